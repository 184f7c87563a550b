"""`nar-diffusers app`: its flags, and serving the page on this machine (no share link)."""

from __future__ import annotations

import argparse
import errno
import inspect
import os
import socket
import sys

from PIL import Image

from ...utils.dtypes import DTYPES
from ...utils.request_limits import RequestLimits, add_limit_arguments
from .layout import build_app
from .models import AppModels, import_gradio, load_app_pipeline


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Refuse (`OSError`, one line naming the port) a `port` already in use on `host`; 0 (a free port) passes."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            reason = "is already in use" if error.errno == errno.EADDRINUSE else f"cannot be opened ({error.strerror})"
            raise OSError(f"--port {port} on {host} {reason}; choose another port, or 0 for a free one.") from None


def launch_app(demo, host: str = "127.0.0.1", port: int = 0, block: bool = True) -> str:
    """Start the app's server on `host`:`port` (0: a free port) without a share link; return its URL. With
    `block=False` it keeps serving in the background until `demo.close()`."""
    port = free_port(host) if not port else port
    kwargs = dict(
        server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True, quiet=True,
        show_error=False, **getattr(demo, "_nar_launch_kwargs", {}),
    )  # fmt: skip
    if "ssr_mode" in inspect.signature(demo.launch).parameters:
        kwargs["ssr_mode"] = False  # plain server-side app: no Node process
    demo.queue(default_concurrency_limit=1)
    demo.launch(**kwargs)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    if block:
        print(f"nar-diffusers app: {url} (Ctrl+C to stop)", flush=True)
        try:
            demo.block_thread()
        finally:
            demo.close()
    return url


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="A saved NAR pipeline folder (image or video).")
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="Address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to your network).",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=0, help="TCP port (default 0: a free one, printed at start).")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Transformer dtype.")
    parser.add_argument(
        "--preview-every", type=int, default=1, help="Decode a preview every N forward passes (1: every pass)."
    )
    add_limit_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        import_gradio()
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in 0-65535 (0: a free port), got {args.port}.")
        if args.preview_every < 1:
            raise ValueError(f"--preview-every must be an integer >= 1, got {args.preview_every}.")
        limits = RequestLimits.from_args(args)
        check_port_free(args.host, args.port)  # before the model loads: a taken port fails in a moment
        pipe = load_app_pipeline(args.model, args.device, DTYPES[args.dtype])
        name = os.path.basename(os.path.normpath(args.model))
        models = AppModels(pipe, name=name, preview_every=args.preview_every, limits=limits)
        demo = build_app(models)
    except (ImportError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # PIL's own bomb check (a warning past MAX_IMAGE_PIXELS, an error past twice that) follows --max-pixels, for
    # any image this process opens; set here, in the app's own process only.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: other machines on your network can reach the app.", file=sys.stderr)
    try:
        launch_app(demo, args.host, args.port, block=True)
    except KeyboardInterrupt:
        pass
    except OSError as error:  # the port was taken between the check and the launch
        print(f"error: --port {args.port} on {args.host} cannot be served: {' '.join(str(error).split())}",
              file=sys.stderr)  # fmt: skip
        return 2
    return 0
