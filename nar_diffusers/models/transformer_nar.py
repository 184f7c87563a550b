"""The NAR transformer: a LlamaGen-style decoder with stacked dimension-oriented decoding heads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.accelerate_utils import apply_forward_hook

from ..schedulers.token_order import TokenOrder, apply_condition_padding, order_kind_for_heads, validate_grid
from ..utils.size_guard import SizeGuardedConfigMixin
from .attention_nar import NARTransformerBlock, swiglu_hidden_size
from .decoding_head import DecodingHead, RowGuidance
from .embeddings import CaptionProjection, rotary_tables
from .kv_cache import NARKVCache, resolve_kv_cache_dtype
from .transformer_config import validate_transformer_config
from .packed_rows import PackedRows

logger = logging.get_logger(__name__)


@dataclass
class NARTransformerOutput(BaseOutput):
    """Output of a teacher-forced forward pass.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, *grid, vocab_size)`, float32):
            Logits of every grid token, mixed over its parents' heads (the origin from the condition).
        loss (`torch.Tensor`, *optional*): mean cross-entropy over all tokens, when `labels` is given.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class NARTransformer(SizeGuardedConfigMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""Autoregressive transformer over a grid of VQ tokens with one decoding head per grid axis.

    The network only: condition embedding (a class label or a caption), token embedding, `num_layers`
    LlamaGen blocks, then the stacked heads. Head `k` reads the hidden state after `num_layers + k` blocks
    (each head beyond the first adds one block), has its own RMSNorm and vocabulary projection, and at
    token `p` predicts the token one step further along grid axis `ndim - 1 - k`. With one head the model is
    a vanilla raster-order AR model (LlamaGen).

    Entry points: `forward` (teacher-forced training, mixed logits + loss), `init_kv_cache` + `prefill` +
    `decode` (inference, per-head logits; like `forward`, they trigger accelerate's offload hooks, so
    `enable_model_cpu_offload` works). Sampling and the token order belong to the schedulers.

    Args:
        vocab_size: number of VQ codebook entries.
        hidden_size, num_layers, num_attention_heads, num_key_value_heads: transformer sizes
            (`num_key_value_heads=None` means as many as attention heads).
        ffn_dim_multiplier, ffn_multiple_of: SwiGLU width = int(8 * hidden / 3), times the multiplier,
            rounded up to a multiple of `ffn_multiple_of` (256 in the published models).
        norm_eps: RMSNorm epsilon. rope_theta: rotary base.
        position_embedding_type: "rope" (N-D rotary) or "learned" (absolute table over condition slots and
            the raster positions of `grid_size`).
        grid_size: the largest token grid the model serves, `(H, W)` or `(T, H, W)`.
        num_decoding_heads: 1 (raster / LlamaGen) or `len(grid_size)` (NAR).
        num_classes: class-conditional models (a null class `num_classes` is added for guidance).
        caption_dim: text-conditional models: width of the caption embeddings (2048 for flan-t5-xl).
        num_condition_tokens: condition length: 1 for class models, the caption length (120) for text.
        class_dropout_prob: probability, in training, of replacing the condition by the unconditional one.
        token_dropout, attention_dropout, residual_dropout, ffn_dropout: dropout rates.
        initializer_range: std of the normal initialisation.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["NARTransformerBlock"]

    _repeated_blocks = ["NARTransformerBlock"]  # `compile_repeated_blocks()` compiles each block once

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 16384,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        ffn_dim_multiplier: float | None = None,
        ffn_multiple_of: int = 256,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        position_embedding_type: str = "rope",
        grid_size: tuple[int, ...] = (16, 16),
        num_decoding_heads: int = 2,
        num_classes: int | None = 1000,
        caption_dim: int | None = None,
        num_condition_tokens: int = 1,
        class_dropout_prob: float = 0.1,
        token_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        residual_dropout: float = 0.0,
        ffn_dropout: float = 0.0,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        grid_size = validate_grid(grid_size)
        num_key_value_heads = num_key_value_heads or num_attention_heads
        validate_transformer_config(
            hidden_size, num_attention_heads, num_key_value_heads, position_embedding_type, grid_size,
            num_decoding_heads, num_classes, caption_dim, num_condition_tokens,
        )
        self.head_dim = hidden_size // num_attention_heads
        self.num_kv_heads = num_key_value_heads
        self.grid_size = grid_size
        self.gradient_checkpointing = False

        if num_classes is not None:
            self.class_embedding = nn.Embedding(num_classes + 1, hidden_size)
        else:
            self.caption_projection = CaptionProjection(caption_dim, hidden_size, num_condition_tokens)
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        if position_embedding_type == "learned":
            self.position_embedding = nn.Parameter(torch.zeros(1, num_condition_tokens + math.prod(grid_size), hidden_size))
        self.embedding_dropout = nn.Dropout(token_dropout)

        intermediate_size = swiglu_hidden_size(hidden_size, ffn_dim_multiplier, ffn_multiple_of)
        self.blocks = nn.ModuleList(
            NARTransformerBlock(
                hidden_size, num_attention_heads, num_key_value_heads, intermediate_size, norm_eps,
                attention_dropout, residual_dropout, ffn_dropout,
            )
            for _ in range(num_layers + num_decoding_heads - 1)
        )
        self.heads = nn.ModuleList(DecodingHead(hidden_size, vocab_size, norm_eps) for _ in range(num_decoding_heads))
        self._token_orders: dict = {}
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if module is self and self.config.position_embedding_type == "learned":
            nn.init.normal_(self.position_embedding, mean=0.0, std=std)

    # --- shared pieces ------------------------------------------------------------------------------

    @property
    def condition_type(self) -> str:
        """"class" or "text"."""
        return "class" if self.config.num_classes is not None else "text"

    @property
    def num_condition_tokens(self) -> int:
        return self.config.num_condition_tokens

    def token_order(self, grid_shape: tuple[int, ...], device: torch.device | None = None) -> TokenOrder:
        """The order this model is trained in: neighbour planes for NAR heads, raster for a single head."""
        device = torch.device(device or self.device)
        key = (tuple(grid_shape), device)
        if key not in self._token_orders:
            kind = order_kind_for_heads(self.config.num_decoding_heads)
            self._token_orders[key] = TokenOrder(tuple(grid_shape), kind, device=device)
        return self._token_orders[key]

    def check_grid(self, grid_shape: tuple[int, ...], name: str = "grid") -> None:
        """Raise a ValueError unless `grid_shape` has the model's rank and fits in its `grid_size`."""
        if len(grid_shape) != len(self.grid_size) or any(g > m for g, m in zip(grid_shape, self.grid_size)):
            raise ValueError(
                f"The token {name} {tuple(grid_shape)} must have rank {len(self.grid_size)} and fit in the "
                f"model's grid_size {self.grid_size}."
            )

    def null_condition(self, batch_size: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The unconditional input for classifier-free guidance, as keyword arguments of `prefill`."""
        device = device or self.device
        if self.condition_type == "class":
            return {"class_labels": torch.full((batch_size,), self.config.num_classes, dtype=torch.long, device=device)}
        uncond = self.caption_projection.uncond_embedding
        return {"encoder_hidden_states": uncond[None].expand(batch_size, -1, -1).to(device)}

    def _embed_condition(
        self, class_labels: torch.LongTensor | None, encoder_hidden_states: torch.Tensor | None, drop: bool
    ) -> torch.Tensor:
        """`(batch, num_condition_tokens, hidden)`; with `drop`, conditions are replaced by the null one at
        rate `class_dropout_prob` (classifier-free guidance training)."""
        prob = self.config.class_dropout_prob if drop else 0.0
        if self.condition_type == "class":
            if class_labels is None or encoder_hidden_states is not None:
                raise ValueError("This is a class-conditional model: pass `class_labels`, not `encoder_hidden_states`.")
            if prob > 0:
                dropped = torch.rand(class_labels.shape, device=class_labels.device) < prob
                class_labels = torch.where(dropped, self.config.num_classes, class_labels)
            return self.class_embedding(class_labels)[:, None]
        if encoder_hidden_states is None or class_labels is not None:
            raise ValueError("This is a text-conditional model: pass `encoder_hidden_states`, not `class_labels`.")
        expected = (self.num_condition_tokens, self.config.caption_dim)
        if tuple(encoder_hidden_states.shape[1:]) != expected:
            raise ValueError(
                f"`encoder_hidden_states` must have shape (batch, {expected[0]}, {expected[1]}), "
                f"got {tuple(encoder_hidden_states.shape)}."
            )
        caption = encoder_hidden_states.to(self.dtype)
        if prob > 0:
            dropped = torch.rand(caption.shape[0], device=caption.device) < prob
            uncond = self.caption_projection.uncond_embedding.to(caption.dtype)
            caption = torch.where(dropped[:, None, None], uncond[None], caption)
        return self.caption_projection(caption)

    def _position_info(self, coordinates: torch.LongTensor) -> tuple[tuple | None, torch.LongTensor | None]:
        """Rotary tables or learned-table indices for the sequence `[condition, tokens at coordinates]`."""
        num_cond = self.num_condition_tokens
        if self.config.position_embedding_type == "rope":
            return rotary_tables(coordinates, self.head_dim, self.config.rope_theta, num_cond), None
        strides = torch.tensor(
            [math.prod(self.grid_size[axis + 1 :]) for axis in range(len(self.grid_size))], device=coordinates.device
        )
        token_ids = num_cond + (coordinates * strides).sum(-1)
        return None, torch.cat([torch.arange(num_cond, device=coordinates.device), token_ids])

    def _run_blocks(
        self,
        embeds: torch.Tensor,
        rope,
        mask,
        cache: NARKVCache | None = None,
        start: int | torch.LongTensor = 0,
        position_ids: torch.LongTensor | None = None,
    ) -> list[torch.Tensor]:
        """The one call into the block stack of every entry point (training forward, prefill, decode, static step).

        Adds token dropout and learned positions to `embeds` (dropout first: the published video model's order),
        runs the trunk and the head blocks, and returns the hidden states each head reads. With a cache, the new
        keys/values go to the slots from `start` on (an int) or to the slots `start` (a tensor)."""
        h = self.embedding_dropout(embeds)
        if position_ids is not None:
            h = h + self.position_embedding[0, position_ids]
        num_layers = self.config.num_layers
        head_inputs = []
        for index, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layer(index)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(block, h, rope, mask, layer_cache, start)
            else:
                h = block(h, rope, mask, layer_cache, start)
            if index >= num_layers - 1:
                head_inputs.append(h)
        return head_inputs

    def _head_logits(
        self,
        head_inputs: list[torch.Tensor],
        head_positions: torch.LongTensor | None = None,
        guidance_scale: float | None = None,
        guided: bool | torch.Tensor = True,
        row_guidance: RowGuidance | None = None,
    ) -> torch.Tensor:
        """`(batch, num_heads, seq, vocab)` float32 logits, head k applied to `head_inputs[k]` (only at the sequence
        positions `head_positions[k]` when given: `(batch, num_heads, m, vocab)`).

        With `guidance_scale`, the batch is `[conditional rows; unconditional rows]` and the result is the guided
        logits of the conditional half, `(batch // 2, ...)` (`DecodingHead.guided_logits`; where `guided` is False,
        the conditional logits alone). With `row_guidance`, the logits of its `cond_rows`, each guided as it says.
        """
        logits = []
        for k, (head, h) in enumerate(zip(self.heads, head_inputs)):
            if head_positions is not None:
                h = h.index_select(1, head_positions[k])
            if row_guidance is not None:
                logits.append(head.row_guided_logits(h, row_guidance))
            elif guidance_scale is None:
                logits.append(head(h))
            else:
                logits.append(head.guided_logits(*h.chunk(2), guidance_scale, guided))
        return torch.stack(logits, dim=1)

    # --- training ----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor,
        class_labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool = True,
    ) -> NARTransformerOutput | tuple:
        """Teacher-forced pass over a whole token grid.

        Args:
            input_ids: `(batch, *grid)` token grid in raster layout.
            class_labels: `(batch,)` class indices (class models).
            encoder_hidden_states: `(batch, num_condition_tokens, caption_dim)` left-padded caption embeddings
                (text models); `encoder_attention_mask` `(batch, num_condition_tokens)`, 1 = valid token.
            labels: `(batch, *grid)` targets (usually `input_ids`); gives the mean cross-entropy `loss`.

        Returns:
            `NARTransformerOutput` with `logits` `(batch, *grid, vocab)` mixed by the parents rule.
        """
        grid = tuple(input_ids.shape[1:])
        self.check_grid(grid, "grid of `input_ids`")
        order = self.token_order(grid, input_ids.device)
        cond = self._embed_condition(class_labels, encoder_hidden_states, drop=self.training)
        fed_positions = order.generation_order[: order.num_fed_tokens]
        fed = self.token_embedding(input_ids.flatten(1)[:, fed_positions])
        rope, position_ids = self._position_info(order.coordinates[: order.num_fed_tokens])
        mask = order.training_attention_mask(self.num_condition_tokens, encoder_attention_mask)
        head_inputs = self._run_blocks(torch.cat([cond, fed], dim=1), rope, mask, position_ids=position_ids)
        # Sources: the last condition position, then every fed token.
        sources = [x[:, self.num_condition_tokens - 1 :] for x in head_inputs]
        logits = order.mix_head_logits(self._head_logits(sources))
        loss = None
        if labels is not None:
            targets = labels.flatten(1)[:, order.generation_order]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        logits = logits[:, order.inverse_generation_order].view(*input_ids.shape, -1)
        if not return_dict:
            return (logits, loss)
        return NARTransformerOutput(logits=logits, loss=loss)

    # --- inference ---------------------------------------------------------------------------------

    def init_kv_cache(
        self,
        batch_size: int,
        coordinates: torch.LongTensor,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        num_spare_slots: int = 0,
    ) -> NARKVCache:
        """Allocate the cache for one generation: the condition plus the tokens at `coordinates`.

        Args:
            coordinates: `(n, ndim)` grid coordinates of every token that will be fed, in feeding order
                (`scheduler.coordinates[: scheduler.num_fed_tokens]`).
            dtype: the storage dtype (`resolve_kv_cache_dtype`): None = the model dtype; float32, bfloat16, float16,
                or float8_e4m3fn (with a scale per row, head and slot); attention reads it back in the model dtype.
            num_spare_slots: extra slots for the padded tokens of `decode_static` (its group size).
        """
        device = torch.device(device or self.device)
        rope, position_ids = self._position_info(coordinates.to(device))
        return NARKVCache(
            num_blocks=len(self.blocks),
            batch_size=batch_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_length=self.num_condition_tokens + coordinates.shape[0],
            dtype=resolve_kv_cache_dtype(dtype, self.dtype),
            device=device,
            rope=rope,
            position_ids=position_ids,
            num_spare_slots=num_spare_slots,
            compute_dtype=self.dtype,
        )

    @apply_forward_hook
    def prefill(
        self,
        kv_cache: NARKVCache,
        class_labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        guided: bool = True,
        row_guidance: RowGuidance | None = None,
    ) -> torch.Tensor:
        """Run the condition into an empty cache; returns `(batch, num_heads, 1, vocab)` per-head logits at the
        last condition position (their mean predicts the origin token).

        With `guidance_scale` (classifier-free guidance; the batch holds the conditional then the unconditional
        conditions), the logits are the guided ones of the conditional half, `(batch // 2, num_heads, 1, vocab)`,
        or its plain logits where `guided` is False; with `row_guidance`, those of its rows (see `_head_logits`).
        """
        if kv_cache.length != 0:
            raise ValueError("`prefill` needs an empty KV cache; allocate one per generation with `init_kv_cache`.")
        num_cond = self.num_condition_tokens
        cond = self._embed_condition(class_labels, encoder_hidden_states, drop=False)
        if cond.shape[0] != kv_cache.batch_size:
            raise ValueError(f"The condition batch {cond.shape[0]} does not match the KV cache batch {kv_cache.batch_size}.")
        mask = None
        if num_cond > 1:
            mask = torch.ones(num_cond, num_cond, dtype=torch.bool, device=cond.device).tril()[None, None]
        if encoder_attention_mask is not None:
            mask = apply_condition_padding(mask, encoder_attention_mask)
            key_mask = torch.ones(kv_cache.batch_size, kv_cache.capacity, dtype=torch.bool, device=cond.device)
            key_mask[:, :num_cond] = encoder_attention_mask.to(device=cond.device, dtype=torch.bool)
            kv_cache.key_mask = key_mask[:, None, None, :]
        position_ids = None if kv_cache.position_ids is None else kv_cache.position_ids[:num_cond]
        head_inputs = self._run_blocks(cond, kv_cache.rope_slice(0, num_cond), mask, kv_cache, 0, position_ids)
        kv_cache.length = num_cond
        return self._head_logits([x[:, -1:] for x in head_inputs], None, guidance_scale, guided, row_guidance)

    @apply_forward_hook
    def decode(
        self,
        kv_cache: NARKVCache,
        input_ids: torch.LongTensor,
        head_positions: torch.LongTensor | None = None,
        guidance_scale: float | None = None,
        guided: bool = True,
    ) -> torch.Tensor:
        """Feed the next group of tokens `(batch, n)`; returns `(batch, num_heads, n, vocab)` per-head logits.

        The tokens occupy the next `n` cache slots, whose positions were fixed by `init_kv_cache`. Every
        query reads the whole filled prefix: in generation order the proximity mask needs nothing more.

        Args:
            head_positions: `(num_heads, m)` indices into the `n` fed tokens: head `k` is evaluated only at
                `head_positions[k]` and the result is `(batch, num_heads, m, vocab)` (`scheduler.head_positions(step)`
                names the tokens whose logits some target reads).
            guidance_scale, guided: classifier-free guidance, as in `prefill`: the result is the guided logits of
                the conditional half of the batch.
        """
        start = kv_cache.reserve(input_ids.shape[1])
        end = start + input_ids.shape[1]
        position_ids = None if kv_cache.position_ids is None else kv_cache.position_ids[start:end]
        rope = kv_cache.rope_slice(start, end)
        embeds = self.token_embedding(input_ids)
        head_inputs = self._run_blocks(embeds, rope, kv_cache.decode_mask(end), kv_cache, start, position_ids)
        kv_cache.length = end
        return self._head_logits(head_inputs, head_positions, guidance_scale, guided)

    def decode_static(
        self,
        kv_cache: NARKVCache,
        input_ids: torch.LongTensor,
        slots: torch.LongTensor,
        key_mask: torch.BoolTensor,
        head_positions: torch.LongTensor,
        guidance_scale: float | None = None,
        guided: bool | torch.Tensor = True,
    ) -> torch.Tensor:
        """One decode step whose shapes are the same at every step of a generation (for `torch.compile` and CUDA
        graphs): no Python-side positions, no slicing by the cache length, no host sync.

        Args:
            input_ids: `(batch, G)` tokens, padded to the largest group.
            slots: `(G,)` cache slots the tokens are written to (padding: the cache's spare slots); their position
                information is gathered from the cache's tables.
            key_mask: `(batch or 1, 1, 1, kv_cache.capacity)` True for the keys every query may read (the filled
                slots, written ones of this step included; never a spare slot).
            head_positions: `(num_heads, M)` indices into the `G` tokens each head is evaluated at.
            guidance_scale, guided: classifier-free guidance as in `prefill`; `guided` may be a bool tensor (one
                graph for guided and unguided steps).


        Returns:
            `(batch, num_heads, M, vocab)` float32 logits (`batch // 2` with guidance). `kv_cache.length` is not
            updated (the caller tracks it).
        """
        position_ids = None if kv_cache.position_ids is None else kv_cache.position_ids[slots]
        rope = None if kv_cache.rope is None else (kv_cache.rope[0][slots], kv_cache.rope[1][slots])
        head_inputs = self._run_blocks(self.token_embedding(input_ids), rope, key_mask, kv_cache, slots, position_ids)
        return self._head_logits(head_inputs, head_positions, guidance_scale, guided)

    def decode_packed(
        self,
        kv_cache: NARKVCache,
        embeds: torch.Tensor,
        packed: PackedRows,
        attention_mask: torch.BoolTensor | None,
        head_guidance: list[RowGuidance],
    ) -> list[torch.Tensor]:
        """One forward pass over cache rows that are each at their own step (the serving engine): a row may prefill
        its condition (`embed_condition`) while the others feed their next group of tokens (`token_embedding`).

        Args:
            embeds: `(1, tokens, hidden)` the input embeddings of every row, packed (`PackedRows`: their rows, and
                the cache slots they are written to; their positions are gathered from the cache's tables).
            attention_mask: `(rows, 1, width, capacity)` per row and query, the cache slots it may read (None when
                no attention group of `packed` is masked).
            head_guidance: per head, where it is evaluated: `cond_rows` and `uncond_rows` index the packed tokens
                (every output's positions for that head, and their unconditional twins), guided as it says.

        Returns:
            Per head, `(positions, vocab)` float32 logits at its `cond_rows`. `kv_cache.length` is not updated.
        """
        position_ids = None if kv_cache.position_ids is None else kv_cache.position_ids[packed.slots]
        rope = None if kv_cache.rope is None else (kv_cache.rope[0][packed.slots], kv_cache.rope[1][packed.slots])
        head_inputs = self._run_blocks(embeds, rope, attention_mask, kv_cache, packed, position_ids)
        return [head.row_guided_logits(h[0], guidance) for head, h, guidance in zip(self.heads, head_inputs, head_guidance)]

    def embed_condition(
        self, class_labels: torch.LongTensor | None = None, encoder_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(batch, num_condition_tokens, hidden)` condition embeddings, as `prefill` feeds them (no dropout)."""
        return self._embed_condition(class_labels, encoder_hidden_states, drop=False)
