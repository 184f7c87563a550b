"""Deprecated: the command line is `nar_diffusers.commands.cli` (`nar-diffusers`, or
`python -m nar_diffusers.commands.cli`). `python -m nar_diffusers.cli ...` keeps working for one release."""

import sys

from .commands import warn_moved
from .commands.cli import COMMANDS, UnderscoreAliases, build_parser, main

warn_moved("nar_diffusers.cli", "nar_diffusers.commands.cli")

__all__ = ["COMMANDS", "UnderscoreAliases", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
