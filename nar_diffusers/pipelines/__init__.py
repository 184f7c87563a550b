from .pipeline_nar import NARPipeline
from .pipeline_nar_inpaint import NARInpaintPipeline
from .pipeline_nar_video import NARVideoPipeline, NARVideoPipelineOutput

__all__ = ["NARInpaintPipeline", "NARPipeline", "NARVideoPipeline", "NARVideoPipelineOutput"]
