"""The HTTP face of the engine (FastAPI; `pip install nar-diffusers[serve]`): OpenAI-style generation endpoints,
server-sent-event streaming, `/health` and `/metrics`.

- `POST /v1/images/generations` (image models) and `POST /v1/videos/generations` (video models): the OpenAI Images
  fields that apply (`prompt`, `n`, `size`, `response_format` "b64_json"), `class_label` / `class_name` for class
  models, and the sampling fields named as in the pipeline call (`guidance_scale`, `cfg_interval`, `temperature`,
  `top_k`, `top_p`, `seed`; omitted ones take the model's saved `sampling_defaults`). `stream: true` answers with
  server-sent events: `image_generation.partial_image` after every step (the growing grid decoded; when decoding
  lags under load, the steps in between are skipped and the newest grid is sent), then `image_generation.completed`.
- Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 422 for bad input (before any model
  work), 429 with `Retry-After` when the queue is full, 504 past the request's timeout, 500 when the model produced
  NaN/inf for this request, 401 without the bearer token (when `--api-key` is set).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import os
import secrets
import tempfile
import time
from typing import Any, Callable, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..pipelines.autoregressive_generation import NonFiniteLogitsError
from ..utils.request_limits import RequestLimits
from .metrics import prometheus_text
from .requests import Event, QueueFullError, RequestCancelledError, RequestTimeoutError

DEFAULT_MAX_PROMPT_CHARS = 2000


class GenerationFields(BaseModel):
    """The request body of both generation endpoints (unknown fields are a 422)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    class_label: int | None = None
    class_name: str | None = None
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    guidance_scale: float | None = None
    cfg_interval: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False


class VideoFields(GenerationFields):
    format: Literal["mp4", "gif"] = "mp4"
    fps: float = Field(default=8.0, gt=0, le=120)


class InvalidField(ValueError):
    """A request field that is not allowed (HTTP 422 naming `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine, model_name: str = "nar", api_key: str | None = None, limits: RequestLimits | None = None,
               max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> FastAPI:  # fmt: skip
    """The FastAPI app over a started `GenerationEngine` (or a baseline executor with the same `submit`)."""
    limits = limits or RequestLimits()
    app = FastAPI(title="nar-diffusers", version="1")
    pipe = engine.pipe
    transformer = pipe.transformer
    is_video = engine.is_video
    served_size = _served_size(pipe, engine.grid, is_video)
    max_n = min(limits.max_images, engine.max_batch)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        header = request.headers.get("authorization", "")
        return header.startswith("Bearer ") and secrets.compare_digest(header[7:].encode(), api_key.encode())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        return _error(422, f"`{param}`: {first.get('msg', 'invalid')}", "invalid_request_error", param)

    def call_arguments(fields: GenerationFields) -> dict[str, Any]:
        """The engine's arguments of a request; `InvalidField` names the field that is not allowed."""
        if fields.model not in (None, model_name):
            raise InvalidField("model", f"`model` must be {model_name!r} (the model this server serves) or omitted.")
        if fields.size is not None and fields.size != served_size:
            raise InvalidField("size", f"`size` must be one of [{served_size!r}] (the size this server serves).")
        if not 1 <= fields.n <= max_n:
            raise InvalidField("n", f"`n` must be an int in [1, {max_n}], got {fields.n}.")
        arguments: dict[str, Any] = {"n": fields.n}
        if transformer.condition_type == "class":
            if fields.prompt is not None:
                raise InvalidField("prompt", "`prompt` is not accepted by this class-conditional model: pass `class_label` or `class_name`.")
            if (fields.class_label is None) == (fields.class_name is None):
                raise InvalidField("class_label", "Pass exactly one of `class_label` and `class_name`.")
            if fields.class_name is not None:
                try:
                    arguments["class_labels"] = pipe.get_label_ids(fields.class_name)[0]
                except ValueError as error:
                    raise InvalidField("class_name", f"`class_name`: {error}") from None
            else:
                num_classes = transformer.config.num_classes
                if not 0 <= fields.class_label < num_classes:
                    raise InvalidField("class_label", f"`class_label` must be in [0, {num_classes - 1}], got "
                                       f"{fields.class_label}.")  # fmt: skip
                arguments["class_labels"] = fields.class_label
        else:
            if fields.class_label is not None or fields.class_name is not None:
                raise InvalidField("prompt", "`prompt` is required by this text-conditional model (not `class_label` / `class_name`).")
            if not fields.prompt:
                raise InvalidField("prompt", "`prompt` is required: a non-empty string.")
            if len(fields.prompt) > max_prompt_chars:
                raise InvalidField("prompt", f"`prompt` has {len(fields.prompt)} characters; at most "
                                   f"{max_prompt_chars} are allowed (--max-prompt-chars).")  # fmt: skip
            arguments["prompt"] = fields.prompt
        for name in ("guidance_scale", "cfg_interval", "temperature", "top_k", "top_p"):
            if getattr(fields, name) is not None:
                arguments[name] = getattr(fields, name)
        if fields.seed is not None:
            arguments["generator"] = torch.Generator().manual_seed(fields.seed)
        return arguments

    async def generate(request: Request, fields: GenerationFields, encode):
        if not authorized(request):
            return _error(401, "Missing or wrong bearer token (Authorization: Bearer <api key>).", "authentication_error",
                          headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EncodedEvent] = asyncio.Queue()
        on_event = _encoding_listener(loop, events, encode)
        try:
            arguments = call_arguments(fields)
            submit = functools.partial(engine.submit, stream=fields.stream, on_event=on_event, **arguments)
            # a prompt is encoded by the text encoder on submission: off the event loop; a class label costs nothing
            handle = submit() if transformer.condition_type == "class" else await asyncio.to_thread(submit)
        except InvalidField as error:
            return _error(422, str(error), "invalid_request_error", error.param)
        except QueueFullError as error:
            return _error(429, str(error), "rate_limit_error", headers={"Retry-After": "1"})
        except (ValueError, TypeError) as error:
            return _error(422, str(error), "invalid_request_error", _named_param(str(error)))
        created = int(time.time())
        if fields.stream:
            return StreamingResponse(_stream(handle, events, created), media_type="text/event-stream")
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            while True:
                event, encoded = await events.get()
                if event.kind == "result":
                    data = [{"b64_json": b64} for b64 in encoded]
                    return JSONResponse({"created": created, "model": model_name, "data": data})
                if event.kind == "error":
                    return _failure(event.error)
        finally:
            watcher.cancel()
            handle.cancel()  # the client went away (this task was cancelled): free its slot; no effect once finished

    if is_video:
        @app.post("/v1/videos/generations")
        async def videos(request: Request, fields: VideoFields):
            return await generate(request, fields, lambda frames: _video_b64(frames, fields.format, fields.fps))
    else:
        @app.post("/v1/images/generations")
        async def images(request: Request, fields: GenerationFields):
            return await generate(request, fields, _png_b64)

    @app.get("/health")
    async def health():
        if not engine.running:
            return JSONResponse({"status": "stopped", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok", "model": model_name, "queue_depth": engine.queue_depth,
                "active_slots": engine.active_outputs, "max_batch": engine.max_batch}  # fmt: skip

    @app.get("/metrics")
    async def metrics(request: Request):
        if not authorized(request):
            return _error(401, "Missing or wrong bearer token.", "authentication_error",
                          headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    return app


EncodedEvent = tuple[Event, list[str] | None]


def _encoding_listener(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, encode) -> Callable[[Event], None]:
    """The `on_event` of one request: base64-encodes a preview's or the result's outputs in the thread that reports
    them (the engine's output worker, beside the event loop), then hands `(event, encoded)` to the event loop. An
    output that fails to encode fails the request (its client gets the error, not silence)."""

    def on_event(event: Event) -> None:
        encoded = None
        if event.kind in ("preview", "result"):
            try:
                outputs = event.outputs if event.kind == "preview" else event.result.outputs
                encoded = [encode(output) for output in outputs]
            except Exception as error:
                if event.kind == "preview":
                    return  # a preview is not worth failing the request for
                event = Event("error", error=error)
        loop.call_soon_threadsafe(events.put_nowait, (event, encoded))

    return on_event


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """Wait for the client to go away (ASGI `http.disconnect`), then cancel its request: its slot is freed at the
    engine's next iteration."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


async def _stream(handle, events: asyncio.Queue, created: int):
    """Server-sent events: partial images as the grid grows (the newest when decoding lags), then the result (or an
    error event)."""
    try:
        while True:
            event, encoded = await events.get()
            if event.kind == "preview":
                for index, b64 in enumerate(encoded):
                    payload = {"type": "image_generation.partial_image", "step": event.step, "index": index,
                               "b64_json": b64, "created": created}  # fmt: skip
                    yield f"event: image_generation.partial_image\ndata: {json.dumps(payload)}\n\n"
            elif event.kind == "result":
                payload = {"type": "image_generation.completed", "created": created,
                           "data": [{"b64_json": b64} for b64 in encoded]}  # fmt: skip
                yield f"event: image_generation.completed\ndata: {json.dumps(payload)}\n\n"
                return
            else:
                response = _failure(event.error)
                yield f"event: error\ndata: {response.body.decode()}\n\n"
                return
    finally:
        handle.cancel()  # a client that went away frees its slot (no effect once finished)


def _failure(error: BaseException) -> JSONResponse:
    if isinstance(error, RequestTimeoutError):
        return _error(504, str(error), "timeout")
    if isinstance(error, RequestCancelledError):
        return _error(503, str(error), "cancelled")
    if isinstance(error, NonFiniteLogitsError):
        return _error(500, str(error), "model_error")
    return _error(500, f"{type(error).__name__}: {error}", "server_error")


def _named_param(message: str) -> str | None:
    """The first `name` a validation message quotes (our messages name the argument in backticks)."""
    if message.count("`") >= 2:
        return message.split("`")[1]
    return None


def _served_size(pipe, grid: tuple[int, ...], is_video: bool) -> str:
    if is_video:
        frames, height, width = pipe.default_video_size()
        return f"{width}x{height}x{frames}"
    factor = pipe.vq_scale_factor
    return f"{grid[1] * factor}x{grid[0] * factor}"


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _video_b64(frames: list, video_format: str, fps: float) -> str:
    from ..utils.video_utils import write_video

    with tempfile.TemporaryDirectory(prefix="nar-serve-") as folder:
        path = write_video(frames, os.path.join(folder, f"video.{video_format}"), fps=fps)
        with open(path, "rb") as file:
            return base64.b64encode(file.read()).decode()
