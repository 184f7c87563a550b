"""Converters from the published NAR / LlamaGen checkpoints to diffusers folders."""

from .checkpoint import UnsafeCheckpointError, clean_state_dict, load_checkpoint_state_dict
from .vq import add_vq_arguments, convert_vq_checkpoint, convert_vq_state_dict, vq_config_from_state_dict

__all__ = [
    "UnsafeCheckpointError",
    "add_vq_arguments",
    "clean_state_dict",
    "convert_vq_checkpoint",
    "convert_vq_state_dict",
    "load_checkpoint_state_dict",
    "vq_config_from_state_dict",
]
