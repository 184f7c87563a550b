"""The continuous-batching engine: a seeded request gets `pipe(...)`'s tokens, alone or among others, joining and
leaving mid-generation; cancelled, timed-out and NaN requests fail alone; the queue is bounded."""

import threading
import time

import pytest
import torch

from nar_diffusers.serving import GenerationEngine, QueueFullError, RequestCancelledError, RequestTimeoutError
from nar_diffusers.pipelines.autoregressive_generation import NonFiniteLogitsError

from conftest import make_pipeline, make_text_pipeline, make_video_pipeline

SETTINGS = [  # different settings per row
    dict(guidance_scale=2.0, temperature=1.0, top_k=0, top_p=1.0),
    dict(guidance_scale=1.0, temperature=0.7, top_k=5, top_p=1.0),
    dict(guidance_scale=3.0, cfg_interval=4, temperature=1.2, top_k=0, top_p=0.8),
    dict(guidance_scale=1.5, do_sample=False),
]


def _pipe(kind: str):
    pipe = {
        "nar": lambda: make_pipeline(),
        "raster": lambda: make_pipeline(raster=True),
        "text": lambda: make_text_pipeline(),
        "video": lambda: make_video_pipeline(),
    }[kind]()
    return pipe.to(torch.float64)


def _condition(pipe, index: int) -> dict:
    if pipe.transformer.condition_type == "class":
        return {"class_labels": index % 10}
    prompts = ["a photo of a cat", "a red fox in the snow", "a small dog", "an oil painting of a blue house by the sea"]
    return {"prompt": prompts[index % len(prompts)]}


def _reference(pipe, index: int, n: int, seed: int) -> torch.Tensor:
    per_prompt = "num_videos_per_prompt" if len(pipe.transformer.config.grid_size) == 3 else "num_images_per_prompt"
    output = pipe(**_condition(pipe, index), **SETTINGS[index % len(SETTINGS)], **{per_prompt: n},
                  generator=torch.Generator().manual_seed(seed), output_type="latent")  # fmt: skip
    return output.images if hasattr(output, "images") else output.frames


def _submit(engine, index: int, n: int, seed: int, **extra):
    return engine.submit(n=n, generator=torch.Generator().manual_seed(seed), output_type="latent",
                         **_condition(engine.pipe, index), **SETTINGS[index % len(SETTINGS)], **extra)  # fmt: skip


@pytest.mark.parametrize("kind", ["nar", "raster", "text", "video"])
def test_seeded_request_gets_pipeline_tokens_alone_and_among_seven_others(kind):
    pipe = _pipe(kind)
    expected = _reference(pipe, 0, 1, seed=11)
    alone = GenerationEngine(pipe, max_batch=8)
    handle = _submit(alone, 0, 1, seed=11)
    alone.run_until_idle()
    assert torch.equal(handle.result().tokens, expected)

    crowded = GenerationEngine(pipe, max_batch=8)
    others = []
    for i in range(1, 8):  # each joins one step after the one before: every row at its own step
        others.append(_submit(crowded, i, 1, seed=100 + i))
        crowded.iterate()
        if i == 3:
            mine = _submit(crowded, 0, 1, seed=11)
    crowded.run_until_idle()
    assert torch.equal(mine.result().tokens, expected)
    for i, other in enumerate(others, start=1):
        assert torch.equal(other.result().tokens, _reference(pipe, i, 1, seed=100 + i)), f"request {i}"


def test_request_of_n_outputs_equals_pipeline_with_one_generator():
    pipe = _pipe("nar")
    engine = GenerationEngine(pipe, max_batch=4)
    handle = _submit(engine, 2, 3, seed=5)
    engine.run_until_idle()
    assert torch.equal(handle.result().tokens, _reference(pipe, 2, 3, seed=5))


def test_requests_join_and_leave_mid_generation_and_slots_are_reused():
    pipe = _pipe("nar")
    engine = GenerationEngine(pipe, max_batch=2, max_queue=8)
    handles = [_submit(engine, i, 1, seed=i) for i in range(5)]
    engine.iterate()
    assert engine.active_outputs == 2 and engine.queue_depth == 3
    seen_active = []
    while engine.queue_depth or engine.active_outputs:
        engine.iterate()
        seen_active.append(engine.active_outputs)
    assert max(seen_active) <= 2
    for i, handle in enumerate(handles):
        assert torch.equal(handle.result().tokens, _reference(pipe, i, 1, seed=i))


def test_cancelled_request_frees_its_slot_at_the_next_iteration():
    pipe = _pipe("nar")
    engine = GenerationEngine(pipe, max_batch=2)
    keep, drop = _submit(engine, 0, 1, seed=0), _submit(engine, 1, 1, seed=1)
    engine.iterate()
    assert engine.active_outputs == 2
    drop.cancel()
    engine.iterate()
    assert engine.active_outputs == 1
    with pytest.raises(RequestCancelledError):
        drop.result(timeout=0)
    engine.run_until_idle()
    assert torch.equal(keep.result().tokens, _reference(pipe, 0, 1, seed=0))


def test_request_past_its_timeout_fails_and_the_others_finish():
    pipe = _pipe("nar")
    engine = GenerationEngine(pipe, max_batch=2)
    slow = _submit(engine, 0, 1, seed=0, timeout=1e-9)
    other = _submit(engine, 1, 1, seed=1)
    engine.run_until_idle()
    with pytest.raises(RequestTimeoutError, match="timeout"):
        slow.result(timeout=0)
    assert torch.equal(other.result().tokens, _reference(pipe, 1, 1, seed=1))


def test_full_queue_refuses_at_once():
    engine = GenerationEngine(_pipe("nar"), max_batch=1, max_queue=1)
    _submit(engine, 0, 1, seed=0)  # would start now: not counted as waiting
    _submit(engine, 1, 1, seed=1)
    with pytest.raises(QueueFullError, match="queue is full"):
        _submit(engine, 2, 1, seed=2)


def test_bad_request_names_the_argument_and_queues_nothing():
    engine = GenerationEngine(_pipe("nar"), max_batch=2)
    with pytest.raises(ValueError, match="`top_p`"):
        engine.submit(class_labels=1, top_p=2.0)
    with pytest.raises(ValueError, match=r"`n` must be an int in \[1, 2\]"):
        engine.submit(class_labels=1, n=3)
    with pytest.raises(ValueError, match="class_labels"):
        engine.submit(class_labels=99)
    assert engine.queue_depth == 0


def test_nan_logits_fail_only_their_request():
    pipe = _pipe("nar")
    engine = GenerationEngine(pipe, max_batch=4)
    with torch.no_grad():
        pipe.transformer.class_embedding.weight[7] = float("nan")
    bad, good = _submit(engine, 7, 1, seed=0), _submit(engine, 1, 1, seed=1)
    engine.run_until_idle()
    with pytest.raises(NonFiniteLogitsError):
        bad.result(timeout=0)
    assert torch.equal(good.result().tokens, _reference(pipe, 1, 1, seed=1))


def test_requests_finishing_together_are_decoded_in_one_call_and_a_failed_decode_fails_only_its_request():
    pipe = make_pipeline()
    engine = GenerationEngine(pipe, max_batch=4)
    decode, calls = pipe.decode_tokens, []

    def decode_failing_on_class_5(tokens):
        calls.append(len(tokens))
        if any(torch.equal(row, bad_tokens) for row in tokens):
            raise RuntimeError("decoder failed (simulated)")
        return decode(tokens)

    bad_tokens = pipe(class_labels=5, generator=torch.Generator().manual_seed(1), output_type="latent").images[0]
    seeds = [(2, 0), (5, 1), (8, 2)]
    pipe.decode_tokens = decode_failing_on_class_5
    handles = [engine.submit(class_labels=c, generator=torch.Generator().manual_seed(seed)) for c, seed in seeds]
    engine.run_until_idle()
    assert calls[0] == 3  # the three finished together: one decode, then one each to find the failing one
    assert sorted(calls[1:]) == [1, 1, 1]
    with pytest.raises(RuntimeError, match="simulated"):
        handles[1].result(timeout=0)
    assert len(handles[0].result().outputs) == 1 and len(handles[2].result().outputs) == 1


def test_background_thread_streams_previews_then_images():
    pipe = make_pipeline()
    engine = GenerationEngine(pipe, max_batch=2).start()
    try:
        handle = engine.submit(class_labels=3, n=2, stream=True, generator=torch.Generator().manual_seed(0))
        result = handle.result(timeout=60)
    finally:
        engine.stop()
    events = []
    while not handle.events.empty():
        events.append(handle.events.get())
    steps = [e.step for e in events if e.kind == "preview"]
    assert steps == sorted(set(steps)) and steps[-1] == len(engine.order) - 1  # in order; the last step always
    assert len(events[0].outputs) == 2 and events[-1].kind == "result"
    assert len(result.outputs) == 2 and result.outputs[0].size == (8, 8)  # 4x4 tokens x 2 px
    assert 0 <= result.queued_seconds <= result.total_seconds


def _hold_decoding(pipe) -> tuple[threading.Event, threading.Event]:
    """Make `pipe.decode_tokens` wait for `release` (set `decoding` when a decode starts)."""
    decode, decoding, release = pipe.decode_tokens, threading.Event(), threading.Event()

    def held_decode(tokens):
        decoding.set()
        assert release.wait(60)
        return decode(tokens)

    pipe.decode_tokens = held_decode
    return decoding, release


def test_an_iteration_decodes_its_previews_and_finished_outputs_in_one_call():
    pipe = make_pipeline()
    engine = GenerationEngine(pipe, max_batch=2)
    decode, calls = pipe.decode_tokens, []
    pipe.decode_tokens = lambda tokens: (calls.append(len(tokens)), decode(tokens))[1]
    streamed = engine.submit(class_labels=1, stream=True, generator=torch.Generator().manual_seed(0))
    plain = engine.submit(class_labels=2, generator=torch.Generator().manual_seed(1))
    engine.run_until_idle()
    assert calls == [1] * (len(engine.order) - 1) + [3]  # the last: the streamed preview and both images
    assert len(streamed.result(timeout=0).outputs) == 1 and len(plain.result(timeout=0).outputs) == 1
    assert streamed.events.qsize() == len(engine.order) + 1  # without a worker thread: every step's preview


def test_previews_skip_to_the_newest_grid_while_decoding_lags_and_the_result_is_not_lost():
    pipe = _pipe("nar")
    expected = _reference(pipe, 0, 1, seed=5)
    engine = GenerationEngine(pipe, max_batch=2)
    decoding, release = _hold_decoding(pipe)
    engine._outputs.start()  # the output worker runs; the test drives the iterations
    try:
        handle = _submit(engine, 0, 1, seed=5, stream=True)
        engine.iterate()
        assert decoding.wait(60)  # step 0's preview is being decoded
        engine.run_until_idle()  # every other step runs meanwhile: each newer grid replaces the waiting one
    finally:
        release.set()
        engine.stop()
    events = list(handle.events.queue)
    assert [e.step for e in events if e.kind == "preview"] == [0, len(engine.order) - 1]
    assert engine.stats.skipped_previews == len(engine.order) - 2
    assert events[-1].kind == "result" and torch.equal(handle.result(timeout=0).tokens, expected)


def test_iterations_go_on_while_outputs_decode_and_stop_delivers_them():
    pipe = make_pipeline()
    engine = GenerationEngine(pipe, max_batch=2)
    decoding, release = _hold_decoding(pipe)
    engine.start()
    try:
        first = engine.submit(class_labels=1, generator=torch.Generator().manual_seed(0))
        assert decoding.wait(60)  # the first request's output is being decoded, on the output worker
        second = engine.submit(class_labels=2, output_type="latent", generator=torch.Generator().manual_seed(1))
        passes = engine.stats.forward_passes
        deadline = time.monotonic() + 60
        while engine.stats.forward_passes < passes + len(engine.order) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.forward_passes >= passes + len(engine.order)  # every step of the second request ran
        assert not first.done and not second.done  # outputs are delivered in order, after the first's decode
    finally:
        threading.Timer(0.3, release.set).start()
        engine.stop()  # waits for the outputs being decoded: they are delivered, not cancelled
    assert len(first.result(timeout=0).outputs) == 1
    assert second.result(timeout=0).tokens.shape == (1, 4, 4)


def test_a_listener_that_raises_does_not_keep_requests_finishing_with_it_waiting():
    engine = GenerationEngine(_pipe("nar"), max_batch=2)

    def broken_listener(event):
        if event.kind == "result":
            raise RuntimeError("the client's event loop is gone (simulated)")

    broken = _submit(engine, 0, 1, seed=0, on_event=broken_listener)
    other = _submit(engine, 1, 1, seed=1)
    engine.run_until_idle()
    assert broken.done and other.done
    assert other.result(timeout=0).tokens.shape == (1, 4, 4)
    assert engine.stats.finished == 2  # the broken listener's request was still generated and counted


def test_failed_iteration_fails_the_requests_in_flight_and_the_engine_goes_on():
    pipe = _pipe("nar")
    engine = GenerationEngine(pipe, max_batch=2)
    step, calls = engine.batch.step, []

    def failing_once():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return step()

    engine.batch.step = failing_once
    engine.start()
    try:
        first = _submit(engine, 0, 1, seed=0)
        with pytest.raises(RuntimeError, match="simulated"):
            first.result(timeout=60)
        second = _submit(engine, 1, 1, seed=1)
        tokens = second.result(timeout=60).tokens
    finally:
        engine.stop()
    assert torch.equal(tokens, _reference(pipe, 1, 1, seed=1))
    assert engine.active_outputs == 0
