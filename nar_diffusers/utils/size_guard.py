"""Size guard: sizes read from a file are checked before anything is allocated from them.

Three checks, each cheap and each refusing with one line that names the file:

- `check_config_bounds`: the size keys of a model config are ints (a JSON `1e9` is a float, refused) inside
  generous plausibility bounds (`SIZE_BOUNDS`), far above any published model.
- `check_model_memory`: the model is built from the config on the meta device (no memory), its weights counted and
  compared with the machine's memory, or with `NAR_DIFFUSERS_MAX_MODEL_BYTES` when that is set.
- `check_state_dict_storage`: every tensor of a loaded checkpoint is backed by as many stored bytes as its shape
  needs; a stride-0 (expanded) view of a tiny storage would otherwise be materialised at its full size.

`check_model_config` runs the first two; `SizeGuardedConfigMixin` runs it on every config a model's
`from_pretrained` reads, so loading a model directly or inside a pipeline is covered.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

MAX_MODEL_BYTES_ENV = "NAR_DIFFUSERS_MAX_MODEL_BYTES"
# Weights need at least this many bytes each (bfloat16 / float16, the smallest dtype the models are stored in), so
# a refused model could not have been loaded in any supported dtype.
MIN_BYTES_PER_WEIGHT = 2


class SizeGuardError(ValueError):
    """A size read from a file is implausible, or what it describes does not fit in memory."""


@dataclass(frozen=True)
class Bound:
    """Allowed values of one config key: an int (or, `real`, a number) in `[low, high]`, a list of such when
    `max_len` is set, and None when `optional`."""

    low: float
    high: float
    optional: bool = False
    max_len: int | None = None
    real: bool = False

    def describe(self) -> str:
        kind = "a number" if self.real else "an int"
        what = f"{kind} in [{self.low:g}, {self.high:g}]"
        if self.max_len is not None:
            what = f"a list of 1 to {self.max_len} entries, each {what}"
        return what + (" or null" if self.optional else "")


def _ints(low: int, high: int, optional: bool = False) -> Bound:
    return Bound(low, high, optional)


def _list(low: int, high: int, max_len: int, optional: bool = False) -> Bound:
    return Bound(low, high, optional, max_len)


def _real(low: float, high: float, optional: bool = False) -> Bound:
    return Bound(low, high, optional, real=True)


_WIDTH = _ints(1, 2**16)  # hidden sizes, channels, code widths
_DEPTH = _ints(0, 1024)
_HEADS = _ints(1, 4096)

# Plausibility bounds per model class. A program that needs larger models may update these entries.
SIZE_BOUNDS: dict[str, dict[str, Bound]] = {
    "NARTransformer": {
        "vocab_size": _ints(1, 2**22), "hidden_size": _WIDTH, "num_layers": _ints(1, 1024),
        "num_attention_heads": _HEADS, "num_key_value_heads": _ints(1, 4096, optional=True),
        "ffn_multiple_of": _WIDTH, "ffn_dim_multiplier": _real(1e-3, 64, optional=True),
        "grid_size": _list(1, 4096, max_len=3), "num_decoding_heads": _ints(1, 3),
        "num_classes": _ints(1, 2**24, optional=True), "caption_dim": _ints(1, 2**16, optional=True),
        "num_condition_tokens": _ints(1, 2**16),
    },
    "LARPTokenizer": {
        "num_frames": _ints(1, 4096), "sample_size": _ints(1, 2**14), "in_channels": _ints(1, 64),
        "temporal_patch_size": _ints(1, 4096), "patch_size": _ints(1, 2**14), "hidden_size": _WIDTH,
        "num_attention_heads": _HEADS, "num_encoder_layers": _DEPTH, "num_decoder_layers": _DEPTH,
        "mlp_ratio": _real(1e-3, 64), "num_latent_tokens": _ints(1, 2**20), "codebook_size": _ints(1, 2**24),
        "codebook_dim": _WIDTH, "latent_grid": _list(1, 4096, max_len=3, optional=True),
    },
    "VQModel": {
        "in_channels": _ints(1, 64), "out_channels": _ints(1, 64), "block_out_channels": _list(1, 2**16, max_len=16),
        "layers_per_block": _ints(1, 64), "latent_channels": _WIDTH, "sample_size": _ints(1, 2**16),
        "num_vq_embeddings": _ints(1, 2**24), "norm_num_groups": _WIDTH, "vq_embed_dim": _ints(1, 2**16, optional=True),
    },
}  # fmt: skip
# Token grids (product of `grid_size` / `latent_grid`): a learned position table and the KV cache scale with it.
MAX_GRID_CELLS = 2**20


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(value: Any, bound: Bound) -> bool:
    number = _is_int(value) or (bound.real and isinstance(value, float) and math.isfinite(value))
    return number and bound.low <= value <= bound.high


def _check_value(where: str, key: str, value: Any, bound: Bound) -> None:
    if value is None and bound.optional:
        return
    if bound.max_len is None:
        ok = _fits(value, bound)
    else:
        ok = isinstance(value, Sequence) and not isinstance(value, str) and 1 <= len(value) <= bound.max_len
        ok = ok and all(_fits(entry, bound) for entry in value)
        if ok and key in ("grid_size", "latent_grid") and math.prod(value) > MAX_GRID_CELLS:
            raise SizeGuardError(
                f"{where}: `{key}` = {list(value)} has {math.prod(value)} cells, more than the {MAX_GRID_CELLS} "
                "allowed; refused before anything is allocated."
            )
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise SizeGuardError(
            f"{where}: `{key}` = {shown} is not allowed: expected {bound.describe()}; refused before anything is "
            "allocated."
        )


def _class_name(model_class: type | str) -> str:
    return model_class if isinstance(model_class, str) else model_class.__name__


def check_config_bounds(model_class: type | str, config: Mapping[str, Any], where: str) -> None:
    """Refuse a config of `model_class` (a class or its name) whose size keys are not ints in their bounds
    (`SIZE_BOUNDS`); keys a config leaves out take the class defaults, which are in bounds. `where` names the file."""
    if not isinstance(config, Mapping):
        raise SizeGuardError(f"{where}: a model config must be a JSON object, got {type(config).__name__}.")
    for key, bound in SIZE_BOUNDS.get(_class_name(model_class), {}).items():
        if key in config:
            _check_value(where, key, config[key], bound)


def max_model_bytes() -> int:
    """The largest model (in weight bytes) the guard lets a file describe: `NAR_DIFFUSERS_MAX_MODEL_BYTES` when
    set, else the machine's physical memory."""
    raw = os.environ.get(MAX_MODEL_BYTES_ENV)
    if raw is not None and raw.strip():
        try:
            value = int(float(raw)) if raw.strip().lower() != "inf" else 2**63
        except (ValueError, OverflowError):
            value = 0
        if value <= 0:
            raise SizeGuardError(f"{MAX_MODEL_BYTES_ENV}={raw!r} must be a positive number of bytes (e.g. 64e9).")
        return value
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:  # psutil comes with accelerate; this is only the fallback
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _largest_sizes(model_class: type | str, config: Mapping[str, Any], count: int = 3) -> str:
    """`key=value` of the size keys closest to their bounds: the ones to look at when a model is too big."""
    ranked = []
    for key, bound in SIZE_BOUNDS.get(_class_name(model_class), {}).items():
        value = config.get(key)
        if value is None or bound.real:
            continue
        size = max(value, default=1) if bound.max_len is not None else value
        ranked.append((math.log(max(size, 1)) / math.log(max(bound.high, 2)), key, value))
    ranked.sort(reverse=True)
    return ", ".join(f"{key}={list(value) if isinstance(value, Sequence) else value}" for _, key, value in ranked[:count])


# Keys that repeat identical blocks: the weight count is linear in each, so it is measured at depths 1 and 2 and
# extrapolated, instead of building (even on the meta device, seconds for a thousand blocks) every block.
DEPTH_KEYS: dict[str, tuple[str, ...]] = {
    "NARTransformer": ("num_layers",),
    "LARPTokenizer": ("num_encoder_layers", "num_decoder_layers"),
    "VQModel": ("layers_per_block",),
}


def _count_on_meta(model_class: type, config: Mapping[str, Any]) -> int:
    # Only the constructor's arguments: diffusers would warn about every other key, and `from_pretrained` does so
    # once already.
    parameters = inspect.signature(model_class.__init__).parameters
    arguments = {key: value for key, value in config.items() if key in parameters and key != "self"}
    with torch.device("meta"):
        model = model_class.from_config(arguments)
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # tied weights count once
    return sum(t.numel() for t in tensors.values())


def count_model_weights(model_class: type, config: Mapping[str, Any], where: str) -> int:
    """Parameters + buffers of `model_class.from_config(config)`, built on the meta device (no memory used). Any
    error while building (a config the class refuses) is a `SizeGuardError` naming `where`."""
    deep = [k for k in DEPTH_KEYS.get(_class_name(model_class), ()) if _is_int(config.get(k)) and config[k] > 2]
    try:
        if not deep:
            return _count_on_meta(model_class, config)
        shallow = {**config, **{key: 1 for key in deep}}
        base = _count_on_meta(model_class, shallow)
        per_block = {key: _count_on_meta(model_class, {**shallow, key: 2}) - base for key in deep}
        return base + sum((config[key] - 1) * per_block[key] for key in deep)
    except MemoryError:
        raise SizeGuardError(f"{where}: building a {model_class.__name__} from this config ran out of memory.") from None
    except Exception as err:  # noqa: BLE001 - a class reports a bad config with many exception types
        message = " ".join(str(err).split()) or type(err).__name__
        raise SizeGuardError(f"{where}: the config does not describe a valid {model_class.__name__}: {message}") from None


def check_model_memory(model_class: type, config: Mapping[str, Any], where: str) -> int:
    """Refuse a config whose model needs more memory than `max_model_bytes()`; returns the weight count."""
    weights = count_model_weights(model_class, config, where)
    needed, limit = weights * MIN_BYTES_PER_WEIGHT, max_model_bytes()
    if needed > limit:
        raise SizeGuardError(
            f"{where}: a {model_class.__name__} with this config holds {weights:,} weights, at least "
            f"{needed / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB allowed (largest sizes: "
            f"{_largest_sizes(model_class, config)}); if the model is meant to be this big, set "
            f"{MAX_MODEL_BYTES_ENV} to a larger number of bytes."
        )
    return weights


def check_model_config(model_class: type, config: Mapping[str, Any], where: str) -> int:
    """`check_config_bounds`, then `check_model_memory`: everything a file's config must pass before a model is
    built from it. Returns the weight count."""
    check_config_bounds(model_class, config, where)
    return check_model_memory(model_class, config, where)


# --------------------------------------------------------------------------------------------------------------------
# Stored tensors
# --------------------------------------------------------------------------------------------------------------------


def check_stored_tensor(name: str, tensor: torch.Tensor, where: str = "The checkpoint") -> None:
    """Refuse a loaded tensor whose storage holds fewer bytes than its shape needs (an expanded / stride-0 view,
    which any copy or dtype cast would materialise at its full size)."""
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        return
    needed = tensor.numel() * tensor.element_size()
    stored = tensor.untyped_storage().nbytes()
    if needed > stored:
        raise SizeGuardError(
            f"{where}: tensor `{name}` of shape {list(tensor.shape)} needs {needed:,} bytes but the file stores only "
            f"{stored:,} for it (an expanded or stride-0 view); refused instead of materialising it."
        )


def check_state_dict_storage(obj: Any, where: str = "The checkpoint", _prefix: str = "", _depth: int = 0) -> None:
    """`check_stored_tensor` on every tensor in a loaded checkpoint: a state dict, or the nested dicts and lists of
    a trainer file (keys joined with "/" in the error)."""
    if isinstance(obj, torch.Tensor):
        check_stored_tensor(_prefix or "<tensor>", obj, where)
    elif _depth < 16 and isinstance(obj, Mapping):
        for key, value in obj.items():
            check_state_dict_storage(value, where, f"{_prefix}/{key}" if _prefix else str(key), _depth + 1)
    elif _depth < 16 and isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            check_state_dict_storage(value, where, f"{_prefix}[{index}]", _depth + 1)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def config_file_label(path: Any, subfolder: str | None = None) -> str:
    """How errors name the config file `from_pretrained(path, subfolder=...)` reads."""
    parts = [str(path)] + ([subfolder] if subfolder else [])
    if os.path.isdir(os.path.join(*parts)):
        return os.path.join(*parts, "config.json")
    return "/".join(parts) if not str(path).endswith(".json") else str(path)


class SizeGuardedConfigMixin:
    """Runs `check_model_config` on every config `load_config` reads from a file, so `from_pretrained` of the
    model (alone, or as a pipeline component through diffusers) refuses implausible sizes before building."""

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs=False, return_commit_hash=False, **kwargs):
        loaded = super().load_config(
            pretrained_model_name_or_path, return_unused_kwargs=return_unused_kwargs,
            return_commit_hash=return_commit_hash, **kwargs,
        )  # fmt: skip
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            config = loaded[0] if isinstance(loaded, tuple) else loaded
            check_model_config(cls, config, config_file_label(pretrained_model_name_or_path, kwargs.get("subfolder")))
        return loaded
