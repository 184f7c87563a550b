from .sampling import sample_tokens
from .scheduling_autoregressive import AutoregressiveScheduler, AutoregressiveSchedulerOutput
from .scheduling_neighbor import NeighborScheduler
from .scheduling_raster import RasterScheduler

__all__ = [
    "AutoregressiveScheduler",
    "AutoregressiveSchedulerOutput",
    "NeighborScheduler",
    "RasterScheduler",
    "sample_tokens",
]
