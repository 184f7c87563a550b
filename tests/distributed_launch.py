"""Run a script or module in several CPU processes with `accelerate launch` (torchrun underneath, gloo between the
processes), the way users launch multi-process jobs."""

from __future__ import annotations

import errno
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _ephemeral_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _is_free(port: int) -> bool:
    """Whether `port` can be bound on every IPv4 and IPv6 address (torchrun's store listens on all of them)."""
    families = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
    for family, host in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((host, port))
        except OSError as error:
            if family == socket.AF_INET6 and error.errno == errno.EAFNOSUPPORT:
                continue
            return False
    return True


def free_port() -> int:
    """A TCP port nobody uses now, for one launch (the machine is shared: never the default 29500).

    Drawn at random below the kernel's ephemeral range: a port the kernel hands out for `bind(0)` can also be taken,
    between this probe and torchrun's bind, as the local port of any outgoing connection (the gloo connections of
    another launch, for instance); ports below that range are only ever taken by an explicit bind.
    """
    low, _ = _ephemeral_ports()
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(20000, max(low, 20001))
        if port != 29500 and _is_free(port):
            return port
    with socket.socket() as sock:  # every port drawn was busy: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


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
    for attempt in range(3):  # a fresh port per run; another job may take it between our probe and the bind
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), *target,
        ]  # fmt: skip
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
        except subprocess.TimeoutExpired as error:  # show what the processes had written before they were stopped
            print(f"$ {' '.join(command)}\nstopped after {timeout} s")
            print(f"----- stdout -----\n{_text(error.stdout)}")
            print(f"----- stderr (all processes) -----\n{_text(error.stderr)}")
            raise
        if result.returncode == 0 or "address already in use" not in result.stderr.lower():
            break
    log_dir = os.environ.get("NAR_TEST_LAUNCH_LOG_DIR")  # keep every launch's output, passing or not, to study flakes
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        log = Path(log_dir) / f"launch-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns()}.log"
        log.write_text(f"$ {' '.join(command)}\nexit status {result.returncode}\n----- stdout -----\n{result.stdout}\n"
                       f"----- stderr (all processes) -----\n{result.stderr}")  # fmt: skip
    if result.returncode != 0:  # pytest shows this on failure: every process's full output, not a tail
        print(f"$ {' '.join(command)}\nexit status {result.returncode}")
        print(f"----- stdout -----\n{result.stdout}\n----- stderr (all processes) -----\n{result.stderr}")
    return result
