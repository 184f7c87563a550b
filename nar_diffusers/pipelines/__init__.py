from .pipeline_nar import NARPipeline

__all__ = ["NARPipeline"]
