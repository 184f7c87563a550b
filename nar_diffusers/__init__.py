"""nar-diffusers: Neighboring Autoregressive Modeling (NAR) for the diffusers ecosystem."""

from .models import LARPTokenizer, NARKVCache, NARTransformer, NARTransformerOutput
from .pipelines import NARPipeline
from .schedulers import AutoregressiveScheduler, AutoregressiveSchedulerOutput, NeighborScheduler, RasterScheduler

__version__ = "0.1.0"

__all__ = [
    "AutoregressiveScheduler",
    "AutoregressiveSchedulerOutput",
    "LARPTokenizer",
    "NARKVCache",
    "NARPipeline",
    "NARTransformer",
    "NARTransformerOutput",
    "NeighborScheduler",
    "RasterScheduler",
]
