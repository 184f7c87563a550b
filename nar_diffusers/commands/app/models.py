"""What the app serves: the pipelines of one loaded folder, and Gradio imported with analytics off."""

from __future__ import annotations

import os
import threading

import torch

from ...pipelines.pipeline_loading import nar_pipeline_class
from ...pipelines.pipeline_nar import NARPipeline
from ...pipelines.pipeline_nar_inpaint import NARInpaintPipeline
from ...pipelines.pipeline_nar_video import NARVideoPipeline
from ...utils.dtypes import dtype_kwargs
from ...utils.request_limits import RequestLimits
from ..generate import check_model_folder, resolve_device

INSTALL_HINT = 'pip install "nar-diffusers[app]"'


def import_gradio():
    """Gradio, with analytics off (nothing is sent anywhere), or an ImportError naming the install command."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise ImportError(f"The app needs Gradio, an optional extra: {INSTALL_HINT}") from None
    return gradio


def load_app_pipeline(model: str, device: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a saved NAR pipeline folder (image, inpainting or video; safetensors only) onto `device`."""
    if not os.path.isdir(model):
        raise ValueError(f"--model {model!r} is not a folder; give a pipeline folder written by save_pretrained.")
    check_model_folder(model)
    pipeline_class = nar_pipeline_class(model)
    try:
        pipe = pipeline_class.from_pretrained(model, use_safetensors=True, **dtype_kwargs(dtype))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"could not load the pipeline in {model}: {' '.join(str(error).split())}") from None
    return pipe.to(resolve_device(device))


class AppModels:
    """The pipelines one loaded folder serves: an image folder gives a `NARPipeline` and a `NARInpaintPipeline` that
    share the same components (no copy of the weights), a video folder a `NARVideoPipeline`. `limits` bound what
    one request may upload or ask for (`RequestLimits()` by default)."""

    def __init__(self, pipe, name: str = "model", preview_every: int = 1, limits: RequestLimits | None = None):
        if not isinstance(preview_every, int) or preview_every < 1:
            raise ValueError(f"`preview_every` must be an int >= 1, got {preview_every!r}.")
        if limits is not None and not isinstance(limits, RequestLimits):
            raise ValueError(f"`limits` must be a RequestLimits or None, got {type(limits).__name__}.")
        self.name = name
        self.preview_every = preview_every
        self.limits = limits or RequestLimits()
        self.is_video = isinstance(pipe, NARVideoPipeline)
        if self.is_video:
            self.image = self.inpaint = None
            self.video = pipe
        else:
            metadata = {key: pipe.config.get(key) for key in ("sampling_defaults", "id2label", "model_card_info")}
            self.image = NARPipeline(**pipe.components, **metadata)
            self.inpaint = NARInpaintPipeline(**pipe.components, **metadata)
            self.video = None
        for model in (self.image, self.inpaint, self.video):
            if model is not None:
                model.set_progress_bar_config(disable=True)
        self.lock = threading.Lock()  # one generation at a time: the pipelines share one scheduler

    @property
    def main(self):
        return self.video if self.is_video else self.image

    @property
    def sampling_defaults(self) -> dict[str, float | int]:
        return self.main.sampling_defaults

    @property
    def class_choices(self) -> list[tuple[str, int]] | None:
        """`(label, id)` per class of a class-conditional model ("3: three" with saved names), else None."""
        transformer = self.main.transformer
        if transformer.condition_type != "class":
            return None
        names = self.main.config.get("id2label") or {}
        names = {int(k): v for k, v in names.items()}
        return [(f"{i}: {names[i]}" if i in names else str(i), i) for i in range(transformer.config.num_classes)]

    def default_size(self) -> tuple[int, int]:
        """`(height, width)` in pixels of the model's default image or frame."""
        if self.is_video:
            return self.video.default_video_size()[1:]
        factor = self.image.vq_scale_factor
        rows, columns = self.image.scheduler.grid_size
        return rows * factor, columns * factor

    def describe(self) -> str:
        main = self.main
        grid = "x".join(map(str, main.scheduler.grid_size))
        condition = "class-conditional" if main.transformer.condition_type == "class" else "text-conditional"
        order = type(main.scheduler).__name__
        return (
            f"**{self.name}**: {condition} {'video' if self.is_video else 'image'} model, {grid} token grid, "
            f"{len(main.scheduler)} forward passes ({order}). Each pass adds one anti-diagonal of tokens (a Manhattan "
            "plane), growing the picture from the top-left corner; gray cells are not generated yet."
        )
