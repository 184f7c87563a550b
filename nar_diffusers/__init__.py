"""nar-diffusers: Neighboring Autoregressive Modeling (NAR) for the diffusers ecosystem."""

from .models import (
    FrameVQTokenizer,
    LARPTokenizer,
    NARKVCache,
    NARTransformer,
    NARTransformerOutput,
    VideoTokenizer,
    as_video_tokenizer,
)
from .pipelines import NARInpaintPipeline, NARPipeline, NARVideoPipeline, NARVideoPipelineOutput
from .schedulers import AutoregressiveScheduler, AutoregressiveSchedulerOutput, NeighborScheduler, RasterScheduler

__version__ = "0.1.0"

__all__ = [
    "AutoregressiveScheduler",
    "AutoregressiveSchedulerOutput",
    "FrameVQTokenizer",
    "NARInpaintPipeline",
    "LARPTokenizer",
    "NARKVCache",
    "NARPipeline",
    "NARTransformer",
    "NARTransformerOutput",
    "NARVideoPipeline",
    "NARVideoPipelineOutput",
    "NeighborScheduler",
    "RasterScheduler",
    "VideoTokenizer",
    "as_video_tokenizer",
]
