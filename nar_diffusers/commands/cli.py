"""The `nar-diffusers` command line: one sub-command per tool, each a thin wrapper over the library.

    nar-diffusers <command> --help
    python -m nar_diffusers.commands.cli <command> ...     # the same, e.g. under `accelerate launch -m`

Every flag of every sub-command is accepted with dashes (`--output-dir`, as listed) or underscores (`--output_dir`,
as diffusers' training scripts spell them).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NamedTuple


class Command(NamedTuple):
    """Where a sub-command lives: its module, the function adding its arguments, the function running it."""

    module: str
    add_arguments: str
    run: str
    help: str


COMMANDS: dict[str, Command] = {
    "convert": Command(
        "nar_diffusers.commands.convert", "add_nar_arguments", "run_nar",
        "Convert a published NAR / LlamaGen transformer checkpoint (+ VQ tokenizer) into a NARPipeline folder.",
    ),
    "convert-vq": Command(
        "nar_diffusers.commands.convert", "add_vq_arguments", "run_vq",
        "Convert a LlamaGen VQ tokenizer checkpoint into a diffusers VQModel folder.",
    ),
    "convert-video": Command(
        "nar_diffusers.commands.convert", "add_video_arguments", "run_video",
        "Convert a published NAR video model (UCF-101) and its LARP tokenizer into a NARVideoPipeline folder.",
    ),
    "demo": Command(
        "nar_diffusers.commands.demo", "add_arguments", "run",
        "Train a tiny VQ tokenizer, a NAR and a raster transformer on scikit-learn's digits (CPU, minutes), save "
        "and reload the pipeline, write samples.png and compare NAR vs raster decoding.",
    ),
    "benchmark": Command(  # the benchmark's flags + --suite gpu (gpu_suite.py, which runs benchmark.py)
        "nar_diffusers.commands.gpu_suite", "add_arguments", "run",
        "Measure NAR vs raster decoding of the same grid in one run (random weights of any size or a saved "
        "pipeline; eager, static or compiled decoding): passes, latency, throughput, memory, wall vs step ratio.",
    ),
    "generate": Command(
        "nar_diffusers.commands.generate", "add_arguments", "run",
        "Generate images with a trained or converted NARPipeline (a folder or a Hub model id).",
    ),
    "app": Command(
        "nar_diffusers.commands.app", "add_arguments", "run",
        'A local Gradio app (pip install "nar-diffusers[app]"): generate and watch the image grow plane by plane, '
        "inpaint / outpaint, videos. Serves on 127.0.0.1 and prints its URL.",
    ),
    "serve": Command(
        "nar_diffusers.commands.serve", "add_arguments", "run",
        'An HTTP server with continuous batching (pip install "nar-diffusers[serve]"): OpenAI-style '
        "/v1/images/generations (or /v1/videos/generations), streaming previews, /health, /metrics.",
    ),
    "serve-benchmark": Command(
        "nar_diffusers.commands.serve_benchmark", "add_arguments", "run",
        "Load-test continuous batching against one-request-at-a-time and static batching (real servers on "
        "localhost, Poisson arrivals): requests/s, p50/p90/p99 latency, time to first preview, 429 rate.",
    ),
    "sample": Command(
        "nar_diffusers.commands.sample", "add_arguments", "run",
        "Generate N samples for evaluation (FID / FVD), split over processes (accelerate launch -m "
        "nar_diffusers.commands.cli sample ...), resumable; PNGs + the ADM .npz, or video files.",
    ),
}
"""Sub-command name -> where it lives. A command's module is imported only when the parser is built."""


class UnderscoreAliases:
    """Wraps an argparse parser (or argument group) so that every `--dashed-flag` it declares is also accepted as
    `--dashed_flag`, the spelling of diffusers' training scripts. Groups made through it get the same treatment."""

    def __init__(self, target) -> None:
        self._target = target

    def add_argument(self, *names: str, **kwargs):
        aliases = []
        for name in names:
            alias = "--" + name[2:].replace("-", "_") if name.startswith("--") else name
            if alias not in names and alias not in aliases:
                aliases.append(alias)
        return self._target.add_argument(*names, *aliases, **kwargs)

    def add_argument_group(self, *args, **kwargs) -> UnderscoreAliases:
        return UnderscoreAliases(self._target.add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, *args, **kwargs) -> UnderscoreAliases:
        return UnderscoreAliases(self._target.add_mutually_exclusive_group(*args, **kwargs))

    def __getattr__(self, name: str):
        return getattr(self._target, name)


def _command_function(command: Command, name: str):
    return getattr(importlib.import_module(command.module), name)


def build_parser() -> argparse.ArgumentParser:
    """The `nar-diffusers` parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="nar-diffusers", description="Neighboring Autoregressive Modeling for diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        # Every sub-command takes both spellings of its flags: --output-dir and --output_dir.
        _command_function(command, command.add_arguments)(UnderscoreAliases(sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: `sys.argv[1:]`), run the sub-command and return its exit status."""
    args = build_parser().parse_args(argv)
    args._command = " ".join(["nar-diffusers", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    command = COMMANDS[args.command]
    return _command_function(command, command.run)(args)


if __name__ == "__main__":
    sys.exit(main())
