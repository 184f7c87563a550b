"""The app's page: one function per tab, over shared input and output components."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ...utils.request_limits import RequestLimits
from .handlers import (
    INPAINT_REGIONS,
    client_message,
    generate_handler,
    inpaint_handler,
    remove_uploads,
    video_handler,
)
from .models import AppModels, import_gradio

DISPLAY_SIZE = 384
"""Pixels the app shows an image at (small model images are scaled up, nearest neighbour)."""
MAX_IMAGES = RequestLimits().max_images
"""Default of the Images slider's maximum (`--max-images` sets it)."""
OUTPUT_CACHE_SECONDS = (3600, 3600)
"""Every hour, Gradio deletes the app's cached outputs (previews, results) older than an hour."""
VIDEO_FILE_TYPES = [".mp4", ".gif", ".webm", ".avi", ".mov"]

CSS = """
.nar-pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""
"""Small model images are shown scaled up to the component, nearest neighbour (the files keep the model's size)."""


class Components:
    """The components every tab repeats: the condition, the sampling controls (set to the model's saved defaults)
    and an output image. Made inside the tab's layout context."""

    def __init__(self, gr, models: AppModels) -> None:
        self.gr = gr
        self.models = models

    def condition(self) -> list:
        choices = self.models.class_choices
        if choices is not None:
            return [self.gr.Dropdown(choices=choices, value=choices[0][1], label="Class")]
        return [self.gr.Textbox(label="Prompt", lines=2), self.gr.Textbox(label="Negative prompt (optional)")]

    def sampling(self) -> list:
        """guidance, cfg interval, temperature, top-k, top-p, seed, greedy (the handlers' order)."""
        gr, defaults = self.gr, self.models.sampling_defaults
        with gr.Accordion("Sampling (defaults: the model's saved settings)", open=True):
            with gr.Row():
                guidance = gr.Slider(0.0, 20.0, value=float(defaults["guidance_scale"]), step=0.1,
                                     label="Guidance scale (> 1: on)")  # fmt: skip
                temperature = gr.Slider(0.0, 2.0, value=float(defaults["temperature"]), step=0.05, label="Temperature")
            with gr.Row():
                top_p = gr.Slider(0.05, 1.0, value=float(defaults["top_p"]), step=0.05, label="Top-p (1: off)")
                top_k = gr.Number(value=int(defaults["top_k"]), precision=0, label="Top-k (0: off)")
            with gr.Row():
                cfg_interval = gr.Number(value=int(defaults["cfg_interval"]), precision=0,
                                         label="CFG interval (-1: every pass)")  # fmt: skip
                seed = gr.Number(value=0, precision=0, label="Seed")
                greedy = gr.Checkbox(value=False, label="Greedy (argmax)")
        return [guidance, cfg_interval, temperature, top_k, top_p, seed, greedy]

    def output_image(self, label: str):
        return self.gr.Image(label=label, type="pil", format="png", height=DISPLAY_SIZE, interactive=False,
                             elem_classes=["nar-pixelated"])  # fmt: skip


def generate_tab(gr, ui: Components) -> None:
    """Image models: a class or prompt, and the image growing plane by plane (`/generate`)."""
    with gr.Tab("Generate"):
        with gr.Row():
            with gr.Column():
                condition = ui.condition()
                num_images = gr.Slider(1, ui.models.limits.max_images, value=1, step=1, label="Images")
                sampling = ui.sampling()
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = ui.output_image("Growing plane by plane")
                status = gr.Markdown()
        button.click(generate_handler(gr, ui.models), [*condition, *sampling, num_images], [image, status],
                     api_name="generate")  # fmt: skip


def bounded_image_editor(gr, models: AppModels, **kwargs):
    """A `gr.ImageEditor` (same page and API) that checks each uploaded image against `models.limits` (its bytes,
    then its pixels from the header) before Gradio decodes it, and removes the uploaded files once read, whatever
    the outcome.

    The check wraps the instance's `preprocess` instead of subclassing: Gradio writes a `.pyi` stub next to the source
    of every Component subclass it sees, which would write into the installed package."""
    editor = gr.ImageEditor(**kwargs)
    preprocess = editor.preprocess
    editor.preprocess = lambda payload: checked_editor_preprocess(gr, editor, payload, models.limits, preprocess)
    return editor


def checked_editor_preprocess(gr, editor, payload: Any, limits: RequestLimits, preprocess: Callable):
    """`preprocess(payload)` of an image editor after the limits' checks of its files (paths, or the bytes the
    browser sent ahead under `payload.id`); a refusal is a `gr.Error` naming the limit."""
    if payload is None:
        return preprocess(payload)
    storage = getattr(editor, "blob_storage", None) or {}
    source = storage.get(payload.id, payload) if getattr(payload, "id", None) is not None else payload
    images = [source.background, *(source.layers or [])]
    images = [image for image in images if image is not None]
    files = [*images, *([source.composite] if source.composite is not None else [])]
    paths = [file.path for file in files if getattr(file, "path", None)]
    try:
        if images:
            limits.check_images(len(images), "Uploaded images (the image and its painted layers)")
        for file in files:
            limits.check_image_file(getattr(file, "path", None) or file)
        return preprocess(payload)
    except ValueError as error:
        if getattr(payload, "id", None) is not None:
            storage.pop(payload.id, None)
        raise gr.Error(client_message(error)) from None
    finally:
        remove_uploads(paths)


def inpaint_tab(gr, ui: Components) -> None:
    """Image models: keep part of an uploaded image and regenerate the rest (`/inpaint`)."""
    with gr.Tab("Inpaint / outpaint"):
        gr.Markdown(
            "Upload an image, paint the part to regenerate (or choose a region), and generate. Known tokens "
            "only inform what is generated **after** them (NAR grows from the top-left), so regions below "
            "or right of what you keep work best."
        )
        with gr.Row():
            with gr.Column():
                editor = bounded_image_editor(gr, ui.models, label="Image (paint the region to regenerate)",
                                              type="pil", height=DISPLAY_SIZE)  # fmt: skip
                region = gr.Radio(list(INPAINT_REGIONS), value=INPAINT_REGIONS[1], label="Region")
                condition = ui.condition()
                sampling = ui.sampling()
                button = gr.Button("Inpaint", variant="primary")
            with gr.Column():
                before = ui.output_image("Kept tokens (gray: regenerated)")
                after = ui.output_image("Result, growing plane by plane")
                status = gr.Markdown()
        button.click(inpaint_handler(gr, ui.models), [editor, region, *condition, *sampling], [before, after, status],
                     api_name="inpaint")  # fmt: skip


def video_tab(gr, ui: Components) -> None:
    """Video models: the clip as a strip of frames, then a GIF; optionally continuing an uploaded video
    (`/generate_video`)."""
    continuation = bool(getattr(ui.models.video.video_tokenizer, "supports_frame_prefix", False))
    with gr.Tab("Generate video"):
        with gr.Row():
            with gr.Column():
                condition = ui.condition()
                sampling = ui.sampling()
                upload = gr.File(label="Continue a video (optional: MP4 / GIF, its first frames are kept)",
                                 file_types=VIDEO_FILE_TYPES, visible=continuation)  # fmt: skip
                keep = gr.Number(value=0, precision=0, visible=continuation,
                                 label="Frames to keep from the uploaded video (0: none)")  # fmt: skip
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                strip = ui.output_image("Frames, growing plane by plane")
                gif = gr.Image(label="Video", type="filepath", interactive=False, height=DISPLAY_SIZE // 2,
                               elem_classes=["nar-pixelated"])  # fmt: skip
                status = gr.Markdown()
        button.click(video_handler(gr, ui.models), [*condition, *sampling, upload, keep], [strip, gif, status],
                     api_name="generate_video")  # fmt: skip


def build_app(models: AppModels):
    """The Gradio Blocks of the app for `models` (not launched)."""
    gr = import_gradio()
    ui = Components(gr, models)
    blocks_kwargs, launch_kwargs = _theme_kwargs(gr)
    if "delete_cache" in inspect.signature(gr.Blocks.__init__).parameters:
        blocks_kwargs["delete_cache"] = OUTPUT_CACHE_SECONDS
    with gr.Blocks(title="NAR: watch it paint", **blocks_kwargs) as demo:
        gr.Markdown("# NAR: neighboring autoregressive generation\n" + models.describe())
        if models.is_video:
            video_tab(gr, ui)
        else:
            generate_tab(gr, ui)
            inpaint_tab(gr, ui)
    if "max_file_size" in inspect.signature(gr.Blocks.launch).parameters:
        launch_kwargs["max_file_size"] = models.limits.max_upload_bytes  # Gradio refuses larger uploads as they come
    demo._nar_launch_kwargs = launch_kwargs
    return demo


def _theme_kwargs(gr) -> tuple[dict, dict]:
    """A theme with the system's fonts (no web fonts: works offline) and the app's CSS, passed where this Gradio
    takes them (`Blocks` up to Gradio 5, `launch` from Gradio 6)."""
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    settings = {"theme": theme, "css": CSS}
    if "css" in inspect.signature(gr.Blocks.launch).parameters:
        return {}, settings
    return settings, {}
