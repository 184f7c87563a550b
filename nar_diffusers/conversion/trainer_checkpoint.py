"""Reading the trainer files of the LARP and NAR video code bases (and plain checkpoints) without running code.

A trainer file is a `torch.save` dict `{"model": {"name": ..., "args": {...}, "sd": state_dict, "ema_sd": {decay:
state_dict}}, "cfg": EasyDict, "optimizer": ..., "rng_states_per_rank": numpy RNG states, ...}`. It is loaded with
`weights_only=True`: the EasyDict objects are rebuilt as plain ordered dicts and numpy arrays as arrays, which
runs no code from the file.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .checkpoint import clean_state_dict, load_checkpoint_object, unwrap_state_dict

_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct

TRAINER_SAFE_GLOBALS: tuple = (
    (OrderedDict, "easydict.EasyDict"),
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    *(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")),  # e.g. the RNG key's uint32
)
"""Harmless stand-ins for the non-tensor types trainer files pickle (their configs and RNG states)."""


def read_checkpoint_file(
    path: str | os.PathLike, ema: bool | float = False, trust_pickle: bool = False, label: str = "Checkpoint"
) -> tuple[str | None, dict[str, Any], dict[str, torch.Tensor]]:
    """`(model name, init args, clean state dict)` of a LARP / NAR-video trainer file, or `(None, {}, state dict)`
    of a plain checkpoint (`.safetensors`, or a pickled state dict, possibly wrapped).

    Args:
        path: The file.
        ema: False for the trained weights; True for the EMA weights (the file must hold exactly one EMA); a decay
            value (e.g. 0.9999) to pick one of several.
        trust_pickle: Allow unpickling arbitrary objects (only for files from a source you trust).
        label: How errors name the file.
    """
    checkpoint = load_checkpoint_object(path, trust_pickle, label, extra_safe_globals=TRAINER_SAFE_GLOBALS)
    model = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if not isinstance(model, Mapping) or not isinstance(model.get("sd"), Mapping):
        if ema is not False:
            raise ValueError(f"`ema` was requested but {label} {path} is not a trainer file with EMA weights.")
        try:
            return None, {}, clean_state_dict(unwrap_state_dict(checkpoint))
        except ValueError as err:
            raise ValueError(f"{label} {path}: {err}") from None
    state_dict = model["sd"]
    if ema is not False:
        available = dict(model.get("ema_sd") or {})
        if not available:
            raise ValueError(f"`ema` was requested but {label} {path} holds no EMA weights (no model['ema_sd']).")
        if ema is True:
            if len(available) != 1:
                raise ValueError(f"{label} {path} holds EMA weights for decays {sorted(available)}; pass one as `ema`.")
            state_dict = next(iter(available.values()))
        else:
            matches = [decay for decay in available if float(decay) == float(ema)]
            if not matches:
                raise ValueError(f"`ema` {ema} is not among the EMA decays {sorted(available)} of {label} {path}.")
            state_dict = available[matches[0]]
    return model.get("name"), dict(model.get("args") or {}), clean_state_dict(state_dict)
