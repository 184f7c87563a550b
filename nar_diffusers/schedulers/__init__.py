from .sampling import draw_uniforms, sample_tokens
from .scheduler_selection import ARCHITECTURES, architecture_of_heads, num_decoding_heads_for, scheduler_class_for_heads
from .scheduling_autoregressive import AutoregressiveScheduler, AutoregressiveSchedulerOutput, StaticDecodeTables
from .scheduling_neighbor import NeighborScheduler
from .scheduling_raster import RasterScheduler
from .token_order import ORDER_KINDS, TokenOrder

__all__ = [
    "ARCHITECTURES",
    "ORDER_KINDS",
    "AutoregressiveScheduler",
    "AutoregressiveSchedulerOutput",
    "NeighborScheduler",
    "RasterScheduler",
    "architecture_of_heads",
    "draw_uniforms",
    "num_decoding_heads_for",
    "sample_tokens",
    "scheduler_class_for_heads",
    "StaticDecodeTables",
    "TokenOrder",
]
