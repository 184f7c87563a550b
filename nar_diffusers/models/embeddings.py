"""Position and condition embeddings of the NAR transformer."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import Linear


def rotary_tables(
    coordinates: torch.LongTensor, head_dim: int, theta: float, num_condition_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cos/sin tables `(num_condition_tokens + n, head_dim // 2)` for an N-D rotary embedding.

    The `head_dim // 2` rotation angles are shared out between the grid axes: each axis gets
    `head_dim // 2 // ndim` frequencies `theta ** (-2i / (2 * per_axis))` and the angles of a cell are
    `[c_0 * f, c_1 * f, ...]` (axis 0 first); leftover slots get angle 0. In 2-D this is exactly the
    LlamaGen table. Condition positions get all-zero cos AND sin rows (the published models' quirk that
    zeroes their rotated queries and keys).
    """
    ndim = coordinates.shape[-1]
    num_slots = head_dim // 2
    per_axis = num_slots // ndim
    if per_axis == 0:
        raise ValueError(f"head_dim {head_dim} is too small for a {ndim}-D rotary embedding.")
    device = coordinates.device
    freqs = 1.0 / (theta ** (torch.arange(0, 2 * per_axis, 2, device=device)[:per_axis].float() / (2 * per_axis)))
    angles = torch.zeros(coordinates.shape[0], num_slots, device=device)
    for axis in range(ndim):
        angles[:, axis * per_axis : (axis + 1) * per_axis] = torch.outer(coordinates[:, axis].float(), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)
    zeros = torch.zeros(num_condition_tokens, num_slots, device=device)
    return torch.cat([zeros, rotation.real]), torch.cat([zeros, rotation.imag])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs `(x[2j], x[2j+1])` of `x` `(batch, seq, heads, head_dim)` in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    first, second = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return rotated.flatten(3).type_as(x)


class CaptionProjection(nn.Module):
    """Projects caption embeddings (e.g. T5) to the model width; holds the learned unconditional caption."""

    def __init__(self, caption_dim: int, hidden_size: int, num_tokens: int):
        super().__init__()
        self.fc1 = Linear(caption_dim, hidden_size, bias=False)
        self.fc2 = Linear(hidden_size, hidden_size, bias=False)
        self.uncond_embedding = nn.Parameter(torch.randn(num_tokens, caption_dim) / caption_dim**0.5)

    def forward(self, caption_embeds: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(caption_embeds), approximate="tanh"))
