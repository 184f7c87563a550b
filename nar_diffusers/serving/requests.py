"""A generation request as the serving engine sees it: checked and encoded on arrival, then a handle to wait on.

`prepare_request` does, in the caller's thread and before any slot is taken, everything a request needs that does not
depend on the other requests: the pipeline's own checks of the condition and the sampling settings (the same
`ValueError`s as `pipe(...)`), the condition encoded for the model (prompts through the text encoder), and all the
randomness of the generation drawn from the request's own generator (`SamplingSettings.uniforms`). The result is a
`PreparedRequest`; `RequestHandle` is what the submitter keeps: events (previews, the result, an error), a result
to wait for, and `cancel()`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.utils import logging

from ..pipelines.autoregressive_generation import CONDITION_ARGUMENTS, SAMPLING_ARGUMENTS
from ..pipelines.condition import Condition, ConditionInputs
from ..pipelines.sampling_settings import SamplingSettings

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "latent")
_request_ids = itertools.count(1)


class QueueFullError(RuntimeError):
    """The engine's queue holds `max_queue` requests already (HTTP 429: retry later)."""


class RequestTimeoutError(TimeoutError):
    """A request was not finished within its timeout (HTTP 504)."""


class RequestCancelledError(RuntimeError):
    """A request was cancelled (its client went away) before it finished."""


@dataclass
class GenerationResult:
    """A finished request: `tokens` `(n, *grid)`, the outputs (`output_type` "pil": PIL images, or one list of
    frames per video; "latent": None), and its timings (seconds since submission)."""

    tokens: torch.LongTensor
    outputs: list | None
    queued_seconds: float
    total_seconds: float


@dataclass
class Event:
    """What a handle reports: kind "preview" (`step`, `outputs`: the partial grid decoded), "result" or "error"."""

    kind: str
    step: int | None = None
    outputs: list | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None


@dataclass
class PreparedRequest:
    """A checked, encoded request: `n` outputs of one condition row each, ready to be admitted to batch slots."""

    id: int
    n: int
    condition: Condition
    settings: SamplingSettings
    uniforms: torch.Tensor | None
    guided_steps: list[bool]
    output_type: str
    stream: bool
    submitted: float
    deadline: float | None
    admitted: float | None = None
    handle: RequestHandle = field(repr=False, default=None)

    @property
    def draw_key(self) -> tuple:
        """Requests drawing with the same settings are drawn in one vectorised call."""
        s = self.settings
        return (s.temperature, s.top_k, s.top_p, s.do_sample)


class RequestHandle:
    """What `engine.submit` returns: wait with `result()`, follow `events` (a `queue.Queue` of `Event`s, or the
    `on_event` callback given to `submit`, called from the engine's thread), stop with `cancel()`."""

    def __init__(self, request_id: int, on_event: Callable[[Event], Any] | None = None):
        self.id = request_id
        self.events: queue.Queue[Event] = queue.Queue()
        self._on_event = on_event
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self.cancelled = False
        self.first_preview_seconds: float | None = None

    def cancel(self) -> None:
        """Drop the request at the engine's next iteration (its slots are freed); a finished one is unaffected."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request; raises its error (e.g. `RequestTimeoutError`, `NonFiniteLogitsError`)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"Request {self.id} is not finished after {timeout} s.")
        if self._error is not None:
            raise self._error
        return self._result

    def _emit(self, event: Event) -> None:
        if event.kind == "result":
            self._result = event.result
        elif event.kind == "error":
            self._error = event.error
        self.events.put(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception as error:  # e.g. the client's event loop is gone: the engine and other requests go on
                logger.error(f"The listener of request {self.id} failed on its {event.kind!r} event: {error!r}")
        if event.kind in ("result", "error"):
            self._done.set()

    def finish(self, result: GenerationResult) -> None:
        self._emit(Event("result", result=result))

    def fail(self, error: BaseException) -> None:
        self._emit(Event("error", error=error))

    def preview(self, step: int, outputs: list, seconds: float) -> None:
        if self.first_preview_seconds is None:
            self.first_preview_seconds = seconds
        self._emit(Event("preview", step=step, outputs=outputs))


def prepare_request(
    pipe,
    order,
    device: torch.device,
    n: int = 1,
    generator: torch.Generator | list[torch.Generator] | None = None,
    output_type: str = "pil",
    stream: bool = False,
    timeout: float | None = None,
    on_event: Callable[[Event], Any] | None = None,
    **call_arguments: Any,
) -> PreparedRequest:
    """Check and encode one request for `pipe`'s engine (`order`: the served `TokenOrder`).

    `call_arguments` are the pipeline call's condition and sampling arguments (`class_labels` or `prompt`, ...,
    `guidance_scale`, `cfg_interval`, `temperature`, `top_k`, `top_p`, `do_sample`); omitted sampling settings take
    the pipeline's `sampling_defaults`. `n` outputs per request (one condition: one class label or one prompt).
    Raises a `ValueError` naming the argument, as the pipeline call does, before anything is encoded.
    """
    unknown = sorted(set(call_arguments) - set(CONDITION_ARGUMENTS) - set(SAMPLING_ARGUMENTS))
    if unknown:
        raise TypeError(f"Unknown request arguments {unknown}.")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"`timeout` must be None or a number of seconds > 0, got {timeout!r}.")
    arguments = {name: None for name in CONDITION_ARGUMENTS + SAMPLING_ARGUMENTS}
    arguments.update(truncation=True, do_sample=True, generator=generator, n=n)
    arguments.update(call_arguments)
    inputs: ConditionInputs = pipe.check_condition(arguments, "n")
    if inputs.num_conditions != 1:
        raise ValueError(
            f"A request has one condition (one class label or one prompt; `n` outputs of it), got {inputs.num_conditions}."
        )
    settings = pipe.check_sampling(arguments, inputs, "image")
    condition = pipe.encode_condition(inputs, device)
    submitted = time.monotonic()
    request_id = next(_request_ids)
    return PreparedRequest(
        id=request_id,
        n=inputs.num_outputs,
        condition=condition,
        settings=settings,
        uniforms=settings.uniforms(inputs.num_outputs, order.num_tokens, device),
        guided_steps=settings.guided_steps(order),
        output_type=output_type,
        stream=bool(stream),
        submitted=submitted,
        deadline=None if timeout is None else submitted + float(timeout),
        handle=RequestHandle(request_id, on_event),
    )
