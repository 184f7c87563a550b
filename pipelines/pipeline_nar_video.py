"""Load a saved NAR video pipeline folder through plain diffusers:

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/pipeline_nar_video.py", trust_remote_code=True)
"""

from nar_diffusers import NARVideoPipeline  # noqa: F401
