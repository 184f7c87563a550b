"""`nar-diffusers demo`: NAR vs raster generation trained from scratch on a CPU in minutes, on scikit-learn's digits.

- `image` (`--task image`, the default): digits on 8x8 token grids (`run_demo`).
- `video` (`--task video`): moving digits, 4 frames of 16 x 32 px on 4x4x8 token grids (`run_video_demo`).
- `common`: what both share (the digits, training a token model, the judge, sampling choice, timing, results).
"""

from __future__ import annotations

import argparse

from ...models.model_sizes import MODEL_PRESETS
from .common import (
    DIGIT_NAMES,
    HELDOUT_SEED_OFFSET,
    NUM_CLASSES,
    NUM_HELD_OUT,
    GenerationResult,
    as_gray,
    choose_sampling_defaults,
    classifier_accuracy,
    fit_digit_classifier,
    sampling_candidates,
    split_digits,
    timed_generation,
    train_token_model,
    write_results,
)
from .image import QUICK_SETTINGS, DemoSettings, run_demo, run_image_demo_command, settings_from_args
from .video import QUICK_VIDEO_SETTINGS, VideoDemoSettings, run_video_demo, run_video_demo_command

TASKS = ("image", "video")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = DemoSettings()
    parser.add_argument(
        "--task", default="image", choices=list(TASKS),
        help="image: digits, NAR vs raster on 8x8 token grids; video: moving digits (4 frames of 16 x 32 px), NAR vs "
        "raster on 4x4x8 token grids. The step and size defaults below are the image demo's; the video demo has its "
        "own (see nar_diffusers/commands/demo/video.py).",
    )  # fmt: skip
    parser.add_argument("--output-dir", default="nar-demo", help="Where pipelines, samples and results go.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds every stage; the same seed gives the same result.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and a few steps (seconds; for testing).")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--vq-steps", type=int, default=None, help=f"VQ training steps ({defaults.vq_steps}).")
    parser.add_argument("--steps", type=int, default=None, help=f"Transformer training steps ({defaults.steps}).")
    parser.add_argument("--batch-size", type=int, default=None, help=f"Transformer batch size ({defaults.batch_size}).")
    parser.add_argument(
        "--model-size", default=None, choices=list(MODEL_PRESETS), help=f"Transformer preset ({defaults.model_size})."
    )
    parser.add_argument("--learning-rate", type=float, default=None, help=f"({defaults.learning_rate}).")
    parser.add_argument(
        "--samples-per-class", type=int, default=None, help=f"Samples per digit ({defaults.samples_per_class})."
    )
    parser.add_argument("--guidance-scale", type=float, default=None, help=f"({defaults.guidance_scale}).")
    parser.add_argument("--temperature", type=float, default=None, help=f"({defaults.temperature}).")
    parser.add_argument("--top-k", type=int, default=None, help=f"({defaults.top_k}; 0 disables).")
    return parser


def run(args: argparse.Namespace) -> int:
    """The `demo` command: the image or the video demo (`--task`)."""
    return run_video_demo_command(args) if args.task == "video" else run_image_demo_command(args)


__all__ = [
    "DIGIT_NAMES",
    "HELDOUT_SEED_OFFSET",
    "NUM_CLASSES",
    "NUM_HELD_OUT",
    "QUICK_SETTINGS",
    "QUICK_VIDEO_SETTINGS",
    "TASKS",
    "DemoSettings",
    "GenerationResult",
    "VideoDemoSettings",
    "add_arguments",
    "as_gray",
    "choose_sampling_defaults",
    "classifier_accuracy",
    "fit_digit_classifier",
    "run",
    "run_demo",
    "run_video_demo",
    "sampling_candidates",
    "settings_from_args",
    "split_digits",
    "timed_generation",
    "train_token_model",
    "write_results",
]
