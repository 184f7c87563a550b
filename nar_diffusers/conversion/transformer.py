"""Convert a published NAR or LlamaGen image transformer checkpoint into a complete diffusers `NARPipeline` folder.

Published key layout (NAR_SPEC.md section 7) -> `NARTransformer` parameter names:

=====================================================  ======================================================
published key                                           `NARTransformer` key
=====================================================  ======================================================
``cls_embedding.embedding_table.weight``                ``class_embedding.weight``             (class models)
``cls_embedding.cap_proj.fc1.weight`` / ``fc2.weight``  ``caption_projection.fc1.weight`` / ``fc2.weight``
``cls_embedding.uncond_embedding``                      ``caption_projection.uncond_embedding`` (text models)
``tok_embeddings.weight``                               ``token_embedding.weight``
``layers.{i}.attention.wqkv.weight``                    ``blocks.{i}.attention.qkv.weight`` (fused, rows q, k, v)
``layers.{i}.attention.wo.weight``                      ``blocks.{i}.attention.out_proj.weight``
``layers.{i}.feed_forward.w{1,2,3}.weight``             ``blocks.{i}.feed_forward.w{1,2,3}.weight``
``layers.{i}.attention_norm.weight`` / ``ffn_norm``     ``blocks.{i}.attention_norm.weight`` / ``ffn_norm``
``norm.weight`` / ``output.weight``                     ``heads.0.norm.weight`` / ``heads.0.proj.weight``
``medusa_norm.weight`` / ``medusa_output.weight``       ``heads.1.norm.weight`` / ``heads.1.proj.weight`` (NAR)
=====================================================  ======================================================

NAR image checkpoints hold `n_layer + 1` blocks: block `n_layer` (the last) is the extra block head 1 reads after.
LlamaGen raster checkpoints hold `n_layer` blocks and one head. Tensors are copied unchanged (only cast to the
requested dtype). Nothing in a checkpoint stores the model size or the grid: the size name gives layers / heads /
width (checked against the tensors) and the image size divided by the VQ downsample factor gives the token grid.
"""

from __future__ import annotations

import argparse
import json
import logging as std_logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import VQModel
from diffusers.utils import logging

from ..models.attention_nar import swiglu_hidden_size
from ..models.model_sizes import MODEL_SIZES, ModelSize, resolve_model_size
from ..models.transformer_nar import NARTransformer
from ..models.vq_codec import check_codebook_lookup, vq_downsample_factor
from ..pipelines.pipeline_nar import NARPipeline
from ..pipelines.text_encoding import load_text_encoder
from ..schedulers.scheduler_selection import ARCHITECTURES, num_decoding_heads_for, scheduler_class_for_heads
from ..utils.dtypes import DTYPES, resolve_dtype
from .checkpoint import check_checkpoint_file, clean_state_dict, load_checkpoint_state_dict
from .output import REPORTED_ERRORS, check_output_dir, format_keys, one_line, save_atomically
from .published import published_pipeline_metadata
from .vq import add_safety_arguments, convert_vq_state_dict

logger = logging.get_logger(__name__)


# The command line also accepts the published family's name for the raster architecture.
ARCHITECTURE_ALIASES: dict[str, str] = {"llamagen": "raster"}
# Published head parameter names (norm, projection), by head index: the image models, and the video models' heads
# "right", "down" and "back".
HEAD_KEYS: tuple[tuple[str, str], ...] = (("norm", "output"), ("medusa_norm", "medusa_output"))
VIDEO_HEAD_KEYS: tuple[tuple[str, str], ...] = (("norm_R", "output_R"), ("norm_D", "output_D"), ("norm_B", "output_B"))


# Settings the published models share and the checkpoints do not store.
PUBLISHED_NORM_EPS = 1e-5
PUBLISHED_ROPE_THETA = 10000.0
PUBLISHED_CLASS_DROPOUT = 0.1
PUBLISHED_INITIALIZER_RANGE = 0.02

_BLOCK_RE = re.compile(r"^layers\.(0|[1-9]\d*)\.")


# --------------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Config inference
# --------------------------------------------------------------------------------------------------------------------


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

    # Conditioning.
    is_class = "cls_embedding.embedding_table.weight" in sd
    is_text = any(key.startswith("cls_embedding.cap_proj.") or key == "cls_embedding.uncond_embedding" for key in sd)
    if is_class == is_text:
        raise ValueError(
            "Cannot tell the conditioning: expected either 'cls_embedding.embedding_table.weight' (class-to-image) "
            "or 'cls_embedding.cap_proj.fc1.weight' + 'cls_embedding.uncond_embedding' (text-to-image), "
            f"found {'both' if is_class else 'neither'}."
        )
    num_classes = caption_dim = None
    num_condition_tokens = 1
    if is_class:
        num_classes = _shape(sd, "cls_embedding.embedding_table.weight", 2)[0] - 1
    else:
        caption_dim = _shape(sd, "cls_embedding.cap_proj.fc1.weight", 2)[1]
        num_condition_tokens, uncond_dim = _shape(sd, "cls_embedding.uncond_embedding", 2)
        if uncond_dim != caption_dim:
            raise ValueError(
                f"shape mismatch: cls_embedding.uncond_embedding is [{num_condition_tokens}, {uncond_dim}] but "
                f"cls_embedding.cap_proj.fc1.weight reads captions of width {caption_dim}."
            )

    # Width.
    vocab_size, hidden_size = _shape(sd, "tok_embeddings.weight", 2)
    if hidden_size != size.hidden_size:
        raise ValueError(
            f"The checkpoint's hidden size {hidden_size} (tok_embeddings.weight) does not match {size_name} "
            f"(hidden size {size.hidden_size}); check `model_size`."
        )

    # Architecture hints, then the block count.
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

    # Attention heads: the fused QKV rows are (n_head + 2 * n_kv_head) * head_dim.
    num_attention_heads = size.num_attention_heads
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden size {hidden_size} is not divisible by {num_attention_heads} attention heads.")
    head_dim = hidden_size // num_attention_heads
    qkv_rows = _shape(sd, "layers.0.attention.wqkv.weight", 2)[0]
    kv_rows = qkv_rows - hidden_size
    if kv_rows <= 0 or kv_rows % (2 * head_dim) or num_attention_heads % (kv_rows // (2 * head_dim)):
        raise ValueError(
            f"shape mismatch: layers.0.attention.wqkv.weight has {qkv_rows} rows, which is not (n_head + 2 * n_kv_head)"
            f" * head_dim for {num_attention_heads} heads of dim {head_dim} ({size_name})."
        )
    num_key_value_heads = kv_rows // (2 * head_dim)

    intermediate_size = _shape(sd, "layers.0.feed_forward.w1.weight", 2)[0]
    ffn_dim_multiplier = _infer_ffn_multiplier(hidden_size, intermediate_size, size.ffn_multiple_of)

    config: dict[str, Any] = {
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "num_layers": size.num_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": int(num_key_value_heads),
        "ffn_dim_multiplier": ffn_dim_multiplier,
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
    condition = f"{num_classes} classes" if is_class else f"captions {num_condition_tokens} x {caption_dim}"
    logger.info(
        f"Inferred {architecture} transformer: {size_name}, vocab {vocab_size}, {condition}, "
        f"{num_key_value_heads} KV heads, ffn {intermediate_size}, grid {grid}x{grid}, {num_heads} head(s)."
    )
    return config


# --------------------------------------------------------------------------------------------------------------------
# State dict conversion
# --------------------------------------------------------------------------------------------------------------------


def published_key_map(config: Mapping[str, Any], head_keys: tuple[tuple[str, str], ...] = HEAD_KEYS) -> dict[str, str]:
    """Every published key of a model with this `NARTransformer` config, mapped to its `NARTransformer` key
    (`head_keys`: the published names of each head's norm and projection)."""
    mapping: dict[str, str] = {}
    if config.get("num_classes") is not None:
        mapping["cls_embedding.embedding_table.weight"] = "class_embedding.weight"
    else:
        mapping["cls_embedding.cap_proj.fc1.weight"] = "caption_projection.fc1.weight"
        mapping["cls_embedding.cap_proj.fc2.weight"] = "caption_projection.fc2.weight"
        mapping["cls_embedding.uncond_embedding"] = "caption_projection.uncond_embedding"
    mapping["tok_embeddings.weight"] = "token_embedding.weight"
    if config.get("position_embedding_type") == "learned":
        mapping["abs_pe"] = "position_embedding"
    num_heads = config["num_decoding_heads"]
    if num_heads > len(head_keys):
        raise ValueError(f"The published layout has at most {len(head_keys)} heads, the config asks {num_heads}.")
    for i in range(config["num_layers"] + num_heads - 1):
        block = {
            "attention.wqkv": "attention.qkv",
            "attention.wo": "attention.out_proj",
            "feed_forward.w1": "feed_forward.w1",
            "feed_forward.w2": "feed_forward.w2",
            "feed_forward.w3": "feed_forward.w3",
            "attention_norm": "attention_norm",
            "ffn_norm": "ffn_norm",
        }
        for src, dst in block.items():
            mapping[f"layers.{i}.{src}.weight"] = f"blocks.{i}.{dst}.weight"
    for k in range(num_heads):
        norm, output = head_keys[k]
        mapping[f"{norm}.weight"] = f"heads.{k}.norm.weight"
        mapping[f"{output}.weight"] = f"heads.{k}.proj.weight"
    return mapping


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Parameter shapes of a `NARTransformer` with this config (built on the meta device)."""
    with torch.device("meta"):
        model = NARTransformer(**config)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def convert_nar_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    head_keys: tuple[tuple[str, str], ...] = HEAD_KEYS,
) -> dict[str, torch.Tensor]:
    """Map a published NAR/LlamaGen state dict onto `NARTransformer` keys (tensors unchanged).

    Every published key must map to a parameter of the right shape and every parameter must be produced; otherwise
    a ValueError reads "missing: [...]; unexpected: [...]; shape mismatch: [...]" with keys in the published layout.
    """
    sd = clean_state_dict(state_dict)
    key_map = published_key_map(config, head_keys)
    expected = _expected_shapes(config)
    if set(key_map.values()) != set(expected):  # a bug here, not in the checkpoint
        raise RuntimeError(f"Key table and NARTransformer disagree: {sorted(set(key_map.values()) ^ set(expected))}")

    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, tensor in sd.items():
        target = key_map.get(key)
        if target is None:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(expected[target]):
            mismatched.append(f"{key} {list(tensor.shape)} != expected {list(expected[target])}")
        else:
            converted[target] = tensor
    missing = [key for key in key_map if key not in sd]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The checkpoint does not match the {config['num_decoding_heads']}-head layout with "
            f"{config['num_layers'] + config['num_decoding_heads'] - 1} blocks inferred from its shapes. "
            f"missing: {format_keys(missing)}; unexpected: {format_keys(sorted(unexpected))}; "
            f"shape mismatch: {format_keys(sorted(mismatched))}"
        )
    logger.info(f"Mapped {len(converted)} tensors.")
    return converted


def transformer_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    dtype: str | torch.dtype = "float32",
    head_keys: tuple[tuple[str, str], ...] = HEAD_KEYS,
) -> NARTransformer:
    """Build a `NARTransformer` holding the converted published weights (no random initialisation)."""
    torch_dtype = resolve_dtype(dtype)
    converted = convert_nar_state_dict(state_dict, config, head_keys)
    with torch.device("meta"):
        model = NARTransformer(**config)
    tensors = {key: value.detach().to(torch_dtype).contiguous() for key, value in converted.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# Components and the pipeline folder
# --------------------------------------------------------------------------------------------------------------------


VQ_CHECKPOINT_LABEL = "`vq_checkpoint` (--vq-checkpoint)"
VQ_PATH_LABEL = "`vq_path` (--vq-path)"


def check_vq_path(vq_path: str | os.PathLike) -> None:
    """Cheap checks that `vq_path` is a diffusers VQModel folder: a folder whose config.json names a VQModel."""
    path = Path(vq_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{VQ_PATH_LABEL} {path} is not a folder: expected a diffusers VQModel folder (with config.json); "
            "pass a LlamaGen tokenizer checkpoint file with --vq-checkpoint instead."
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = f" (did you mean {path / 'vqvae'}?)" if (path / "vqvae" / "config.json").is_file() else ""
        raise FileNotFoundError(
            f"{VQ_PATH_LABEL} {path} has no config.json{hint}: expected a diffusers VQModel folder, e.g. the output "
            "of `nar-diffusers convert-vq` or the vqvae/ folder of a converted pipeline."
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{VQ_PATH_LABEL} {config_file} is not a readable JSON config: {one_line(err)}") from None
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name not in (None, "VQModel"):
        raise ValueError(f"{VQ_PATH_LABEL} {config_file} describes a {class_name}, not a VQModel.")
    if not any(path.glob("diffusion_pytorch_model*")):  # checked here: diffusers would log its own error first
        raise ValueError(
            f"{VQ_PATH_LABEL} {path} could not be loaded as a VQModel: it holds no weights "
            "(diffusion_pytorch_model.safetensors or .bin)."
        )


def load_or_convert_vqvae(
    vq_checkpoint: str | os.PathLike | None,
    vq_path: str | os.PathLike | None,
    image_size: int,
    dtype: torch.dtype,
    trust_pickle: bool = False,
) -> VQModel:
    """The VQ tokenizer: converted from a LlamaGen `vq_checkpoint`, or loaded from a diffusers folder `vq_path`.

    `trust_pickle` allows a `vq_checkpoint` that pickles arbitrary objects (see `load_checkpoint_state_dict`).
    """
    if vq_checkpoint is not None:
        logger.info(f"Converting the VQ tokenizer {vq_checkpoint}")
        vq_source = load_checkpoint_state_dict(vq_checkpoint, trust_pickle=trust_pickle, label=VQ_CHECKPOINT_LABEL)
        vq_config, vq_state_dict = convert_vq_state_dict(vq_source, sample_size=image_size)
        with torch.device("meta"):
            vqvae = VQModel(**vq_config)
        vqvae.load_state_dict({k: v.to(dtype) for k, v in vq_state_dict.items()}, strict=True, assign=True)
        check_codebook_lookup(vqvae)
    else:
        check_vq_path(vq_path)
        try:
            vqvae = VQModel.from_pretrained(vq_path).to(dtype)
        except (OSError, ValueError) as err:
            raise ValueError(f"{VQ_PATH_LABEL} {vq_path} could not be loaded as a VQModel: {one_line(err)}") from None
        check_codebook_lookup(vqvae, f"The VQModel in {vq_path}")
    return vqvae.eval()


def convert_nar_checkpoint(
    transformer_checkpoint: str | os.PathLike,
    model_size: str | ModelSize | Mapping[str, int],
    image_size: int,
    output_dir: str | os.PathLike,
    architecture: str = "nar",
    vq_checkpoint: str | os.PathLike | None = None,
    vq_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    text_encoder_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
) -> Path:
    """Convert a published NAR / LlamaGen image transformer checkpoint into a complete `NARPipeline` folder.

    Args:
        transformer_checkpoint: the published `torch.save` file (or `.safetensors`).
        model_size: a published size name (`"GPT-B"` ... `"GPT-7B"`), or a custom `ModelSize` / dict.
        image_size: the image side in pixels the model generates (384 for the class-to-image NAR models,
            256 or 512 for text-to-image); the token grid is `image_size / VQ downsample`.
        output_dir: the pipeline folder to write; an existing non-empty folder is refused unless `overwrite`.
        architecture: `"nar"` (two stacked heads, `NeighborScheduler`) or `"raster"` (LlamaGen, `RasterScheduler`).
        vq_checkpoint / vq_path: exactly one: a LlamaGen VQ checkpoint to convert, or a diffusers VQModel folder.
        dtype: stored weight dtype, `"float32"`, `"bfloat16"` or `"float16"`.
        text_encoder_path: text models only: a folder with a T5 encoder and its tokenizer (e.g. flan-t5-xl).
        overwrite: replace an existing `output_dir` the converter wrote. A folder holding any file its manifest does
            not list, or holding one of the inputs, is refused even then.
        trust_pickle: allow `.pt` checkpoints that pickle arbitrary objects. This runs code from the files: only
            for files from a source you trust. Without it they are refused (tensors, plain containers and
            `argparse.Namespace` load safely).

    Returns:
        The output folder. Nothing is written unless every check passes.
    """
    # Cheap argument checks first: nothing is loaded for a call that cannot succeed.
    if (vq_checkpoint is None) == (vq_path is None):
        raise ValueError(
            "Pass exactly one of `vq_checkpoint` (--vq-checkpoint, a LlamaGen VQ checkpoint) and `vq_path` "
            f"(--vq-path, a diffusers VQModel folder); got {'both' if vq_checkpoint is not None else 'neither'}."
        )
    size_name, size = resolve_model_size(model_size)
    num_heads = _check_architecture(architecture)
    torch_dtype = resolve_dtype(dtype)
    token_grid_side(image_size, 1)  # type checks; divisibility is checked against the VQ model below
    output_dir = Path(output_dir)
    label = "`transformer_checkpoint` (--transformer-checkpoint)"
    inputs = {
        label: transformer_checkpoint,
        VQ_CHECKPOINT_LABEL: vq_checkpoint,
        VQ_PATH_LABEL: vq_path,
        "`text_encoder_path` (--text-encoder-path)": text_encoder_path,
    }
    check_checkpoint_file(transformer_checkpoint, label)
    if vq_checkpoint is not None:
        check_checkpoint_file(vq_checkpoint, VQ_CHECKPOINT_LABEL)
    else:
        check_vq_path(vq_path)
    check_output_dir(output_dir, overwrite, inputs)

    logger.info(f"Loading {transformer_checkpoint}")
    state_dict = load_checkpoint_state_dict(transformer_checkpoint, trust_pickle=trust_pickle, label=label)
    if text_encoder_path is not None and "cls_embedding.embedding_table.weight" in state_dict:
        raise ValueError(
            "`text_encoder_path` (--text-encoder-path) is only for text-to-image models, but this checkpoint is "
            "class-conditional (it has cls_embedding.embedding_table.weight)."
        )

    vqvae = load_or_convert_vqvae(vq_checkpoint, vq_path, image_size, torch_dtype, trust_pickle=trust_pickle)
    downsample = vq_downsample_factor(vqvae)
    config = nar_config_from_state_dict(state_dict, size, image_size, architecture, vq_downsample=downsample)
    if config["vocab_size"] != vqvae.config.num_vq_embeddings:
        raise ValueError(
            f"vocabulary mismatch: the transformer predicts {config['vocab_size']} tokens (tok_embeddings.weight) "
            f"but the VQ codebook has {vqvae.config.num_vq_embeddings} entries."
        )
    transformer = transformer_from_state_dict(state_dict, config, torch_dtype)
    del state_dict

    grid = tuple(config["grid_size"])
    scheduler = scheduler_class_for_heads(num_heads)(grid_size=grid)

    text_encoder = tokenizer = None
    if text_encoder_path is not None:
        try:
            text_encoder, tokenizer = load_text_encoder(text_encoder_path, torch_dtype)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"`text_encoder_path` (--text-encoder-path) {text_encoder_path} could not be loaded as a T5 encoder "
                f"and tokenizer: {one_line(err)}"
            ) from None
        width = text_encoder.config.d_model
        if width != config["caption_dim"]:
            raise ValueError(
                f"The text encoder at `text_encoder_path` outputs width {width}, but the transformer reads captions "
                f"of width {config['caption_dim']} (cls_embedding.cap_proj.fc1.weight)."
            )
    elif config["caption_dim"] is not None:
        logger.warning(
            "Text-to-image model converted without `text_encoder_path`: the pipeline will need `prompt_embeds` "
            "(or add a T5 encoder and tokenizer later)."
        )

    metadata = published_pipeline_metadata(
        architecture, "class" if config["num_classes"] is not None else "text", num_classes=config["num_classes"],
        model_size=size_name, image_size=image_size, converted_from=Path(transformer_checkpoint).name,
    )  # fmt: skip
    pipeline = NARPipeline(
        transformer=transformer, vqvae=vqvae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
        **metadata,
    )  # fmt: skip
    save_atomically(pipeline, output_dir, overwrite, inputs)
    logger.info(
        f"Saved NARPipeline ({size_name}, {architecture}, {grid[0]}x{grid[1]} tokens, {torch_dtype}) to {output_dir}"
    )
    return output_dir


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the transformer conversion options to `parser` (also usable on a CLI sub-command parser)."""
    parser.add_argument("--transformer-checkpoint", required=True, help="Published NAR / LlamaGen GPT checkpoint.")
    parser.add_argument("--model-size", required=True, choices=list(MODEL_SIZES), help="Published model size.")
    parser.add_argument(
        "--image-size", required=True, type=int,
        help="Image side in pixels the model generates (NAR c2i: 384; t2i: 256 or 512).",
    )
    parser.add_argument(
        "--architecture", choices=[*ARCHITECTURES, *ARCHITECTURE_ALIASES], default="nar",
        help="'nar' (two stacked heads, neighbor order) or 'raster' (one head, raster order; 'llamagen' is the same).",
    )
    vq = parser.add_mutually_exclusive_group(required=True)
    vq.add_argument("--vq-checkpoint", help="LlamaGen VQ tokenizer checkpoint to convert (e.g. vq_ds16_c2i.pt).")
    vq.add_argument("--vq-path", help="An already converted diffusers VQModel folder.")
    parser.add_argument("--output-dir", required=True, help="Pipeline folder to write.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Stored weight dtype.")
    parser.add_argument(
        "--text-encoder-path", default=None,
        help="Text-to-image models: a local folder with the T5 encoder and tokenizer (flan-t5-xl).",
    )
    add_safety_arguments(parser)
    return parser


def run_conversion(args: argparse.Namespace) -> int:
    """Run the conversion for parsed arguments; returns a process exit code: 0, or 2 after logging a one-line error
    (nothing is written then)."""
    try:
        convert_nar_checkpoint(
            args.transformer_checkpoint,
            args.model_size,
            args.image_size,
            args.output_dir,
            architecture=ARCHITECTURE_ALIASES.get(args.architecture, args.architecture),
            vq_checkpoint=args.vq_checkpoint,
            vq_path=args.vq_path,
            dtype=args.dtype,
            text_encoder_path=args.text_encoder_path,
            overwrite=args.overwrite,
            trust_pickle=args.trust_pickle,
        )
    except REPORTED_ERRORS as err:
        logger.error(f"Transformer conversion failed: {one_line(err)}")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: published NAR / LlamaGen transformer checkpoint -> NARPipeline folder."""
    parser = argparse.ArgumentParser(
        description="Convert a published NAR or LlamaGen image transformer checkpoint into a diffusers NARPipeline."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    std_logging.basicConfig(level=std_logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_conversion(args)


if __name__ == "__main__":
    sys.exit(main())
