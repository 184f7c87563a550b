"""`nar-diffusers app --model FOLDER`: a local Gradio app that shows a NAR model painting, plane by plane.

    pip install "nar-diffusers[app]"
    nar-diffusers app --model nar-demo/pipeline              # prints http://127.0.0.1:<free port>

Tabs:

- **Generate** (image models): a class (by name when the model has names) or a prompt, the sampling controls (set to
  the model's saved `sampling_defaults`), and the image streamed after every forward pass: NAR grows it from the
  top-left corner, one anti-diagonal of tokens per pass; cells not generated yet are gray.
- **Inpaint / outpaint** (image models): upload an image, paint the region to regenerate (or pick one: bottom half,
  right half, ...; or an outpainting layout that shrinks the image into a corner of the canvas), and watch the rest
  grow around the kept tokens (`NARInpaintPipeline`).
- **Generate video** (video models): the clip streamed as a strip of frames, then an animated GIF; with a frame-wise
  tokenizer, optionally continuing the first frames of an uploaded video.

The app runs on this machine only: it binds to 127.0.0.1 unless `--host` says otherwise, never creates a public
share link, turns Gradio's analytics off and loads no fonts or scripts from the internet, so it works offline. Every
action is also an API endpoint (`/generate`, `/inpaint`, `/generate_video`), e.g. for `gradio_client`.
"""

from __future__ import annotations

import argparse
import inspect
import os
import queue
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from .pipelines.pipeline_nar import NARPipeline, NonFiniteLogitsError
from .pipelines.pipeline_nar_inpaint import NARInpaintPipeline
from .pipelines.pipeline_nar_video import NARVideoPipeline
from .utils.image_utils import image_grid
from .utils.preview import TokenPreview, preview_images

INSTALL_HINT = 'pip install "nar-diffusers[app]"'
DISPLAY_SIZE = 384
"""Pixels the app shows an image at (small model images are scaled up, nearest neighbour)."""
MAX_IMAGES = 8

INPAINT_REGIONS = (
    "painted region",
    "bottom half",
    "right half",
    "bottom-right quarter",
    "center (known context comes only from above-left)",
    "outpaint right and down (image in the top-left quarter)",
    "outpaint right (image in the left half)",
    "outpaint down (image in the top half)",
)
"""Inpainting regions of the app: the painted mask, fixed regions, and outpainting layouts."""

CSS = """
.nar-pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""
"""Small model images are shown scaled up to the component, nearest neighbour (the files keep the model's size)."""


def import_gradio():
    """Gradio, with analytics off (nothing is sent anywhere), or an ImportError naming the install command."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise ImportError(f"The app needs Gradio, an optional extra: {INSTALL_HINT}") from None
    return gradio


# --- loading ------------------------------------------------------------------------------------------------------


def load_app_pipeline(model: str, device: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a saved NAR pipeline folder (image, inpainting or video; safetensors only) onto `device`."""
    from .generate import check_model_folder, resolve_device
    from .pipelines.pipeline_loading import nar_pipeline_class
    from .utils.dtypes import dtype_kwargs

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
    share the same components (no copy of the weights), a video folder a `NARVideoPipeline`."""

    def __init__(self, pipe, name: str = "model", preview_every: int = 1):
        if not isinstance(preview_every, int) or preview_every < 1:
            raise ValueError(f"`preview_every` must be an int >= 1, got {preview_every!r}.")
        self.name = name
        self.preview_every = preview_every
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


# --- running a pipeline with previews ------------------------------------------------------------------------------


def stream_generation(run: Callable[[TokenPreview], Any], preview_every: int = 1) -> Iterator[tuple[str, Any, Any]]:
    """Run `run(callback)` in a worker thread and yield `("step", step_index, previews)` for every decoded step, then
    `("done", result, seconds)`; an exception of the run is raised here."""
    events: queue.Queue = queue.Queue()

    def work() -> None:
        start = time.perf_counter()
        try:
            def on_preview(step: int, images: list) -> None:
                events.put(("step", step, images))

            callback = TokenPreview(every=preview_every, on_preview=on_preview)
            result = run(callback)
            events.put(("done", result, time.perf_counter() - start))
        except BaseException as error:  # handed to the caller's thread
            events.put(("error", error, None))

    threading.Thread(target=work, daemon=True, name="nar-app-generation").start()
    while True:
        kind, value, extra = events.get()
        if kind == "error":
            raise value
        yield kind, value, extra
        if kind == "done":
            return


def _tile(images: list[Image.Image]) -> Image.Image:
    """One image, or a grid of up to four columns."""
    if len(images) == 1:
        return images[0]
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    filler = [Image.new(images[0].mode, images[0].size, "white")] * (rows * columns - len(images))
    return image_grid(list(images) + filler, rows=rows, padding=1)


def _sampling_kwargs(guidance_scale, cfg_interval, temperature, top_k, top_p, seed, greedy, device) -> dict:
    return {
        "guidance_scale": float(guidance_scale), "cfg_interval": int(cfg_interval), "temperature": float(temperature),
        "top_k": int(top_k), "top_p": float(top_p), "do_sample": not bool(greedy),
        "generator": torch.Generator(device).manual_seed(int(seed)),
    }  # fmt: skip


def _condition_kwargs(models: AppModels, condition: list) -> dict:
    if models.class_choices is not None:
        label = condition[0]
        if label is None or label == "":
            raise ValueError("Choose a class.")
        return {"class_labels": [int(label)]}
    prompt, negative = condition[0], condition[1] if len(condition) > 1 else None
    if not prompt or not str(prompt).strip():
        raise ValueError("Write a prompt.")
    return {"prompt": str(prompt), "negative_prompt": str(negative) if negative and str(negative).strip() else None}


def _status(step: int, total: int) -> str:
    return f"Forward pass {step + 1} / {total}: plane {step} of the token grid."


def inpaint_inputs(models: AppModels, editor: Any, region: str) -> tuple[Image.Image, Image.Image]:
    """The canvas and mask (white = regenerate) at the model's size, from the image editor's value (`{"background",
    "layers", "composite"}` or a plain image) and a region of `INPAINT_REGIONS`."""
    if isinstance(editor, dict):
        background, layers = editor.get("background"), editor.get("layers") or []
    else:
        background, layers = editor, []
    if background is None:
        raise ValueError("Upload an image first.")
    if not isinstance(background, Image.Image):
        background = Image.fromarray(np.asarray(background))
    height, width = models.default_size()
    mode = "L" if models.inpaint.vqvae.config.in_channels == 1 else "RGB"
    source = background.convert(mode)
    if region not in INPAINT_REGIONS:
        raise ValueError(f"Unknown region {region!r}; choose one of {list(INPAINT_REGIONS)}.")
    if region.startswith("outpaint"):
        size = {"outpaint right and down": (height // 2, width // 2), "outpaint right": (height, width // 2),
                "outpaint down": (height // 2, width)}[region.split(" (")[0]]  # fmt: skip
        small = source.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        return NARInpaintPipeline.outpaint_canvas(small, (height, width), (0, 0))
    canvas = source.resize((width, height), Image.Resampling.LANCZOS)
    mask = np.zeros((height, width), dtype=bool)
    if region == "painted region":
        for layer in layers:
            layer = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
            alpha = layer.convert("RGBA").getchannel("A").resize((width, height), Image.Resampling.NEAREST)
            mask |= np.asarray(alpha) > 0
        if not mask.any():
            raise ValueError("Paint the region to regenerate with the brush, or choose another region.")
    elif region == "bottom half":
        mask[height // 2 :] = True
    elif region == "right half":
        mask[:, width // 2 :] = True
    elif region == "bottom-right quarter":
        mask[height // 2 :, width // 2 :] = True
    else:  # center
        mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    return canvas, Image.fromarray(mask.astype(np.uint8) * 255)


# --- the app -------------------------------------------------------------------------------------------------------


def build_app(models: AppModels):
    """The Gradio Blocks of the app for `models` (not launched)."""
    gr = import_gradio()
    defaults = models.sampling_defaults
    device = models.main._execution_device

    def condition_inputs() -> list:
        choices = models.class_choices
        if choices is not None:
            return [gr.Dropdown(choices=choices, value=choices[0][1], label="Class")]
        return [gr.Textbox(label="Prompt", lines=2), gr.Textbox(label="Negative prompt (optional)")]

    def sampling_inputs() -> list:
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

    def output_image(label: str):
        return gr.Image(label=label, type="pil", format="png", height=DISPLAY_SIZE, interactive=False,
                        elem_classes=["nar-pixelated"])  # fmt: skip

    num_condition = 1 if models.class_choices is not None else 2

    def split(args: tuple) -> tuple[list, list]:
        return list(args[:num_condition]), list(args[num_condition : num_condition + 7])

    # --- handlers (generators: each yield updates the page) ---

    def generate(*args):
        condition, sampling = split(args)
        num_images = int(args[num_condition + 7])
        try:
            kwargs = {**_condition_kwargs(models, condition), **_sampling_kwargs(*sampling, device)}
            with models.lock:
                total = len(models.image.scheduler)
                run = lambda callback: models.image(  # noqa: E731
                    **kwargs, num_images_per_prompt=num_images, callback_on_step_end=callback
                ).images
                for kind, value, extra in stream_generation(run, models.preview_every):
                    if kind == "step":
                        yield _tile(extra), _status(value, total)
                    else:
                        yield _tile(value), f"Done: {total} forward passes in {extra:.2f} s."
        except (ValueError, NonFiniteLogitsError) as error:
            raise gr.Error(str(error)) from None

    def inpaint(editor, region, *args):
        condition, sampling = split(args)
        try:
            canvas, mask = inpaint_inputs(models, editor, region)
            kwargs = {**_condition_kwargs(models, condition), **_sampling_kwargs(*sampling, device)}
            with models.lock:
                known, token_mask = models.inpaint.prepare_known_tokens(canvas, mask)
                before = preview_images(models.inpaint, known)[0]
                total = len(models.inpaint.scheduler)
                kept = int((~token_mask).sum())
                yield before, None, f"Keeping {kept} of {token_mask.numel()} tokens; generating the gray ones."
                run = lambda callback: models.inpaint(  # noqa: E731
                    image=canvas, mask_image=mask, **kwargs, callback_on_step_end=callback
                ).images
                for kind, value, extra in stream_generation(run, models.preview_every):
                    if kind == "step":
                        yield before, extra[0], _status(value, total)
                    else:
                        yield before, value[0], f"Done: {total} forward passes in {extra:.2f} s."
        except (ValueError, NonFiniteLogitsError) as error:
            raise gr.Error(str(error)) from None

    def generate_video(*args):
        condition, sampling = split(args)
        upload, keep_frames = args[num_condition + 7], int(args[num_condition + 8] or 0)
        try:
            kwargs = {**_condition_kwargs(models, condition), **_sampling_kwargs(*sampling, device)}
            if upload and keep_frames > 0:
                kwargs["video"] = _first_frames(models, upload, keep_frames)
            with models.lock:
                total = len(models.video.scheduler)
                run = lambda callback: models.video(**kwargs, callback_on_step_end=callback).frames  # noqa: E731
                for kind, value, extra in stream_generation(run, models.preview_every):
                    if kind == "step":
                        yield _strip(extra[0]), None, _status(value, total)
                    else:
                        yield _strip(value[0]), _write_gif(value[0]), f"Done: {total} forward passes in {extra:.2f} s."
        except (ValueError, NonFiniteLogitsError) as error:
            raise gr.Error(str(error)) from None

    blocks_kwargs, launch_kwargs = _theme_kwargs(gr)
    with gr.Blocks(title="NAR: watch it paint", **blocks_kwargs) as demo:
        gr.Markdown("# NAR: neighboring autoregressive generation\n" + models.describe())
        if not models.is_video:
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column():
                        condition = condition_inputs()
                        num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
                        sampling = sampling_inputs()
                        button = gr.Button("Generate", variant="primary")
                    with gr.Column():
                        image = output_image("Growing plane by plane")
                        status = gr.Markdown()
                button.click(generate, [*condition, *sampling, num_images], [image, status], api_name="generate")
            with gr.Tab("Inpaint / outpaint"):
                gr.Markdown(
                    "Upload an image, paint the part to regenerate (or choose a region), and generate. Known tokens "
                    "only inform what is generated **after** them (NAR grows from the top-left), so regions below "
                    "or right of what you keep work best."
                )
                with gr.Row():
                    with gr.Column():
                        editor = gr.ImageEditor(label="Image (paint the region to regenerate)", type="pil",
                                                height=DISPLAY_SIZE)  # fmt: skip
                        region = gr.Radio(list(INPAINT_REGIONS), value=INPAINT_REGIONS[1], label="Region")
                        condition = condition_inputs()
                        sampling = sampling_inputs()
                        button = gr.Button("Inpaint", variant="primary")
                    with gr.Column():
                        before = output_image("Kept tokens (gray: regenerated)")
                        after = output_image("Result, growing plane by plane")
                        status = gr.Markdown()
                button.click(inpaint, [editor, region, *condition, *sampling], [before, after, status],
                             api_name="inpaint")  # fmt: skip
        else:
            with gr.Tab("Generate video"):
                continuation = bool(getattr(models.video.video_tokenizer, "supports_frame_prefix", False))
                with gr.Row():
                    with gr.Column():
                        condition = condition_inputs()
                        sampling = sampling_inputs()
                        upload = gr.File(label="Continue a video (optional: MP4 / GIF, its first frames are kept)",
                                         file_types=[".mp4", ".gif", ".webm", ".avi", ".mov"],
                                         visible=continuation)  # fmt: skip
                        keep = gr.Number(value=0, precision=0, visible=continuation,
                                         label="Frames to keep from the uploaded video (0: none)")  # fmt: skip
                        button = gr.Button("Generate", variant="primary")
                    with gr.Column():
                        strip = output_image("Frames, growing plane by plane")
                        gif = gr.Image(label="Video", type="filepath", interactive=False, height=DISPLAY_SIZE // 2,
                                       elem_classes=["nar-pixelated"])  # fmt: skip
                        status = gr.Markdown()
                button.click(generate_video, [*condition, *sampling, upload, keep], [strip, gif, status],
                             api_name="generate_video")  # fmt: skip
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


def _strip(frames: list[Image.Image]) -> Image.Image:
    """A clip's frames side by side."""
    return image_grid(frames, rows=1, padding=1)


def _write_gif(frames: list[Image.Image]) -> str:
    from .utils.video_utils import write_video

    folder = tempfile.mkdtemp(prefix="nar-app-")
    return write_video(frames, os.path.join(folder, "video.gif"), fps=4)


def _first_frames(models: AppModels, path: Any, count: int) -> np.ndarray:
    """The first `count` frames of an uploaded video, at the model's frame size, as `(F, H, W, C)` in [0, 1]."""
    from .utils.video_utils import read_clip

    path = getattr(path, "name", path)
    height, width = models.default_size()
    try:
        clip = read_clip(path, count, start=0)
    except ImportError:
        raise ValueError("Reading video files needs PyAV: pip install av") from None
    frames = [Image.fromarray(frame).convert("RGB").resize((width, height), Image.Resampling.LANCZOS) for frame in clip]
    return np.stack([np.asarray(frame, dtype=np.float32) / 255 for frame in frames])


# --- launching -----------------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launch_app(demo, host: str = "127.0.0.1", port: int = 0, block: bool = True) -> str:
    """Start the app's server on `host`:`port` (0: a free port) without a share link; return its URL. With
    `block=False` it keeps serving in the background until `demo.close()`."""
    port = free_port(host) if not port else port
    kwargs = dict(
        server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True, quiet=True,
        show_error=True, **getattr(demo, "_nar_launch_kwargs", {}),
    )  # fmt: skip
    if "ssr_mode" in inspect.signature(demo.launch).parameters:
        kwargs["ssr_mode"] = False  # plain server-side app: no Node process
    demo.queue(default_concurrency_limit=1)
    demo.launch(**kwargs)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    if block:
        print(f"nar-diffusers app: {url} (Ctrl+C to stop)", flush=True)
        try:
            demo.block_thread()
        finally:
            demo.close()
    return url


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .utils.dtypes import DTYPES

    parser.add_argument("--model", required=True, help="A saved NAR pipeline folder (image or video).")
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="Address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to your network).",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=0, help="TCP port (default 0: a free one, printed at start).")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Transformer dtype.")
    parser.add_argument(
        "--preview-every", type=int, default=1, help="Decode a preview every N forward passes (1: every pass)."
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from .utils.dtypes import DTYPES

    try:
        import_gradio()
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in 0-65535 (0: a free port), got {args.port}.")
        if args.preview_every < 1:
            raise ValueError(f"--preview-every must be an integer >= 1, got {args.preview_every}.")
        pipe = load_app_pipeline(args.model, args.device, DTYPES[args.dtype])
        models = AppModels(pipe, name=os.path.basename(os.path.normpath(args.model)), preview_every=args.preview_every)
        demo = build_app(models)
    except (ImportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: other machines on your network can reach the app.", file=sys.stderr)
    try:
        launch_app(demo, args.host, args.port, block=True)
    except KeyboardInterrupt:
        pass
    return 0
