"""`GenerationEngine`: continuous batching at step granularity for one NAR pipeline.

```py
engine = GenerationEngine(pipe, max_batch=8).start()
handle = engine.submit(class_labels=207, n=2, generator=torch.Generator().manual_seed(0))
images = handle.result().outputs
engine.stop()
```

Every iteration: drop the requests that were cancelled or ran past their timeout, admit queued requests while batch
slots are free, run ONE forward pass over every output in flight, each at its own step (new ones prefill their
condition and draw their first token in it), then free the slots of finished requests at once. Decoding (streamed
previews, finished outputs) runs beside the iterations on an output worker thread (`OutputWorker`), everything
waiting for it in one decode; when it lags, a streamed request's previews skip to its newest grid (a result is never
skipped). A request with a generator gets the same tokens whether it is served alone or
among others, and the same as `pipe(...)` with that generator. NaN/inf logits fail the request they belong to
(`NonFiniteLogitsError`); the others go on.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Any, Callable

import torch
from diffusers.utils import logging

from ..pipelines.autoregressive_generation import NonFiniteLogitsError
from .continuous_batch import ContinuousBatch
from .output_worker import OutputWorker
from .requests import (
    Event, PreparedRequest, QueueFullError, RequestCancelledError, RequestHandle,
    RequestTimeoutError, prepare_request,
)  # fmt: skip
from .stats import EngineStats

logger = logging.get_logger(__name__)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


class GenerationEngine:
    """Serve one `NARPipeline` / `NARVideoPipeline` (NAR or raster order, class or text) with continuous batching.

    Args:
        pipe: the pipeline; its transformer's dtype and device are used as they are.
        max_batch: outputs in flight at once (each a batch slot; a guided output also takes an unconditional row).
        max_queue: requests waiting for slots; `submit` raises `QueueFullError` beyond it.
        timeout: default per-request timeout in seconds (None: no timeout).
        grid: the token grid served (default: the scheduler's; for videos, the pipeline's default video grid).
    """

    def __init__(self, pipe, max_batch: int = 8, max_queue: int = 64, timeout: float | None = None, grid=None):
        self.pipe = pipe
        self.max_batch = _check_count("max_batch", max_batch, 1)
        self.max_queue = _check_count("max_queue", max_queue, 0)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"`timeout` must be None or a number of seconds > 0, got {timeout!r}.")
        self.timeout = timeout
        transformer = pipe.transformer
        self.is_video = len(transformer.config.grid_size) == 3
        if grid is None and self.is_video:
            frames, height, width = pipe.default_video_size()
            grid = pipe.video_tokenizer.token_grid(num_frames=frames, height=height, width=width)
        elif grid is None:
            grid = tuple(pipe.scheduler.grid_size)
        grid = tuple(int(g) for g in grid)
        transformer.check_grid(grid)
        self.device = transformer.device
        self.order = transformer.token_order(grid, self.device)
        self.grid = grid
        self.batch = ContinuousBatch(transformer, self.order, self.max_batch)
        self.stats = EngineStats()
        self._queue: collections.deque[PreparedRequest] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._outputs = OutputWorker(pipe, self.stats, max_pending=2 * self.max_batch)
        self._stopping = False
        self.error: BaseException | None = None

    # --- submitting ---------------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_outputs(self) -> int:
        return len(self.batch.slots)

    def submit(self, n: int = 1, generator=None, output_type: str = "pil", stream: bool = False,
               timeout: float | None = None, on_event: Callable[[Event], Any] | None = None,
               **call_arguments: Any) -> RequestHandle:  # fmt: skip
        """Check, encode and queue one request; returns its handle.

        `call_arguments` are the pipeline call's condition and sampling arguments for ONE condition (`class_labels`
        an int, or `prompt` a string, ...), `n` the outputs of it; `generator` one `torch.Generator` for the request
        (its outputs draw from it as `pipe(..., generator=generator)` would) or one per output. `stream=True` reports
        a preview after every step (`Event("preview")`). `timeout` overrides the engine's.

        Raises:
            `ValueError` naming the argument (nothing is queued); `QueueFullError` when `max_queue` requests wait.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_batch:
            raise ValueError(f"`n` must be an int in [1, {self.max_batch}] (the engine's max_batch), got {n!r}.")
        with self._lock:
            if self._is_full(n):
                self.stats.rejected += 1
                raise QueueFullError(f"The queue is full ({self.max_queue} requests waiting); retry later.")
        with torch.inference_mode():
            request = prepare_request(
                self.pipe, self.order, self.device, n=n, generator=generator, output_type=output_type, stream=stream,
                timeout=self.timeout if timeout is None else timeout, on_event=on_event, **call_arguments,
            )  # fmt: skip
        with self._lock:
            if self._is_full(n):
                self.stats.rejected += 1
                raise QueueFullError(f"The queue is full ({self.max_queue} requests waiting); retry later.")
            self._queue.append(request)
            self.stats.submitted += 1
            self._lock.notify()
        return request.handle

    def _is_full(self, n: int) -> bool:
        """Whether a new request of `n` outputs would wait behind `max_queue` others: queued requests that the next
        iteration admits (in order, while slots are free) do not count as waiting."""
        free, waiting = self.batch.num_free, 0
        for request in self._queue:
            if waiting == 0 and request.n <= free:
                free -= request.n
            else:
                waiting += 1
        return waiting >= self.max_queue and (waiting > 0 or n > free)

    # --- running ------------------------------------------------------------------------------------------------

    def start(self) -> GenerationEngine:
        """Run the iterations in a background thread (a daemon); returns the engine."""
        if self._thread is None:
            self._stopping = False
            self._outputs.start()
            self._thread = threading.Thread(target=self._run, name="nar-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread after its current iteration; requests still queued or in flight fail (cancelled)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._outputs.stop(timeout)  # outputs being decoded are delivered
        self._fail_all(RequestCancelledError("The engine was stopped."))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._queue and not self.batch.slots:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.iterate()
            except Exception as error:  # not one request's fault (e.g. out of memory): fail those in flight, go on
                logger.error(f"A serving iteration failed; the requests in flight fail with it: {error!r}")
                self.error = error
                self._fail_in_flight(error)

    def iterate(self) -> None:
        """One iteration (the background thread calls it in a loop; tests may call it directly)."""
        with torch.inference_mode():
            self._drop_abandoned()
            self._admit()
            stepped = self.batch.step()
            self.stats.count_step(len(stepped), sum(self.batch.group_sizes[self.batch.slots[s].step - 1] for s in stepped))
            previews = self._previews(stepped)
            self._outputs.hand_over(previews, self._finish())  # decoded together, beside the next iteration

    def run_until_idle(self) -> None:
        """Iterate until nothing is queued or in flight (without the background thread)."""
        while self._queue or self.batch.slots:
            self.iterate()

    # --- the parts of an iteration --------------------------------------------------------------------------------

    def _requests_in_flight(self) -> dict[int, list[int]]:
        slots_of: dict[int, list[int]] = {}
        for slot, output in self.batch.slots.items():
            slots_of.setdefault(output.request.id, []).append(slot)
        return slots_of

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        with self._lock:
            kept = collections.deque()
            for request in self._queue:
                error = _abandoned(request, now)
                if error is None:
                    kept.append(request)
                else:
                    self._fail(request, error)
            self._queue = kept
        requests = {output.request.id: output.request for output in self.batch.slots.values()}
        for request_id, slots in self._requests_in_flight().items():
            error = _abandoned(requests[request_id], now)
            if error is not None:
                self.batch.release(slots)
                self._fail(requests[request_id], error)

    def _admit(self) -> None:
        joining, free = [], self.batch.num_free
        with self._lock:
            while self._queue and self._queue[0].n <= free:
                request = self._queue.popleft()
                request.admitted = time.monotonic()
                joining.append(request)
                free -= request.n
        if joining:
            self.batch.admit(joining)

    def _previews(self, stepped: list[int]) -> list[tuple[PreparedRequest, int, torch.LongTensor]]:
        """(request, step, partial grids) of every streaming request stepped."""
        streaming: dict[int, list[int]] = {}
        for slot in stepped:
            output = self.batch.slots[slot]
            if output.request.stream and not output.request.handle.cancelled:
                streaming.setdefault(output.request.id, []).append(slot)
        if not streaming:
            return []
        groups = [sorted(slots, key=lambda s: self.batch.slots[s].index) for slots in streaming.values()]
        grids = self.batch.grids([slot for slots in groups for slot in slots])
        previews = []
        for slots, end in zip(groups, itertools.accumulate(len(slots) for slots in groups)):
            output = self.batch.slots[slots[0]]
            previews.append((output.request, output.step - 1, grids[end - len(slots) : end]))
        return previews

    def _finish(self) -> list[tuple[PreparedRequest, torch.LongTensor]]:
        """Release the finished requests' slots now; returns (request, grids) of those that have outputs to deliver
        (a request with NaN/inf logits fails here)."""
        finished = set(self.batch.finished())
        done: list[tuple[PreparedRequest, torch.LongTensor]] = []
        for request_id, slots in self._requests_in_flight().items():
            if not set(slots) <= finished:
                continue
            slots.sort(key=lambda s: self.batch.slots[s].index)
            request = self.batch.slots[slots[0]].request
            tokens = self.batch.grids(slots)
            nonfinite = bool(self.batch.nonfinite.index_select(0, torch.tensor(slots, device=self.device)).any())
            self.batch.release(slots)
            if nonfinite:
                self._fail(request, NonFiniteLogitsError(
                    "The transformer produced NaN or inf logits for this request, so no valid tokens could be drawn "
                    "(float16 overflow, NaN weights, or a guidance_scale so large that the guided logits overflow)."
                ))  # fmt: skip
            else:
                done.append((request, tokens))
        return done

    def _fail(self, request: PreparedRequest, error: BaseException) -> None:
        self.stats.count_failed(error)
        request.handle.fail(error)

    def _fail_in_flight(self, error: BaseException) -> None:
        requests = {output.request.id: output.request for output in self.batch.slots.values()}
        for slots in self._requests_in_flight().values():
            self.batch.release(slots)
        for request in requests.values():
            if not request.handle.done:
                self._fail(request, error)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
        self._fail_in_flight(error)
        for request in queued:
            if not request.handle.done:
                self._fail(request, error)


def _abandoned(request: PreparedRequest, now: float) -> BaseException | None:
    if request.handle.cancelled:
        return RequestCancelledError("The request was cancelled.")
    if request.deadline is not None and now > request.deadline:
        return RequestTimeoutError(
            f"The request did not finish within its timeout of {request.deadline - request.submitted:g} s."
        )
    return None
