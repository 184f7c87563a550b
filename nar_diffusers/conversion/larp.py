"""The published LARP video tokenizer -> `LARPTokenizer`, from any of the forms it is distributed in.

Accepted: a hub-style folder (`config.json` + `model.safetensors` or `pytorch_model.bin`), NAR's folder of one
`.pth` state dict + one `.json` of init arguments, a LARP trainer file (`.pth` with model args, weights and
optionally EMA weights), or a folder already written by `LARPTokenizer.save_pretrained`. The training-only prior
model (`prior_model.*`) is dropped. Nothing is unpickled beyond tensors and plain data (see `checkpoint.py`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from ..models.larp_tokenizer import LARPTokenizer
from ..utils.size_guard import check_model_config
from .checkpoint import clean_state_dict, load_checkpoint_object, unwrap_state_dict
from .output import format_keys
from .trainer_checkpoint import read_checkpoint_file

logger = logging.get_logger(__name__)

TOKENIZER_LABEL = "`tokenizer` (--tokenizer)"
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# LARP's own defaults for arguments a saved config may leave out (its `__init__` signature).
LARP_DEFAULTS: dict[str, Any] = {
    "frame_num": 16, "input_size": 128, "encoder_num_heads": 12, "decoder_num_heads": 12,
    "latent_pe_scale_factor": 10000,
}  # fmt: skip
_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.")


def _regularizer_args(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    bottleneck = kwargs.get("bottleneck") or {}
    regularizer = (bottleneck.get("args") or {}).get("regularizer") or {}
    if regularizer and regularizer.get("name", "vq") != "vq":
        raise ValueError(f"Only LARP's 'vq' bottleneck is supported, the config names {regularizer.get('name')!r}.")
    args = regularizer.get("args") or {}
    if args.get("l2_normalized") is False:
        raise ValueError("Only LARP's l2-normalised codebook is supported (the config sets l2_normalized: false).")
    return args


def _whole(name: str, value: Any) -> int:
    """An init argument that must be a whole number (LARP's configs may write 16 as 16.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"The tokenizer's config sets `{name}` to {value!r}; it must be a whole number.")
    return value


def larp_config(kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The `LARPTokenizer` config of a published tokenizer: sizes from the tensor shapes, the rest (heads, clip
    size, code temperature) from LARP's init arguments, which are checked against the shapes."""
    patch_weight = state_dict.get("x_embedder.proj.weight")
    if patch_weight is None or patch_weight.ndim != 5:
        raise ValueError(
            "The tokenizer has no 3-D patch embedding `x_embedder.proj.weight` [dim, channels, pt, p, p]; only LARP "
            "models with temporal_patch_size > 1 (the published ones) are supported."
        )
    hidden, in_channels, temporal_patch, patch, patch_w = patch_weight.shape
    depths = {"encoder": set(), "decoder": set()}
    for key in state_dict:
        if match := _BLOCK.match(key):
            depths[match.group(1)].add(int(match.group(2)))
    num_latent_tokens = state_dict["encoder_latent_query_embed"].shape[0]
    codebook_size, codebook_dim = state_dict["bottleneck.regularizer.embedding.weight"].shape
    value = {**LARP_DEFAULTS, **kwargs}.get
    checks = {
        "encoder_hidden_size": hidden, "decoder_hidden_size": state_dict["decoder.blocks.0.norm1.weight"].shape[0],
        "temporal_patch_size": temporal_patch, "patch_size": patch, "decoder_temporal_patch_size": temporal_patch,
        "decoder_patch_size": patch, "in_channels": in_channels, "bottleneck_token_num": num_latent_tokens,
        "encoder_depth": len(depths["encoder"]), "decoder_depth": len(depths["decoder"]),
    }  # fmt: skip
    contradictions = [f"{k}={kwargs[k]} (weights: {v})" for k, v in checks.items() if k in kwargs and kwargs[k] != v]
    if patch != patch_w or checks["decoder_hidden_size"] != hidden or value("encoder_num_heads") != value("decoder_num_heads"):
        contradictions.append("encoder and decoder differ in width, heads or patch shape")
    if contradictions:
        raise ValueError(f"The tokenizer's config contradicts its weights or this port: {contradictions}.")
    return {
        "num_frames": _whole("frame_num", value("frame_num")),
        "sample_size": _whole("input_size", value("input_size")),
        "in_channels": in_channels,
        "temporal_patch_size": temporal_patch,
        "patch_size": patch,
        "hidden_size": hidden,
        "num_attention_heads": _whole("encoder_num_heads", value("encoder_num_heads")),
        "num_encoder_layers": len(depths["encoder"]),
        "num_decoder_layers": len(depths["decoder"]),
        "mlp_ratio": state_dict["encoder.blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        "num_latent_tokens": num_latent_tokens,
        "codebook_size": codebook_size,
        "codebook_dim": codebook_dim,
        "stochastic_temperature": float(_regularizer_args(kwargs).get("stochastic_temperature", 0.03)),
        "pe_scale": float(value("latent_pe_scale_factor")),
    }


def tokenizer_from_state_dict(
    kwargs: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    latent_grid: tuple[int, int, int] | None = None,
    where: str = "The tokenizer",
) -> LARPTokenizer:
    """A `LARPTokenizer` holding a published state dict (prefixes stripped, the prior model dropped), reading its
    tokens as `latent_grid` (the AR model's `latent_shape`; default: the patch grid). `where` names the source in
    errors; the config is size-checked before anything is built."""
    state_dict = {k: v for k, v in clean_state_dict(state_dict).items() if not k.startswith("prior_model.")}
    try:
        config = larp_config(kwargs, state_dict)
    except KeyError as err:
        raise ValueError(f"The tokenizer weights lack {err.args[0]!r}: not a LARP tokenizer.") from None
    if latent_grid is not None:
        if math.prod(latent_grid) != config["num_latent_tokens"]:
            raise ValueError(
                f"{where}: the AR model's latent_shape {'x'.join(map(str, latent_grid))} has {math.prod(latent_grid)} "
                f"cells, but the LARP tokenizer makes {config['num_latent_tokens']} tokens per clip (num_latent_tokens); "
                "they must be equal."
            )
        config["latent_grid"] = list(latent_grid)
    check_model_config(LARPTokenizer, config, where)
    with torch.device("meta"):
        model = LARPTokenizer(**config)
    expected = model.state_dict()
    if "decoder_patch_query_token_type_embed" not in state_dict:  # use_decoder_patch_query_token_type_embed: false
        state_dict["decoder_patch_query_token_type_embed"] = torch.zeros(expected["decoder_patch_query_token_type_embed"].shape)
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    if unexpected or missing:
        raise ValueError(
            f"The tokenizer weights do not fit the published LARP layout: unexpected {format_keys(unexpected)}, "
            f"missing {format_keys(missing)} (other LARP variants, e.g. extra token-type embeddings, are not ported)."
        )
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state_dict.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"Tokenizer tensors have unexpected shapes: {wrong[:10]}.")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval()


def _single(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise ValueError(
            f"{TOKENIZER_LABEL} {folder} must hold exactly one {pattern} file (a NAR-style tokenizer folder: one "
            f"state dict + one config), found {[p.name for p in found]}."
        )
    return found[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{TOKENIZER_LABEL} {path} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{TOKENIZER_LABEL} {path} must hold a JSON object of LARP init arguments.")
    return data


def load_larp_tokenizer(
    path: str | os.PathLike,
    ema: bool | float = False,
    trust_pickle: bool = False,
    latent_grid: tuple[int, int, int] | None = None,
) -> LARPTokenizer:
    """Load a published LARP tokenizer in any accepted form (see the module docstring) as a float32
    `LARPTokenizer`. `ema` selects EMA weights of a trainer file; `trust_pickle` allows arbitrary unpickling;
    `latent_grid` is the `(T, h, w)` grid the tokens are read as (the AR model's `latent_shape`; default: the
    tokenizer's own). Sizes from the files are checked before anything is allocated (`utils.size_guard`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{TOKENIZER_LABEL} {path} not found.")
    if path.is_dir():
        if ema is not False:
            raise ValueError(f"`ema` applies to LARP trainer files; {TOKENIZER_LABEL} {path} is a folder of weights.")
        config_file = path / "config.json"
        if config_file.is_file():
            kwargs = _read_json(config_file)
            if kwargs.get("_class_name") == LARPTokenizer.__name__:
                model = LARPTokenizer.from_pretrained(path).eval()  # checks its config (SizeGuardedConfigMixin)
                if latent_grid is not None:
                    model.set_latent_grid(tuple(latent_grid))
                return model
            weights = next((path / name for name in HUB_WEIGHT_FILES if (path / name).is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"{TOKENIZER_LABEL} {path} has config.json but none of {list(HUB_WEIGHT_FILES)}.")
        else:
            weights, config_file = _single(path, "*.pth"), _single(path, "*.json")
            kwargs = _read_json(config_file)
        state_dict = unwrap_state_dict(load_checkpoint_object(weights, trust_pickle, TOKENIZER_LABEL))
    else:
        config_file = path
        _, kwargs, state_dict = read_checkpoint_file(path, ema, trust_pickle, TOKENIZER_LABEL)
    logger.info(f"Loading the LARP tokenizer from {path}")
    return tokenizer_from_state_dict(kwargs, state_dict, latent_grid, where=f"{TOKENIZER_LABEL} {config_file}")
