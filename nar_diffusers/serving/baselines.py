"""What continuous batching is measured against: whole pipeline calls, one request at a time or statically batched.

`PipelineBatcher` has the engine's interface (`submit`, `start`, `stop`, the counters `/metrics` reads), so the same
server and the same load benchmark run on all three (`nar-diffusers serve --batching single|static|continuous`):

- "single": one `pipe(...)` call per request, in arrival order;
- "static": wait until `max_batch` outputs are queued or `max_wait` seconds passed since the oldest, then ONE
  pipeline call for those of them that share sampling settings (one generator per output).
Streaming previews come from the pipeline's step callback (`TokenPreview`).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import torch

from ..utils.preview import TokenPreview
from .engine import GenerationEngine
from .requests import (
    GenerationResult, QueueFullError, RequestCancelledError, RequestHandle, RequestTimeoutError, prepare_request,
)  # fmt: skip
from .stats import EngineStats

BATCHING_MODES = ("continuous", "single", "static")


class _Pending:
    def __init__(self, arguments: dict, n: int, handle: RequestHandle, stream: bool, deadline: float | None):
        self.arguments, self.n, self.handle, self.stream, self.deadline = arguments, n, handle, stream, deadline
        self.submitted = time.monotonic()


class PipelineBatcher:
    """Serve whole pipeline calls ("single" or "static", see the module docstring); `GenerationEngine`'s interface."""

    def __init__(self, pipe, mode: str = "single", max_batch: int = 8, max_queue: int = 64,
                 timeout: float | None = None, max_wait: float = 0.05):  # fmt: skip
        if mode not in ("single", "static"):
            raise ValueError(f"`mode` must be 'single' or 'static', got {mode!r}.")
        # A checking engine: the same validation, grid and sizes as continuous batching, never started.
        self._checker = GenerationEngine(pipe, max_batch=max_batch, max_queue=max_queue, timeout=timeout)
        self.pipe, self.mode, self.max_batch, self.max_queue = pipe, mode, max_batch, max_queue
        self.timeout, self.max_wait = timeout, max_wait
        self.is_video, self.grid = self._checker.is_video, self._checker.grid
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self._queue: collections.deque[_Pending] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._active = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_outputs(self) -> int:
        return self._active

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, n: int = 1, generator=None, stream: bool = False, timeout: float | None = None, on_event=None,
               **call_arguments: Any) -> RequestHandle:  # fmt: skip
        # Validated as the engine validates (the prepared request is discarded; the generator is left untouched).
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_batch:
            raise ValueError(f"`n` must be an int in [1, {self.max_batch}] (the engine's max_batch), got {n!r}.")
        with torch.inference_mode():
            prepared = prepare_request(self.pipe, self._checker.order, self._checker.device, n=n, **call_arguments)
        handle = RequestHandle(prepared.id, on_event)
        timeout = self.timeout if timeout is None else timeout
        pending = _Pending({**call_arguments, "generator": generator}, n, handle, stream,
                           None if timeout is None else time.monotonic() + timeout)  # fmt: skip
        with self._lock:
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"The queue is full ({self.max_queue} requests waiting); retry later.")
            self._queue.append(pending)
            self.stats.submitted += 1
            self._lock.notify()
        return handle

    def start(self) -> PipelineBatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"nar-{self.mode}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _take_batch(self) -> list[_Pending]:
        with self._lock:
            while not self._stopping and not self._queue:
                self._lock.wait()
            if self._stopping:
                return []
            if self.mode == "static":
                deadline = self._queue[0].submitted + self.max_wait
                while sum(p.n for p in self._queue) < self.max_batch and time.monotonic() < deadline:
                    self._lock.wait(max(deadline - time.monotonic(), 0))
            batch, outputs = [], 0
            while self._queue and outputs + self._queue[0].n <= (self.max_batch if self.mode == "static" else 1 << 30):
                batch.append(self._queue.popleft())
                outputs += batch[-1].n
                if self.mode == "single":
                    break
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            now = time.monotonic()
            live = []
            for pending in batch:
                if pending.handle.cancelled:
                    self.stats.count_failed(RequestCancelledError())
                    pending.handle.fail(RequestCancelledError("The request was cancelled."))
                elif pending.deadline is not None and now > pending.deadline:
                    error = RequestTimeoutError("The request did not finish within its timeout.")
                    self.stats.count_failed(error)
                    pending.handle.fail(error)
                else:
                    live.append(pending)
            groups: dict[tuple, list[_Pending]] = {}
            for pending in live:
                key = tuple(sorted((k, v) for k, v in pending.arguments.items()
                                   if k not in ("class_labels", "prompt", "generator")))  # fmt: skip
                groups.setdefault(key, []).append(pending)
            for group in groups.values():
                self._call(group)

    def _call(self, group: list[_Pending]) -> None:
        arguments = {k: v for k, v in group[0].arguments.items() if k != "generator"}
        condition = "class_labels" if "class_labels" in arguments else "prompt"
        arguments[condition] = [p.arguments[condition] for p in group for _ in range(p.n)]
        generators = []
        for pending in group:
            generator = pending.arguments.get("generator")
            generators += [generator if generator is not None else torch.Generator().manual_seed(
                int(torch.randint(0, 2**62, ())))] * pending.n  # fmt: skip
        streaming = [p for p in group if p.stream]
        callback = None
        if streaming:
            callback = TokenPreview(on_preview=lambda step, images: [
                p.handle.preview(step, images, time.monotonic() - p.submitted) for p in streaming])  # fmt: skip
        self._active = sum(p.n for p in group)
        started = time.monotonic()
        try:
            output = self.pipe(**arguments, generator=generators, callback_on_step_end=callback)
        except Exception as error:  # one failed call fails its requests, never the server
            for pending in group:
                self.stats.count_failed(error)
                pending.handle.fail(error)
            return
        finally:
            self._active = 0
        outputs = output.frames if self.is_video else output.images
        start = 0
        for pending in group:
            total = time.monotonic() - pending.submitted
            self.stats.count_finished(pending.n, total)
            queued = started - pending.submitted
            pending.handle.finish(GenerationResult(torch.empty(0), outputs[start : start + pending.n], queued, total))
            start += pending.n
