"""LlamaGen-style transformer block: RMSNorm, grouped-query attention with a fused QKV, SwiGLU."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.utils.import_utils import is_torch_version, is_xformers_available

from .embeddings import apply_rotary
from .kv_cache import KVCacheLayer
from .linear import Linear
from .packed_rows import PackedRows

# PyTorch >= 2.5 attends grouped-query K/V heads natively; older versions get repeated K/V.
SDPA_SUPPORTS_GQA = is_torch_version(">=", "2.5")


def repeat_kv(k: torch.Tensor, v: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat `(batch, kv_heads, seq, head_dim)` keys and values to `num_heads` heads (query head `h` reads KV head
    `h // (num_heads // kv_heads)`)."""
    if k.shape[1] == num_heads:
        return k, v
    repeats = num_heads // k.shape[1]
    return k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps)` computed in float32, cast back to the input dtype, times the weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def swiglu_hidden_size(hidden_size: int, ffn_dim_multiplier: float | None, multiple_of: int) -> int:
    """The published feed-forward width: int(8 * dim / 3), times the multiplier, rounded up to `multiple_of`."""
    width = int(2 * 4 * hidden_size / 3)
    if ffn_dim_multiplier is not None:
        width = int(ffn_dim_multiplier * width)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    """SwiGLU: `w2(silu(w1 x) * w3 x)`, no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = Linear(hidden_size, intermediate_size, bias=False)
        self.w3 = Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class NARAttnProcessor:
    """Attention for `NARAttention`: PyTorch SDPA by default, or any diffusers attention backend.

    Inputs are `(batch, heads, seq, head_dim)` queries and `(batch, kv_heads, seq, head_dim)` keys and values
    (grouped-query attention is SDPA's own, `enable_gqa`, where PyTorch has it: no K/V copies); `mask` is boolean
    (True = may attend) or None. `transformer.set_attention_backend(name)` (diffusers' attention dispatcher) sets
    `_attention_backend`; the calls then go through `diffusers.models.attention_dispatch.dispatch_attention_fn`
    with that backend (xFormers included); `reset_attention_backend()` returns to plain SDPA.
    """

    def __init__(self) -> None:
        self._attention_backend = None
        self._parallel_config = None

    def __call__(self, q, k, v, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
        if self._attention_backend is not None:
            return self._dispatch(q, k, v, mask, dropout_p)
        if k.shape[1] == q.shape[1]:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        if SDPA_SUPPORTS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True)
        k, v = repeat_kv(k, v, q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def _dispatch(self, q, k, v, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        backend = str(getattr(self._attention_backend, "value", self._attention_backend))
        if backend not in NATIVE_BACKENDS:
            # Other backends read masks as additive biases (xFormers also wants every head's K/V).
            k, v = repeat_kv(k, v, q.shape[1])
            if mask is not None:
                bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
                mask = bias.masked_fill_(~mask, float("-inf")).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = dispatch_attention_fn(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p,
            enable_gqa=k.shape[1] != q.shape[1], backend=self._attention_backend,
        )  # fmt: skip
        return out.transpose(1, 2)


# diffusers backends that are PyTorch's SDPA underneath (boolean masks and grouped K/V heads as they are).
NATIVE_BACKENDS = frozenset({"native", "_native_math", "_native_efficient", "_native_flash", "_native_cudnn"})


class NARAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention with a fused QKV projection (rows q, k, v), grouped KV heads and rotary q/k."""

    _default_processor_cls = NARAttnProcessor
    _available_processors = [NARAttnProcessor]

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        attention_dropout: float = 0.0,
        residual_dropout: float = 0.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = Linear(hidden_size, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=False)
        self.out_proj = Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.attention_dropout = attention_dropout
        self.residual_dropout = nn.Dropout(residual_dropout)
        self.processor = NARAttnProcessor()

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Callable | None = None) -> None:
        """Switch between xFormers and PyTorch SDPA (called by `enable_xformers_memory_efficient_attention`); xFormers
        runs through diffusers' attention dispatcher like every other backend (`attention_op` is not used)."""
        if not valid:
            self.processor._attention_backend = None
            return
        if not is_xformers_available():
            raise ModuleNotFoundError("xformers is not installed: `pip install nar-diffusers[xformers]`.")
        if not torch.cuda.is_available():
            raise ValueError("xformers memory-efficient attention needs a CUDA device.")
        from diffusers.models.attention_dispatch import AttentionBackendName

        self.processor._attention_backend = AttentionBackendName.XFORMERS

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCacheLayer | None = None,
        cache_start: int | torch.LongTensor | PackedRows = 0,
    ) -> torch.Tensor:
        """Attend `x` `(batch, seq, dim)`; with `cache` (this block's `KVCacheLayer`), the new keys/values are
        written at `cache_start` and the queries read the whole prefix. With `cache_start` a `(seq,)` tensor of slots
        (the static decode path), the keys/values are written to those slots and the queries read the whole cache
        through `mask`; with `PackedRows`, `x` is `(1, tokens, dim)` holding the tokens of several cache rows, each
        written to and reading its own row. The cache stores them in its own dtype and reads them back in `x`'s."""
        batch, seq_len, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qk, v = self.qkv(x).split([q_size + kv_size, kv_size], dim=-1)
        # Queries and keys are rotated together: one rotary call per block.
        qk = qk.view(batch, seq_len, self.num_heads + self.num_kv_heads, self.head_dim)
        if rope is not None:
            qk = apply_rotary(qk, *rope)
        q, k = qk.transpose(1, 2).split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            cache.write(k, v, cache_start)
            if isinstance(cache_start, PackedRows):
                end = cache_start.key_length  # every row's filled slots lie below it
            else:
                end = None if isinstance(cache_start, torch.Tensor) else cache_start + seq_len
            k, v = cache.read(q.dtype, end)
        if isinstance(cache_start, PackedRows):
            # Tokens of several rows packed in one sequence (the serving engine): each reads its own cache row.
            packed = cache_start
            q = packed.pad(q[0].transpose(0, 1)).transpose(1, 2)
            out = torch.zeros_like(q)
            for first, end, width, key_length, masked in packed.attention_groups or [
                (0, packed.num_rows, packed.width, packed.key_length, True)
            ]:
                rows = slice(first, end)
                out[rows, :, :width] = self.processor(
                    q[rows, :, :width], k[rows, :, :key_length], v[rows, :, :key_length],
                    mask[rows, :, :width, :key_length] if masked else None, 0.0,
                )  # fmt: skip
            out = packed.unpad(out.transpose(1, 2)).reshape(1, seq_len, q_size)
            return self.residual_dropout(self.out_proj(out))
        dropout_p = self.attention_dropout if self.training else 0.0
        out = self.processor(q, k, v, mask, dropout_p)
        out = out.transpose(1, 2).reshape(batch, seq_len, q_size)
        return self.residual_dropout(self.out_proj(out))


class NARTransformerBlock(nn.Module):
    """Pre-norm block: `h = x + attn(norm(x))`, `out = h + ffn(norm(h))`."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        intermediate_size: int,
        norm_eps: float,
        attention_dropout: float = 0.0,
        residual_dropout: float = 0.0,
        ffn_dropout: float = 0.0,
    ):
        super().__init__()
        self.attention_norm = RMSNorm(hidden_size, norm_eps)
        self.attention = NARAttention(hidden_size, num_heads, num_kv_heads, attention_dropout, residual_dropout)
        self.ffn_norm = RMSNorm(hidden_size, norm_eps)
        self.feed_forward = FeedForward(hidden_size, intermediate_size, ffn_dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, cache_start)
        return h + self.feed_forward(self.ffn_norm(h))
