"""The process group of `accelerate launch` / `torchrun` runs, on GPUs and on CPU-only machines.

accelerate treats a process as alone unless it runs on an accelerator or is told to use the CPU: under
`torchrun --nproc_per_node 2` (or `accelerate launch --multi_gpu --num_processes 2`) on a machine without GPUs every
process would otherwise believe it is the only one and do all the work. `use_cpu_backend` detects that case, so the
same command runs with gloo on CPU processes and with NCCL on GPUs. `distributed_session` / `end_distributed` tear the
group down at the end of a command.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

DEFAULT_TIMEOUT = timedelta(hours=2)
"""How long a process waits for the others at a barrier (e.g. while the main process prepares a large dataset)."""


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def launched_processes() -> int:
    """The number of processes the launcher started (`WORLD_SIZE`; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_cpu_backend(cpu: bool = False) -> bool:
    """Whether accelerate must run on the CPU (gloo between processes): asked for (`cpu`, `accelerate launch
    --cpu`, which sets `ACCELERATE_USE_CPU`), or several processes launched on a machine without an accelerator."""
    from accelerate.utils import parse_flag_from_env

    if cpu or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    return launched_processes() > 1 and not _has_accelerator()


def distributed_state(cpu: bool = False, timeout: timedelta = DEFAULT_TIMEOUT):
    """accelerate's `PartialState` of this process (creating the process group on first use).

    Args:
        cpu: Run on the CPU even when an accelerator is present.
        timeout: How long collectives (barriers) wait for the other processes.

    Returns:
        The `accelerate.PartialState`: `process_index`, `num_processes`, `device`, `wait_for_everyone()`,
        `split_between_processes(...)`, `main_process_first()`, ...
    """
    from accelerate import PartialState

    return PartialState(cpu=use_cpu_backend(cpu), timeout=timeout)


def end_distributed(barrier: bool = True) -> None:
    """Tear this process's process group down, if one was created: a final barrier (so no process leaves while
    another still talks to it), then `torch.distributed.destroy_process_group()`.

    Without it the group's communication threads are still running when the interpreter exits, and a process can
    die with SIGABRT ("terminate called without an active exception") after its work is done. accelerate's cached
    state is reset too, so a later `distributed_state()` in the same process builds a new group.

    Args:
        barrier: Wait for the other processes first. Pass False on an error path: the others may never arrive.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


@contextmanager
def distributed_session() -> Iterator[None]:
    """Run the body of a multi-process command, then end the process group (`end_distributed`): after a final
    barrier when the body returns, without one when it raises."""
    try:
        yield
    except BaseException:
        end_distributed(barrier=False)
        raise
    end_distributed()
