"""The VQ token codec: images <-> token grids with a diffusers `VQModel` (the published NAR / LlamaGen tokenizer is
one, after conversion)."""

from __future__ import annotations

import contextlib
import os

import torch
from diffusers import VQModel


def vq_downsample_factor(vqvae: VQModel) -> int:
    """Pixels per token along each side of a diffusers `VQModel`: `2 ** (len(block_out_channels) - 1)`."""
    return 2 ** (len(vqvae.config.block_out_channels) - 1)


def check_codebook_lookup(vqvae: VQModel, where: str = "The VQ model") -> None:
    """Raise unless the `VQModel` can decode token ids (`lookup_from_codebook=True`)."""
    if not vqvae.config.lookup_from_codebook:
        raise ValueError(f"{where} needs `lookup_from_codebook=True` in its config to decode token ids.")


@torch.no_grad()
def encode_images_to_tokens(vqvae: VQModel, pixels: torch.Tensor) -> torch.LongTensor:
    """Encode images to the grid of their nearest codebook indices.

    Args:
        vqvae: A diffusers `VQModel`.
        pixels: Images (B, C, H, W) in [-1, 1]; H and W must be multiples of the downsample factor.

    Returns:
        Token ids, LongTensor (B, H / f, W / f) on `pixels`' device, in raster order when flattened.
    """
    if pixels.ndim != 4:
        raise ValueError(f"`pixels` must have shape (batch, channels, height, width), got {tuple(pixels.shape)}.")
    factor = vq_downsample_factor(vqvae)
    batch, channels, height, width = pixels.shape
    if height % factor or width % factor:
        raise ValueError(
            f"Image size {height}x{width} must be a multiple of the VQ downsample factor {factor} "
            f"(2 ** (len(block_out_channels) - 1))."
        )
    if channels != vqvae.config.in_channels:
        raise ValueError(f"`pixels` has {channels} channels but the VQModel expects {vqvae.config.in_channels}.")
    latents = vqvae.encode(pixels.to(device=vqvae.device, dtype=vqvae.dtype)).latents
    # The VQModel's VectorQuantizer returns flat indices (sane_index_shape=False): reshape to the latent grid.
    _, _, (_, _, indices) = vqvae.quantize(latents)
    return indices.reshape(batch, latents.shape[2], latents.shape[3]).long().to(pixels.device)


def decode_tokens_to_images(vqvae: VQModel, tokens: torch.LongTensor) -> torch.Tensor:
    """Decode a (B, h, w) grid of token ids to images (B, C, H, W) in about [-1, 1] (not clamped).

    Needs a `VQModel` created with `lookup_from_codebook=True`.
    """
    check_codebook_lookup(vqvae, "`decode_tokens_to_images`")
    if tokens.ndim != 3:
        raise ValueError(f"`tokens` must have shape (batch, height, width), got {tuple(tokens.shape)}.")
    batch, height, width = tokens.shape
    shape = (batch, height, width, vqvae.quantize.vq_embed_dim)
    return vqvae.decode(tokens.reshape(-1).to(vqvae.device), force_not_quantize=True, shape=shape).sample


@contextlib.contextmanager
def upcast_for_decoding(vqvae: VQModel):
    """Run the block with a float16 `VQModel` upcast to float32 when its config asks (`force_upcast`: fp16 VQ
    decoding can overflow); the model gets its dtype back afterwards, even on errors."""
    upcast = vqvae.dtype == torch.float16 and vqvae.config.force_upcast
    if upcast:
        vqvae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vqvae.to(torch.float16)


def load_vq_model(path: str | os.PathLike, flag: str = "vq_model_path", **kwargs) -> VQModel:
    """A frozen, eval-mode `VQModel` from a diffusers VQModel folder or a pipeline folder (its `vqvae/`).

    Args:
        path: The folder.
        flag: The argument or command-line flag that named `path`, for error messages.
        kwargs: Passed to `VQModel.from_pretrained` (e.g. `dtype`; see `utils.dtypes.dtype_kwargs`).
    """
    if not os.path.isdir(path):
        raise ValueError(f"`{flag}` {str(path)!r} is not a folder holding a diffusers VQModel.")
    subfolder = "vqvae" if os.path.isfile(os.path.join(path, "model_index.json")) else None
    vqvae = VQModel.from_pretrained(path, subfolder=subfolder, **kwargs).eval().requires_grad_(False)
    check_codebook_lookup(vqvae, f"The VQModel in {path}")
    return vqvae
