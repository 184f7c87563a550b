"""`nar-diffusers sample`: thousands of samples from a saved pipeline, split over processes, for FID / FVD.

    # one process (a GPU when there is one)
    nar-diffusers sample --model nar-l-c2i-384 --num-samples 50000 --resize 256 --output-dir samples-nar-l
    # 8 GPUs: the same command under accelerate (or torchrun); the samples are the same
    accelerate launch --multi_gpu --num_processes 8 -m nar_diffusers.commands.cli sample --model nar-l-c2i-384 \\
        --num-samples 50000 --resize 256 --output-dir samples-nar-l
    # text models: prompts from a .txt / .csv / .jsonl file (cycled), e.g. 30,000 COCO captions
    nar-diffusers sample --model nar-xl-t2i-256 --prompts coco30k.csv --prompt-column caption --output-dir coco

The flags and their checks live here; the sampling itself (the plan, the resumable folder, the shards, the `.npz`)
is `nar_diffusers.evaluation.bulk_sampling.run_sampling`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..evaluation.bulk_sampling import VIDEO_FORMATS, format_summary, run_sampling
from ..pipelines.autoregressive_generation import NonFiniteLogitsError
from ..utils.distributed import distributed_session, distributed_state
from ..utils.dtypes import DTYPES
from .generate import check_model_folder


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="A saved NARPipeline or NARVideoPipeline folder.")
    parser.add_argument("--output-dir", required=True, help="Folder of the samples (a rerun resumes it).")
    parser.add_argument(
        "--num-samples", type=int, default=None,
        help="How many samples (class models: required, e.g. 50000 = 50 per ImageNet class; text models: default "
        "one per prompt).",
    )  # fmt: skip
    condition = parser.add_mutually_exclusive_group()
    condition.add_argument(
        "--class-labels", type=int, nargs="+", default=None,
        help="Class models: the labels to cycle through (default: every class, balanced).",
    )  # fmt: skip
    condition.add_argument(
        "--prompts", default=None,
        help="Text models: a .txt (one prompt a line), .csv or .jsonl file of prompts, cycled through.",
    )  # fmt: skip
    parser.add_argument("--prompt-column", default=None, help="CSV column / JSONL key of the prompts.")
    parser.add_argument("--negative-prompt", default=None, help="Replaces the learned unconditional caption.")
    parser.add_argument("--seed", type=int, default=0, help="Sample i draws from a generator seeded by (seed, i).")
    parser.add_argument("--batch-size", type=int, default=32, help="Samples per forward pass, per process.")
    parser.add_argument("--shard-size", type=int, default=500, help="Samples per shard (the unit of resumption).")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="Classifier-free guidance (> 1 enables it).")
    parser.add_argument("--cfg-interval", type=int, default=-1, help="Stop guiding after this many tokens (-1: never).")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k filtering.")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 disables nucleus filtering.")
    parser.add_argument("--height", type=int, default=None, help="Pixels generated; default: the model's size.")
    parser.add_argument("--width", type=int, default=None, help="Pixels generated; default: the model's size.")
    parser.add_argument("--num-frames", type=int, default=None, help="Video models: frames; default: the model's.")
    parser.add_argument(
        "--resize", type=int, default=None,
        help="Images: resize to SIZE x SIZE (bicubic, before quantising to 8 bits) when saving, e.g. 256 for the "
        "published protocol (generate at 384, evaluate at 256).",
    )  # fmt: skip
    parser.add_argument("--video-format", choices=VIDEO_FORMATS, default=None, help="Video models (default mp4).")
    parser.add_argument("--fps", type=float, default=8.0, help="Frames per second of MP4 / GIF samples.")
    parser.add_argument("--no-npz", action="store_true", help="Images: skip the ADM .npz (PNGs only).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Transformer dtype.")
    parser.add_argument("--cpu", action="store_true", help="Run on the CPU even when a GPU is present.")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Raise a ValueError naming the flag and what it allows, before any model is loaded."""
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}.")
    for name in ("num_samples", "resize", "height", "width", "num_frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}.")
    if args.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {args.seed}.")
    if not args.fps > 0:
        raise ValueError(f"--fps must be positive, got {args.fps}.")
    if args.prompt_column is not None and args.prompts is None:
        raise ValueError("--prompt-column names a column of --prompts; pass --prompts too.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir!r} is a file; give a folder.")
    check_model_folder(args.model)


def run(args: argparse.Namespace) -> int:
    """The `nar-diffusers sample` command: errors are one line and exit status 2."""
    try:
        check_arguments(args)
        # The process group of a multi-process run ends cleanly here (no abort at exit once the npz is written).
        with distributed_session():
            summary = run_sampling(args)
            is_main_process = distributed_state().is_main_process
    except (ValueError, NonFiniteLogitsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if is_main_process:
        print(format_summary(summary))
    return 0
