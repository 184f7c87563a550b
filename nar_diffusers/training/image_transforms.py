"""PIL image transforms for training and code extraction: resize, crops, flips, ten-crop; tensors in [-1, 1] out."""

from __future__ import annotations

import torch
from PIL import Image

from ..utils.image_utils import check_num_channels, pil_to_tensor, to_8_bit


AUGMENTATIONS: dict[str, int] = {"none": 1, "flip": 2, "ten_crop": 10}
"""Augmentation name -> number of views produced per source image."""


_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resize_shorter_side(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so that the shorter side is `size`, keeping the aspect ratio."""
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"`interpolation` must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}.")
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, resample=_INTERPOLATIONS[interpolation])


def crop(image: Image.Image, top: int, left: int, size: int) -> Image.Image:
    """Crop a `size` x `size` square whose top-left corner is (`top`, `left`)."""
    return image.crop((left, top, left + size, top + size))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central `size` x `size` square."""
    width, height = image.size
    return crop(image, (height - size) // 2, (width - size) // 2, size)


def hflip(image: Image.Image) -> Image.Image:
    """Mirror an image left-right."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square, optionally flip, and return a tensor in [-1, 1].
    16-bit grayscale images are scaled to the 8-bit range first (`to_8_bit`).

    Args:
        resolution: Output height and width.
        center_crop: Center crop when True, random crop when False.
        random_flip: Mirror left-right with probability 0.5.
        num_channels: 3 for RGB, 1 for grayscale.
        interpolation: One of "nearest", "bilinear", "bicubic", "lanczos".
        generator: Optional `torch.Generator` for the random crop and flip.
    """

    def __init__(
        self,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        num_channels: int = 3,
        interpolation: str = "bicubic",
        generator: torch.Generator | None = None,
    ):
        if resolution < 1:
            raise ValueError(f"`resolution` must be a positive integer, got {resolution}.")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"`interpolation` must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}.")
        check_num_channels(num_channels)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.num_channels = num_channels
        self.interpolation = interpolation
        self.generator = generator

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform one image; `generator` (default: the one given at construction) draws the crop and flip."""
        generator = generator if generator is not None else self.generator

        def randint(high: int) -> int:
            return int(torch.randint(high, (1,), generator=generator).item())

        image = resize_shorter_side(to_8_bit(image), self.resolution, self.interpolation)
        if self.center_crop:
            image = center_crop(image, self.resolution)
        else:
            width, height = image.size
            top = randint(height - self.resolution + 1)
            left = randint(width - self.resolution + 1)
            image = crop(image, top, left, self.resolution)
        if self.random_flip and randint(2) == 1:
            image = hflip(image)
        return pil_to_tensor(image, self.num_channels)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip}, num_channels={self.num_channels}, interpolation={self.interpolation!r})"
        )


def flip_augment(image: Image.Image) -> list[Image.Image]:
    """Return `[image, mirrored image]`."""
    return [image, hflip(image)]


def ten_crop_augment(
    image: Image.Image, resolution: int, crop_scale: float = 1.1, interpolation: str = "bicubic"
) -> list[Image.Image]:
    """Ten views: resize the shorter side to `round(resolution * crop_scale)`, crop the four corners and the center
    at `resolution`, then the five crops mirrored (order: top-left, top-right, bottom-left, bottom-right, center,
    then the same five flipped)."""
    if crop_scale < 1.0:
        raise ValueError(f"`crop_scale` must be >= 1.0, got {crop_scale}.")
    image = resize_shorter_side(image, round(resolution * crop_scale), interpolation)
    width, height = image.size
    bottom, right = height - resolution, width - resolution
    crops = [
        crop(image, 0, 0, resolution),
        crop(image, 0, right, resolution),
        crop(image, bottom, 0, resolution),
        crop(image, bottom, right, resolution),
        center_crop(image, resolution),
    ]
    return crops + [hflip(c) for c in crops]


def augment_views(
    image: Image.Image, resolution: int, aug: str = "none", interpolation: str = "bicubic"
) -> list[Image.Image]:
    """The deterministic views of one image used for code extraction.

    Args:
        image: The source image.
        resolution: Side of the square views.
        aug: "none" (one center crop), "flip" (center crop and its mirror) or "ten_crop" (see `ten_crop_augment`).
        interpolation: Resize filter.

    Returns:
        `AUGMENTATIONS[aug]` PIL images of size `resolution` x `resolution`.
    """
    if aug not in AUGMENTATIONS:
        raise ValueError(f"`aug` must be one of {list(AUGMENTATIONS)}, got {aug!r}.")
    image = to_8_bit(image)  # 16-bit grayscale scaled, not clipped by the resize and conversions
    if aug == "ten_crop":
        return ten_crop_augment(image, resolution, interpolation=interpolation)
    view = center_crop(resize_shorter_side(image, resolution, interpolation), resolution)
    return flip_augment(view) if aug == "flip" else [view]
