"""The flags the training scripts share, under the names of diffusers' example scripts, declared once.

`add_optimizer_arguments` (optimization.py) holds the optimizer flags; this module the rest: the pretrained model
(`--pretrained_model_name_or_path`, `--revision`, `--variant`), crops (`--center_crop` / `--random_crop`), the run
length and TF32 (`--num_train_epochs`, `--allow_tf32`), validation (`--validation_prompt`, the sampling settings
validation uses and the saved pipeline keeps), trackers (`--report_to`, `--logging_dir`, `--tracker_project_name`)
and the Hub (`--push_to_hub`, `--hub_model_id`, `--hub_token`). Each `add_*` function takes an argparse parser or
argument group; `check_script_arguments` rejects values that cannot work, naming the flag, before anything loads.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

REPORT_TO_NONE = "none"


def tracker_choices() -> list[str]:
    """`--report_to` values: "none", "all", and every tracker accelerate knows."""
    from accelerate.utils import LoggerType

    return [REPORT_TO_NONE, *(str(t.value) for t in LoggerType)]


def add_pretrained_arguments(parser, *aliases: str, required: bool = False, help: str | None = None) -> None:
    """`--pretrained_model_name_or_path` (also spelled as each of `aliases`, e.g. the older `--pretrained_model_path`)
    with `--revision` and `--variant` of the weights to load."""
    parser.add_argument(
        "--pretrained_model_name_or_path", *aliases, dest="pretrained_model_name_or_path", type=str, default=None,
        required=required, help=help or "A local folder or Hub model id to start from.",
    )  # fmt: skip
    parser.add_argument(
        "--revision", type=str, default=None,
        help="Revision (branch, tag or commit) of --pretrained_model_name_or_path on the Hub.",
    )  # fmt: skip
    parser.add_argument(
        "--variant", type=str, default=None,
        help="Variant of the pretrained weights to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors).",
    )  # fmt: skip


def pretrained_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`revision` / `variant` keyword arguments of `from_pretrained` for the flags that are set."""
    return {name: getattr(args, name) for name in ("revision", "variant") if getattr(args, name, None) is not None}


def add_crop_arguments(parser, center_crop: bool) -> None:
    """`--center_crop` and `--random_crop`: one setting (`args.center_crop`), both spellings; `center_crop` is this
    script's default."""
    group = parser.add_mutually_exclusive_group()
    default = "default" if center_crop else "default: random crops"
    group.add_argument(
        "--center_crop", dest="center_crop", action="store_const", const=True,
        help=f"Center crops to --resolution ({default}).",
    )  # fmt: skip
    group.add_argument(
        "--random_crop", dest="center_crop", action="store_const", const=False,
        help=f"Random crops to --resolution ({'default: center crops' if center_crop else 'default'}).",
    )  # fmt: skip
    parser.set_defaults(center_crop=center_crop)


def add_training_arguments(parser) -> None:
    """`--num_train_epochs` (overrides `--max_train_steps` when set) and `--allow_tf32`."""
    parser.add_argument(
        "--num_train_epochs", type=int, default=None,
        help="Train this many passes over the data (overrides --max_train_steps).",
    )  # fmt: skip
    parser.add_argument(
        "--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs (faster training)."
    )


def apply_allow_tf32(args: argparse.Namespace) -> None:
    """`--allow_tf32`: TF32 matmuls and convolutions on CUDA."""
    if getattr(args, "allow_tf32", False) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def steps_for_epochs(args: argparse.Namespace, num_batches: int, num_processes: int = 1) -> int:
    """`--max_train_steps`, or the optimizer steps of `--num_train_epochs` passes over `num_batches` batches split
    over `num_processes` processes with `--gradient_accumulation_steps`."""
    if getattr(args, "num_train_epochs", None) is None:
        return args.max_train_steps
    batches_per_process = math.ceil(num_batches / num_processes)
    return args.num_train_epochs * math.ceil(batches_per_process / args.gradient_accumulation_steps)


def add_validation_arguments(parser, guidance_scale: float = 4.0, prompts: bool = True) -> None:
    """The sampling settings of validation (`--validation_guidance_scale`, `--validation_temperature`,
    `--validation_top_k`, `--validation_top_p`), which the saved pipeline keeps as its sampling defaults, and with
    `prompts` the `--validation_prompt` flag (several prompts after one flag, or the flag repeated; also spelled
    `--validation_prompts`)."""
    if prompts:
        parser.add_argument(
            "--validation_prompt", "--validation_prompts", dest="validation_prompt", type=str, nargs="+",
            action="extend", default=None, help="Prompt(s) for validation images (text models).",
        )  # fmt: skip
    parser.add_argument("--validation_guidance_scale", type=float, default=guidance_scale, help="Validation guidance.")
    parser.add_argument("--validation_temperature", type=float, default=1.0, help="Validation token temperature.")
    parser.add_argument("--validation_top_k", type=int, default=0, help="Validation top-k (0: off).")
    parser.add_argument("--validation_top_p", type=float, default=1.0, help="Validation top-p (1.0: off).")


def validation_sampling(args: argparse.Namespace) -> dict[str, float | int]:
    """The sampling settings of validation as pipeline arguments (and the saved pipeline's sampling defaults)."""
    return {
        "guidance_scale": args.validation_guidance_scale,
        "temperature": args.validation_temperature,
        "top_k": args.validation_top_k,
        "top_p": args.validation_top_p,
    }


def add_resume_arguments(parser) -> None:
    """`--resume_from_checkpoint`, `--overwrite_output_dir` and `--allow_world_size_change` (see `checkpointing`)."""
    parser.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint-<step> folder.'
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="Start a new run in an --output_dir holding another run's checkpoints, deleting those checkpoints.",
    )  # fmt: skip
    parser.add_argument(
        "--allow_world_size_change", action="store_true",
        help="Resume a checkpoint saved by another number of processes; the global batch changes (it is logged).",
    )  # fmt: skip


def add_tracking_arguments(parser, tracker_project_name: str) -> None:
    """`--report_to`, `--logging_dir` and `--tracker_project_name`."""
    parser.add_argument(
        "--report_to", type=str, default=None, choices=tracker_choices(),
        help='Where to log losses and images: a tracker, "all" or "none" (default: tensorboard when installed).',
    )  # fmt: skip
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    parser.add_argument(
        "--tracker_project_name", type=str, default=tracker_project_name, help="Project (run) name for the trackers."
    )


def add_hub_arguments(parser) -> None:
    """`--push_to_hub`, `--hub_model_id` and `--hub_token`."""
    parser.add_argument(
        "--push_to_hub", action="store_true",
        help="Upload --output_dir (without training checkpoints) to the Hub at the end, with its model card.",
    )  # fmt: skip
    parser.add_argument(
        "--hub_model_id", type=str, default=None, help="The Hub repository to push to (default: the --output_dir name)."
    )
    parser.add_argument(
        "--hub_token", type=str, default=None, help="Hub token (default: the one `hf auth login` stored)."
    )


def available_trackers() -> list[str]:
    """The trackers whose packages are installed."""
    from accelerate.tracking import get_available_trackers

    return [str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers()]


def resolve_report_to(args: argparse.Namespace) -> None:
    """Turn the `--report_to` default (None) into "tensorboard" when it is installed, else "none"."""
    if args.report_to is None:
        args.report_to = "tensorboard" if "tensorboard" in available_trackers() else REPORT_TO_NONE


def check_script_arguments(args: argparse.Namespace) -> None:
    """Checks of the shared flags, naming the flag: the tracker is installed, the token does not go to wandb,
    validation sampling settings can sample, the run length is positive."""
    resolve_report_to(args)
    if args.report_to not in (REPORT_TO_NONE, "all"):
        available = available_trackers()
        if args.report_to not in available:
            raise ValueError(
                f"--report_to {args.report_to}: the {args.report_to} package is not installed (installed trackers: "
                f"{available or 'none'}); install it or pass --report_to none."
            )
    uses_wandb = args.report_to == "wandb" or (args.report_to == "all" and "wandb" in available_trackers())
    if getattr(args, "hub_token", None) is not None and uses_wandb:
        raise ValueError(
            "--hub_token cannot be used with --report_to wandb (or all): the token would be stored with the run's "
            "config. Log in with `hf auth login` instead and leave --hub_token out."
        )
    if getattr(args, "num_train_epochs", None) is not None and args.num_train_epochs < 1:
        raise ValueError(f"--num_train_epochs must be a positive integer, got {args.num_train_epochs}.")
    if hasattr(args, "validation_temperature"):
        if not args.validation_temperature > 0:
            raise ValueError(f"--validation_temperature must be > 0, got {args.validation_temperature}.")
        if args.validation_top_k < 0:
            raise ValueError(f"--validation_top_k must be >= 0 (0 disables it), got {args.validation_top_k}.")
        if not 0.0 < args.validation_top_p <= 1.0:
            raise ValueError(f"--validation_top_p must be in (0, 1], got {args.validation_top_p}.")
