"""Loading of published (LlamaGen / NAR) training checkpoints into a flat, clean state dict.

Shared by all converters in :mod:`nar_diffusers.conversion`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# Keys under which training scripts nest the model weights (DDP, DeepSpeed, Lightning-style).
WRAPPER_KEYS: tuple[str, ...] = ("model", "module", "state_dict")
# Prefixes added by DDP/DeepSpeed wrapping and by `torch.compile`.
STRIPPED_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
# Buffers that are not weights: KV caches of the transformers, usage counter of the VQ codebook.
IGNORED_KEY_SUFFIXES: tuple[str, ...] = ("kv_cache.k_cache", "kv_cache.v_cache")
IGNORED_KEYS: frozenset[str] = frozenset({"quantize.codebook_used"})


def _is_state_dict(obj: object) -> bool:
    """True for a non-empty mapping of string keys to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Return the tensor state dict inside a checkpoint object.

    Accepts a bare state dict or one nested (possibly repeatedly) under "model", "module" or "state_dict".
    """
    seen_path: list[str] = []
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise ValueError(f"Checkpoint content is a {type(obj).__name__}, not a state dict.")
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                seen_path.append(key)
                obj = obj[key]
                break
        else:
            non_tensor = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))[:10]
            where = "/".join(seen_path) or "<top level>"
            raise ValueError(
                f"Could not find a state dict in the checkpoint at {where}: expected tensors or one of "
                f"{WRAPPER_KEYS}; found non-tensor entries {non_tensor}."
            )
    if seen_path:
        logger.info(f"Using the state dict stored under {'/'.join(repr(k) for k in seen_path)}.")
    return dict(obj)


def strip_key_prefixes(key: str) -> str:
    """Remove any leading "module." / "_orig_mod." prefixes (repeatedly, in any order)."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def is_ignored_key(key: str) -> bool:
    """True for buffers that carry no weights (KV caches, codebook usage counter)."""
    return key in IGNORED_KEYS or key.endswith(IGNORED_KEY_SUFFIXES)


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from keys and drop non-weight buffers. Idempotent."""
    cleaned: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for raw_key, tensor in state_dict.items():
        key = strip_key_prefixes(raw_key)
        if is_ignored_key(key):
            dropped.append(key)
            continue
        if key in cleaned:
            raise ValueError(f"Checkpoint key {raw_key!r} collides with another key after prefix stripping ({key!r}).")
        cleaned[key] = tensor
    if dropped:
        more = " ..." if len(dropped) > 5 else ""
        logger.info(f"Ignoring {len(dropped)} non-weight buffer(s): {sorted(dropped)[:5]}{more}")
    return cleaned


def load_checkpoint_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a `.pt`/`.pth`/`.bin`/`.ckpt` (torch.save) or `.safetensors` checkpoint as a clean, flat state dict.

    `torch.load` runs with `weights_only=True`; only if that is refused (the file pickles non-tensor objects) does it
    retry with `weights_only=False`, with a warning, since that executes code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            logger.warning(
                f"Loading {path} with weights_only=True failed ({str(err).splitlines()[0]}); retrying with "
                "weights_only=False. This unpickles arbitrary objects: only do this for checkpoints you trust."
            )
            obj = torch.load(path, map_location="cpu", weights_only=False)

    return clean_state_dict(unwrap_state_dict(obj))
