"""Decoding beside the step loop: the engine hands its streamed previews and finished outputs to one worker thread,
so the next forward pass does not wait for them (decoding releases the GIL in its convolutions, so on a machine with
a spare core the two overlap).

What is handed over waits until the worker is free, then everything waiting is decoded in ONE call of the VQ decoder
(previews and results together; if that call fails, the previews are decoded together and each result on its own, so
that a failure is only its request's). A request's preview still waiting when its next one comes is replaced: when
decoding lags, a stream skips to its newest grid instead of stalling the step loop. Results are never skipped: when
`max_pending` outputs wait, handing over more blocks, and the step loop slows to the decoder's pace. A request's
previews are delivered before its result. Without a started thread (a caller driving `GenerationEngine.iterate`
itself) everything is delivered at once, in the caller's thread.
"""

from __future__ import annotations

import itertools
import threading
import time

import torch
from diffusers.utils import logging

from ..utils.preview import paint_unknown, pixels_to_pil
from .requests import GenerationResult, PreparedRequest
from .stats import EngineStats

logger = logging.get_logger(__name__)

Preview = tuple[PreparedRequest, int, torch.LongTensor]  # (request, step, its partial grids, -1 where unknown)
Result = tuple[PreparedRequest, torch.LongTensor]  # (request, its finished grids)


class OutputWorker:
    """The engine's decoding thread (see the module docstring): `hand_over` previews and results, `start`, `stop`."""

    def __init__(self, pipe, stats: EngineStats, max_pending: int):
        self.pipe = pipe
        self.stats = stats
        self.max_pending = max_pending
        self._lock = threading.Condition()
        self._previews: dict[int, Preview] = {}
        self._results: list[Result] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="nar-engine-outputs", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Deliver what was handed over so far, then end the thread."""
        if self._thread is not None:
            with self._lock:
                self._stopping = True
                self._lock.notify_all()
            self._thread.join(timeout)
            self._thread = None

    def hand_over(self, previews: list[Preview] = (), results: list[Result] = ()) -> None:
        """Queue previews (each replacing its request's waiting one) and results (blocking while `max_pending`
        outputs wait) for the worker; without a started thread, deliver them now."""
        if not previews and not results:
            return  # most iterations of a non-streaming load: no lock, no wake-up
        if self._thread is None:
            self._deliver(list(previews), list(results))
            return
        with self._lock:
            for preview in previews:
                if preview[0].id in self._previews:
                    self.stats.count_skipped_preview()
                self._previews[preview[0].id] = preview
            if results:
                while self._thread is not None and self._waiting_outputs() >= self.max_pending:
                    self._lock.wait()
                self._results.extend(results)
            self._lock.notify_all()

    def _waiting_outputs(self) -> int:
        return sum(request.n for request, _ in self._results)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._previews and not self._results and not self._stopping:
                    self._lock.wait()
                if not self._previews and not self._results:
                    return  # stopping, and everything is delivered
                previews, self._previews = list(self._previews.values()), {}
                results, self._results = self._results, []
                self._lock.notify_all()  # room for more results
            try:
                with torch.inference_mode():  # grad mode is per thread
                    self._deliver(previews, results)
            except Exception as error:  # `_deliver` reports its requests' failures; this is a bug, not theirs
                logger.error(f"Delivering the serving engine's outputs failed: {error!r}")

    # --- decoding and delivering ------------------------------------------------------------------------------------

    def _deliver(self, previews: list[Preview], results: list[Result]) -> None:
        previews = [preview for preview in previews if not preview[0].handle.done]
        decoded = [result for result in results if result[0].output_type != "latent"]
        grids = [grids.clamp(min=0) for _, _, grids in previews] + [tokens for _, tokens in decoded]
        pixels = self._decode_together(grids, together=len(previews))
        now = time.monotonic()
        for (request, step, grids), request_pixels in zip(previews, pixels):
            if isinstance(request_pixels, BaseException):
                logger.warning(f"Decoding a streamed preview failed; it is skipped: {request_pixels!r}")
            elif not request.handle.done:
                images = pixels_to_pil(paint_unknown(self.pipe, grids, request_pixels))
                request.handle.preview(step, images, now - request.submitted)
        result_pixels = iter(pixels[len(previews) :])
        for request, tokens in results:
            try:
                outputs = None if request.output_type == "latent" else self._postprocess(next(result_pixels))
            except Exception as error:  # a failed decode (re-raised here) or postprocessing fails this request only
                self.stats.count_failed(error)
                request.handle.fail(error)
                continue
            total = time.monotonic() - request.submitted
            self.stats.count_finished(request.n, total)
            request.handle.finish(GenerationResult(tokens.cpu(), outputs, request.admitted - request.submitted, total))

    def _decode_together(self, grids: list[torch.LongTensor], together: int) -> list[torch.Tensor | BaseException]:
        """Each grid's pixels, from one `decode_tokens` call; if that fails, the first `together` grids (previews) in
        one call and the others each on its own, so that a failure is only its request's."""
        if not grids:
            return []
        try:
            pixels = self.pipe.decode_tokens(torch.cat(grids))
            ends = itertools.accumulate(len(tokens) for tokens in grids)
            return [pixels[end - len(tokens) : end] for tokens, end in zip(grids, ends)]
        except Exception as error:
            if len(grids) == 1:
                return [error]
        parts = [grids[:together]] if together else []
        parts += [[tokens] for tokens in grids[together:]]
        return [pixels for part in parts for pixels in self._decode_together(part, together=0)]

    def _postprocess(self, pixels) -> list:
        if isinstance(pixels, BaseException):
            raise pixels
        if pixels.ndim == 5:
            return self.pipe.video_processor.postprocess_video(pixels, output_type="pil")
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")
