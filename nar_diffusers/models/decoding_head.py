"""A decoding head: one per grid axis in NAR (one in raster AR), each predicting its neighbour's token."""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention_nar import RMSNorm
from .linear import Linear


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
