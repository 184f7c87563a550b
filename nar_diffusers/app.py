"""Deprecated: the app moved to `nar_diffusers.commands.app` (`nar-diffusers app`)."""

from .commands import warn_moved
from .commands.app import *  # noqa: F403
from .commands.app import __all__  # noqa: F401

warn_moved("nar_diffusers.app", "nar_diffusers.commands.app")
