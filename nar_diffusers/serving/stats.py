"""What the engine counts, for `GET /metrics` (Prometheus text) and the load benchmark."""

from __future__ import annotations

import threading
import time

from .requests import QueueFullError, RequestCancelledError, RequestTimeoutError

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


class EngineStats:
    """Counters of one engine: requests by outcome, outputs and tokens generated, forward passes, latencies.

    Counts only grow; `tokens_per_second` / `outputs_per_second` are over a sliding window of recent iterations.
    Thread-safe (the engine's thread writes, the server reads).
    """

    def __init__(self, window_seconds: float = 30.0):
        self._lock = threading.Lock()
        self.window_seconds = window_seconds
        self.submitted = 0
        self.rejected = 0
        self.finished = 0
        self.failed = {"timeout": 0, "cancelled": 0, "error": 0}
        self.outputs = 0
        self.tokens = 0
        self.forward_passes = 0
        self.skipped_previews = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self._recent: list[tuple[float, int, int]] = []  # (time, tokens, outputs)

    def _remember(self, tokens: int, outputs: int) -> None:
        now = time.monotonic()
        self._recent.append((now, tokens, outputs))
        while self._recent and self._recent[0][0] < now - self.window_seconds:
            self._recent.pop(0)

    def count_step(self, rows: int, tokens: int) -> None:
        if rows == 0:
            return
        with self._lock:
            self.forward_passes += 1
            self.tokens += tokens
            self._remember(tokens, 0)

    def count_skipped_preview(self) -> None:
        with self._lock:
            self.skipped_previews += 1

    def count_finished(self, outputs: int, seconds: float) -> None:
        with self._lock:
            self.finished += 1
            self.outputs += outputs
            self.latency_sum += seconds
            bucket = next((i for i, edge in enumerate(LATENCY_BUCKETS) if seconds <= edge), len(LATENCY_BUCKETS))
            self.latency_counts[bucket] += 1
            self._remember(0, outputs)

    def count_failed(self, error: BaseException) -> None:
        kind = "timeout" if isinstance(error, RequestTimeoutError) else (
            "cancelled" if isinstance(error, RequestCancelledError) else "error")  # fmt: skip
        if isinstance(error, QueueFullError):
            return
        with self._lock:
            self.failed[kind] += 1

    def rates(self) -> tuple[float, float]:
        """(tokens/s, outputs/s) over the window."""
        with self._lock:
            if not self._recent:
                return 0.0, 0.0
            span = max(time.monotonic() - self._recent[0][0], 1e-3)
            return sum(t for _, t, _ in self._recent) / span, sum(o for _, _, o in self._recent) / span
