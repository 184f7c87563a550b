"""The `nar-diffusers` command line tools, kept apart from the library (as diffusers keeps its CLI in `commands/`).

One module (or package) per command: `convert` (the three converters), `demo` (image and video), `app`, `generate`,
`sample`, `benchmark`; `cli` builds the parser (`nar-diffusers = nar_diffusers.commands.cli:main`). The tools use
the library's public parts; nothing in the library imports them.
"""

import warnings


def warn_moved(old: str, new: str) -> None:
    """The `FutureWarning` of a module that moved here (its old path keeps working for one release)."""
    warnings.warn(
        f"`{old}` moved to `{new}`; the old import path is deprecated and will be removed in the next release.",
        FutureWarning,
        stacklevel=3,
    )
