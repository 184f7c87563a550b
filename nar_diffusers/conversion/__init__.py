"""Converters from the published NAR / LlamaGen checkpoints to diffusers folders."""

from ._moved import moved_attribute
from .checkpoint import UnsafeCheckpointError, clean_state_dict, load_checkpoint_state_dict
from .vq import convert_vq_checkpoint, convert_vq_state_dict, vq_config_from_state_dict

__all__ = [
    "UnsafeCheckpointError",
    "clean_state_dict",
    "convert_vq_checkpoint",
    "convert_vq_state_dict",
    "load_checkpoint_state_dict",
    "vq_config_from_state_dict",
]


def __getattr__(name: str):
    # `add_vq_arguments` moved to nar_diffusers.commands.convert; a deprecated alias for one release.
    return moved_attribute(__name__, name, ("add_vq_arguments",))
