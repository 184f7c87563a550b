"""Lets plain diffusers load a saved NAR pipeline folder from anywhere:

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

`save_pretrained` copies this file into the folder, whose `model_index.json` names it. From a checkout of the
repository it also serves as a custom pipeline file for a folder without it:

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipelines/pipeline_nar.py", trust_remote_code=True)

The pipeline code is the installed nar-diffusers package (`pip install nar-diffusers`); this file only imports it.
"""

from nar_diffusers.pipelines import NARPipeline  # noqa: F401
