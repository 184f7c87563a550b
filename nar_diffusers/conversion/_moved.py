"""Deprecated aliases: the converters' command-line functions moved to `nar_diffusers.commands.convert`.

The old names still resolve for one release (with a FutureWarning). The import is by name and at attribute access,
so the library never imports the command layer above it.
"""

from __future__ import annotations

import importlib
import warnings

COMMANDS_MODULE = "nar_diffusers.commands.convert"

# old name -> new name in COMMANDS_MODULE
MOVED_NAMES: dict[str, str] = {
    "add_arguments": "add_nar_arguments",
    "run_conversion": "run_nar",
    "add_vq_arguments": "add_vq_arguments",
    "run_vq_conversion": "run_vq",
    "add_safety_arguments": "add_safety_arguments",
    "add_video_arguments": "add_video_arguments",
    "run_video_conversion": "run_video",
}


def moved_attribute(module: str, name: str, names: tuple[str, ...]):
    """The moved function `name` of `module` (one of `names`), with a FutureWarning; AttributeError otherwise."""
    if name not in names:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_name = MOVED_NAMES[name]
    warnings.warn(
        f"`{module}.{name}` moved to `{COMMANDS_MODULE}.{new_name}`; the old name will be removed in the next "
        "release. Run the converters as `nar-diffusers convert`, `convert-vq` or `convert-video`.",
        FutureWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(COMMANDS_MODULE), new_name)
