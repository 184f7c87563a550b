"""Serving: continuous batching at step granularity (`GenerationEngine`) and the HTTP server behind
`nar-diffusers serve` (`server.create_app`, FastAPI; the `[serve]` extra)."""

from .engine import GenerationEngine
from .requests import (
    Event, GenerationResult, QueueFullError, RequestCancelledError, RequestHandle, RequestTimeoutError,
)  # fmt: skip

__all__ = [
    "Event", "GenerationEngine", "GenerationResult", "QueueFullError", "RequestCancelledError", "RequestHandle",
    "RequestTimeoutError",
]  # fmt: skip
