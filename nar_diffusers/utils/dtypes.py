"""The dtype names accepted by the command-line tools and converters."""

from __future__ import annotations

import torch
from packaging import version


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"float32"`/`"bfloat16"`/`"float16"` (or the torch dtype itself) -> torch dtype; anything else raises."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"Unsupported `dtype` {dtype!r}; choose one of {list(DTYPES)}.")


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The `from_pretrained` keyword of a diffusers model or pipeline for `dtype`: `dtype=` (diffusers >= 0.40,
    where `torch_dtype=` is deprecated), `torch_dtype=` on older diffusers; nothing for None."""
    if dtype is None:
        return {}
    import diffusers

    name = "dtype" if version.parse(diffusers.__version__).release >= (0, 40) else "torch_dtype"
    return {name: dtype}
