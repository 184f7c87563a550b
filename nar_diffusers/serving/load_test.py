"""The load benchmark behind `nar-diffusers serve-benchmark`: open-loop Poisson arrivals against real servers.

For each batching mode (`single`: one pipeline call per request; `static`: wait for a batch, one call; `continuous`:
the engine), a `nar-diffusers serve` process is started on localhost, warmed up, and measured:

1. a lone request's latency (sequential requests, median);
2. Poisson arrivals at each `--rates` multiple of the one-at-a-time capacity (1 / the single mode's lone latency),
   `--requests` per rate (and at most `--max-seconds`): requests/s, p50/p90/p99 latency, time to first preview
   (every `--stream-every`-th request streams), and the share of 429s;
3. optionally (`--overload N`, continuous mode) N requests at `--overload-rate` x capacity against a short queue,
   after N / 5 of them as a warm-up: every answer is counted by status (images, 429, 422, 504); lost requests (no
   answer) and server errors (other 5xx) must be zero; the server's RSS is read after the warm-up and at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field


logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise


@dataclass
class RunResult:
    """One arrival run: per request, its status and latency (None when no answer came)."""

    mode: str
    rate: float
    statuses: list[int | None] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    first_previews: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        ok = [lat for lat, status in zip(self.latencies, self.statuses) if status == 200]
        def pct(q):  # noqa: E306
            return _percentile(ok, q) if ok else None
        total = len(self.statuses)
        return {
            "mode": self.mode, "rate_per_s": self.rate, "requests": total, "ok": len(ok),
            "requests_per_s": len(ok) / self.seconds if self.seconds else 0.0,
            "p50_s": pct(50), "p90_s": pct(90), "p99_s": pct(99),
            "first_preview_p50_s": _percentile(self.first_previews, 50) if self.first_previews else None,
            "rate_429": self.statuses.count(429) / total if total else 0.0,
            "statuses": {str(s): self.statuses.count(s) for s in sorted(set(self.statuses), key=str)},
        }  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`nar-diffusers serve` in a child process on a free localhost port."""

    def __init__(self, model: str, mode: str, max_batch: int, max_queue: int, timeout: float, extra: list[str]):
        self.port = free_port()
        command = [sys.executable, "-m", "nar_diffusers.commands.cli", "serve", "--model", model, "--port",
                   str(self.port), "--batching", mode, "--max-batch", str(max_batch), "--max-queue", str(max_queue),
                   "--timeout", str(timeout), *extra]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, seconds: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server did not become healthy within {seconds} s")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def _one(client, url: str, body: dict, result: RunResult, stream: bool) -> None:
    """One request; its status (a streamed error event's code; None when no answer came), latency and, streaming,
    its time to the first preview."""
    start, status, first_preview = time.monotonic(), None, None
    try:
        if stream:
            async with client.stream("POST", url, json={**body, "stream": True}) as response:
                status, error_next = response.status_code, False
                async for line in response.aiter_lines():
                    if first_preview is None and line.startswith("event: image_generation.partial_image"):
                        first_preview = time.monotonic() - start
                    elif line.startswith("event: error"):
                        error_next = True
                    elif error_next and line.startswith("data: "):
                        status = json.loads(line[len("data: ") :])["error"]["code"]
                        error_next = False
        else:
            status = (await client.post(url, json=body)).status_code
    except Exception:  # no answer at all: counted as lost
        status = None
    result.statuses.append(status)
    result.latencies.append(time.monotonic() - start)
    if first_preview is not None and status == 200:
        result.first_previews.append(first_preview)


async def arrivals(url: str, bodies: list[dict], rate: float, mode: str, max_seconds: float, stream_every: int,
                   seed: int = 0) -> RunResult:  # fmt: skip
    """Send `bodies` with exponential gaps of mean 1 / `rate` (open loop: a slow answer delays no later request)."""
    import httpx

    rng = random.Random(seed)
    result = RunResult(mode, rate)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=max_seconds + 600, limits=limits) as client:
        tasks, start = [], time.monotonic()
        next_time = start
        for index, body in enumerate(bodies):
            if time.monotonic() - start > max_seconds:
                break
            await asyncio.sleep(max(0.0, next_time - time.monotonic()))
            stream = stream_every > 0 and index % stream_every == 0
            tasks.append(asyncio.create_task(_one(client, f"{url}/v1/images/generations", body, result, stream)))
            next_time += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        result.seconds = time.monotonic() - start
    return result


def request_bodies(count: int, condition: dict, sampling: dict, seed: int) -> list[dict]:
    """`count` request bodies: the condition (`class_label` cycles over `num_classes`, or one prompt) and settings."""
    bodies = []
    for index in range(count):
        body = dict(sampling, seed=seed + index)
        if "num_classes" in condition:
            body["class_label"] = index % condition["num_classes"]
        else:
            body["prompt"] = condition["prompt"]
        bodies.append(body)
    return bodies


def lone_latency(url: str, body: dict, repeats: int) -> float:
    import httpx

    times = []
    for index in range(repeats):
        start = time.monotonic()
        response = httpx.post(f"{url}/v1/images/generations", json={**body, "seed": index}, timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"a lone request failed: {response.status_code} {response.text[:500]}")
        times.append(time.monotonic() - start)
    return statistics.median(times)


def write_report(path: str | None, report: dict) -> None:
    if path is None:
        return
    from ..utils.atomic_files import write_json_atomically

    if path == "-":
        print(json.dumps(report, indent=2))
    else:
        write_json_atomically(os.path.abspath(path), report)
