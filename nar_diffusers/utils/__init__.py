"""Helpers shared by inference, conversion and training: dtype names, image conversions, previews of partial grids."""

from .dtypes import DTYPES, resolve_dtype
from .image_utils import image_grid, pil_to_tensor, tensor_to_pil
from .preview import TokenPreview, decode_partial_tokens, preview_images

__all__ = [
    "DTYPES", "TokenPreview", "decode_partial_tokens", "image_grid", "pil_to_tensor", "preview_images", "resolve_dtype",
    "tensor_to_pil",
]  # fmt: skip
