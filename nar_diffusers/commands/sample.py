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
import errno
import math
import os
import sys

from ..evaluation.bulk_sampling import VIDEO_FORMATS, format_summary, run_sampling
from ..evaluation.sample_plan import MAX_PROMPT_CHARS, read_prompts
from ..pipelines.autoregressive_generation import NonFiniteLogitsError
from ..utils.distributed import distributed_session, distributed_state
from ..utils.dtypes import DTYPES
from ..utils.video_utils import FPS_RANGE, check_fps
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
    parser.add_argument(
        "--max-prompt-chars", type=int, default=MAX_PROMPT_CHARS,
        help="Longest prompt accepted, in characters (a text encoder reads a few hundred tokens at most).",
    )  # fmt: skip
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
    parser.add_argument(
        "--fps", type=float, default=8.0,
        help=f"Frames per second of MP4 / GIF samples, {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}.",
    )  # fmt: skip
    parser.add_argument("--no-npz", action="store_true", help="Images: skip the ADM .npz (PNGs only).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Transformer dtype.")
    parser.add_argument("--cpu", action="store_true", help="Run on the CPU even when a GPU is present.")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Raise a ValueError naming the flag and what it allows, before any model is loaded or anything written."""
    for name in ("batch_size", "shard_size", "max_prompt_chars"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}.")
    for name in ("num_samples", "resize", "height", "width", "num_frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}.")
    if args.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {args.seed}.")
    check_sampling_flags(args)
    check_fps(args.fps, "--fps")
    if args.prompt_column is not None and args.prompts is None:
        raise ValueError("--prompt-column names a column of --prompts; pass --prompts too.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir!r} is a file; give a folder.")
    check_model_folder(args.model)
    if args.prompts is not None and os.path.isfile(args.prompts):
        # A binary or huge prompts file is refused before the model loads (a missing one once the model's kind
        # is known, which tells whether --prompts applies at all).
        read_prompts(args.prompts, args.prompt_column, args.max_prompt_chars)


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The token-draw flags, with the ranges the pipelines accept."""
    if not math.isfinite(args.guidance_scale) or args.guidance_scale < 0:
        raise ValueError(f"--guidance-scale must be a finite number >= 0 (> 1 enables guidance), got {args.guidance_scale}.")
    if args.cfg_interval < -1:
        raise ValueError(f"--cfg-interval must be an integer >= -1 (-1: guide every token), got {args.cfg_interval}.")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}.")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be an integer >= 0 (0 disables top-k), got {args.top_k}.")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1.0 disables nucleus filtering), got {args.top_p}.")


_OS_ERROR_ADVICE = {
    "ENOSPC": "the disk is full: free space, or choose another --output-dir, then rerun to resume",
    "EDQUOT": "the disk quota is exceeded: free space, or choose another --output-dir, then rerun to resume",
    "EROFS": "the file system is read-only: choose another --output-dir",
    "EACCES": "permission denied: choose a folder you can write to",
    "EPERM": "permission denied: choose a folder you can write to",
}


def describe_os_error(error: OSError, output_dir: str) -> str:
    """One line for a failed read or write: what happened, where, and what to do."""
    advice = {
        getattr(errno, name): text for name, text in _OS_ERROR_ADVICE.items() if hasattr(errno, name)
    }.get(error.errno)
    where = f" ({error.filename})" if error.filename else ""
    what = advice or error.strerror or str(error)
    return f"could not write the samples to --output-dir {output_dir!r}{where}: {what}."


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
    except OSError as error:
        print(f"error: {describe_os_error(error, args.output_dir)}", file=sys.stderr)
        return 2
    if is_main_process:
        print(format_summary(summary))
    return 0
