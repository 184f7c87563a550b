"""The modules a saved NAR pipeline folder carries (`pipeline_nar.py`, `pipeline_nar_inpaint.py`,
`pipeline_nar_video.py`): `save_pretrained` copies the one its pipeline names into the folder, so that plain
diffusers loads the folder with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

These files are the one source of those modules; the repository's root `pipelines/` folder links to them. Each
only imports the installed package; nothing in the package imports them.
"""
