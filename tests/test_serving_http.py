"""`nar-diffusers serve`'s HTTP API against a real server on localhost: images, errors, 429, streaming, auth,
health, metrics, and a disconnect freeing its slot."""

import asyncio
import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from conftest import make_pipeline, make_video_pipeline
from nar_diffusers.commands.serve import add_arguments, check_args, default_serving_threads
from nar_diffusers.serving import GenerationEngine
from nar_diffusers.serving.requests import Event, GenerationResult
from nar_diffusers.serving.server import _encoding_listener, create_app


class LiveServer:
    """uvicorn in a thread on a free localhost port."""

    def __init__(self, app):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def pipe():
    return make_pipeline().to(torch.float64)


def _image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_image_generation_returns_the_pipelines_images_for_a_seed(pipe):
    engine = GenerationEngine(pipe, max_batch=4).start()
    try:
        with LiveServer(create_app(engine, model_name="tiny")) as client:
            response = client.post("/v1/images/generations", json={"class_label": 3, "n": 2, "seed": 7,
                                                                    "guidance_scale": 2.0, "size": "8x8"})
    finally:
        engine.stop()
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    expected = pipe(class_labels=3, num_images_per_prompt=2, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(7)).images  # fmt: skip
    assert len(data) == 2
    for item, image in zip(data, expected):
        assert np.array_equal(_image(item["b64_json"]), np.asarray(image))


@pytest.mark.parametrize(
    "body, param",
    [
        ({"class_label": 3, "top_p": 2.0}, "top_p"),
        ({"class_label": 3, "n": 9}, "n"),
        ({"class_label": 3, "size": "1024x1024"}, "size"),
        ({"class_label": 30}, "class_label"),
        ({"prompt": "a cat"}, "prompt"),
        ({"class_label": 3, "colour": "red"}, "colour"),
        ({"class_label": 3, "response_format": "url"}, "response_format"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(pipe, body, param):
    engine = GenerationEngine(pipe, max_batch=4).start()
    try:
        with LiveServer(create_app(engine)) as client:
            response = client.post("/v1/images/generations", json=body)
    finally:
        engine.stop()
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert engine.stats.submitted == 0


def test_full_queue_is_a_429_with_retry_after(pipe):
    engine = GenerationEngine(pipe, max_batch=1, max_queue=0)  # not started: the first request stays queued
    engine.submit(class_labels=1)
    with LiveServer(create_app(engine)) as client:
        response = client.post("/v1/images/generations", json={"class_label": 3})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert "queue is full" in response.json()["error"]["message"]


def test_streaming_sends_previews_of_the_growing_grid_then_the_images(pipe):
    engine = GenerationEngine(pipe, max_batch=2).start()
    try:
        with LiveServer(create_app(engine)) as client:
            with client.stream("POST", "/v1/images/generations", json={"class_label": 2, "stream": True}) as response:
                lines = list(response.iter_lines())
    finally:
        engine.stop()
    events = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    assert events[-1] == "image_generation.completed" and set(events[:-1]) == {"image_generation.partial_image"}
    steps = [payload["step"] for payload in data if payload["type"] == "image_generation.partial_image"]
    assert steps == sorted(set(steps)) and steps[-1] == len(engine.order) - 1  # in order (skipping when decoding lags)


def test_api_key_is_required_when_set(pipe):
    engine = GenerationEngine(pipe, max_batch=2).start()
    try:
        with LiveServer(create_app(engine, api_key="secret")) as client:
            refused = client.post("/v1/images/generations", json={"class_label": 1})
            metrics_refused = client.get("/metrics")
            accepted = client.post("/v1/images/generations", json={"class_label": 1},
                                   headers={"Authorization": "Bearer secret"})  # fmt: skip
            health = client.get("/health")
    finally:
        engine.stop()
    assert refused.status_code == 401 and metrics_refused.status_code == 401
    assert accepted.status_code == 200 and health.status_code == 200


def test_health_and_metrics_report_the_engine(pipe):
    engine = GenerationEngine(pipe, max_batch=2).start()
    try:
        with LiveServer(create_app(engine)) as client:
            assert client.post("/v1/images/generations", json={"class_label": 1}).status_code == 200
            health = client.get("/health").json()
            metrics = client.get("/metrics").text
    finally:
        engine.stop()
    with LiveServer(create_app(engine)) as client:
        stopped = client.get("/health")
    assert health["status"] == "ok" and health["max_batch"] == 2
    for name in ("nar_queue_depth", "nar_active_slots", "nar_tokens_per_second", "nar_images_per_second",
                 "nar_request_latency_seconds_bucket"):  # fmt: skip
        assert name in metrics
    assert 'nar_requests_total{outcome="finished"} 1.0' in metrics
    assert stopped.status_code == 503


def _slow_engine(pipe) -> GenerationEngine:
    """A started engine whose iterations take 0.2 s at least: slow enough for a client to leave mid-generation."""
    engine = GenerationEngine(pipe, max_batch=2)
    step = engine.batch.step
    engine.batch.step = lambda: (time.sleep(0.2), step())[1]
    return engine.start()


def _wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_client_that_disconnects_frees_its_slot(pipe):
    engine = _slow_engine(pipe)
    try:
        with LiveServer(create_app(engine)) as client:
            with client.stream("POST", "/v1/images/generations", json={"class_label": 2, "stream": True}) as response:
                next(line for line in response.iter_lines() if line.startswith("event: "))
            _wait_until(lambda: engine.stats.failed["cancelled"] > 0)
    finally:
        engine.stop()
    assert engine.stats.failed["cancelled"] == 1
    assert engine.active_outputs == 0 and engine.stats.finished == 0


def test_client_that_disconnects_before_its_image_frees_its_slot(pipe):
    engine = _slow_engine(pipe)
    try:
        with LiveServer(create_app(engine)) as client:
            body = json.dumps({"class_label": 2}).encode()
            with socket.create_connection(("127.0.0.1", client.base_url.port)) as raw:
                raw.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                _wait_until(lambda: engine.active_outputs > 0)
                assert engine.active_outputs == 1  # generating; now the client goes away
            _wait_until(lambda: engine.stats.failed["cancelled"] > 0)
    finally:
        engine.stop()
    assert engine.stats.failed["cancelled"] == 1
    assert engine.active_outputs == 0 and engine.stats.finished == 0


def test_an_output_that_fails_to_encode_fails_its_request_with_the_message():
    loop = asyncio.new_event_loop()
    try:
        events = asyncio.Queue()
        on_event = _encoding_listener(loop, events, lambda image: 1 / 0)
        on_event(Event("preview", step=0, outputs=["image"]))  # a preview that fails to encode is skipped
        on_event(Event("result", result=GenerationResult(torch.zeros(1), ["image"], 0.0, 0.0)))
        loop.run_until_complete(asyncio.sleep(0))
        event, encoded = events.get_nowait()
    finally:
        loop.close()
    assert events.empty() and event.kind == "error" and encoded is None
    assert isinstance(event.error, ZeroDivisionError)


def test_video_model_serves_videos_as_base64_files():
    pipe = make_video_pipeline()
    engine = GenerationEngine(pipe, max_batch=2).start()
    try:
        with LiveServer(create_app(engine)) as client:
            gif = client.post("/v1/videos/generations", json={"class_label": 1, "format": "gif", "seed": 0})
            no_images = client.post("/v1/images/generations", json={"class_label": 1})
    finally:
        engine.stop()
    assert gif.status_code == 200, gif.text
    video = Image.open(io.BytesIO(base64.b64decode(gif.json()["data"][0]["b64_json"])))
    assert video.n_frames == pipe.default_video_size()[0]
    assert no_images.status_code == 404


def test_serve_refuses_other_hosts_without_an_api_key(tmp_path):
    import argparse

    args = add_arguments(argparse.ArgumentParser()).parse_args(["--model", str(tmp_path), "--host", "0.0.0.0"])
    with pytest.raises(ValueError, match="--api-key"):
        check_args(args)
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--model", str(tmp_path), "--max-batch", "0"])
    with pytest.raises(ValueError, match="--max-batch"):
        check_args(args)


def test_serve_leaves_a_cpu_core_to_http_and_decoding_by_default(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert default_serving_threads("cpu") == 7
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert default_serving_threads("cpu") == 1
    assert default_serving_threads("cuda") is None  # the GPU runs the model: torch's threads are left alone


def test_sse_error_event_carries_the_message(pipe):
    with torch.no_grad():
        pipe.transformer.class_embedding.weight[5] = float("nan")
    engine = GenerationEngine(pipe, max_batch=2).start()
    try:
        with LiveServer(create_app(engine)) as client:
            plain = client.post("/v1/images/generations", json={"class_label": 5})
            with client.stream("POST", "/v1/images/generations", json={"class_label": 5, "stream": True}) as response:
                lines = list(response.iter_lines())
            healthy = client.post("/v1/images/generations", json={"class_label": 4})
    finally:
        engine.stop()
    assert plain.status_code == 500 and "NaN" in plain.json()["error"]["message"]
    error_data = lines[lines.index("event: error") + 1]
    assert json.loads(error_data[len("data: "):])["error"]["code"] == 500
    assert healthy.status_code == 200
