"""Experiment trackers of the training scripts: the accelerate `log_with` of `--report_to`, the run config they
record, and sample / validation images logged to every tracker that takes images."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np
from diffusers.utils import logging
from PIL import Image

from .arguments import REPORT_TO_NONE

logger = logging.get_logger(__name__)

SECRET_ARGUMENTS = ("hub_token",)
"""Flags never recorded in a tracker's run config."""

_warned: set[str] = set()


def log_with(report_to: str | None) -> str | None:
    """accelerate's `log_with` for a `--report_to` value ("none" -> no tracker)."""
    return None if report_to in (None, REPORT_TO_NONE) else report_to


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as a run config trackers accept (numbers, strings, booleans; lists as strings), without secrets."""
    config = {}
    for name, value in vars(args).items():
        if name in SECRET_ARGUMENTS:
            continue
        if isinstance(value, (list, tuple)):
            value = " ".join(map(str, value))
        if value is None or isinstance(value, (int, float, str, bool)):
            config[name] = value
    return config


def init_trackers(accelerator, args: argparse.Namespace) -> None:
    """Start the `--report_to` trackers under `--tracker_project_name` (no-op with `--report_to none`)."""
    if accelerator.is_main_process and log_with(args.report_to) is not None:
        config = {k: v for k, v in tracker_config(args).items() if v is not None}
        accelerator.init_trackers(args.tracker_project_name, config=config)


def _as_rgb_arrays(images: Sequence[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]


def log_images(accelerator, key: str, images: Sequence[Image.Image], step: int) -> None:
    """Log sample or validation `images` (PIL) under `key` at `step` to every tracker of `accelerator` that takes
    images: TensorBoard, wandb, SwanLab (all images under one key), Aim and ClearML (one key per image). Trackers
    whose accelerate class has no `log_images` (e.g. MLflow, Comet) get none, with a warning once."""
    if not images:
        return
    for tracker in accelerator.trackers:
        name = getattr(tracker, "name", type(tracker).__name__)
        if name == "tensorboard":
            arrays = _as_rgb_arrays(images)
            if len({a.shape for a in arrays}) == 1:
                tracker.log_images({key: np.stack(arrays)}, step=step, dataformats="NHWC")
            else:
                for index, array in enumerate(arrays):
                    tracker.log_images({f"{key}/{index}": array[None]}, step=step, dataformats="NHWC")
        elif name in ("wandb", "swanlab"):
            tracker.log_images({key: list(images)}, step=step)
        elif name in ("aim", "clearml"):
            tracker.log_images({f"{key}/{index}": array for index, array in enumerate(_as_rgb_arrays(images))}, step=step)
        elif callable(getattr(tracker, "log_images", None)):
            tracker.log_images({key: list(images)}, step=step)
        elif name not in _warned:
            _warned.add(name)
            logger.warning(f"The {name} tracker does not take images; sample images are only written to files.")
