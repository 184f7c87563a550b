"""The dtype names accepted by the command-line tools and converters."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"float32"`/`"bfloat16"`/`"float16"` (or the torch dtype itself) -> torch dtype; anything else raises."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"Unsupported `dtype` {dtype!r}; choose one of {list(DTYPES)}.")
