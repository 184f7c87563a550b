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


def images_to_tensor(image, num_channels: int, name: str = "image") -> torch.Tensor:
    """Pipeline image inputs as a float tensor `(B, num_channels, H, W)` in [0, 1], without resizing.

    Accepted (diffusers' conventions): a PIL image or a list of PIL images of one size; a NumPy array `(H, W)`,
    `(H, W, C)` or `(B, H, W, C)`; a torch tensor `(H, W)`, `(C, H, W)` or `(B, C, H, W)`. Arrays and tensors hold
    floats in [0, 1] (or uint8 in 0-255, or bools); C is 1, 3 or 4 (alpha is dropped). RGB becomes grayscale for a
    1-channel model (ITU-R 601 luma, as PIL converts) and grayscale is repeated for a 3-channel one. Raises a
    ValueError naming `name` otherwise.
    """
    check_num_channels(num_channels)
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image or not all(isinstance(i, Image.Image) for i in image):
            raise ValueError(f"`{name}` as a list must be a non-empty list of PIL images.")
        sizes = {i.size for i in image}
        if len(sizes) > 1:
            raise ValueError(f"`{name}` images must all have the same size, got (width, height) sizes {sorted(sizes)}.")
        return torch.stack([(pil_to_tensor(i, num_channels) + 1) / 2 for i in image])
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[None, :, :, None]
        elif array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise ValueError(f"`{name}` as a NumPy array must be (H, W), (H, W, C) or (B, H, W, C), got {image.shape}.")
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        pixels = image.detach().cpu()
        if pixels.ndim == 2:
            pixels = pixels[None, None]
        elif pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4:
            raise ValueError(
                f"`{name}` as a tensor must be (H, W), (C, H, W) or (B, C, H, W), got {tuple(image.shape)}."
            )
    else:
        raise ValueError(
            f"`{name}` must be a PIL image, a list of PIL images, a NumPy array or a torch tensor, got "
            f"{type(image).__name__}."
        )
    if pixels.numel() == 0:
        raise ValueError(
            f"`{name}` is empty (shape {tuple(image.shape)}): it needs at least one image of at least 1x1 pixels."
        )
    if pixels.shape[1] not in (1, 3, 4) or pixels.shape[0] == 0:
        raise ValueError(
            f"`{name}` must have 1, 3 or 4 channels (NumPy: last axis; torch: the axis before height), got shape "
            f"{tuple(image.shape)}."
        )
    if pixels.dtype == torch.uint8:
        pixels = pixels.float() / 255
    elif pixels.dtype == torch.bool:
        pixels = pixels.float()
    elif pixels.dtype.is_floating_point:
        pixels = pixels.float()
        if not bool(torch.isfinite(pixels).all()) or float(pixels.min()) < 0 or float(pixels.max()) > 1:
            raise ValueError(f"`{name}` floats must be in [0, 1] (diffusers' convention for arrays and tensors).")
    else:
        raise ValueError(f"`{name}` must hold floats in [0, 1], uint8 or bools, got {pixels.dtype}.")
    pixels = pixels[:, :3]
    if pixels.shape[1] == 3 and num_channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        pixels = (pixels * weights).sum(dim=1, keepdim=True)
    elif pixels.shape[1] == 1 and num_channels == 3:
        pixels = pixels.repeat(1, 3, 1, 1)
    return pixels.contiguous()
