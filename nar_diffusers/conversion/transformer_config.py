"""The `NARTransformer` config of a published NAR / LlamaGen image checkpoint, inferred from its tensor shapes.

Nothing in a checkpoint stores the model size or the grid: the size name gives layers / heads / width (checked
against the tensors) and the image size divided by the VQ downsample factor gives the token grid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.utils import logging

from ..models.attention_nar import swiglu_hidden_size
from ..models.model_sizes import ModelSize, resolve_model_size
from ..schedulers.scheduler_selection import num_decoding_heads_for
from .checkpoint import clean_state_dict

logger = logging.get_logger(__name__)

# Settings the published models share and the checkpoints do not store.
PUBLISHED_NORM_EPS = 1e-5
PUBLISHED_ROPE_THETA = 10000.0
PUBLISHED_CLASS_DROPOUT = 0.1
PUBLISHED_INITIALIZER_RANGE = 0.02

_BLOCK_RE = re.compile(r"^layers\.(0|[1-9]\d*)\.")


def _check_architecture(architecture: str) -> int:
    """Decoding heads of a published image `architecture`: "right" and "down" for NAR, one for raster (LlamaGen)."""
    return num_decoding_heads_for(architecture, grid_rank=2)


def token_grid_side(image_size: int, vq_downsample: int) -> int:
    """Tokens per image side: `image_size / vq_downsample`, which must be a whole number."""
    for name, value in (("image_size", image_size), ("vq_downsample", vq_downsample)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if image_size % vq_downsample:
        raise ValueError(
            f"`image_size` {image_size} is not divisible by the VQ downsample factor {vq_downsample}: the token grid "
            f"would not be whole (published sizes: 256 -> 16x16, 384 -> 24x24, 512 -> 32x32 with VQ-16)."
        )
    return image_size // vq_downsample


def _shape(sd: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"Not a NAR/LlamaGen transformer checkpoint: required key {key!r} is missing.")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"Key {key!r} has shape {list(shape)}, expected a {ndim}-d tensor.")
    return shape


def _infer_ffn_multiplier(hidden_size: int, intermediate_size: int, multiple_of: int) -> float | None:
    """The `ffn_dim_multiplier` that gives the stored SwiGLU width (None = the published default width)."""
    if swiglu_hidden_size(hidden_size, None, multiple_of) == intermediate_size:
        return None
    base = int(2 * 4 * hidden_size / 3)
    multiplier = intermediate_size / base
    if swiglu_hidden_size(hidden_size, multiplier, multiple_of) == intermediate_size:
        logger.info(f"Feed-forward width {intermediate_size} implies ffn_dim_multiplier={multiplier}.")
        return multiplier
    raise ValueError(
        f"The feed-forward width {intermediate_size} (layers.0.feed_forward.w1.weight) is not a SwiGLU width for "
        f"hidden size {hidden_size} rounded to a multiple of {multiple_of} (default width "
        f"{swiglu_hidden_size(hidden_size, None, multiple_of)})."
    )


def _conditioning(sd: Mapping[str, torch.Tensor]) -> tuple[int | None, int | None, int]:
    """`(num_classes, caption_dim, num_condition_tokens)`: class models have classes, text models a caption width."""
    is_class = "cls_embedding.embedding_table.weight" in sd
    is_text = any(key.startswith("cls_embedding.cap_proj.") or key == "cls_embedding.uncond_embedding" for key in sd)
    if is_class == is_text:
        raise ValueError(
            "Cannot tell the conditioning: expected either 'cls_embedding.embedding_table.weight' (class-to-image) "
            "or 'cls_embedding.cap_proj.fc1.weight' + 'cls_embedding.uncond_embedding' (text-to-image), "
            f"found {'both' if is_class else 'neither'}."
        )
    if is_class:
        return _shape(sd, "cls_embedding.embedding_table.weight", 2)[0] - 1, None, 1
    caption_dim = _shape(sd, "cls_embedding.cap_proj.fc1.weight", 2)[1]
    num_condition_tokens, uncond_dim = _shape(sd, "cls_embedding.uncond_embedding", 2)
    if uncond_dim != caption_dim:
        raise ValueError(
            f"shape mismatch: cls_embedding.uncond_embedding is [{num_condition_tokens}, {uncond_dim}] but "
            f"cls_embedding.cap_proj.fc1.weight reads captions of width {caption_dim}."
        )
    return None, caption_dim, num_condition_tokens


def _check_heads_and_blocks(
    sd: Mapping[str, torch.Tensor], size_name: str, size: ModelSize, architecture: str, num_heads: int
) -> None:
    """The second head's weights must be there exactly for NAR, and the block count must fit the size."""
    has_medusa = any(key.startswith(("medusa_norm.", "medusa_output.")) for key in sd)
    if architecture == "raster" and has_medusa:
        raise ValueError(
            "The checkpoint holds medusa_norm/medusa_output (a second decoding head): it is a NAR checkpoint; "
            "use architecture 'nar'."
        )
    if architecture == "nar" and not has_medusa:
        raise ValueError(
            "The checkpoint has no medusa_norm/medusa_output keys (head 1 of a NAR model): missing: "
            "['medusa_norm.weight', 'medusa_output.weight']. A LlamaGen raster checkpoint needs architecture "
            "'raster' (command line: --architecture raster or llamagen)."
        )
    block_ids = {int(m.group(1)) for key in sd if (m := _BLOCK_RE.match(key))}
    num_blocks = max(block_ids) + 1 if block_ids else 0
    expected_blocks = size.num_layers + num_heads - 1
    if num_blocks != expected_blocks:
        extra = " (n_layer + 1: the NAR models carry one extra block for head 1)" if num_heads > 1 else ""
        raise ValueError(
            f"layer count: the checkpoint holds {num_blocks} transformer blocks (layers.0 .. layers.{num_blocks - 1}) "
            f"but {size_name} with architecture {architecture!r} has {expected_blocks}{extra}; check `model_size` "
            "and `architecture`."
        )


def _num_key_value_heads(sd: Mapping[str, torch.Tensor], hidden_size: int, num_heads: int, size_name: str) -> int:
    """KV heads from the fused QKV rows, which are (n_head + 2 * n_kv_head) * head_dim."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} attention heads.")
    head_dim = hidden_size // num_heads
    qkv_rows = _shape(sd, "layers.0.attention.wqkv.weight", 2)[0]
    kv_rows = qkv_rows - hidden_size
    if kv_rows <= 0 or kv_rows % (2 * head_dim) or num_heads % (kv_rows // (2 * head_dim)):
        raise ValueError(
            f"shape mismatch: layers.0.attention.wqkv.weight has {qkv_rows} rows, which is not (n_head + 2 * n_kv_head)"
            f" * head_dim for {num_heads} heads of dim {head_dim} ({size_name})."
        )
    return kv_rows // (2 * head_dim)


def nar_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model_size: str | ModelSize | Mapping[str, int],
    image_size: int,
    architecture: str = "nar",
    vq_downsample: int = 16,
) -> dict[str, Any]:
    """Infer the `NARTransformer` config of a published checkpoint (keyword arguments of `NARTransformer`).

    From the tensors: class vs text conditioning, vocabulary, number of classes, caption width, condition length
    (rows of the unconditional caption table), KV heads, feed-forward width and block count. From the arguments:
    layers / heads / width (`model_size`, checked against the tensors), the heads (2 for `"nar"`, 1 for
    `"raster"`) and the square token grid `image_size // vq_downsample`.
    """
    sd = clean_state_dict(state_dict)
    size_name, size = resolve_model_size(model_size)
    num_heads = _check_architecture(architecture)
    grid = token_grid_side(image_size, vq_downsample)
    num_classes, caption_dim, num_condition_tokens = _conditioning(sd)
    vocab_size, hidden_size = _shape(sd, "tok_embeddings.weight", 2)
    if hidden_size != size.hidden_size:
        raise ValueError(
            f"The checkpoint's hidden size {hidden_size} (tok_embeddings.weight) does not match {size_name} "
            f"(hidden size {size.hidden_size}); check `model_size`."
        )
    _check_heads_and_blocks(sd, size_name, size, architecture, num_heads)
    num_key_value_heads = _num_key_value_heads(sd, hidden_size, size.num_attention_heads, size_name)
    intermediate_size = _shape(sd, "layers.0.feed_forward.w1.weight", 2)[0]
    config: dict[str, Any] = {
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "num_layers": size.num_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": int(num_key_value_heads),
        "ffn_dim_multiplier": _infer_ffn_multiplier(hidden_size, intermediate_size, size.ffn_multiple_of),
        "ffn_multiple_of": size.ffn_multiple_of,
        "norm_eps": PUBLISHED_NORM_EPS,
        "rope_theta": PUBLISHED_ROPE_THETA,
        "position_embedding_type": "rope",
        "grid_size": [grid, grid],
        "num_decoding_heads": num_heads,
        "num_classes": None if num_classes is None else int(num_classes),
        "caption_dim": None if caption_dim is None else int(caption_dim),
        "num_condition_tokens": int(num_condition_tokens),
        "class_dropout_prob": PUBLISHED_CLASS_DROPOUT,
        "token_dropout": 0.0,
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "ffn_dropout": 0.0,
        "initializer_range": PUBLISHED_INITIALIZER_RANGE,
    }
    condition = f"captions {num_condition_tokens} x {caption_dim}" if num_classes is None else f"{num_classes} classes"
    logger.info(
        f"Inferred {architecture} transformer: {size_name}, vocab {vocab_size}, {condition}, "
        f"{num_key_value_heads} KV heads, ffn {intermediate_size}, grid {grid}x{grid}, {num_heads} head(s)."
    )
    return config
