"""Helpers shared by inference, conversion and training: dtype names and image conversions."""

from .dtypes import DTYPES, resolve_dtype
from .image_utils import image_grid, pil_to_tensor, tensor_to_pil

__all__ = ["DTYPES", "image_grid", "pil_to_tensor", "resolve_dtype", "tensor_to_pil"]
