"""The published NAR video models (UCF-101, class-conditional, LARP tokens) -> `NARTransformer`.

The AR model is a stack of LlamaGen blocks with a learned absolute position table `abs_pe` [1, 1 + T*H*W, dim]
(condition at 0, tokens at 1 + raster index) and three stacked heads: "right" (`norm_R`/`output_R`) after
`n_layer` blocks, "down" (`norm_D`/`output_D`) after one more and "back" (`norm_B`/`output_B`) after one more
again. Its checkpoints come as a NAR trainer file (`.pth`: model = {name, args, sd, ema_sd}), a hub-style folder
(`config.json` + `model.safetensors` / `pytorch_model.bin`) or a bare state dict.
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

from ..models.model_sizes import VIDEO_MODEL_SIZES, resolve_model_size
from .checkpoint import clean_state_dict, load_checkpoint_object, unwrap_state_dict
from .trainer_checkpoint import read_checkpoint_file
from .transformer import (
    PUBLISHED_CLASS_DROPOUT,
    PUBLISHED_INITIALIZER_RANGE,
    PUBLISHED_NORM_EPS,
    _infer_ffn_multiplier,
    _shape,
)

logger = logging.get_logger(__name__)

AR_LABEL = "`ar_checkpoint` (--ar-checkpoint)"
PUBLISHED_VIDEO_GRID: tuple[int, int, int] = (4, 16, 16)
PUBLISHED_VIDEO_DROPOUT = 0.1
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_LAYER = re.compile(r"^layers\.(\d+)\.")


def nar_video_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model_size: str | None = None,
    grid_size: tuple[int, int, int] = PUBLISHED_VIDEO_GRID,
) -> dict[str, Any]:
    """The `NARTransformer` config of a published NAR video model, from its tensor shapes.

    `model_size` (a "llama-abs-*" name), when given, is checked against the shapes; without it the attention heads
    follow the family's head width of 64.
    """
    sd = clean_state_dict(state_dict)
    vocab_size, hidden_size = _shape(sd, "tok_embeddings.weight", 2)
    num_classes = _shape(sd, "cls_embedding.embedding_table.weight", 2)[0] - 1
    num_blocks = len({int(m.group(1)) for key in sd if (m := _LAYER.match(key))})
    num_layers = num_blocks - 2
    positions = _shape(sd, "abs_pe", 3)
    expected_positions = 1 + math.prod(grid_size)
    if positions[1] != expected_positions:
        raise ValueError(
            f"abs_pe holds {positions[1]} positions but the NAR video model on a {'x'.join(map(str, grid_size))} grid "
            f"has {expected_positions} (1 condition + the tokens); LARP's own raster AR (1024 rows) is not a NAR model."
        )
    missing_heads = [k for k in ("norm_R.weight", "norm_D.weight", "norm_B.weight") if k not in sd]
    if missing_heads or num_layers < 1:
        raise ValueError(f"Not a three-head NAR video checkpoint: missing {missing_heads or ['layers.*']}.")
    if model_size is not None:
        name, size = resolve_model_size(model_size, flag="--model-size")
        if (size.num_layers, size.hidden_size) != (num_layers, hidden_size):
            raise ValueError(
                f"`--model-size` {name} has {size.num_layers} layers of width {size.hidden_size}, but the checkpoint "
                f"has {num_layers} (+2 head blocks) of width {hidden_size}."
            )
        num_attention_heads = size.num_attention_heads
    else:
        matches = [n for n, s in VIDEO_MODEL_SIZES.items() if (s.num_layers, s.hidden_size) == (num_layers, hidden_size)]
        num_attention_heads = VIDEO_MODEL_SIZES[matches[0]].num_attention_heads if matches else hidden_size // 64
        logger.info(f"Inferred size {matches[0] if matches else 'custom'}: {num_layers} layers, width {hidden_size}.")
    head_dim = hidden_size // num_attention_heads
    kv_rows = _shape(sd, "layers.0.attention.wqkv.weight", 2)[0] - hidden_size
    if kv_rows <= 0 or kv_rows % (2 * head_dim):
        raise ValueError(f"layers.0.attention.wqkv.weight does not fit {num_attention_heads} heads of width {head_dim}.")
    intermediate_size = _shape(sd, "layers.0.feed_forward.w1.weight", 2)[0]
    return {
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "num_layers": num_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": kv_rows // (2 * head_dim),
        "ffn_dim_multiplier": _infer_ffn_multiplier(hidden_size, intermediate_size, 256),
        "ffn_multiple_of": 256,
        "norm_eps": PUBLISHED_NORM_EPS,
        "position_embedding_type": "learned",
        "grid_size": list(grid_size),
        "num_decoding_heads": 3,
        "num_classes": int(num_classes),
        "num_condition_tokens": 1,
        "class_dropout_prob": PUBLISHED_CLASS_DROPOUT,
        "token_dropout": PUBLISHED_VIDEO_DROPOUT,
        "attention_dropout": 0.0,
        "residual_dropout": PUBLISHED_VIDEO_DROPOUT,
        "ffn_dropout": PUBLISHED_VIDEO_DROPOUT,
        "initializer_range": PUBLISHED_INITIALIZER_RANGE,
    }


def load_nar_video_checkpoint(
    path: str | os.PathLike, ema: bool | float = False, trust_pickle: bool = False
) -> tuple[str | None, dict[str, torch.Tensor]]:
    """`(size name or None, clean state dict)` of a NAR video AR checkpoint in any accepted form."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{AR_LABEL} {path} not found.")
    if path.is_dir():
        if ema is not False:
            raise ValueError(f"`ema` applies to trainer files; {AR_LABEL} {path} is a folder of weights.")
        weights = next((path / name for name in HUB_WEIGHT_FILES if (path / name).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{AR_LABEL} {path} holds none of {list(HUB_WEIGHT_FILES)}.")
        config_file = path / "config.json"
        name = None
        if config_file.is_file():
            try:
                name = (json.loads(config_file.read_text(encoding="utf-8")) or {}).get("model_type")
            except (OSError, ValueError, AttributeError):
                name = None
        state_dict = unwrap_state_dict(load_checkpoint_object(weights, trust_pickle, AR_LABEL))
        return (name if name in VIDEO_MODEL_SIZES else None), clean_state_dict(state_dict)
    name, _, state_dict = read_checkpoint_file(path, ema, trust_pickle, AR_LABEL)
    return (name if name in VIDEO_MODEL_SIZES else None), state_dict
