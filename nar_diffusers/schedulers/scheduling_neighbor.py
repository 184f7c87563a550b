"""Neighboring autoregressive order: one Manhattan plane of the token grid per forward pass."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers finds the loader by this name)

from .scheduling_autoregressive import AutoregressiveScheduler


class NeighborScheduler(AutoregressiveScheduler):
    """Generates a grid of rank 1-3 outward from the origin, one plane `sum(coordinates) = d` per step.

    A grid of shape `(d_1, ..., d_n)` takes `sum(d_i) - n + 1` forward passes (31 for 16x16, 34 for 4x16x16).
    It drives a model with one decoding head per grid axis: head `k` at token `p` predicts the token one
    step further along axis `n - 1 - k` (head 0 = "right" along the last axis, head 1 = "down", head 2 =
    "back" in time). A target's logits are the mean over the heads whose parent (the target minus one step
    along that head's axis) exists; the origin is predicted from the condition by the mean of all heads.

    Args:
        grid_size (`tuple[int, ...]`): the default token grid, e.g. `(16, 16)` or `(4, 16, 16)`.
    """

    order_kind = "neighbor"

    @register_to_config
    def __init__(self, grid_size: tuple[int, ...] = (16, 16)):
        super().__init__(grid_size)
