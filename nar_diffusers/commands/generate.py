"""`nar-diffusers generate`: images from a NARPipeline, videos from a NARVideoPipeline (a folder or a Hub model id).

    nar-diffusers generate --model nar-demo/pipeline --class-labels 3 7 --num-images-per-prompt 4 --output digits.png
    nar-diffusers generate --model nar-l-c2i-384 --class-labels "golden retriever" 360 --output dogs.png
    nar-diffusers generate --model nar-xl-t2i-256 --prompt "a red fox in snow" --output fox.png --guidance-scale 4
    nar-diffusers generate --model nar-video-demo/pipeline --class-labels 3 7 --output clips.gif --grid-scale 4

Class labels are ids or the model's class names. Sampling flags left out take the model's saved sampling defaults.
One image is written as is; several are laid out in a grid with one row per class label / prompt. Videos are written
as MP4 (H.264) or animated GIF, chosen by the extension of --output; several are tiled the same way, frame by frame.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import warnings

import torch
from diffusers.utils import logging
from PIL import Image

from ..pipelines.autoregressive_generation import NonFiniteLogitsError
from ..pipelines.pipeline_hub import PIPELINE_CONFIG_KEYS
from ..pipelines.pipeline_loading import NAR_PIPELINES, nar_pipeline_class
from ..pipelines.pipeline_nar import NARPipeline
from ..pipelines.pipeline_nar_video import NARVideoPipeline
from ..schedulers.scheduler_selection import scheduler_class_for_heads
from ..schedulers.scheduling_neighbor import NeighborScheduler
from ..schedulers.scheduling_raster import RasterScheduler
from ..utils.dtypes import DTYPES, dtype_kwargs
from ..utils.image_utils import image_grid
from ..utils.video_utils import FPS_RANGE, VIDEO_EXTENSIONS, check_fps, video_grid, write_video


logger = logging.get_logger(__name__)

SCHEDULERS = {"neighbor": NeighborScheduler, "raster": RasterScheduler}
SCHEDULER_NAMES = {cls: name for name, cls in SCHEDULERS.items()}
MAX_GRID_SCALE = 16


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--model", required=True,
        help="A NARPipeline or NARVideoPipeline folder (trained, converted, or from the demo) or a Hub model id.",
    )  # fmt: skip
    parser.add_argument("--revision", default=None, help="Hub models: the branch, tag or commit to load.")
    condition = parser.add_mutually_exclusive_group(required=True)
    condition.add_argument(
        "--class-labels", nargs="+",
        help='Class ids or class names of the model, e.g. 207 or "golden retriever" (class-conditional models).',
    )  # fmt: skip
    condition.add_argument("--prompt", nargs="+", help="One or more prompts (text-conditional models).")
    parser.add_argument("--negative-prompt", default=None, help="Replaces the learned unconditional caption.")
    parser.add_argument(
        "--output", required=True, help="File to write: an image (PNG, JPEG, ...), or for video pipelines .mp4 or .gif."
    )
    parser.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        default=None,
        help="Token order: neighbor (NAR models) or raster (one-head LlamaGen models); default: the folder's.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the token draws.")
    saved = "default: the model's saved sampling default"
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help=f"Classifier-free guidance (> 1 enables it; {saved})."
    )
    parser.add_argument(
        "--cfg-interval", type=int, default=None, help=f"Stop guiding after this many tokens (-1: never; {saved})."
    )
    parser.add_argument(
        "--num-images-per-prompt", "--num-videos-per-prompt", dest="num_images_per_prompt", type=int, default=1,
        help="Images (or videos) per class label / prompt.",
    )  # fmt: skip
    parser.add_argument("--temperature", type=float, default=None, help=f"Token temperature ({saved}).")
    parser.add_argument("--top-k", type=int, default=None, help=f"0 disables top-k filtering ({saved}).")
    parser.add_argument("--top-p", type=float, default=None, help=f"1.0 disables nucleus filtering ({saved}).")
    parser.add_argument("--num-frames", type=int, default=None, help="Video pipelines: frames (default: the model's).")
    parser.add_argument(
        "--fps", type=float, default=8.0,
        help=f"Video pipelines: frames per second of the file, {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}.",
    )
    parser.add_argument("--height", type=int, default=None, help="Pixels; default: the model's training size.")
    parser.add_argument("--width", type=int, default=None, help="Pixels; default: the model's training size.")
    parser.add_argument(
        "--grid-scale", type=int, default=1,
        help=f"Nearest-neighbour upscaling of the written image, 1 to {MAX_GRID_SCALE}.",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Transformer dtype.")
    return parser


def _can_write_rgb(image_format: str) -> bool:
    """Whether PIL can write an RGB image in `image_format` (tried on a tiny image in memory)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of rarely used formats
            Image.new("RGB", (2, 2)).save(io.BytesIO(), format=image_format)
    except Exception:  # PIL raises OSError, ValueError, KeyError, ... for formats it cannot write as RGB
        return False
    return True


def check_output(output: str) -> None:
    """Raise a ValueError unless `output` is an image file PIL can write (or a video file, .mp4 / .gif), in a folder
    that exists or can be made."""
    Image.init()
    extensions = Image.registered_extensions()
    extension = os.path.splitext(output)[1].lower()
    image_format = extensions.get(extension)
    if extension not in VIDEO_EXTENSIONS and (
        image_format is None or image_format not in Image.SAVE or not _can_write_rgb(image_format)
    ):
        writable = sorted(ext for ext, fmt in extensions.items() if fmt in Image.SAVE and _can_write_rgb(fmt))
        raise ValueError(
            f"--output {output!r} must end with an image extension PIL can write: {', '.join(writable)} (or, for "
            f"video pipelines, {' or '.join(VIDEO_EXTENSIONS)})."
        )
    if os.path.isdir(output):
        raise ValueError(f"--output {output!r} is an existing directory; give an image file path such as out.png.")
    parent = os.path.dirname(os.path.abspath(output))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output {output!r} cannot be created: {existing!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output!r} cannot be written: no write permission in {existing!r}.")


def available_devices() -> list[str]:
    """The torch devices this machine can generate on."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | None) -> str:
    """Return `device` (default: cuda when available, else cpu) or raise a ValueError when it is invalid here."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"--device {device!r} is not a torch device string; use one of {', '.join(available_devices())}."
        ) from None
    if parsed.type == "cpu":
        return device
    backend = getattr(torch, parsed.type, None)
    is_available = getattr(backend, "is_available", None) if parsed.type != "mps" else torch.backends.mps.is_available
    count = getattr(backend, "device_count", None)
    available = callable(is_available) and is_available()
    if available and parsed.index is not None and callable(count) and parsed.index >= count():
        available = False
    if not available:
        raise ValueError(
            f"--device {device!r} is not available on this machine; use one of {', '.join(available_devices())}."
        )
    return device


def check_model_folder(model: str) -> type[NARPipeline] | type[NARVideoPipeline]:
    """Raise a ValueError naming the file when `model` is not a readable pipeline folder; return its pipeline class
    (`NARPipeline` when `model_index.json` names no NAR pipeline)."""
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"--model {model!r} is not a pipeline folder (no model_index.json).")
    try:
        with open(index, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{index} is not a readable JSON file ({error}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{index} must hold a JSON object mapping component names to [library, class].")
    for name, entry in config.items():
        if name.startswith("_") or name in PIPELINE_CONFIG_KEYS:
            continue
        if not (isinstance(entry, list) and len(entry) == 2):
            raise ValueError(f"{index}: component {name!r} must be [library, class] or [null, null], got {entry!r}.")
        if entry[0] is not None and not os.path.isdir(os.path.join(model, name)):
            folder = os.path.join(model, name)
            raise ValueError(f"{index} lists the component {name!r}, but the folder {folder} is missing.")
    name = config.get("_class_name")
    name = name[1] if isinstance(name, list) and len(name) == 2 else name  # [module, class]
    return NAR_PIPELINES.get(name, NARPipeline) if isinstance(name, str) else NARPipeline


def check_output_fits(output: str, pipeline_class: type, num_frames: int | None, model: str) -> None:
    """Raise a ValueError when --output / --num-frames do not fit what the pipeline in `model` generates."""
    extension = os.path.splitext(output)[1].lower()
    if pipeline_class is NARVideoPipeline and extension not in VIDEO_EXTENSIONS:
        raise ValueError(
            f"--model {model!r} generates videos: --output {output!r} must end with {' or '.join(VIDEO_EXTENSIONS)}."
        )
    if pipeline_class is not NARVideoPipeline and extension == ".mp4":
        raise ValueError(f"--output {output!r} is a video file, but --model {model!r} generates images.")
    if pipeline_class is not NARVideoPipeline and num_frames is not None:
        raise ValueError(f"--num-frames is for video pipelines; --model {model!r} generates images.")


def is_local_path(model: str) -> bool:
    """Whether `--model` names a local folder: it exists, or reads as a path rather than a Hub id ("name" or
    "owner/name"): absolute, starting with "." or "~", or with more than one "/"."""
    return (
        os.path.exists(model)
        or os.path.isabs(model)
        or model.startswith((".", "~"))
        or (os.sep != "/" and os.sep in model)
        or model.count("/") > 1
    )


def pipeline_class_of(model: str, revision: str | None = None) -> type[NARPipeline] | type[NARVideoPipeline]:
    """The pipeline class of a local folder (checked) or a Hub model id."""
    if is_local_path(model):
        return check_model_folder(os.path.expanduser(model))
    try:
        return nar_pipeline_class(model, revision=revision)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {model!r} is not a local folder, and reading it as a Hub model id failed: {error}") from None


def load_pipeline(
    model: str, scheduler: str | None, device: str, dtype: torch.dtype, revision: str | None = None,
    pipeline_class: type[NARPipeline] | type[NARVideoPipeline] | None = None,
) -> NARPipeline | NARVideoPipeline:
    """Load a local folder or a Hub model id (safetensors weights only) as the pipeline class it names, optionally
    swapping the token order, and check the scheduler fits the transformer."""
    local = is_local_path(model)
    pipeline_class = pipeline_class or pipeline_class_of(model, revision)
    model = os.path.expanduser(model) if local else model
    try:
        pipeline = pipeline_class.from_pretrained(model, use_safetensors=True, revision=revision, **dtype_kwargs(dtype))
    except (OSError, ValueError, TypeError, KeyError) as error:
        message = " ".join(str(error).split())
        if "safetensors" in message:
            message += " (only .safetensors weights are loaded, never pickle files)"
        if not local:
            raise ValueError(
                f"--model {model!r} is not a local folder, and loading it as a Hub model id failed: {message}"
            ) from None
        raise ValueError(f"could not load the pipeline in {model}: {message}") from None
    if scheduler is not None:
        pipeline.scheduler = SCHEDULERS[scheduler](grid_size=pipeline.scheduler.config.grid_size)
    heads = pipeline.transformer.config.num_decoding_heads
    if pipeline.scheduler.num_heads != heads:
        raise ValueError(
            f"--scheduler {scheduler or type(pipeline.scheduler).__name__} drives {pipeline.scheduler.num_heads} "
            f"decoding head(s) but the transformer in {model} has {heads}: use --scheduler "
            f"{SCHEDULER_NAMES[scheduler_class_for_heads(heads)]}."
        )
    return pipeline.to(device)


def resolve_class_labels(pipeline: NARPipeline | NARVideoPipeline, labels: list[str] | None) -> list[int] | None:
    """`--class-labels` as class ids: integers as they are, anything else looked up in the model's class names
    (`pipeline.get_label_ids`, which lists close matches for an unknown name)."""
    if labels is None:
        return None
    ids = []
    for label in labels:
        if re.fullmatch(r"[+-]?\d+", label.strip()):
            ids.append(int(label))
            continue
        try:
            ids.extend(pipeline.get_label_ids(label.strip()))
        except ValueError as error:
            raise ValueError(f"--class-labels {label!r}: {error}") from None
    return ids


def run(args: argparse.Namespace) -> int:
    try:
        if args.num_images_per_prompt < 1:
            raise ValueError(f"--num-images-per-prompt must be an integer >= 1, got {args.num_images_per_prompt}.")
        if not 1 <= args.grid_scale <= MAX_GRID_SCALE:
            raise ValueError(f"--grid-scale must be an integer from 1 to {MAX_GRID_SCALE}, got {args.grid_scale}.")
        check_fps(args.fps, "--fps")
        check_output(args.output)
        device = resolve_device(args.device)
        pipeline_class = pipeline_class_of(args.model, args.revision)
        check_output_fits(args.output, pipeline_class, args.num_frames, args.model)
        pipeline = load_pipeline(args.model, args.scheduler, device, DTYPES[args.dtype], args.revision, pipeline_class)
        class_labels = resolve_class_labels(pipeline, args.class_labels)
        generator = torch.Generator(device).manual_seed(args.seed)
        is_video = isinstance(pipeline, NARVideoPipeline)
        per_prompt = {"num_videos_per_prompt" if is_video else "num_images_per_prompt": args.num_images_per_prompt}
        if is_video:
            per_prompt["num_frames"] = args.num_frames
        images = pipeline(
            class_labels=class_labels,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            guidance_scale=args.guidance_scale,
            cfg_interval=args.cfg_interval,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            height=args.height,
            width=args.width,
            generator=generator,
            return_dict=False,
            **per_prompt,
        )[0]
    except (ValueError, NonFiniteLogitsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = len(args.class_labels or args.prompt)
    tiled = len(images) > 1 or args.grid_scale > 1
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        if is_video:
            write_video(video_grid(images, rows, scale=args.grid_scale) if tiled else images[0], args.output, args.fps)
        else:
            (image_grid(images, rows, scale=args.grid_scale) if tiled else images[0]).save(args.output)
    except (OSError, ValueError) as error:
        print(f"error: could not write --output {args.output!r}: {error}", file=sys.stderr)
        return 2
    kind = f"video(s) of {len(images[0])} frames" if is_video else "image(s)"
    print(f"Wrote {len(images)} {kind} ({rows} row(s), {pipeline.scheduler.__class__.__name__}) to {args.output}")
    return 0
