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
optimizers, LR schedulers, every process's RNG states, and the states registered with `register_checkpoint_state`
(the position in the data, an EMA model). `resume_training_state` loads one back and returns the step it was taken
at, so a loop continues at the same global step with the same optimizer state.

Trust and recovery:

- Nothing in a checkpoint is unpickled with `weights_only=False`. Registered states are written as JSON (plus
  safetensors for their tensors), never with accelerate's pickled `custom_checkpoint_<i>.pkl`; the model is
  safetensors; `optimizer.bin`, `scheduler.bin` and `random_states_<i>.pkl` are read by torch's `weights_only`
  unpickler, which only rebuilds tensors, numbers and containers.
- A checkpoint is written into a temporary sibling `.checkpoint-<step>.tmp`, completed with `checkpoint_complete.json`
  (every file and its size) and only then renamed to `checkpoint-<step>`; old checkpoints are pruned after that.
  A killed save therefore never costs the previous checkpoint, and its leftover temporary folder is removed by the
  next save.
- `--resume_from_checkpoint latest` skips, with a warning, folders that are not complete checkpoints. A named
  checkpoint that is incomplete, damaged or lacks a process's RNG state is refused, naming the missing file: the
  resumed run would not reproduce the uninterrupted one.
- `prepare_output_dir` refuses to start a new run in a folder holding another run's checkpoints unless the user
  resumes or passes `--overwrite_output_dir`, which deletes only the checkpoint folders this module wrote.

Usage in a loop (all processes call these functions):

    prepare_output_dir(accelerator, output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    register_checkpoint_state(accelerator, "data_position", position)
    start_step = resume_training_state(accelerator, output_dir, args.resume_from_checkpoint)
    ...
    if global_step % checkpointing_steps == 0:
        save_training_state(accelerator, output_dir, global_step, checkpoints_total_limit)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch
from diffusers.utils import logging

from .checkpoint_states import read_state, register_checkpoint_state, write_state


__all__ = [
    "check_world_size",
    "checkpoint_problems",
    "checkpoint_step",
    "find_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "prepare_output_dir",
    "prune_checkpoints",
    "read_state",
    "register_checkpoint_state",
    "remove_temporary_folders",
    "resume_training_state",
    "save_training_state",
    "write_state",
]


logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_FORMAT_VERSION = 1
_TEMPORARY = re.compile(r"\.checkpoint-(\d+)\.(tmp|old)")


# ---------------------------------------------------------------------------------------------------------------
# Finding and checking checkpoints
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: str) -> int | None:
    """The step of a `checkpoint-<step>` folder name or path, or None for any other name."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """`(step, path)` of every `checkpoint-<step>` folder in `output_dir` (complete or not), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = checkpoint_step(name)
        if step is not None and os.path.isdir(os.path.join(output_dir, name)):
            found.append((step, os.path.join(output_dir, name)))
    return sorted(found)


def _temporary_folders(output_dir: str) -> list[str]:
    """The `.checkpoint-<step>.tmp` / `.old` folders a save left behind (it was killed)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        os.path.join(output_dir, name)
        for name in os.listdir(output_dir)
        if _TEMPORARY.fullmatch(name) and os.path.isdir(os.path.join(output_dir, name))
    )


def _read_marker(path: str) -> dict | None:
    try:
        with open(os.path.join(path, COMPLETE_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None


def is_complete_checkpoint(path: str) -> bool:
    """Whether `path` is a `checkpoint-<step>` folder completed by `save_training_state` (it has the marker)."""
    return checkpoint_step(path) is not None and _read_marker(path) is not None


def checkpoint_problems(path: str) -> list[str]:
    """Why the checkpoint folder `path` cannot be resumed exactly (empty when it can): no completion marker (the
    save was interrupted, or it predates the marker), missing or truncated files, pickled custom state."""
    if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        return [f"it has no {COMPLETE_MARKER} (its save was interrupted, or an older version wrote it)"]
    marker = _read_marker(path)
    if marker is None:
        return [f"its {COMPLETE_MARKER} is unreadable"]
    problems = []
    if marker.get("step") != checkpoint_step(path):
        problems.append(f"{COMPLETE_MARKER} records step {marker.get('step')}, not {checkpoint_step(path)}")
    for name, size in sorted(marker["files"].items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            what = " (the RNG state of a process; without it the run cannot continue exactly)"
            problems.append(f"{name} is missing{what if name.startswith('random_states_') else ''}")
        elif os.path.getsize(file) != size:
            problems.append(f"{name} has {os.path.getsize(file)} bytes instead of {size}")
    pickled = sorted(f for f in os.listdir(path) if re.fullmatch(r"custom_checkpoint_\d+\.pkl", f))
    if pickled:
        problems.append(f"it holds {', '.join(pickled)}: pickled state that is never loaded (it could run code)")
    return problems


def find_checkpoint(output_dir: str, resume_from_checkpoint: str) -> str | None:
    """Resolve `resume_from_checkpoint` ("latest" or a path / name under `output_dir`) to a complete checkpoint.

    "latest" is the newest complete checkpoint; incomplete ones (and the temporary folders of interrupted saves)
    are skipped with a warning. Returns None when "latest" is asked for and `output_dir` holds no checkpoint folder.

    Raises:
        ValueError: A named checkpoint does not exist, is not a `checkpoint-<step>` folder or is incomplete; or
            "latest" finds checkpoint folders but none complete. The message names the flag and the problems.
    """
    if resume_from_checkpoint == "latest":
        for folder in _temporary_folders(output_dir):
            logger.warning(f"Ignoring {folder}: a checkpoint save that did not finish (the next save removes it).")
        skipped = []
        for _, path in reversed(list_checkpoints(output_dir)):
            problems = checkpoint_problems(path)
            if not problems:
                return path
            skipped.append(f"{os.path.basename(path)}: {'; '.join(problems)}")
            logger.warning(f"`--resume_from_checkpoint latest` skips {path}: {'; '.join(problems)}.")
        if skipped:
            raise ValueError(
                f"`--resume_from_checkpoint latest` found no complete checkpoint in {output_dir!r}: "
                + " | ".join(skipped)
                + ". Restore what is missing, or start a new run (another `--output_dir`, or `--overwrite_output_dir`)."
            )
        return None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, resume_from_checkpoint)
    if not os.path.isdir(path) or checkpoint_step(path) is None:
        raise ValueError(
            f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is neither 'latest' nor a checkpoint-<step> "
            f"folder (looked in {output_dir!r})."
        )
    problems = checkpoint_problems(path)
    if problems:
        raise ValueError(
            f"`--resume_from_checkpoint` {path!r} cannot be resumed exactly: {'; '.join(problems)}. Resume from "
            "another checkpoint ('latest' picks the newest complete one)."
        )
    return path


def check_world_size(path: str, accelerator, batch_size: int | None, allow_change: bool = False) -> bool:
    """Refuse to resume a checkpoint saved by another number of processes, unless `allow_change`; then state the
    change of the global batch. Returns whether the world size changed.

    Raises:
        ValueError: One line naming both world sizes (and global batches) and `--allow_world_size_change`.
    """
    marker = _read_marker(path) or {}
    saved, now = marker.get("num_processes"), accelerator.num_processes
    if not isinstance(saved, int) or saved == now:
        return False
    saved_batch = marker.get("per_device_batch_size")

    def describe(processes: int, per_device: Any) -> str:
        if not isinstance(per_device, int):
            return f"{processes} processes"
        return f"{processes} processes (global batch {processes * per_device} = {processes} x {per_device})"

    change = f"was saved by {describe(saved, saved_batch)}; this run has {describe(now, batch_size)}"
    if not allow_change:
        raise ValueError(
            f"`--resume_from_checkpoint` {path!r} {change}. Resume with {saved} processes for an exact resume, or "
            "pass `--allow_world_size_change` to continue with the new global batch."
        )
    logger.warning(f"--allow_world_size_change: {path} {change}; the resumed run is not exact.")
    return True


def _check_random_states(path: str, accelerator) -> None:
    """Every process needs its own readable `random_states_<process>.pkl` for an exact resume (accelerate would
    only log that it could not load them)."""
    from accelerate.utils import load

    file = os.path.join(path, f"random_states_{accelerator.process_index}.pkl")
    if not os.path.isfile(file):
        raise ValueError(
            f"`--resume_from_checkpoint` {path!r} lacks random_states_{accelerator.process_index}.pkl (the RNG state "
            "of this process); without it the resumed run would not reproduce the uninterrupted one."
        )
    try:
        states = load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # the weights_only unpickler refuses anything but tensors, numbers and containers
        raise ValueError(f"{file} is unreadable or holds more than RNG states ({error}); it is not loaded.") from error
    keys = states if isinstance(states, dict) else {}
    missing = [key for key in ("random_state", "numpy_random_seed", "torch_manual_seed") if key not in keys]
    if missing:
        raise ValueError(f"{file} lacks the RNG states {missing}; the resumed run would not be exact.")
    if torch.cuda.is_available() and "torch_cuda_manual_seed" not in keys:
        logger.warning(f"{file} holds no CUDA RNG states (saved without a GPU): the resume on this GPU is not exact.")


def resume_training_state(
    accelerator,
    output_dir: str,
    resume_from_checkpoint: str | None,
    batch_size: int | None = None,
    allow_world_size_change: bool = False,
) -> int:
    """Load a training state saved by `save_training_state` and return its global step.

    Call it on every process after `accelerator.prepare` and `register_checkpoint_state`. Pickled files are read by
    torch's `weights_only` unpickler only.

    Args:
        accelerator: The run's `accelerate.Accelerator`.
        output_dir: Where the `checkpoint-<step>` folders are.
        resume_from_checkpoint: None (start at step 0), "latest" (the newest complete checkpoint, or step 0 when
            there is none yet) or a checkpoint folder / name.
        batch_size: This run's per-device batch size, to state the change of global batch (`check_world_size`).
        allow_world_size_change: Resume a checkpoint saved by another number of processes.

    Raises:
        ValueError: The checkpoint is incomplete, damaged, lacks this process's RNG state (see `find_checkpoint`),
            or was saved by another number of processes without `allow_world_size_change`.
    """
    if not resume_from_checkpoint:
        return 0
    path = find_checkpoint(output_dir, resume_from_checkpoint)
    if path is None:
        logger.info(f"No checkpoint in {output_dir} yet; starting a new run.")
        return 0
    changed = check_world_size(path, accelerator, batch_size, allow_world_size_change)
    if not changed or os.path.isfile(os.path.join(path, f"random_states_{accelerator.process_index}.pkl")):
        _check_random_states(path, accelerator)
    accelerator.load_state(path, load_kwargs={"weights_only": True})
    step = checkpoint_step(path)
    logger.info(f"Resumed from {path} at step {step}")
    return step


# ---------------------------------------------------------------------------------------------------------------
# Writing checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _files_and_sizes(folder: str) -> dict[str, int]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return dict(sorted(files.items()))


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. directories on some file systems
        pass
    finally:
        os.close(fd)


def _write_marker(folder: str, step: int, num_processes: int, batch_size: int | None) -> None:
    """Flush the checkpoint's files to disk, then record them (and their sizes), the world size and the per-device
    batch in the completion marker."""
    files = _files_and_sizes(folder)
    for name in files:
        _fsync(os.path.join(folder, name))
    marker = {"format_version": CHECKPOINT_FORMAT_VERSION, "step": step, "num_processes": num_processes}
    if batch_size is not None:
        marker["per_device_batch_size"] = batch_size
    marker["files"] = files
    path = os.path.join(folder, COMPLETE_MARKER)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync(folder)


def remove_temporary_folders(output_dir: str) -> None:
    """Delete the `.checkpoint-<step>.tmp` / `.old` folders left by interrupted saves (only this module makes them)."""
    for folder in _temporary_folders(output_dir):
        logger.warning(f"Removing {folder}, left by a checkpoint save that did not finish.")
        shutil.rmtree(folder)


def prune_checkpoints(output_dir: str, keep: int, protect: str | None = None) -> None:
    """Delete the oldest complete checkpoints of `output_dir` so that at most `keep` remain, never `protect`.

    Folders without the completion marker (not written by `save_training_state`) are never deleted.
    """
    complete = [path for _, path in list_checkpoints(output_dir) if is_complete_checkpoint(path)]
    removable = [path for path in complete if protect is None or os.path.abspath(path) != os.path.abspath(protect)]
    for path in removable[: max(0, len(complete) - max(1, keep))]:
        logger.info(f"Removing old checkpoint {path}")
        shutil.rmtree(path)


def _move_aside(path: str) -> str:
    """Rename a folder that is in the way to `<path>.incomplete` (or `.incomplete-<n>`), deleting nothing."""
    target, number = f"{path}.incomplete", 1
    while os.path.exists(target):
        target, number = f"{path}.incomplete-{number}", number + 1
    os.rename(path, target)
    logger.warning(f"{path} has no {COMPLETE_MARKER} (not a complete checkpoint); kept it as {target}.")
    return target


def save_training_state(
    accelerator, output_dir: str, step: int, total_limit: int | None = None, batch_size: int | None = None
) -> str:
    """Save the accelerator's whole training state to `<output_dir>/checkpoint-<step>`, atomically.

    Call it on every process (FSDP shards and per-process RNG states need all of them). Every process saves into
    `.checkpoint-<step>.tmp`; after all have finished the main process writes the completion marker, renames the
    folder to `checkpoint-<step>` (replacing an older complete checkpoint of that step; an incomplete folder of that
    name is renamed to `checkpoint-<step>.incomplete`, never deleted) and, with `total_limit`,
    deletes the oldest complete checkpoints so that at most `total_limit` remain. `output_dir` must be on a file
    system all processes share. `batch_size` (per device) is recorded with the world size, so a resume by another
    number of processes can state the change of global batch.

    Returns:
        The checkpoint folder.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    temporary = os.path.join(output_dir, f".{CHECKPOINT_PREFIX}{step}.tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        remove_temporary_folders(output_dir)
        if os.path.isdir(final) and not is_complete_checkpoint(final):
            _move_aside(final)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_marker(temporary, step, accelerator.num_processes, batch_size)
        if os.path.isdir(final):  # an older save of this step (e.g. after resuming from an earlier checkpoint)
            old = os.path.join(output_dir, f".{CHECKPOINT_PREFIX}{step}.old")
            os.rename(final, old)
            os.rename(temporary, final)
            shutil.rmtree(old)
        else:
            os.rename(temporary, final)
        _fsync(output_dir)
        if total_limit is not None:
            prune_checkpoints(output_dir, total_limit, protect=final)
    accelerator.wait_for_everyone()
    logger.info(f"Saved training state to {final}")
    return final


# ---------------------------------------------------------------------------------------------------------------
# The output folder of a new run
# ---------------------------------------------------------------------------------------------------------------


def prepare_output_dir(
    accelerator, output_dir: str, resume_from_checkpoint: str | None = None, overwrite_output_dir: bool = False
) -> None:
    """Refuse to start a new run over another run's checkpoints; call it on every process before training.

    A folder holding `checkpoint-<step>` folders (or the leftovers of an interrupted save) belongs to another run:
    unless `resume_from_checkpoint` continues it, a new run there would mix its checkpoints with the old ones and a
    later "latest" could resume the wrong run. With `overwrite_output_dir` the main process deletes the old run's
    complete checkpoints and leftovers, and nothing else.

    Raises:
        ValueError: Naming `--output_dir`, `--resume_from_checkpoint` and `--overwrite_output_dir`, when the folder
            holds checkpoints and neither flag is given, when both flags are given, or when a `checkpoint-<step>`
            folder was not written by this module (it is never deleted).
    """
    checkpoints = [path for _, path in list_checkpoints(output_dir)]
    leftovers = _temporary_folders(output_dir)
    if resume_from_checkpoint and overwrite_output_dir:
        raise ValueError(
            "Pass either `--resume_from_checkpoint` (continue the run in `--output_dir`) or `--overwrite_output_dir` "
            "(delete its checkpoints and start over), not both."
        )
    if resume_from_checkpoint or not (checkpoints or leftovers):
        return
    names = [os.path.basename(path) for path in checkpoints + leftovers]
    if not overwrite_output_dir:
        raise ValueError(
            f"`--output_dir` {output_dir!r} already holds checkpoints of another run ({', '.join(names)}). Pass "
            "`--resume_from_checkpoint latest` to continue that run, `--overwrite_output_dir` to delete its "
            "checkpoints and start a new one, or choose another `--output_dir`."
        )
    foreign = [os.path.basename(path) for path in checkpoints if not is_complete_checkpoint(path)]
    if foreign:
        raise ValueError(
            f"`--overwrite_output_dir` only deletes checkpoints nar-diffusers completed; {', '.join(foreign)} in "
            f"{output_dir!r} {'has' if len(foreign) == 1 else 'have'} no {COMPLETE_MARKER} (an interrupted save, "
            "an older version, or not a training checkpoint). Move or delete them yourself, or choose another "
            "`--output_dir`."
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in checkpoints:
            logger.warning(f"--overwrite_output_dir: removing {path} of the previous run.")
            shutil.rmtree(path)
        remove_temporary_folders(output_dir)
    accelerator.wait_for_everyone()
