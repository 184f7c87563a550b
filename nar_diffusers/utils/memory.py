"""Memory accounting for benchmarks: resident set size (Linux), tensor bytes, KV cache sizes, one child per run.

A process's peak RSS is a high-water mark over its whole life; measuring one configuration needs a process that
has done nothing else. `run_in_child` runs a function in a fresh child (forked from a helper process that has
imported the benchmark but built and run nothing), so every configuration starts from the same state.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import pickle
import struct
import subprocess
import sys
import traceback
from typing import Any, Callable

import torch

MIB = 2**20
_STATUS = "/proc/self/status"


def rss_available() -> bool:
    """Whether this platform exposes the current and peak RSS (`/proc/self/status`, Linux)."""
    return os.path.isfile(_STATUS)


def _status_bytes(key: str) -> int:
    with open(_STATUS) as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in {_STATUS}")


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    return _status_bytes("VmRSS")


def file_rss() -> int:
    """The file-backed part of the RSS (shared libraries' code and mapped files), in bytes."""
    return _status_bytes("RssFile")


def peak_rss() -> int:
    """Peak resident set size of this process (since it started or since `reset_peak_rss`), in bytes."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0, `/proc/self/clear_refs`); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back (glibc), so RSS counts only live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores; for tensor subclasses (torchao's quantized weights) the sum of their inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters as stored (quantized weights at their real size)."""
    return sum(tensor_bytes(p) for p in module.parameters())


def kv_cache_bytes(
    *,
    num_blocks: int,
    model_rows: int,
    num_kv_heads: int,
    head_dim: int,
    num_condition_tokens: int,
    num_fed_tokens: int,
    num_spare_slots: int = 0,
    element_size: int,
    scale_size: int = 0,
) -> int:
    """Keys plus values of every block for one generation:
    `2 * blocks * rows * kv_heads * (condition + fed tokens + spare slots) * (head_dim * bytes per element + bytes
    of a scale)`; `scale_size` is 4 for a float8 cache (one float32 scale per row, head and slot), else 0."""
    slots = num_condition_tokens + num_fed_tokens + num_spare_slots
    return 2 * num_blocks * model_rows * num_kv_heads * slots * (head_dim * element_size + scale_size)


class _ForkServer:
    """A helper process that has imported `preload` and done nothing else; every request runs in a new fork of it.
    (Unlike multiprocessing's fork server it never re-imports the caller's `__main__`, so it also works from
    unguarded scripts; forking a process that has run no parallel region is safe with OpenMP.)"""

    def __init__(self, preload: tuple[str, ...]):
        requests_read, self._requests = os.pipe()
        self._responses, responses_write = os.pipe()
        command = [sys.executable, "-m", "nar_diffusers.utils.memory", str(requests_read), str(responses_write),
                   *preload]  # fmt: skip
        self.process = subprocess.Popen(command, pass_fds=(requests_read, responses_write), stdin=subprocess.DEVNULL)
        os.close(requests_read)
        os.close(responses_write)
        self.preload = preload

    def call(self, function: Callable[[Any], dict], payload: Any) -> dict:
        _send(self._requests, (function.__module__, function.__qualname__, payload))
        response = _receive(self._responses)
        if response is None:
            return {"error": f"the fork server exited (code {self.process.wait()})"}
        return response


def _send(fd: int, message: Any) -> None:
    data = pickle.dumps(message)
    os.write(fd, struct.pack("<Q", len(data)))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 2**20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int) -> Any:
    header = _read_exactly(fd, 8)
    if header is None:
        return None
    data = _read_exactly(fd, struct.unpack("<Q", header)[0])
    return None if data is None else pickle.loads(data)


def _run_one(module: str, name: str, payload: Any) -> dict:
    try:
        function = importlib.import_module(module)
        for part in name.split("."):
            function = getattr(function, part)
        return function(payload)
    except BaseException as error:  # reported to the caller, which records it and goes on
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=8)}


def _serve(requests: int, responses: int) -> None:
    while (request := _receive(requests)) is not None:
        result_read, result_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(result_read)
            try:
                _send(result_write, _run_one(*request))
            finally:
                os._exit(0)
        os.close(result_write)
        result = _receive(result_read)
        os.close(result_read)
        _, status = os.waitpid(pid, 0)
        if result is None:
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            result = {"error": f"the child process died ({how}; out of memory?)"}
        _send(responses, result)


_SERVER: _ForkServer | None = None


def run_in_child(function: Callable[[Any], dict], payload: Any, preload: tuple[str, ...] = ()) -> dict:
    """`function(payload)` in a fresh child process: its result dict, or `{"error": ...}` if it raised or died.
    `function` must be importable (module level), its payload and result picklable. Children are forked from one
    helper process that imported `preload` once (started again only when a call needs a module it lacks)."""
    global _SERVER
    if not hasattr(os, "fork"):
        return {"error": "a child process per measurement needs os.fork (Linux, macOS)"}
    if _SERVER is None or _SERVER.process.poll() is not None or not set(preload) <= set(_SERVER.preload):
        _SERVER = _ForkServer(tuple(preload))
    return _SERVER.call(function, payload)


if __name__ == "__main__":
    for module_name in sys.argv[3:]:
        importlib.import_module(module_name)
    gc.freeze()  # what is alive now stays out of the children's collections (no copy-on-write, fast gc)
    _serve(int(sys.argv[1]), int(sys.argv[2]))
