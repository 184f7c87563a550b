"""Which NAR pipeline class a saved folder (or Hub id) holds, read from its `model_index.json`."""

from __future__ import annotations

import os

from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from .pipeline_nar import NARPipeline
from .pipeline_nar_inpaint import NARInpaintPipeline
from .pipeline_nar_video import NARVideoPipeline

NAR_PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "NARPipeline": NARPipeline, "NARInpaintPipeline": NARInpaintPipeline, "NARVideoPipeline": NARVideoPipeline,
}  # fmt: skip


def nar_pipeline_class(pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> type[DiffusionPipeline]:
    """`NARPipeline`, `NARInpaintPipeline` or `NARVideoPipeline`, as the folder's `model_index.json` names it
    (`kwargs` go to `DiffusionPipeline.load_config`, e.g. `cache_dir`)."""
    config = DiffusionPipeline.load_config(pretrained_model_name_or_path, **kwargs)
    name = config.get("_class_name")
    if isinstance(name, (list, tuple)) and len(name) == 2:  # [module, class]: a folder that carries its module
        name = name[1]
    if not isinstance(name, str) or name not in NAR_PIPELINES:
        raise ValueError(
            f"{pretrained_model_name_or_path} holds a {name}, not one of the NAR pipelines {sorted(NAR_PIPELINES)}."
        )
    return NAR_PIPELINES[name]
