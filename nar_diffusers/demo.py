"""Deprecated: the demo moved to `nar_diffusers.commands.demo` (`nar-diffusers demo`; the image demo is
`nar_diffusers.commands.demo.image`, what it shares with the video demo `nar_diffusers.commands.demo.common`)."""

from .commands import warn_moved
from .commands.demo import *  # noqa: F403
from .commands.demo import __all__ as _common_names
from .commands.demo.image import results_markdown, save_sample_grid, train_tokenizer

warn_moved("nar_diffusers.demo", "nar_diffusers.commands.demo")

__all__ = [*_common_names, "results_markdown", "save_sample_grid", "train_tokenizer"]
