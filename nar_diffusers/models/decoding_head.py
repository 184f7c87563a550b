"""A decoding head: one per grid axis in NAR (one in raster AR), each predicting its neighbour's token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention_nar import RMSNorm
from .linear import Linear


@dataclass
class RowGuidance:
    """Classifier-free guidance row by row, for a batch whose rows are at different steps with different settings
    (the serving engine): the logits of `cond_rows` are returned, each guided by its own unconditional row.

    Args:
        cond_rows: `(n,)` the batch rows whose logits are returned, in order.
        uncond_rows: `(n,)` each one's unconditional row (any row, e.g. its own, where it is not guided).
        scale: `(n,)` float32 guidance scales.
        guided: `(n,)` bool, whether each row is guided at this step (False: its conditional logits alone).
    """

    cond_rows: torch.LongTensor
    uncond_rows: torch.LongTensor
    scale: torch.Tensor
    guided: torch.BoolTensor


class DecodingHead(nn.Module):
    """RMSNorm followed by a bias-free projection to the vocabulary; logits come out in float32."""

    def __init__(self, hidden_size: int, vocab_size: int, norm_eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden_size, norm_eps)
        self.proj = Linear(hidden_size, vocab_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden_states)).float()

    def guided_logits(
        self, cond: torch.Tensor, uncond: torch.Tensor, scale: float, guided: bool | torch.Tensor = True
    ) -> torch.Tensor:
        """Classifier-free guided logits `uncond + scale * (cond - uncond)` of the conditional and unconditional
        hidden states, computed by blending the normalised states (in float32) before the bias-free projection:
        the projection is linear, so this equals guiding the logits, at half the projection cost. Where `guided` is
        False (a Python bool, or a bool tensor: one graph for guided and unguided steps) the conditional logits."""
        if isinstance(guided, bool) and not guided:
            return self(cond)
        cond, uncond = self.norm(cond), self.norm(uncond)
        blended = (uncond.float() + (cond.float() - uncond.float()) * scale).to(cond.dtype)
        if not isinstance(guided, bool):
            blended = torch.where(guided, blended, cond)
        return self.proj(blended).float()

    def row_guided_logits(self, hidden_states: torch.Tensor, guidance: RowGuidance) -> torch.Tensor:
        """`guided_logits` row by row (`RowGuidance`): the same arithmetic, with a scale and a guided flag per row."""
        normed = self.norm(hidden_states)
        cond, uncond = normed.index_select(0, guidance.cond_rows), normed.index_select(0, guidance.uncond_rows)
        shape = (-1,) + (1,) * (cond.dim() - 1)
        scale = guidance.scale.view(shape)
        blended = (uncond.float() + (cond.float() - uncond.float()) * scale).to(cond.dtype)
        return self.proj(torch.where(guidance.guided.view(shape), blended, cond)).float()
