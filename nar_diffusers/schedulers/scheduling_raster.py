"""Raster order: vanilla next-token autoregression (LlamaGen), one token per forward pass."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers finds the loader by this name)

from .scheduling_autoregressive import AutoregressiveScheduler


class RasterScheduler(AutoregressiveScheduler):
    """Generates the grid one token per step in row-major order with a single decoding head.

    Token `j` is predicted from the model output at token `j - 1` (the first from the condition), so a
    grid of `N` tokens takes `N` forward passes. This is the baseline NAR is compared against and the
    order the published LlamaGen checkpoints were trained in.

    Args:
        grid_size (`tuple[int, ...]`): the default token grid, e.g. `(16, 16)`.
    """

    order_kind = "raster"

    @register_to_config
    def __init__(self, grid_size: tuple[int, ...] = (16, 16)):
        super().__init__(grid_size)
