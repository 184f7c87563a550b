"""Load a saved NAR pipeline folder as an inpainting pipeline through plain diffusers:

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/pipeline_nar_inpaint.py", trust_remote_code=True)
"""

from nar_diffusers import NARInpaintPipeline  # noqa: F401
