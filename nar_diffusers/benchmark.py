"""Deprecated: the command moved to `nar_diffusers.commands.benchmark` (`nar-diffusers benchmark`)."""

from __future__ import annotations

from .commands import warn_moved
from .commands.benchmark import (  # noqa: F401
    CPU_LINEAR_KERNELS,
    DECODE_MODES,
    ORDERS,
    Measurement,
    add_arguments,
    build_pipelines,
    format_table,
    run,
    run_benchmark,
)

warn_moved("nar_diffusers.benchmark", "nar_diffusers.commands.benchmark")


def main(argv: list[str] | None = None) -> int:
    """`nar-diffusers benchmark ...` (`argv` without the command name; default: `sys.argv[1:]`)."""
    import sys

    from .commands.cli import main as cli_main

    return cli_main(["benchmark", *(sys.argv[1:] if argv is None else argv)])
