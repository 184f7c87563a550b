"""Decoding beside the step loop: the engine hands its VQ decodes (streamed previews, finished outputs) to one worker
thread, so the next forward pass does not wait for them; decoding releases the GIL in its convolutions, so on a
machine with a spare core the two overlap.

Jobs run in the order they are handed over (a request's previews before its result). At most `max_pending` wait:
past that, `run` blocks, and the step loop slows to the decoder's pace instead of piling up tensors. Without a started
thread (a caller driving `GenerationEngine.iterate` itself) every job runs at once, in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from diffusers.utils import logging

logger = logging.get_logger(__name__)


class OutputWorker:
    """One background thread running the engine's decode jobs in order (see the module docstring)."""

    def __init__(self, max_pending: int):
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="nar-engine-outputs", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Run the jobs handed over so far, then end the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
            self._thread = None

    def run(self, job: Callable[[], None]) -> None:
        """Run `job` on the worker thread (at once, here, when none is started)."""
        if self._thread is None:
            job()
        else:
            self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                with torch.inference_mode():  # grad mode is per thread
                    job()
            except Exception as error:  # a job reports its own requests' failures; this is a bug, not theirs
                logger.error(f"A decode job of the serving engine failed: {error!r}")
