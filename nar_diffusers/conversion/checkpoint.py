"""Loading of published (LlamaGen / NAR) training checkpoints into a flat, clean state dict.

Shared by all converters in :mod:`nar_diffusers.conversion`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers.utils import logging

from ..utils.size_guard import check_state_dict_storage

logger = logging.get_logger(__name__)

# Keys under which training scripts nest the model weights (DDP, DeepSpeed, Lightning-style).
WRAPPER_KEYS: tuple[str, ...] = ("model", "module", "state_dict")
# Prefixes added by DDP/DeepSpeed wrapping and by `torch.compile`.
STRIPPED_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
# Buffers that are not weights: KV caches of the transformers, usage counter of the VQ codebook.
IGNORED_KEY_SUFFIXES: tuple[str, ...] = ("kv_cache.k_cache", "kv_cache.v_cache")
IGNORED_KEYS: frozenset[str] = frozenset({"quantize.codebook_used"})
# Non-tensor types that `torch.load(weights_only=True)` may rebuild besides torch's own defaults: the LlamaGen / NAR
# training scripts store their `argparse.Namespace` under "args". Nothing here can run code while being unpickled.
SAFE_PICKLE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint holds objects that loading it safely (`weights_only=True`) may not rebuild."""


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


def _qualified_name(obj: type) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _text_start(path: Path) -> str | None:
    """The first characters of `path` if it is a text file (e.g. a saved web page or link), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        text = head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not all(c.isprintable() or c.isspace() for c in text):
        return None
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:40] + ("..." if len(first) > 40 else "")


def _unreadable(path: Path, label: str, kind: str, err: Exception) -> ValueError:
    text = _text_start(path)
    if text is not None:
        return ValueError(f"{label} {path} is a text file, not a {kind} (it starts with {text!r}).")
    return ValueError(f"{label} {path} is not a readable {kind} (truncated or damaged?): {_first_line(err)}")


def _global_name(obj: type | tuple) -> str:
    """The name a pickle uses for an allowed global: `(obj, "module.name")` entries carry it explicitly."""
    return obj[1] if isinstance(obj, tuple) else _qualified_name(obj)


def _blocked_globals(path: Path, err: Exception, extra_safe_globals: Sequence = ()) -> list[str]:
    """The pickled globals that `weights_only=True` refused in `path` (empty if the file is simply unreadable)."""
    allowed = {_global_name(obj) for obj in (*SAFE_PICKLE_GLOBALS, *extra_safe_globals)}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) format or a damaged file: read the refusal message instead
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))
    return sorted({name for name in names if name not in allowed})


def _torch_load_safely(path: Path, label: str, trust_pickle: bool, extra_safe_globals: Sequence = ()) -> object:
    """`torch.load(weights_only=True)`, allowing `SAFE_PICKLE_GLOBALS` for this call only.

    See `load_checkpoint_state_dict` for what is refused and what `trust_pickle` allows.
    """
    # Scoped allow-list: add only what is not allowed already, and take exactly that back afterwards.
    already = set(torch.serialization.get_safe_globals())
    extra = [obj for obj in (*SAFE_PICKLE_GLOBALS, *extra_safe_globals) if obj not in already]
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - torch reports damaged files with many exception types
        blocked = _blocked_globals(path, err, extra_safe_globals)
        if not blocked:
            raise _unreadable(path, label, "torch checkpoint", err) from None
        allowed = [_global_name(obj) for obj in (*SAFE_PICKLE_GLOBALS, *extra_safe_globals)]
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{label} {path} pickles objects of type(s) {blocked}, which loading it safely does not allow "
                f"(allowed besides tensors and plain containers: {allowed}); unpickling them can run arbitrary code. "
                "Convert the file to .safetensors, or, only if you trust its source, pass --trust-pickle "
                "(trust_pickle=True) to load it with weights_only=False."
            ) from None
    logger.warning(
        f"--trust-pickle: loading {path} with weights_only=False to unpickle {blocked}; this runs code from the file."
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{label} {path} could not be unpickled: {_first_line(err)}") from None


def check_checkpoint_file(path: str | os.PathLike, label: str = "Checkpoint") -> Path:
    """Cheap checks before loading: `path` is an existing, non-empty file. Returns it as a `Path`."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"{label} {path} is a folder, not a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})."
        )
    if not path.is_file():
        raise FileNotFoundError(f"{label} {path} not found.")
    if path.stat().st_size == 0:
        raise ValueError(f"{label} {path} is empty (0 bytes).")
    return path


def load_checkpoint_object(
    path: str | os.PathLike, trust_pickle: bool = False, label: str = "Checkpoint", extra_safe_globals: Sequence = ()
) -> object:
    """Load a checkpoint file as saved: a `.safetensors` file as its tensor dict, a pickled one with
    `weights_only=True` (see `load_checkpoint_state_dict`), allowing also `extra_safe_globals` (classes or
    `(class, "module.name")` pairs that rebuild a pickled type as a harmless one) for this call only. Tensors whose
    stored bytes cannot back their shape (expanded views) are refused (`SizeGuardError`, a ValueError)."""
    path = check_checkpoint_file(path, label)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded = load_file(str(path), device="cpu")
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - SafetensorError and OS errors
            raise _unreadable(path, label, ".safetensors file", err) from None
    else:
        loaded = _torch_load_safely(path, label, trust_pickle, extra_safe_globals)
    # A pickled tensor may be a stride-0 view of a tiny storage; refuse it before any copy materialises it.
    check_state_dict_storage(loaded, f"{label} {path}")
    return loaded


def load_checkpoint_state_dict(
    path: str | os.PathLike, trust_pickle: bool = False, label: str = "Checkpoint"
) -> dict[str, torch.Tensor]:
    """Load a `.pt`/`.pth`/`.bin`/`.ckpt` (torch.save) or `.safetensors` checkpoint as a clean, flat state dict.

    `.safetensors` files hold tensors only and are preferred. Pickled files are loaded with `weights_only=True`,
    which rebuilds tensors, plain containers and the types in `SAFE_PICKLE_GLOBALS` (the `argparse.Namespace`
    training scripts store) and runs no code from the file. A file that pickles anything else raises
    `UnsafeCheckpointError` naming the types, unless `trust_pickle=True` (`--trust-pickle`) explicitly allows loading
    it with `weights_only=False`, which runs code from the file.

    Args:
        path: the checkpoint file.
        trust_pickle: allow unpickling arbitrary objects (only for files from a source you trust).
        label: how errors name the file, e.g. "`vq_checkpoint` (--vq-checkpoint)".

    Raises:
        FileNotFoundError: `path` does not exist or is a folder.
        ValueError: the file is empty, damaged, not a checkpoint, holds no state dict, or (`UnsafeCheckpointError`)
            pickles objects that are not allowed.
    """
    obj = load_checkpoint_object(path, trust_pickle, label)
    try:
        state_dict = unwrap_state_dict(obj)
    except ValueError as err:
        raise ValueError(f"{label} {path}: {err}") from None
    return clean_state_dict(state_dict)
