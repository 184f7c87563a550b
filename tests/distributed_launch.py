"""Run a script or module in several CPU processes with `accelerate launch` (torchrun underneath, gloo between the
processes), the way users launch multi-process jobs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on now (the machine is shared: never the default 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(target: list[str], num_processes: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N <target...>` on this machine's CPUs.

    `target` is a script path and its arguments, or `["-m", module, ...]`. The processes import this checkout
    (PYTHONPATH) and run one thread each. On a machine without GPUs `--multi_gpu` starts the processes with
    torchrun, and nar_diffusers puts them in one gloo group (`nar_diffusers.utils.distributed`).
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), *target,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
