"""What the app's buttons run: a pipeline call in a worker thread, a preview streamed after every forward pass.

Each `*_handler(gr, models)` returns the Gradio event handler of one tab: a generator whose every `yield` updates
the page. The handlers take their inputs positionally, in the order the tab lists its components: the condition
(a class, or a prompt and a negative prompt), the seven sampling controls, then what the tab adds.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...pipelines.pipeline_nar import NonFiniteLogitsError
from ...pipelines.pipeline_nar_inpaint import NARInpaintPipeline
from ...utils.image_utils import image_grid
from ...utils.preview import TokenPreview, preview_images
from ...utils.request_limits import upload_name
from .models import AppModels

logger = logging.getLogger(__name__)

NUM_SAMPLING_INPUTS = 7
"""guidance scale, cfg interval, temperature, top-k, top-p, seed, greedy (the order of `sampling_inputs`)."""

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


# --- inputs -----------------------------------------------------------------------------------------------------


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


def _call_kwargs(models: AppModels, args: tuple) -> tuple[dict, tuple]:
    """The pipeline arguments of the condition and sampling inputs at the start of `args`, and the inputs after them."""
    num_condition = 1 if models.class_choices is not None else 2
    condition = list(args[:num_condition])
    sampling = args[num_condition : num_condition + NUM_SAMPLING_INPUTS]
    kwargs = {**_condition_kwargs(models, condition), **_sampling_kwargs(*sampling, models.main._execution_device)}
    return kwargs, args[num_condition + NUM_SAMPLING_INPUTS :]


def inpaint_inputs(models: AppModels, editor: Any, region: str) -> tuple[Image.Image, Image.Image]:
    """The canvas and mask (white = regenerate) at the model's size, from the image editor's value (`{"background",
    "layers", "composite"}` or a plain image) and a region of `INPAINT_REGIONS`."""
    if isinstance(editor, dict):
        background, layers = editor.get("background"), editor.get("layers") or []
    else:
        background, layers = editor, []
    if background is None:
        raise ValueError("Upload an image first.")
    limits = models.limits
    limits.check_images(1 + len(layers), "Uploaded images (the image and its painted layers)")
    background = _bounded_image(background, limits)
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
            layer = _bounded_image(layer, limits)
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


def _bounded_image(image: Any, limits) -> Image.Image:
    """A PIL image of an input (a PIL image, an array, or a path), its size checked before it is decoded."""
    if isinstance(image, (str, os.PathLike)):
        limits.check_image_file(image)
        with Image.open(image) as opened:
            opened.load()
            return opened
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    limits.check_pixels(*image.size, "the uploaded image")
    return image


def _first_frames(models: AppModels, path: Any, count: int) -> np.ndarray:
    """The first `count` frames of an uploaded video, at the model's frame size, as `(F, H, W, C)` in [0, 1].

    `count` and the video's size are checked first (the metadata only); then frames are decoded one at a time and
    each is resized at once, so at most one frame of the upload's size is held. A video shorter than `count`
    repeats its last frame."""
    path = getattr(path, "name", path)
    height, width = models.default_size()
    count = models.limits.check_frames(count, models.video.default_video_size()[0], "Frames to keep")
    try:
        models.limits.check_video_file(path)
    except ImportError:
        raise ValueError("Reading video files needs PyAV: pip install av") from None
    frames = read_first_frames(path, count, (width, height), models.limits.max_pixels)
    return np.stack([np.asarray(frame, dtype=np.float32) / 255 for frame in frames])


def read_first_frames(path: str, count: int, size: tuple[int, int], max_pixels: int) -> list[Image.Image]:
    """Decode the first `count` frames of the video at `path` as RGB images resized to `size` `(width, height)`."""
    import av

    what = f"the uploaded video {upload_name(path)}"
    frames: list[Image.Image] = []
    try:
        with av.open(path) as container:
            for frame in container.decode(container.streams.video[0]):
                if frame.width * frame.height > max_pixels:  # a stream may change its size after the header
                    raise ValueError(f"{what} has a {frame.width}x{frame.height} frame; `max_pixels` is {max_pixels}.")
                frames.append(frame.to_image().convert("RGB").resize(size, Image.Resampling.LANCZOS))
                if len(frames) == count:
                    break
    except av.error.FFmpegError as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ValueError(f"{what} is not a readable video ({reason}).") from None
    if not frames:
        raise ValueError(f"{what} is not a readable video: it holds no decodable frame.")
    return frames + [frames[-1]] * (count - len(frames))


# --- requests: uploads and errors -------------------------------------------------------------------------------

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\-])(?:[A-Za-z]:)?[/\\](?:[^\s'\"<>|:/\\]+[/\\])+([^\s'\"<>|:/\\]*)")


def client_message(error: BaseException) -> str:
    """The message of `error` as a client may see it: every absolute path cut to its file name (no server folder:
    not the working directory, not a temp folder)."""
    message = " ".join(str(error).split()) or type(error).__name__
    message = _ABSOLUTE_PATH.sub(lambda match: match.group(1) or "<path>", message)
    folders = {os.getcwd(), tempfile.gettempdir(), upload_folder(), os.path.expanduser("~")}
    for folder in sorted((folder for folder in folders if len(folder) > 1), key=len, reverse=True):
        message = message.replace(folder, "<server folder>")  # what the pattern missed, e.g. a path with spaces
    return message


def upload_folder() -> str:
    """The folder Gradio stores uploads in (`GRADIO_TEMP_DIR`, else `<temp>/gradio`)."""
    return os.path.realpath(os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio"))


def remove_uploads(paths: list) -> None:
    """Remove uploaded files, and their folders once empty; only files inside Gradio's upload folder, so a path a
    caller passes from elsewhere is never touched."""
    root = upload_folder()
    for path in paths:
        path = getattr(path, "name", path)
        if not isinstance(path, (str, os.PathLike)):
            continue
        path = os.path.realpath(path)
        if not path.startswith(root + os.sep):
            continue
        try:
            os.remove(path)
            folder = os.path.dirname(path)
            if folder != root and not os.listdir(folder):
                os.rmdir(folder)
        except OSError:  # already gone, or a second request of the same upload holds it
            pass


def client_error(gr, error: BaseException):
    """The `gr.Error` a client sees for `error`: its message without server paths. An unexpected error is logged
    here with its traceback, and named by its type for the client."""
    if isinstance(error, gr.Error):
        return error
    if not isinstance(error, (ValueError, NonFiniteLogitsError)):
        logger.error("nar-diffusers app: a request failed", exc_info=error)
        return gr.Error(f"{type(error).__name__}: {client_message(error)}")
    return gr.Error(client_message(error))


# --- outputs ----------------------------------------------------------------------------------------------------


def _tile(images: list[Image.Image]) -> Image.Image:
    """One image, or a grid of up to four columns."""
    if len(images) == 1:
        return images[0]
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    filler = [Image.new(images[0].mode, images[0].size, "white")] * (rows * columns - len(images))
    return image_grid(list(images) + filler, rows=rows, padding=1)


def _strip(frames: list[Image.Image]) -> Image.Image:
    """A clip's frames side by side."""
    return image_grid(frames, rows=1, padding=1)


def _write_gif(frames: list[Image.Image], folder: str) -> str:
    from ...utils.video_utils import write_video

    return write_video(frames, os.path.join(folder, "video.gif"), fps=4)


def _status(step: int, total: int) -> str:
    return f"Forward pass {step + 1} / {total}: plane {step} of the token grid."


def _done(total: int, seconds: float) -> str:
    return f"Done: {total} forward passes in {seconds:.2f} s."


# --- the handlers -----------------------------------------------------------------------------------------------


def generate_handler(gr, models: AppModels) -> Callable:
    """Generate tab: `(condition..., sampling..., number of images)` -> (image, status) after every pass."""

    def generate(*args):
        try:
            kwargs, (num_images,) = _call_kwargs(models, args)
            num_images = models.limits.check_images(_whole(num_images, "Images"), "Images")
            with models.lock:
                total = len(models.image.scheduler)
                run = lambda callback: models.image(  # noqa: E731
                    **kwargs, num_images_per_prompt=num_images, callback_on_step_end=callback
                ).images
                for kind, value, extra in stream_generation(run, models.preview_every):
                    if kind == "step":
                        yield _tile(extra), _status(value, total)
                    else:
                        yield _tile(value), _done(total, extra)
        except Exception as error:
            raise client_error(gr, error) from None

    return generate


def inpaint_handler(gr, models: AppModels) -> Callable:
    """Inpaint tab: `(editor, region, condition..., sampling...)` -> (kept tokens, result, status)."""

    def inpaint(editor, region, *args):
        try:
            canvas, mask = inpaint_inputs(models, editor, region)
            kwargs, _ = _call_kwargs(models, args)
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
                        yield before, value[0], _done(total, extra)
        except Exception as error:
            raise client_error(gr, error) from None

    return inpaint


def video_handler(gr, models: AppModels) -> Callable:
    """Video tab: `(condition..., sampling..., uploaded video, frames to keep)` -> (frame strip, GIF, status).
    The upload is read (after the limits' checks) and removed before the generation starts."""

    def generate_video(*args):
        folder = None
        try:
            kwargs, (upload, keep_frames) = _call_kwargs(models, args)
            try:
                keep_frames = _whole(keep_frames or 0, "Frames to keep")
                if upload and keep_frames > 0:
                    kwargs["video"] = _first_frames(models, upload, keep_frames)
            finally:
                remove_uploads([upload])
            with models.lock:
                total = len(models.video.scheduler)
                run = lambda callback: models.video(**kwargs, callback_on_step_end=callback).frames  # noqa: E731
                for kind, value, extra in stream_generation(run, models.preview_every):
                    if kind == "step":
                        yield _strip(extra[0]), None, _status(value, total)
                    else:
                        folder = tempfile.mkdtemp(prefix="nar-app-")
                        yield _strip(value[0]), _write_gif(value[0], folder), _done(total, extra)
        except Exception as error:
            raise client_error(gr, error) from None
        finally:  # Gradio has copied the GIF into its cache by the time the generator resumes
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    return generate_video


def _whole(value: Any, what: str) -> int:
    """An integer input (Gradio numbers may arrive as floats): a whole finite number, else a ValueError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a whole number, got {value!r}.") from None
    if not number.is_integer():
        raise ValueError(f"{what} must be a whole number, got {value!r}.")
    return int(number)
