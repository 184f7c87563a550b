"""`nar-diffusers serve`: an HTTP server over one pipeline with continuous batching (`pip install nar-diffusers[serve]`).

    nar-diffusers serve --model my-nar-folder --port 8000 --max-batch 8
    curl -s localhost:8000/v1/images/generations -H 'content-type: application/json' \\
        -d '{"class_label": 3, "n": 2, "seed": 0}'

One engine per process and device; for more, run replicas behind any HTTP load balancer (`GET /health`).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..utils.dtypes import DTYPES
from ..utils.request_limits import RequestLimits, add_limit_arguments
from .app.launch import check_port_free
from .generate import check_model_folder, load_pipeline, resolve_device

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..serving.baselines import BATCHING_MODES
    from ..serving.server import DEFAULT_MAX_PROMPT_CHARS

    parser.add_argument("--model", required=True, help="A saved NARPipeline / NARVideoPipeline folder.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to serve on (default 127.0.0.1; any other needs --api-key).")  # fmt: skip
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000).")
    parser.add_argument("--max-batch", type=int, default=8, help="Outputs generated at once (batch slots).")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="Requests waiting for a slot; beyond it a request is refused with 429.")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds a request may take (504 beyond).")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Transformer dtype.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (CPU; default: torch's less one, at least 1: a core is left to "
                        "the HTTP side and the output decoder).")  # fmt: skip
    parser.add_argument("--api-key", default=os.environ.get("NAR_API_KEY"),
                        help="Bearer token required on /v1 and /metrics (default: $NAR_API_KEY; required off loopback).")
    parser.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS, help="Longest prompt.")
    parser.add_argument("--batching", choices=BATCHING_MODES, default="continuous",
                        help="continuous (default); single or static: whole pipeline calls, to compare against.")
    parser.add_argument("--static-wait-ms", type=float, default=50.0,
                        help="--batching static: wait up to this long for a batch to fill.")  # fmt: skip
    add_limit_arguments(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Every flag, before the model loads; a ValueError names the flag."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0-65535, got {args.port}.")
    for flag, value, minimum in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                                 ("--max-prompt-chars", args.max_prompt_chars, 1)):  # fmt: skip
        if value < minimum:
            raise ValueError(f"{flag} must be an integer >= {minimum}, got {value}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}.")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}.")
    if args.static_wait_ms < 0:
        raise ValueError(f"--static-wait-ms must be >= 0, got {args.static_wait_ms}.")
    if args.host not in LOOPBACK_HOSTS and not args.api_key:
        raise ValueError(f"--host {args.host} is reachable from other machines: set --api-key (or $NAR_API_KEY).")
    check_model_folder(args.model)


def default_serving_threads(device) -> int | None:
    """On CPU, torch's thread count less one (at least 1): the model's threads spin between operations, and a
    server also needs a core for HTTP and decoding (docs/serving.md measures both)."""
    if torch.device(device).type != "cpu":
        return None
    return max(1, torch.get_num_threads() - 1)


def build_executor(pipe, args: argparse.Namespace):
    """The engine (`--batching continuous`) or a baseline batcher, started."""
    from ..serving import GenerationEngine
    from ..serving.baselines import PipelineBatcher

    if args.batching == "continuous":
        return GenerationEngine(pipe, max_batch=args.max_batch, max_queue=args.max_queue, timeout=args.timeout).start()
    return PipelineBatcher(pipe, args.batching, max_batch=args.max_batch, max_queue=args.max_queue,
                           timeout=args.timeout, max_wait=args.static_wait_ms / 1000).start()  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serving.server import create_app
    except ImportError as error:
        print(f'error: serving needs FastAPI and uvicorn: pip install "nar-diffusers[serve]" ({error})', file=sys.stderr)
        return 2
    try:
        check_args(args)
        limits = RequestLimits.from_args(args)
        check_port_free(args.host, args.port)
        device = resolve_device(args.device)
        threads = default_serving_threads(device) if args.threads is None else args.threads
        if threads is not None:
            torch.set_num_threads(threads)
        pipe = load_pipeline(args.model, None, device, DTYPES[args.dtype])
        pipe.set_progress_bar_config(disable=True)
        executor = build_executor(pipe, args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = os.path.basename(os.path.normpath(args.model))
    app = create_app(executor, model_name=name, api_key=args.api_key, limits=limits,
                     max_prompt_chars=args.max_prompt_chars)  # fmt: skip
    print(f"serving {name} ({args.batching} batching, {args.max_batch} slots) on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)  # fmt: skip
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        executor.stop()
    return 0
