"""Watching a generation: decode the partial token grid of any step into pictures.

NAR grows an image from its top-left corner, one anti-diagonal of tokens per forward pass. Every step hands
`callback_on_step_end` its grid (`callback_kwargs["tokens"]`, -1 where nothing is generated yet);
`preview_images` decodes such a grid with the pipeline's own tokenizer and paints the cells not generated yet a neutral
gray, and `TokenPreview` is a ready-made callback that does it every step (or every n-th):

```py
from nar_diffusers.utils.preview import TokenPreview

preview = TokenPreview(on_preview=lambda step, images: images[0].save(f"step_{step:02d}.png"))
pipe(class_labels=[207], callback_on_step_end=preview)
```

It works with `NARPipeline`, `NARInpaintPipeline` and `NARVideoPipeline` (a video is a list of frames). A cell is
painted gray over its `f x f` pixel patch (and its frames, for a frame-wise video tokenizer); a holistic video
tokenizer (LARP) has no patch per token, so there the unknown cells are only filled with a token before decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

NEUTRAL_GRAY = 0.5
"""The value (in [0, 1]) of pixels whose token is not generated yet."""


@torch.no_grad()
def decode_partial_tokens(pipe: Any, tokens: torch.LongTensor, fill_token: int = 0) -> torch.Tensor:
    """Decode a partial grid into floats in [0, 1], cells not generated yet (-1) in `NEUTRAL_GRAY`.

    Args:
        pipe: a NAR pipeline (its `decode_tokens`; for videos its `video_tokenizer`).
        tokens: `(batch, h, w)` (images) or `(batch, T, h, w)` (videos) token ids, -1 = unknown.
        fill_token: the id decoded in place of unknown cells before they are painted over.

    Returns:
        `(batch, C, H, W)` images or `(batch, C, F, H, W)` videos in [0, 1]. A grid with no known cell is not
        decoded at all (it is all gray).
    """
    if tokens.ndim not in (3, 4):
        raise ValueError(
            f"`tokens` must be a (batch, h, w) or (batch, T, h, w) grid, got shape {tuple(tokens.shape)}."
        )
    known = tokens >= 0
    if not bool(known.any()):
        units = _cell_units(pipe, video=tokens.ndim == 4)
        size = [n * unit for n, unit in zip(tokens.shape[1:], units)]
        return torch.full((tokens.shape[0], _channels(pipe, video=tokens.ndim == 4), *size), NEUTRAL_GRAY)
    return paint_unknown(pipe, tokens, pipe.decode_tokens(torch.where(known, tokens, fill_token)))


def paint_unknown(pipe: Any, tokens: torch.LongTensor, pixels: torch.Tensor) -> torch.Tensor:
    """`pixels`, the pipeline's `decode_tokens` of a partial grid `tokens` (its unknown cells filled), as floats in
    [0, 1] with the pixels of the unknown (-1) cells in `NEUTRAL_GRAY` (for a tokenizer with a patch per token)."""
    video = tokens.ndim == 4
    low, high = (float(v) for v in pipe.video_tokenizer.pixel_range) if video else (-1.0, 1.0)
    pixels = ((pixels.float() - low) / (high - low)).clamp(0, 1).cpu()
    if video and not bool(getattr(pipe.video_tokenizer, "supports_frame_prefix", False)):
        return pixels
    cells = (tokens >= 0).cpu()
    for axis, unit in enumerate(_cell_units(pipe, video), start=1):
        cells = cells.repeat_interleave(unit, dim=axis)
    return torch.where(cells[:, None], pixels, NEUTRAL_GRAY)


def _cell_units(pipe: Any, video: bool) -> tuple[int, ...]:
    """The pixels (frames, height, width) one token covers."""
    if video:
        tokenizer = pipe.video_tokenizer
        return (tokenizer.temporal_compression, tokenizer.spatial_compression, tokenizer.spatial_compression)
    return (pipe.vq_scale_factor, pipe.vq_scale_factor)


def _channels(pipe: Any, video: bool) -> int:
    if not video:
        return int(pipe.vqvae.config.in_channels)
    tokenizer = pipe.video_tokenizer
    config = getattr(tokenizer, "config", None)
    return int(getattr(tokenizer, "num_channels", None) or getattr(config, "in_channels", None) or 3)


def pixels_to_pil(pixels: torch.Tensor) -> list:
    """`(batch, C, H, W)` floats in [0, 1] -> PIL images; `(batch, C, F, H, W)` -> one list of frames per video."""
    if pixels.ndim == 4:
        return _to_pil(pixels)
    return [_to_pil(video.transpose(0, 1)) for video in pixels]


def _to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """`(batch, C, H, W)` in [0, 1] -> PIL images ("L" for one channel, else RGB)."""
    arrays = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[:, :, 0]) if a.shape[-1] == 1 else Image.fromarray(a[:, :, :3]) for a in arrays]


def preview_images(pipe: Any, tokens: torch.LongTensor, fill_token: int = 0) -> list:
    """`decode_partial_tokens` as PIL: a list of images for `(batch, h, w)` grids, a list of frame lists for
    `(batch, T, h, w)` video grids."""
    return pixels_to_pil(decode_partial_tokens(pipe, tokens, fill_token))


class TokenPreview:
    """A `callback_on_step_end` that decodes the growing grid into PIL previews (cells not generated yet: gray).

    Args:
        every: decode every `every`-th step (and always the last one); 1 = every step.
        max_images: decode only the first `max_images` outputs of the batch (None: all); fewer is cheaper.
        on_preview: called as `on_preview(step_index, previews)` after each decoded step (`previews` as
            `preview_images` returns them), e.g. to save files or push to a UI queue.
        fill_token: the id decoded in place of unknown cells before they are painted over.

    After a generation, `images` holds the last previews and `step` its step index. The callback never changes the
    grid (it returns `{}`), so the generated tokens are the same with and without it.
    """

    tensor_inputs = ["tokens"]

    def __init__(
        self,
        every: int = 1,
        max_images: int | None = None,
        on_preview: Callable[[int, list], Any] | None = None,
        fill_token: int = 0,
    ):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"`every` must be an int >= 1, got {every!r}.")
        if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
            raise ValueError(f"`max_images` must be None or an int >= 1, got {max_images!r}.")
        if on_preview is not None and not callable(on_preview):
            raise ValueError(
                f"`on_preview` must be None or a callable f(step, previews), got {type(on_preview).__name__}."
            )
        self.every = every
        self.max_images = max_images
        self.on_preview = on_preview
        self.fill_token = fill_token
        self.images: list | None = None
        self.step: int | None = None

    def __call__(self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
        last = step_index == getattr(pipe, "num_timesteps", 0) - 1
        if step_index % self.every == 0 or last:
            tokens = callback_kwargs["tokens"]
            if self.max_images is not None:
                tokens = tokens[: self.max_images]
            self.images = preview_images(pipe, tokens, self.fill_token)
            self.step = step_index
            if self.on_preview is not None:
                self.on_preview(step_index, self.images)
        return {}
