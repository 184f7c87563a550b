"""The video tokenizer interface: clips <-> `(T, h, w)` token grids, whatever model does the work.

`NARVideoPipeline` and the video training code talk to their tokenizer only through this small protocol, so a
frame-wise diffusers `VQModel` (the default, `FrameVQTokenizer`) and a dedicated video tokenizer (the published
LARP, a `ModelMixin` implementing the protocol itself) plug in the same way. An object implements it when it has:

- `temporal_compression: int`: frames per token step along T.
- `spatial_compression: int`: pixels per token along H and W.
- `vocab_size: int`: number of token ids.
- `pixel_range: tuple[float, float]`: the value range it takes as input and decodes to ((-1, 1) for a `VQModel`).
- `token_grid(num_frames, height, width) -> (T, h, w)`: raises a ValueError naming `num_frames` / `height` /
  `width` when a size does not fit.
- `encode_video(video) -> LongTensor (B, T, h, w)`, `video` a float tensor `(B, C, F, H, W)` in `pixel_range`.
- `decode_video(tokens) -> Tensor (B, C, F, H, W)`, floats about `pixel_range` (not clamped).
- `device`, `dtype` (as modules have them).
- optional `supports_frame_prefix: bool` (False when absent): whether token time step `t` encodes exactly frames
  `t * temporal_compression ... (t + 1) * temporal_compression - 1` and nothing else, so the tokens of a clip's first
  frames are the first time steps of the clip's grid. Video continuation (`NARVideoPipeline(video=...)`) needs it: a
  frame-wise `VQModel` has it, a holistic tokenizer (LARP: every token reads the whole clip) does not.

`as_video_tokenizer(module)` returns the module itself when it has the protocol's methods, a `FrameVQTokenizer` for
a `VQModel`, and raises a TypeError otherwise.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import ModelMixin, VQModel

from ..schedulers.sampling import is_int
from .vq_codec import (
    check_codebook_lookup,
    decode_tokens_to_images,
    encode_images_to_tokens,
    load_vq_model,
    upcast_for_decoding,
    vq_downsample_factor,
)

PROTOCOL_METHODS = ("token_grid", "encode_video", "decode_video")
PROTOCOL_ATTRIBUTES = ("temporal_compression", "spatial_compression", "vocab_size", "pixel_range")


@runtime_checkable
class VideoTokenizer(Protocol):
    """What `NARVideoPipeline` needs from a video tokenizer (see the module docstring)."""

    temporal_compression: int
    spatial_compression: int
    vocab_size: int
    pixel_range: tuple[float, float]

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]: ...

    def encode_video(self, video: torch.Tensor) -> torch.LongTensor: ...

    def decode_video(self, tokens: torch.LongTensor) -> torch.Tensor: ...


def check_video_size(
    num_frames: Any, height: Any, width: Any, temporal_compression: int, spatial_compression: int
) -> tuple[int, int, int]:
    """The `(T, h, w)` token grid of a clip, or a ValueError naming the size that does not fit the compression.

    Shared by tokenizers that map `F x H x W` pixels to `F / temporal x H / spatial x W / spatial` tokens.
    """
    for name, value, factor, unit in (
        ("num_frames", num_frames, temporal_compression, "temporal compression (frames per token step)"),
        ("height", height, spatial_compression, "spatial compression (pixels per token)"),
        ("width", width, spatial_compression, "spatial compression (pixels per token)"),
    ):
        if not is_int(value) or value <= 0 or value % factor:
            raise ValueError(f"`{name}` must be a positive multiple of the tokenizer's {unit} {factor}, got {value!r}.")
    return int(num_frames) // temporal_compression, int(height) // spatial_compression, int(width) // spatial_compression


def to_unit_range(video: torch.Tensor, pixel_range: tuple[float, float]) -> torch.Tensor:
    """Map values in `pixel_range` to [0, 1] and clamp (for display and export)."""
    low, high = (float(v) for v in pixel_range)
    return ((video.float() - low) / (high - low)).clamp(0.0, 1.0)


def from_unit_range(video: torch.Tensor, pixel_range: tuple[float, float]) -> torch.Tensor:
    """Map values in [0, 1] to `pixel_range` (the inverse of `to_unit_range` on [0, 1])."""
    low, high = (float(v) for v in pixel_range)
    return video.float() * (high - low) + low


class FrameVQTokenizer:
    """A diffusers `VQModel` applied frame by frame: a `T x h x w` token grid is the token grids of T frames.

    Args:
        vqvae: a `VQModel` with `lookup_from_codebook=True` (the NAR / LlamaGen tokenizers after conversion, or
            one trained with `training/train_vq.py`).
        max_frames_per_batch: frames encoded or decoded in one `VQModel` call (bounds the memory of long clips
            and large batches; the result does not depend on it).
    """

    temporal_compression = 1
    pixel_range = (-1.0, 1.0)
    supports_frame_prefix = True  # frame t is token time step t: the first frames encode on their own

    def __init__(self, vqvae: VQModel, max_frames_per_batch: int = 64):
        if not isinstance(vqvae, VQModel):
            raise TypeError(f"`vqvae` must be a diffusers VQModel, got {type(vqvae).__name__}.")
        check_codebook_lookup(vqvae, "`vqvae`")
        if not is_int(max_frames_per_batch) or max_frames_per_batch < 1:
            raise ValueError(f"`max_frames_per_batch` must be a positive int, got {max_frames_per_batch!r}.")
        self.vqvae = vqvae
        self.max_frames_per_batch = int(max_frames_per_batch)

    @property
    def spatial_compression(self) -> int:
        return vq_downsample_factor(self.vqvae)

    @property
    def vocab_size(self) -> int:
        return self.vqvae.config.num_vq_embeddings

    @property
    def num_channels(self) -> int:
        return self.vqvae.config.in_channels

    @property
    def device(self) -> torch.device:
        return self.vqvae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vqvae.dtype

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return check_video_size(num_frames, height, width, self.temporal_compression, self.spatial_compression)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.LongTensor:
        """`(B, C, F, H, W)` floats in [-1, 1] -> token ids `(B, F, H / f, W / f)` on `video`'s device."""
        if video.ndim != 5:
            raise ValueError(f"`video` must have shape (batch, channels, frames, height, width), got {tuple(video.shape)}.")
        batch, channels, frames, height, width = video.shape
        self.token_grid(frames, height, width)
        pixels = video.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        tokens = torch.cat(
            [encode_images_to_tokens(self.vqvae, chunk) for chunk in pixels.split(self.max_frames_per_batch)]
        )
        return tokens.view(batch, frames, *tokens.shape[1:])

    @torch.no_grad()
    def decode_video(self, tokens: torch.LongTensor) -> torch.Tensor:
        """Token ids `(B, T, h, w)` -> float32 frames `(B, C, T, h * f, w * f)` in about [-1, 1] (not clamped).

        A float16 `VQModel` whose config asks for it (`force_upcast`) decodes in float32 and gets its dtype back,
        even on errors.
        """
        if tokens.ndim != 4:
            raise ValueError(f"`tokens` must have shape (batch, frames, height, width), got {tuple(tokens.shape)}.")
        with upcast_for_decoding(self.vqvae):
            frames = torch.cat(
                [
                    decode_tokens_to_images(self.vqvae, chunk).float()
                    for chunk in tokens.flatten(0, 1).split(self.max_frames_per_batch)
                ]
            )
        batch, steps = tokens.shape[:2]
        return frames.view(batch, steps, *frames.shape[1:]).permute(0, 2, 1, 3, 4)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(spatial_compression={self.spatial_compression}, vocab_size={self.vocab_size}, "
            f"num_channels={self.num_channels})"
        )


def is_video_tokenizer(module: Any) -> bool:
    """Whether `module` implements the video tokenizer protocol itself (its methods and attributes)."""
    return all(callable(getattr(module, name, None)) for name in PROTOCOL_METHODS) and all(
        hasattr(module, name) for name in PROTOCOL_ATTRIBUTES
    )


def as_video_tokenizer(module: Any, name: str = "vqvae") -> VideoTokenizer:
    """The video tokenizer behind a pipeline component.

    Returns `module` itself when it implements the protocol (e.g. `LARPTokenizer`), a `FrameVQTokenizer` for a
    diffusers `VQModel`, and raises a TypeError naming the component `name` otherwise.
    """
    if is_video_tokenizer(module):
        return module
    if isinstance(module, VQModel):
        return FrameVQTokenizer(module)
    raise TypeError(
        f"`{name}` must be a diffusers VQModel (applied frame by frame) or a model implementing the video tokenizer "
        f"interface ({', '.join(PROTOCOL_ATTRIBUTES)}, {', '.join(PROTOCOL_METHODS)}), got {type(module).__name__}."
    )


def load_tokenizer_model(path: str | os.PathLike, flag: str = "vq_model_path", **kwargs) -> ModelMixin:
    """A frozen, eval-mode tokenizer model from its folder or a pipeline folder (its `vqvae/`): a diffusers
    `VQModel`, or a `nar_diffusers` model implementing the video tokenizer interface (e.g. `LARPTokenizer`).

    Args:
        path: The folder.
        flag: The argument or command-line flag that named `path`, for error messages.
        kwargs: Passed to `from_pretrained` (e.g. `dtype`; see `utils.dtypes.dtype_kwargs`).
    """
    if not os.path.isdir(path):
        raise ValueError(f"`{flag}` {str(path)!r} is not a folder holding a tokenizer model.")
    subfolder = "vqvae" if os.path.isfile(os.path.join(path, "model_index.json")) else None
    config_path = os.path.join(path, subfolder or "", "config.json")
    try:
        with open(config_path, encoding="utf-8") as file:
            class_name = json.load(file).get("_class_name")
    except (OSError, ValueError) as error:
        raise ValueError(f"`{flag}` {str(path)!r}: {config_path} is not a readable model config ({error}).") from None
    if class_name == "VQModel":
        return load_vq_model(path, flag, **kwargs)
    from .larp_tokenizer import LARPTokenizer

    cls = {"LARPTokenizer": LARPTokenizer}.get(str(class_name))
    if cls is None or not all(callable(getattr(cls, name, None)) for name in PROTOCOL_METHODS):
        raise ValueError(
            f"`{flag}` {str(path)!r} holds a {class_name}: expected a diffusers VQModel or a nar_diffusers model "
            "implementing the video tokenizer interface."
        )
    return cls.from_pretrained(path, subfolder=subfolder, **kwargs).eval().requires_grad_(False)


def tokenizer_num_channels(tokenizer: Any) -> int:
    """Colour channels a video tokenizer takes: its `num_channels`, else its config's `in_channels`, else 3."""
    channels = getattr(tokenizer, "num_channels", None)
    if channels is None:
        channels = getattr(getattr(tokenizer, "config", None), "in_channels", None)
    return int(channels or 3)
