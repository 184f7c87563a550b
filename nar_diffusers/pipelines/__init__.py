from .pipeline_nar import NARPipeline
from .pipeline_nar_video import NARVideoPipeline, NARVideoPipelineOutput

__all__ = ["NARPipeline", "NARVideoPipeline", "NARVideoPipelineOutput"]
