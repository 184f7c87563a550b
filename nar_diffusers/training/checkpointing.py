# Copyright 2025 The nar-diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Training-state checkpoints shared by every trainer: `checkpoint-<step>` folders written by accelerate.

A checkpoint is `accelerator.save_state` into `<output_dir>/checkpoint-<global step>`: the prepared models,
optimizers, LR schedulers, dataloader samplers, every process's RNG states and whatever was registered with
`accelerator.register_for_checkpointing` (e.g. an EMA model). `resume_training_state` loads one back and returns
the step it was taken at, so a loop continues at the same global step with the same optimizer state.

Usage in a loop (all processes call both functions):

    start_step = resume_training_state(accelerator, output_dir, args.resume_from_checkpoint)
    ...
    if global_step % checkpointing_steps == 0:
        save_training_state(accelerator, output_dir, global_step, checkpoints_total_limit)
"""

from __future__ import annotations

import os
import re
import shutil

from diffusers.utils import logging


logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_step(path: str) -> int | None:
    """The step of a `checkpoint-<step>` folder name or path, or None for any other name."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """`(step, path)` of every `checkpoint-<step>` folder in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = checkpoint_step(name)
        if step is not None and os.path.isdir(os.path.join(output_dir, name)):
            found.append((step, os.path.join(output_dir, name)))
    return sorted(found)


def find_checkpoint(output_dir: str, resume_from_checkpoint: str) -> str | None:
    """Resolve `resume_from_checkpoint` ("latest" or a path / name under `output_dir`) to a checkpoint folder.

    Returns None when "latest" is asked for and no checkpoint exists yet.

    Raises:
        ValueError: A named checkpoint does not exist or is not a `checkpoint-<step>` folder.
    """
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, resume_from_checkpoint)
    if not os.path.isdir(path) or checkpoint_step(path) is None:
        raise ValueError(
            f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is neither 'latest' nor a checkpoint-<step> "
            f"folder (looked in {output_dir!r})."
        )
    return path


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete the oldest `checkpoint-<step>` folders of `output_dir` so that at most `keep` remain."""
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[: max(0, len(checkpoints) - keep)]:
        logger.info(f"Removing old checkpoint {path}")
        shutil.rmtree(path)


def save_training_state(accelerator, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """Save the accelerator's whole training state to `<output_dir>/checkpoint-<step>`.

    Call it on every process (FSDP shards and per-process RNG states need all of them). With `total_limit`, the
    main process first deletes the oldest checkpoints so that at most `total_limit` exist afterwards.

    Returns:
        The checkpoint folder.
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and total_limit is not None:
        prune_checkpoints(output_dir, max(0, total_limit - 1))
    accelerator.wait_for_everyone()
    path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    accelerator.save_state(path)
    logger.info(f"Saved training state to {path}")
    return path


def resume_training_state(accelerator, output_dir: str, resume_from_checkpoint: str | None) -> int:
    """Load a training state saved by `save_training_state` and return its global step.

    Call it on every process after `accelerator.prepare` (and after `register_for_checkpointing`).

    Args:
        accelerator: The run's `accelerate.Accelerator`.
        output_dir: Where the `checkpoint-<step>` folders are.
        resume_from_checkpoint: None (start at step 0), "latest" (the newest checkpoint, or step 0 when there is
            none yet) or a checkpoint folder / name.
    """
    if not resume_from_checkpoint:
        return 0
    path = find_checkpoint(output_dir, resume_from_checkpoint)
    if path is None:
        logger.info(f"No checkpoint in {output_dir} yet; starting a new run.")
        return 0
    accelerator.load_state(path)
    step = checkpoint_step(path)
    logger.info(f"Resumed from {path} at step {step}")
    return step
