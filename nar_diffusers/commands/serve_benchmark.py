"""`nar-diffusers serve-benchmark`: continuous batching vs one request at a time vs static batching, under load.

    nar-diffusers serve-benchmark --model nar-demo/pipeline --guidance-scale 2 --json serve.json
    nar-diffusers serve-benchmark --model-size GPT-B --grid 16 16 --guidance-scale 2 --requests 24

Each mode runs its own `nar-diffusers serve` process on localhost, one after the other (see
`nar_diffusers/serving/load_test.py` for what is measured). Rates are multiples of the one-at-a-time capacity
(1 / the single mode's lone-request latency). Everything is bounded: `--requests` per rate, `--max-seconds` per run.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile

import torch

from ..serving.baselines import BATCHING_MODES
from ..serving.load_test import ServerProcess, arrivals, lone_latency, request_bodies, write_report


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="A saved pipeline folder (e.g. the digits demo's nar-demo/pipeline).")
    source.add_argument("--model-size", help="Random weights of a size preset (GPT-B, ...), class-conditional.")
    parser.add_argument("--grid", type=int, nargs=2, default=[16, 16], help="--model-size: the token grid.")
    parser.add_argument("--modes", nargs="+", choices=BATCHING_MODES, default=["single", "static", "continuous"])
    parser.add_argument("--max-batch", type=int, default=8, help="Batch slots (static and continuous).")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--static-wait-ms", type=float, default=100.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 4.0],
                        help="Arrival rates as multiples of the one-at-a-time capacity.")  # fmt: skip
    parser.add_argument("--requests", type=int, default=24, help="Requests per rate.")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="Longest arrival run.")
    parser.add_argument("--lone-repeats", type=int, default=3, help="Sequential requests for the lone latency.")
    parser.add_argument("--stream-every", type=int, default=4, help="Every N-th request streams (0: none).")
    parser.add_argument("--overload", type=int, default=0, help="Continuous mode: this many requests of overload.")
    parser.add_argument("--overload-rate", type=float, default=20.0, help="Overload rate (x capacity).")
    parser.add_argument("--overload-queue", type=int, default=16, help="--max-queue during the overload run.")
    parser.add_argument("--overload-warmup", type=int, default=None,
                        help="Requests sent at the overload rate before RSS is first read (default: --overload / 5).")
    parser.add_argument("--overload-timeout", type=float, default=60.0, help="Request timeout of the overload run.")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--prompt", default="a photo of a cat", help="Text models: the prompt of every request.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each server (default: serve's, torch's less one on CPU).")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Write the report as JSON here ('-': stdout).")
    return parser


def _random_model_folder(size_name: str, grid: list[int], folder: str, seed: int) -> str:
    from ..models.model_sizes import resolve_model_size
    from ..models.transformer_nar import NARTransformer
    from ..pipelines.pipeline_nar import NARPipeline
    from ..schedulers.scheduling_neighbor import NeighborScheduler
    from .benchmark import _tiny_vqmodel

    _, size = resolve_model_size(size_name, flag="--model-size")
    torch.manual_seed(seed)
    transformer = NARTransformer(
        hidden_size=size.hidden_size, num_layers=size.num_layers, num_attention_heads=size.num_attention_heads,
        ffn_multiple_of=size.ffn_multiple_of, grid_size=tuple(grid), num_decoding_heads=2, num_classes=1000,
    ).eval()
    pipe = NARPipeline(transformer=transformer, vqvae=_tiny_vqmodel(transformer.config.vocab_size),
                       scheduler=NeighborScheduler(grid_size=tuple(grid)))  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _condition(model: str, prompt: str) -> dict:
    import json
    import os

    with open(os.path.join(model, "transformer", "config.json")) as file:
        config = json.load(file)
    if config.get("num_classes"):
        return {"num_classes": config["num_classes"]}
    return {"prompt": prompt}


def _check(args: argparse.Namespace) -> None:
    for flag, value in (("--max-batch", args.max_batch), ("--requests", args.requests),
                        ("--lone-repeats", args.lone_repeats)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    if any(rate <= 0 for rate in args.rates) or args.overload_rate <= 0:
        raise ValueError(f"--rates and --overload-rate must be > 0, got {args.rates} and {args.overload_rate}.")
    if args.overload < 0 or args.stream_every < 0 or (args.overload_warmup or 0) < 0:
        raise ValueError("--overload, --overload-warmup and --stream-every must be >= 0.")
    if args.overload and "continuous" not in args.modes:
        raise ValueError("--overload runs against continuous batching: include it in --modes.")


def run_benchmark(args: argparse.Namespace, model: str) -> dict:
    condition = _condition(model, args.prompt)
    sampling = {"guidance_scale": args.guidance_scale}
    extra = ["--threads", str(args.threads)] if args.threads else []
    modes = sorted(args.modes, key=lambda m: m != "single")  # single first: it sets the capacity
    report = {"model": model, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "max_batch": args.max_batch, "guidance_scale": args.guidance_scale, "modes": {}}  # fmt: skip
    capacity = None
    for mode in modes:
        server = ServerProcess(model, mode, args.max_batch, args.max_queue, args.max_seconds + 600,
                               extra + ["--static-wait-ms", str(args.static_wait_ms)])  # fmt: skip
        try:
            server.wait_ready()
            body = request_bodies(1, condition, sampling, args.seed)[0]
            lone_latency(server.url, body, 1)  # warm-up
            lone = lone_latency(server.url, body, args.lone_repeats)
            capacity = capacity or 1 / lone
            runs = []
            for index, multiple in enumerate(args.rates):
                bodies = request_bodies(args.requests, condition, sampling, args.seed + 1000 * (index + 1))
                result = asyncio.run(arrivals(server.url, bodies, multiple * capacity, mode, args.max_seconds,
                                              args.stream_every, seed=args.seed + index))  # fmt: skip
                runs.append({"rate_multiple": multiple, **result.summary()})
                print(_line(mode, multiple, runs[-1], lone), file=sys.stderr, flush=True)
            entry = {"lone_latency_s": lone, "runs": runs}
            if args.overload and mode == "continuous":
                server.stop()
                server = ServerProcess(model, mode, args.max_batch, args.overload_queue, args.overload_timeout, extra)
                server.wait_ready()
                lone_latency(server.url, body, 2)
                # Warm up at the overload rate first, so RSS is read in the steady state the run must keep.
                warm_up = args.overload // 5 if args.overload_warmup is None else args.overload_warmup
                warm = request_bodies(max(warm_up, 2 * args.max_batch), condition, sampling, args.seed + 7)
                asyncio.run(arrivals(server.url, warm, args.overload_rate * capacity, mode, args.max_seconds * 10, 0))
                rss_before = server.rss_mib()
                bodies = request_bodies(args.overload, condition, sampling, args.seed + 10**6)
                result = asyncio.run(arrivals(server.url, bodies, args.overload_rate * capacity, mode,
                                              args.max_seconds * 10, 0))  # fmt: skip
                rss_after = server.rss_mib()
                statuses = result.statuses
                entry["overload"] = {
                    **result.summary(), "lost": statuses.count(None),
                    "server_errors": sum(1 for s in statuses if s is not None and s >= 500 and s != 504),
                    "warm_up_requests": len(warm), "rss_before_mib": rss_before, "rss_after_mib": rss_after,
                    "rss_growth": (rss_after - rss_before) / rss_before,
                }  # fmt: skip
                print(f"{mode} overload: {entry['overload']['statuses']} lost {entry['overload']['lost']} "
                      f"rss {rss_before:.0f} -> {rss_after:.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
            report["modes"][mode] = entry
        finally:
            server.stop()
    report["capacity_one_at_a_time_per_s"] = capacity
    report["table"] = format_table(report)
    return report


def _line(mode: str, multiple: float, run: dict, lone: float) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"{mode:10s} x{multiple:<4g} {run['requests_per_s']:.3f} req/s  p50 {fmt(run['p50_s'])}  p99 "
            f"{fmt(run['p99_s'])}  first preview {fmt(run['first_preview_p50_s'])}  429 {run['rate_429']:.0%}  "
            f"(lone {lone:.2f} s)")  # fmt: skip


def format_table(report: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| mode | rate (x capacity) | req/s | p50 s | p90 s | p99 s | first preview s | 429 | lone s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, entry in report["modes"].items():
        for run in entry["runs"]:
            lines.append(
                f"| {mode} | {run['rate_multiple']:g} | {run['requests_per_s']:.3f} | {fmt(run['p50_s'])} | "
                f"{fmt(run['p90_s'])} | {fmt(run['p99_s'])} | {fmt(run['first_preview_p50_s'])} | "
                f"{run['rate_429']:.0%} | {entry['lone_latency_s']:.2f} |"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nar-serve-bench-") as folder:
        model = args.model or _random_model_folder(args.model_size, args.grid, folder, args.seed)
        report = run_benchmark(args, model)
    print(report["table"])
    write_report(args.json, report)
    return 0
