"""`nar-diffusers generate`: images from a trained or converted NARPipeline folder.

    nar-diffusers generate --model nar-demo/pipeline --class-labels 3 7 --num-images-per-prompt 4 --output digits.png
    nar-diffusers generate --model nar-xl-t2i-256 --prompt "a red fox in snow" --output fox.png --guidance-scale 4

One image is written as is; several are laid out in a grid with one row per class label / prompt.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from diffusers.utils import logging

from .pipelines.pipeline_nar import NARPipeline
from .schedulers.scheduler_selection import scheduler_class_for_heads
from .schedulers.scheduling_neighbor import NeighborScheduler
from .schedulers.scheduling_raster import RasterScheduler
from .utils.dtypes import DTYPES
from .utils.image_utils import image_grid


logger = logging.get_logger(__name__)

SCHEDULERS = {"neighbor": NeighborScheduler, "raster": RasterScheduler}
SCHEDULER_NAMES = {cls: name for name, cls in SCHEDULERS.items()}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="A NARPipeline folder (trained with train_nar.py or converted).")
    condition = parser.add_mutually_exclusive_group(required=True)
    condition.add_argument("--class-labels", type=int, nargs="+", help="Class indices (class-conditional models).")
    condition.add_argument("--prompt", nargs="+", help="One or more prompts (text-conditional models).")
    parser.add_argument("--negative-prompt", default=None, help="Replaces the learned unconditional caption.")
    parser.add_argument("--output", required=True, help="Image file to write (PNG, JPEG, ...).")
    parser.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        default=None,
        help="Token order: neighbor (NAR models) or raster (one-head LlamaGen models); default: the folder's.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the token draws.")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="Classifier-free guidance (> 1 enables it).")
    parser.add_argument("--cfg-interval", type=int, default=-1, help="Stop guiding after this many tokens (-1: never).")
    parser.add_argument("--num-images-per-prompt", type=int, default=1, help="Images per class label / prompt.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k filtering.")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 disables nucleus filtering.")
    parser.add_argument("--height", type=int, default=None, help="Pixels; default: the model's training size.")
    parser.add_argument("--width", type=int, default=None, help="Pixels; default: the model's training size.")
    parser.add_argument("--grid-scale", type=int, default=1, help="Nearest-neighbour upscaling of the written image.")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Transformer dtype.")
    return parser


def load_pipeline(model: str, scheduler: str | None, device: str, dtype: torch.dtype) -> NARPipeline:
    """Load the folder, optionally swapping the token order, and check the scheduler fits the transformer."""
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(f"--model {model!r} is not a pipeline folder (no model_index.json).")
    pipeline = NARPipeline.from_pretrained(model, torch_dtype=dtype)
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


def run(args: argparse.Namespace) -> int:
    if args.num_images_per_prompt < 1 or args.grid_scale < 1:
        print("error: --num-images-per-prompt and --grid-scale must be positive integers.", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipeline = load_pipeline(args.model, args.scheduler, device, DTYPES[args.dtype])
        generator = torch.Generator(device).manual_seed(args.seed)
        images = pipeline(
            class_labels=args.class_labels,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            guidance_scale=args.guidance_scale,
            cfg_interval=args.cfg_interval,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            height=args.height,
            width=args.width,
            num_images_per_prompt=args.num_images_per_prompt,
            generator=generator,
        ).images
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = len(args.class_labels or args.prompt)
    image = image_grid(images, rows, scale=args.grid_scale) if len(images) > 1 or args.grid_scale > 1 else images[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    image.save(args.output)
    print(f"Wrote {len(images)} image(s) ({rows} row(s), {pipeline.scheduler.__class__.__name__}) to {args.output}")
    return 0
