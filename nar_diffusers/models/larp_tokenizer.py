"""LARP: the holistic video tokenizer of the published NAR video models (Wang et al. 2024, arXiv 2410.21264).

A clip `(B, 3, F, H, W)` in [0, 1] is cut into 3-D patches; a ViT encoder reads the patches together with learned
"holistic" query tokens, and each query output is quantised to the nearest entry of an l2-normalised codebook. The
decoder reads the quantised tokens together with fixed patch queries and predicts the pixels of every patch. The
NAR video model treats the token sequence as a `(T, h, w)` grid, its `latent_shape` (`latent_grid` here; by default
the patch grid `(F / temporal_patch_size, H / patch_size, W / patch_size)`), by a plain reshape: token `i` is cell
`(i // (h * w), (i // w) % h, i % w)`. The tokens have no native grid, so only their count is fixed.

Parameter and buffer names follow the published checkpoints, so converted weights load without renaming. The
training-only prior model is not part of this port.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..utils.size_guard import SizeGuardedConfigMixin


def sincos_1d(dim: int, positions: np.ndarray, scale: float = 10000.0) -> np.ndarray:
    """`(len(positions), dim)`: all sines, then all cosines, of `positions * scale ** (-k / (dim / 2))`."""
    if dim % 2:
        raise ValueError(f"A sine-cosine embedding needs an even width, got {dim}.")
    omega = scale ** (-np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.asarray(positions, dtype=np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_3d(dim: int, grid: tuple[int, int, int], scale: float = 10000.0) -> np.ndarray:
    """`(t * h * w, dim)`, t-major: the 2-D embedding of `(row, column)` (first half: the column, second half: the
    row) plus the 1-D embedding of the frame index over the full width."""
    if dim % 4:
        raise ValueError(f"A 3-D sine-cosine embedding needs a width divisible by 4, got {dim}.")
    frames, rows, columns = grid
    t, h, w = np.meshgrid(np.arange(frames), np.arange(rows), np.arange(columns), indexing="ij")
    spatial = np.concatenate([sincos_1d(dim // 2, w, scale), sincos_1d(dim // 2, h, scale)], axis=1)
    return spatial + sincos_1d(dim, t, scale)


def _table(shape: tuple[int, ...], values) -> torch.Tensor:
    """A fixed position table of `shape` from `values()` (a NumPy array); built on the meta device (sizes only,
    nothing computed) when the model is, so a size check never allocates the tables."""
    if torch.empty(0).device.type == "meta":
        return torch.empty(shape)
    return torch.from_numpy(values()).float().reshape(shape)


def _latent_grid(
    latent_grid: tuple[int, int, int] | None, patch_grid: tuple[int, int, int], num_latent_tokens: int
) -> tuple[int, int, int]:
    """The grid the holistic tokens are read as: `latent_grid`, else the patch grid; its cells must number
    `num_latent_tokens`."""
    if latent_grid is not None and (
        len(latent_grid) != 3 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in latent_grid)
    ):
        raise ValueError(f"`latent_grid` must be three positive ints (T, h, w), got {latent_grid!r}.")
    grid = tuple(latent_grid) if latent_grid is not None else patch_grid
    if num_latent_tokens != math.prod(grid):
        source = "`latent_grid`" if latent_grid is not None else "the patch grid (give `latent_grid` otherwise)"
        raise ValueError(
            f"`num_latent_tokens` {num_latent_tokens} must equal the {grid[0]}x{grid[1]}x{grid[2]} = "
            f"{math.prod(grid)} cells of {source}, the token grid the NAR video models generate."
        )
    return grid


class LARPAttention(nn.Module):
    """Multi-head self-attention with a fused, bias-free `qkv` projection (rows q | k | v, head-major)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class LARPMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LARPBlock(nn.Module):
    """Pre-norm ViT block: `x + proj(attn(LN(x)))`, then `x + fc2(GELU(fc1(LN(x))))` (exact GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = LARPAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = LARPMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LARPStack(nn.Module):
    """Blocks over `[context; queries]` with full bidirectional attention; returns the query outputs."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(LARPBlock(dim, num_heads, mlp_ratio, eps) for _ in range(depth))

    def forward(self, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        x = torch.cat([context, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return x[:, context.shape[1] :]


class LARPPatchEmbed(nn.Module):
    """Non-overlapping 3-D patches -> tokens, t-major: `(B, C, F, H, W) -> (B, t * h * w, dim)`."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.proj(video).flatten(2).transpose(1, 2)


class LARPBottleneck(nn.Module):
    """Projection to the code space (`in_linear`), the codebook (`regularizer.embedding`, stored raw and
    l2-normalised at use), and the projection back (`out_linear`)."""

    def __init__(self, dim: int, code_dim: int, codebook_size: int):
        super().__init__()
        self.in_linear = nn.Linear(dim, code_dim)
        self.regularizer = nn.Module()
        self.regularizer.embedding = nn.Embedding(codebook_size, code_dim)
        self.out_linear = nn.Linear(code_dim, dim)

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.regularizer.embedding.weight.float(), dim=-1)


class LARPFinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=eps)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class LARPTokenizer(SizeGuardedConfigMixin, ModelMixin, ConfigMixin):
    r"""The LARP video tokenizer: clips in [0, 1] <-> token ids on a `(T, h, w)` grid (LARP-L-long: 16 x 128 x 128
    pixels <-> 4 x 16 x 16 = 1024 tokens from a codebook of 8192).

    It implements the video-tokenizer interface `NARVideoPipeline` uses (`token_grid`, `encode_video`,
    `decode_video`, `pixel_range`, `temporal_compression`, `spatial_compression`, `vocab_size`), so a pipeline
    takes it in place of a frame-wise `VQModel`.

    Args:
        num_frames, sample_size: The clip the model reads and writes (frames, square side in pixels).
        in_channels: Colour channels.
        temporal_patch_size, patch_size: Patch extent in frames and pixels; the token grid is
            `(num_frames / temporal_patch_size, sample_size / patch_size, sample_size / patch_size)`.
        hidden_size, num_attention_heads, mlp_ratio: Width, heads and MLP expansion of both ViT stacks.
        num_encoder_layers, num_decoder_layers: Depths of the two stacks.
        num_latent_tokens: Holistic tokens per clip; must equal the cells of the token grid.
        codebook_size, codebook_dim: The l2-normalised codebook.
        stochastic_temperature: Temperature of the stochastic code draw (`encode(..., deterministic=False)`).
        layer_norm_eps: LayerNorm epsilon inside the blocks (1e-5, as the published weights were trained).
        final_layer_norm_eps: LayerNorm epsilon of the output layer (1e-6).
        pe_scale: Base of the sine-cosine position embeddings.
        latent_grid: The `(T, h, w)` grid the NAR video model reads the holistic tokens as (its `latent_shape`);
            None: the patch grid. Only the token count is fixed by the tokenizer.
    """

    @register_to_config
    def __init__(
        self,
        num_frames: int = 16,
        sample_size: int = 128,
        in_channels: int = 3,
        temporal_patch_size: int = 4,
        patch_size: int = 8,
        hidden_size: int = 768,
        num_attention_heads: int = 12,
        num_encoder_layers: int = 12,
        num_decoder_layers: int = 12,
        mlp_ratio: float = 4.0,
        num_latent_tokens: int = 1024,
        codebook_size: int = 8192,
        codebook_dim: int = 16,
        stochastic_temperature: float = 0.03,
        layer_norm_eps: float = 1e-5,
        final_layer_norm_eps: float = 1e-6,
        pe_scale: float = 10000.0,
        latent_grid: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        if num_frames % temporal_patch_size or sample_size % patch_size:
            raise ValueError(
                f"`num_frames` {num_frames} must be a multiple of `temporal_patch_size` {temporal_patch_size} and "
                f"`sample_size` {sample_size} a multiple of `patch_size` {patch_size}."
            )
        self.patch_grid = (num_frames // temporal_patch_size, sample_size // patch_size, sample_size // patch_size)
        self.grid = _latent_grid(latent_grid, self.patch_grid, num_latent_tokens)
        if hidden_size % num_attention_heads or hidden_size % 4:
            raise ValueError(
                f"`hidden_size` {hidden_size} must be divisible by 4 and by `num_attention_heads` {num_attention_heads}."
            )
        if stochastic_temperature <= 0:
            raise ValueError(f"`stochastic_temperature` must be positive, got {stochastic_temperature}.")
        patch = (temporal_patch_size, patch_size, patch_size)

        def stack(depth: int) -> LARPStack:
            return LARPStack(depth, hidden_size, num_attention_heads, mlp_ratio, layer_norm_eps)

        self.x_embedder = LARPPatchEmbed(in_channels, hidden_size, patch)
        self.encoder_latent_query_embed = nn.Parameter(torch.zeros(num_latent_tokens, hidden_size))
        self.encoder = stack(num_encoder_layers)
        self.bottleneck = LARPBottleneck(hidden_size, codebook_dim, codebook_size)
        self.decoder_patch_query_token_type_embed = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.decoder = stack(num_decoder_layers)
        self.final_layer = LARPFinalLayer(hidden_size, math.prod(patch) * in_channels, final_layer_norm_eps)

        num_patches = math.prod(self.patch_grid)
        patch_pe = _table((1, num_patches, hidden_size), lambda: sincos_3d(hidden_size, self.patch_grid, pe_scale))
        self.register_buffer("encoder_patch_pe", patch_pe.clone())
        self.register_buffer("decoder_patch_query_embed", patch_pe.clone())
        latent_pe = _table(
            (1, num_latent_tokens, hidden_size), lambda: sincos_1d(hidden_size, np.arange(num_latent_tokens), pe_scale)
        )
        self.register_buffer("decoder_latent_pe", latent_pe)
        nn.init.normal_(self.encoder_latent_query_embed, std=0.02)
        nn.init.normal_(self.decoder_patch_query_token_type_embed, std=0.02)

    def set_latent_grid(self, latent_grid: tuple[int, int, int]) -> None:
        """Read the holistic tokens as the `(T, h, w)` grid `latent_grid` (the AR model's `latent_shape`); its
        cells must number `num_latent_tokens`. Stored in the config, so a saved tokenizer keeps it."""
        self.grid = _latent_grid(latent_grid, self.patch_grid, self.config.num_latent_tokens)
        self.register_to_config(latent_grid=list(self.grid))

    # --- the video-tokenizer interface ---------------------------------------------------------------------

    pixel_range: tuple[float, float] = (0.0, 1.0)
    # Holistic: every token is read from (and decodes into) the whole clip, so a clip's first frames are not the
    # first token time steps of its grid, and video continuation from given frames is not possible.
    supports_frame_prefix: bool = False

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_patch_size

    @property
    def spatial_compression(self) -> int:
        return self.config.patch_size

    @property
    def clip_size(self) -> tuple[int, int, int]:
        """`(num_frames, height, width)`: the one clip size LARP reads and writes. With a `latent_grid` other than
        the patch grid, it is not the token grid times the compressions."""
        return self.config.num_frames, self.config.sample_size, self.config.sample_size

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The `(T, h, w)` token grid of a clip; LARP reads and writes clips of exactly one size."""
        config = self.config
        expected = {"num_frames": config.num_frames, "height": config.sample_size, "width": config.sample_size}
        for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
            if value != expected[name]:
                raise ValueError(
                    f"`{name}` must be {expected[name]} for this LARP tokenizer (it reads and writes "
                    f"{config.num_frames} x {config.sample_size} x {config.sample_size} clips), got {value}."
                )
        return self.grid

    def encode_video(self, video: torch.Tensor) -> torch.LongTensor:
        """`(B, C, F, H, W)` in [0, 1] -> the `(B, T, h, w)` grid of nearest-code ids."""
        return self.encode(video).view(video.shape[0], *self.grid)

    def decode_video(self, tokens: torch.LongTensor) -> torch.Tensor:
        """Token ids, `(B, T, h, w)` or flat -> `(B, C, F, H, W)`, about [0, 1] (not clamped)."""
        return self._decode(tokens)

    # --- encode / decode ------------------------------------------------------------------------------------

    def _check_video(self, video: torch.Tensor) -> None:
        config = self.config
        expected = (config.in_channels, config.num_frames, config.sample_size, config.sample_size)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"`video` must have shape (batch, {', '.join(map(str, expected))}) = (batch, channels, frames, "
                f"height, width), got {tuple(video.shape)}."
            )

    def _flat_ids(self, ids: torch.Tensor) -> torch.LongTensor:
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"Token ids must be integers, got {ids.dtype}.")
        if ids.ndim == 4 and tuple(ids.shape[1:]) == self.grid:
            ids = ids.flatten(1)
        if ids.ndim != 2 or ids.shape[1] != self.config.num_latent_tokens:
            raise ValueError(
                f"Token ids must have shape (batch, {self.config.num_latent_tokens}) or (batch, "
                f"{', '.join(map(str, self.grid))}), got {tuple(ids.shape)}."
            )
        return ids.long()

    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, deterministic: bool = True, generator: torch.Generator | None = None
    ) -> torch.LongTensor:
        """Encode clips to token ids `(B, num_latent_tokens)`.

        Args:
            video: `(B, C, F, H, W)` in [0, 1].
            deterministic: Take the nearest l2-normalised code (as the published AR training data was made). With
                False, draw each code from `softmax(cosine similarity / stochastic_temperature)`.
            generator: Seeds the stochastic draw.
        """
        self._check_video(video)
        patches = self.x_embedder(video.to(self.dtype)) + self.encoder_patch_pe.to(self.dtype)
        queries = self.encoder_latent_query_embed.to(self.dtype)[None].expand(video.shape[0], -1, -1)
        latents = self.bottleneck.in_linear(self.encoder(patches, queries))
        similarity = F.normalize(latents.float(), dim=-1) @ self.bottleneck.normalized_codebook().T
        if deterministic:
            return similarity.argmax(dim=-1)
        probs = torch.softmax(similarity / self.config.stochastic_temperature, dim=-1)
        draws = torch.multinomial(probs.flatten(0, 1), 1, generator=generator)
        return draws.view(similarity.shape[:2])

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids, `(B, num_latent_tokens)` or `(B, T, h, w)` -> clips `(B, C, F, H, W)` clamped to [0, 1]."""
        return self._decode(ids).clamp(0.0, 1.0)

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._flat_ids(ids).to(self.device)
        codes = F.normalize(self.bottleneck.regularizer.embedding(ids), dim=-1)
        latents = self.bottleneck.out_linear(codes) + self.decoder_latent_pe.to(self.dtype)
        queries = self.decoder_patch_query_embed + self.decoder_patch_query_token_type_embed
        queries = queries.to(self.dtype).expand(ids.shape[0], -1, -1)
        patches = self.final_layer(self.decoder(latents, queries))
        return self._unpatchify(patches)

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """`(B, t*h*w, pt*p*p*C)`, each patch's values laid out `(pt, p, p, C)` -> `(B, C, t*pt, h*p, w*p)`."""
        config = self.config
        t, h, w = self.patch_grid
        pt, p, c = config.temporal_patch_size, config.patch_size, config.in_channels
        x = patches.view(patches.shape[0], t, h, w, pt, p, p, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(patches.shape[0], c, t * pt, h * p, w * p)
