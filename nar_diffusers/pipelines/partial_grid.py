"""Generation from a partial token grid: the `tokens` argument, checked once and laid out one grid per output."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .condition import is_integer_array


def check_known_tokens(
    tokens: Any, grid: tuple[int, ...], num_conditions: int, num_per_prompt: int, vocab_size: int, name: str = "tokens"
) -> None:
    """Validate a partial token grid; raise a ValueError naming `name`.

    Allowed: an integer `torch.Tensor` or NumPy array of token ids in [-1, vocab_size - 1] (-1 = unknown, to be
    generated) of shape `grid` (the same grid for every output), `(num_conditions, *grid)` (one per class label /
    prompt, repeated `num_per_prompt` times) or `(num_conditions * num_per_prompt, *grid)` (one per output).
    """
    if not isinstance(tokens, (torch.Tensor, np.ndarray)):
        raise ValueError(
            f"`{name}` must be a torch.Tensor or NumPy array of token ids (-1 = unknown cell, generated), got "
            f"{type(tokens).__name__}."
        )
    if not is_integer_array(tokens):
        raise ValueError(f"`{name}` must hold integer token ids (-1 = unknown cell), got dtype {tokens.dtype}.")
    grid = tuple(grid)
    allowed = [grid, (num_conditions, *grid), (num_conditions * num_per_prompt, *grid)]
    if tuple(tokens.shape) not in allowed:
        shapes = " or ".join(dict.fromkeys(str(shape) for shape in allowed))
        raise ValueError(
            f"`{name}` must have the token grid's shape: {shapes} (the same grid for every output, one per class "
            f"label / prompt, or one per output), got {tuple(tokens.shape)}."
        )
    # NumPy's min/max read every integer dtype (uint64 included, which torch cannot reduce).
    values = tokens if isinstance(tokens, np.ndarray) else tokens.detach().cpu().numpy()
    if values.size == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(tokens.shape)}).")
    low, high = int(values.min()), int(values.max())
    if low < -1 or high >= vocab_size:
        raise ValueError(
            f"`{name}` ids must be in [-1, {vocab_size - 1}] (-1 = unknown cell, generated; the model has "
            f"{vocab_size} token ids), got values in [{low}, {high}]."
        )


def prepare_known_tokens(
    tokens: torch.Tensor | np.ndarray | None, grid: tuple[int, ...], num_conditions: int, num_per_prompt: int,
    device: torch.device,
) -> torch.LongTensor | None:
    """A checked partial grid as a `(num_conditions * num_per_prompt, *grid)` long tensor on `device` (one grid per
    output), or None."""
    if tokens is None:
        return None
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(np.ascontiguousarray(tokens).astype(np.int64))  # checked: ids fit in int64
    tokens = tokens.to(device=device, dtype=torch.long)
    total = num_conditions * num_per_prompt
    if tokens.dim() == len(grid):
        return tokens.expand(total, *grid).clone()
    if tokens.shape[0] != total:
        tokens = tokens.repeat_interleave(num_per_prompt, dim=0)
    return tokens.clone()
