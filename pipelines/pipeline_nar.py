"""Load a saved NAR pipeline folder through plain diffusers:

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/pipeline_nar.py", trust_remote_code=True)
"""

from nar_diffusers import NARPipeline  # noqa: F401
