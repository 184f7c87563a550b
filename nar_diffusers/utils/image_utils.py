"""Images <-> tensors in [-1, 1], and grids of images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def check_num_channels(num_channels: int) -> None:
    """Raise unless `num_channels` is 1 (grayscale) or 3 (RGB)."""
    if num_channels not in (1, 3):
        raise ValueError(f"`num_channels` must be 1 (grayscale) or 3 (RGB), got {num_channels}.")


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""PIL modes of 16-bit grayscale images (PNG, TIFF); "I" (32-bit integers) is read in the same 0-65535 range."""


def to_8_bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit grayscale image (`SIXTEEN_BIT_MODES`) from 0-65535 to an 8-bit "L" image; other images are
    returned unchanged. PIL's own `convert("L")` / `convert("RGB")` clips such images, turning them white."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    array = np.asarray(image).astype(np.float64) / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))


def pil_to_tensor(image: Image.Image, num_channels: int = 3) -> torch.Tensor:
    """Convert a PIL image to a float tensor (C, H, W) in [-1, 1], as RGB (3 channels) or grayscale (1); 16-bit
    images are scaled to the 8-bit range first (`to_8_bit`)."""
    check_num_channels(num_channels)
    image = to_8_bit(image).convert("RGB" if num_channels == 3 else "L")
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert a batch (B, C, H, W) in [-1, 1] to PIL images (RGB for 3 channels, "L" for 1)."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arrays = images.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[:, :, 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a) for a in arrays]


def image_grid(images: Sequence[Image.Image], rows: int, scale: int = 1, padding: int = 0) -> Image.Image:
    """Paste equally sized images into `rows` rows (row-major), optionally upscaled (nearest) and padded."""
    if not images or len(images) % rows:
        raise ValueError(f"{len(images)} images do not fill {rows} rows.")
    columns = len(images) // rows
    width, height = images[0].size
    width, height = width * scale, height * scale
    grid = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        if scale != 1:
            image = image.resize((width, height), resample=Image.Resampling.NEAREST)
        grid.paste(image.convert("RGB"), (padding + column * (width + padding), padding + row * (height + padding)))
    return grid
