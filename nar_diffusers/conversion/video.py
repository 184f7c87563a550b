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

from ..models.larp_tokenizer import LARPTokenizer
from ..models.transformer_nar import NARTransformer
from ..models.model_sizes import VIDEO_MODEL_SIZES, resolve_model_size
from ..pipelines.pipeline_nar_video import NARVideoPipeline
from ..schedulers.scheduling_neighbor import NeighborScheduler
from ..utils.dtypes import resolve_dtype
from ..utils.size_guard import check_model_config
from ._moved import moved_attribute
from .checkpoint import clean_state_dict, load_checkpoint_object, unwrap_state_dict
from .larp import load_larp_tokenizer
from .output import check_output_dir, save_atomically
from .trainer_checkpoint import read_checkpoint_file
from .transformer import VIDEO_HEAD_KEYS, transformer_from_state_dict
from .transformer_config import (
    PUBLISHED_CLASS_DROPOUT,
    PUBLISHED_INITIALIZER_RANGE,
    PUBLISHED_NORM_EPS,
    _infer_ffn_multiplier,
    _shape,
)
from .ucf101 import UCF101_CLASSES

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
    published_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `NARTransformer` config of a published NAR video model, from its tensor shapes.

    `model_size` (a "llama-abs-*" name) and `published_args` (the model's own `ModelArgs`: `dim`, `n_layer`,
    `n_head`, as a hub folder's config.json holds them), when given, are checked against the shapes; without
    either, the attention heads follow the family's head width of 64.
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
    published_args = published_args or {}
    stated = {"dim": hidden_size, "n_layer": num_layers, "vocab_size": vocab_size, "num_classes": num_classes}
    contradictions = [f"{k}={published_args[k]} (weights: {v})" for k, v in stated.items() if published_args.get(k) not in (None, v)]
    if contradictions:
        raise ValueError(f"The AR model's config contradicts its weights: {contradictions}.")
    if model_size is not None:
        name, size = resolve_model_size(model_size, flag="--model-size")
        if (size.num_layers, size.hidden_size) != (num_layers, hidden_size):
            raise ValueError(
                f"`--model-size` {name} has {size.num_layers} layers of width {size.hidden_size}, but the checkpoint "
                f"has {num_layers} (+2 head blocks) of width {hidden_size}."
            )
        num_attention_heads = size.num_attention_heads
    elif published_args.get("n_head"):
        num_attention_heads = int(published_args["n_head"])
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
) -> tuple[str | None, dict[str, Any], dict[str, torch.Tensor]]:
    """`(size name or None, the model's own arguments, clean state dict)` of a NAR video AR checkpoint in any
    accepted form."""
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
        args: dict[str, Any] = {}
        if config_file.is_file():
            try:
                args = dict(json.loads(config_file.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as err:
                raise ValueError(f"{AR_LABEL} {config_file} is not a readable JSON object: {err}") from None
        state_dict = unwrap_state_dict(load_checkpoint_object(weights, trust_pickle, AR_LABEL))
        return None, args, clean_state_dict(state_dict)
    name, args, state_dict = read_checkpoint_file(path, ema, trust_pickle, AR_LABEL)
    return (name if name in VIDEO_MODEL_SIZES else None), args, state_dict


# --------------------------------------------------------------------------------------------------------------------
# The pipeline folder
# --------------------------------------------------------------------------------------------------------------------

TOKENIZER_LABEL = "`tokenizer` (--tokenizer)"
# The settings of NAR's FVD sampling script for the UCF-101 model.
PUBLISHED_VIDEO_SAMPLING: dict[str, float | int] = {
    "guidance_scale": 2.5, "cfg_interval": -1, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
}  # fmt: skip


def latent_shape_of(published_args: Mapping[str, Any] | None) -> tuple[int, int, int] | None:
    """The `(T, h, w)` token grid the AR model's own config states (`latent_shape`), or None where it states none."""
    shape = (published_args or {}).get("latent_shape")
    if shape is None:
        return None
    valid = isinstance(shape, (list, tuple)) and len(shape) == 3
    valid = valid and all(isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= 4096 for g in shape)
    if not valid:
        raise ValueError(f"{AR_LABEL}: `latent_shape` {shape!r} in the model's config must be three ints in [1, 4096].")
    return tuple(shape)


def _token_grid(tokenizer: LARPTokenizer, published_args: Mapping[str, Any] | None) -> tuple[int, int, int]:
    """The AR model's `latent_shape` when its config gives one, else the tokenizer's grid. The tokens are holistic
    (no native grid), so only their counts must agree; the tokenizer is set to read its tokens as that grid."""
    shape = latent_shape_of(published_args)
    if shape is None:
        return tuple(tokenizer.grid)
    tokens = tokenizer.config.num_latent_tokens
    if math.prod(shape) != tokens:
        raise ValueError(
            f"{AR_LABEL}: the model's latent_shape {'x'.join(map(str, shape))} has {math.prod(shape)} cells, but the "
            f"LARP tokenizer makes {tokens} tokens per clip (num_latent_tokens); they must be equal."
        )
    if shape != tuple(tokenizer.grid):
        tokenizer.set_latent_grid(shape)
    return shape


def build_nar_video_pipeline(
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: LARPTokenizer,
    model_size: str | None = None,
    dtype: str | torch.dtype = "float32",
    published_args: Mapping[str, Any] | None = None,
    source: str | os.PathLike | None = None,
) -> NARVideoPipeline:
    """A `NARVideoPipeline` around a published AR state dict and its LARP tokenizer, after checking that they fit
    each other (vocabulary = codebook, the AR grid - its `latent_shape`, else the tokenizer's grid - holds as many
    cells as the tokenizer makes tokens, and the position table covers it). `source` names the AR file in errors."""
    torch_dtype = resolve_dtype(dtype)
    grid = _token_grid(tokenizer, published_args)
    config = nar_video_config_from_state_dict(state_dict, model_size, grid, published_args)
    check_model_config(NARTransformer, config, AR_LABEL if source is None else f"{AR_LABEL} {source}")
    if config["vocab_size"] != tokenizer.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the AR model predicts {config['vocab_size']} tokens (tok_embeddings.weight) but the "
            f"LARP codebook has {tokenizer.vocab_size} entries."
        )
    transformer = transformer_from_state_dict(state_dict, config, torch_dtype, head_keys=VIDEO_HEAD_KEYS)
    scheduler = NeighborScheduler(grid_size=grid)
    if torch_dtype != tokenizer.dtype:
        tokenizer = tokenizer.to(torch_dtype)
    ucf101 = config["num_classes"] == len(UCF101_CLASSES)
    return NARVideoPipeline(
        transformer=transformer, vqvae=tokenizer, scheduler=scheduler, sampling_defaults=PUBLISHED_VIDEO_SAMPLING,
        id2label=dict(enumerate(UCF101_CLASSES)) if ucf101 else None,
        model_card_info={
            "summary": "The published NAR class-conditional video model (UCF-101, 16 frames of 128 x 128) with its "
            "LARP tokenizer (arXiv 2410.21264), converted to diffusers.",
            "license": "other",
        },
    )


def convert_nar_video_checkpoint(
    ar_checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_size: str | None = None,
    ema: bool | float = False,
    tokenizer_ema: bool | float = False,
    dtype: str | torch.dtype = "float32",
    overwrite: bool = False,
    trust_pickle: bool = False,
) -> Path:
    """Convert a published NAR video model and its LARP tokenizer into a complete `NARVideoPipeline` folder.

    Args:
        ar_checkpoint: NAR's trainer `.pth`, a hub-style folder or a bare state dict (see the module docstring).
        tokenizer: the LARP tokenizer in any form `load_larp_tokenizer` accepts.
        output_dir: the pipeline folder to write (refused if it exists, unless `overwrite` and the converter wrote it).
        model_size: a "llama-abs-*" size, checked against the tensors (default: the trainer file's name, or
            inferred from the shapes).
        ema, tokenizer_ema: take the EMA weights of a trainer file (True, or the decay to pick).
        dtype: stored weight dtype of the transformer and the tokenizer.
        overwrite, trust_pickle: as for the image converters.

    Returns:
        The output folder. Nothing is written unless every check passes.
    """
    if model_size is not None:
        resolve_model_size(model_size, flag="--model-size")
    resolve_dtype(dtype)
    output_dir = Path(output_dir)
    inputs = {AR_LABEL: ar_checkpoint, TOKENIZER_LABEL: tokenizer}
    for label, path in inputs.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"{label} {path} not found.")
    check_output_dir(output_dir, overwrite, inputs)

    name, args, state_dict = load_nar_video_checkpoint(ar_checkpoint, ema, trust_pickle)
    larp = load_larp_tokenizer(tokenizer, tokenizer_ema, trust_pickle, latent_grid=latent_shape_of(args))
    pipeline = build_nar_video_pipeline(state_dict, larp, model_size or name, dtype, args, source=ar_checkpoint)
    del state_dict
    pipeline.register_to_config(model_card_info={**pipeline.config.model_card_info, "converted_from": Path(ar_checkpoint).name})
    save_atomically(pipeline, output_dir, overwrite, inputs)
    logger.info(f"Saved NARVideoPipeline ({pipeline.transformer.config.num_layers} layers, {dtype}) to {output_dir}")
    return output_dir


def __getattr__(name: str):
    # Deprecated aliases of the command-line functions, which moved to nar_diffusers.commands.convert.
    return moved_attribute(__name__, name, ("add_video_arguments", "run_video_conversion"))
