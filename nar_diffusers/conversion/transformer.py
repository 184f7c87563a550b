"""Convert a published NAR or LlamaGen image transformer checkpoint into a complete diffusers `NARPipeline` folder.

Published key layout (github.com/ThisisBillhe/NAR checkpoints) -> `NARTransformer` parameter names:

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

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import VQModel
from diffusers.utils import logging

from ..models.model_sizes import MODEL_SIZES, ModelSize, resolve_model_size
from ..models.transformer_nar import NARTransformer
from ..models.vq_codec import check_codebook_lookup, vq_downsample_factor
from ..pipelines.pipeline_nar import NARPipeline
from ..pipelines.text_encoding import load_text_encoder
from ..schedulers.scheduler_selection import scheduler_class_for_heads
from ..utils.dtypes import resolve_dtype
from ..utils.size_guard import check_model_config
from ._moved import moved_attribute
from .checkpoint import check_checkpoint_file, clean_state_dict, load_checkpoint_state_dict
from .output import check_output_dir, format_keys, one_line, save_atomically
from .published import published_pipeline_metadata
from .transformer_config import (  # noqa: F401  (re-exported: their import path before the split)
    PUBLISHED_CLASS_DROPOUT,
    PUBLISHED_INITIALIZER_RANGE,
    PUBLISHED_NORM_EPS,
    PUBLISHED_ROPE_THETA,
    _check_architecture,
    _infer_ffn_multiplier,
    _shape,
    nar_config_from_state_dict,
    token_grid_side,
)
from .vq import convert_vq_state_dict

logger = logging.get_logger(__name__)


# The command line also accepts the published family's name for the raster architecture.
ARCHITECTURE_ALIASES: dict[str, str] = {"llamagen": "raster"}
# Published head parameter names (norm, projection), by head index: the image models, and the video models' heads
# "right", "down" and "back".
HEAD_KEYS: tuple[tuple[str, str], ...] = (("norm", "output"), ("medusa_norm", "medusa_output"))
VIDEO_HEAD_KEYS: tuple[tuple[str, str], ...] = (("norm_R", "output_R"), ("norm_D", "output_D"), ("norm_B", "output_B"))


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
    check_model_config(VQModel, config, f"{VQ_PATH_LABEL} {config_file}")
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
        check_model_config(VQModel, vq_config, f"{VQ_CHECKPOINT_LABEL} {vq_checkpoint}")
        with torch.device("meta"):
            vqvae = VQModel(**vq_config)
        vqvae.load_state_dict({k: v.to(dtype) for k, v in vq_state_dict.items()}, strict=True, assign=True)
        check_codebook_lookup(vqvae)
    else:
        check_vq_path(vq_path)
        try:
            vqvae = VQModel.from_pretrained(vq_path).to(dtype)  # check_vq_path size-checked its config
        except (OSError, ValueError) as err:
            raise ValueError(f"{VQ_PATH_LABEL} {vq_path} could not be loaded as a VQModel: {one_line(err)}") from None
        check_codebook_lookup(vqvae, f"The VQModel in {vq_path}")
    return vqvae.eval()


TRANSFORMER_LABEL = "`transformer_checkpoint` (--transformer-checkpoint)"
TEXT_ENCODER_LABEL = "`text_encoder_path` (--text-encoder-path)"


def _check_inputs(
    transformer_checkpoint: str | os.PathLike,
    vq_checkpoint: str | os.PathLike | None,
    vq_path: str | os.PathLike | None,
    text_encoder_path: str | os.PathLike | None,
    output_dir: Path,
    overwrite: bool,
) -> dict[str, str | os.PathLike | None]:
    """Check the input paths and the output folder before loading anything; returns the inputs by label."""
    if (vq_checkpoint is None) == (vq_path is None):
        raise ValueError(
            "Pass exactly one of `vq_checkpoint` (--vq-checkpoint, a LlamaGen VQ checkpoint) and `vq_path` "
            f"(--vq-path, a diffusers VQModel folder); got {'both' if vq_checkpoint is not None else 'neither'}."
        )
    inputs = {
        TRANSFORMER_LABEL: transformer_checkpoint,
        VQ_CHECKPOINT_LABEL: vq_checkpoint,
        VQ_PATH_LABEL: vq_path,
        TEXT_ENCODER_LABEL: text_encoder_path,
    }
    check_checkpoint_file(transformer_checkpoint, TRANSFORMER_LABEL)
    if vq_checkpoint is not None:
        check_checkpoint_file(vq_checkpoint, VQ_CHECKPOINT_LABEL)
    else:
        check_vq_path(vq_path)
    check_output_dir(output_dir, overwrite, inputs)
    return inputs


def _text_encoder_for(text_encoder_path: str | os.PathLike | None, dtype: torch.dtype, caption_dim: int | None):
    """`(text_encoder, tokenizer)` from `text_encoder_path`, checked against the caption width; `(None, None)`
    without a path."""
    if text_encoder_path is None:
        if caption_dim is not None:
            logger.warning(
                "Text-to-image model converted without `text_encoder_path`: the pipeline will need `prompt_embeds` "
                "(or add a T5 encoder and tokenizer later)."
            )
        return None, None
    try:
        text_encoder, tokenizer = load_text_encoder(text_encoder_path, dtype)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{TEXT_ENCODER_LABEL} {text_encoder_path} could not be loaded as a T5 encoder and tokenizer: "
            f"{one_line(err)}"
        ) from None
    width = text_encoder.config.d_model
    if width != caption_dim:
        raise ValueError(
            f"The text encoder at `text_encoder_path` outputs width {width}, but the transformer reads captions "
            f"of width {caption_dim} (cls_embedding.cap_proj.fc1.weight)."
        )
    return text_encoder, tokenizer


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
    size_name, size = resolve_model_size(model_size)
    num_heads = _check_architecture(architecture)
    torch_dtype = resolve_dtype(dtype)
    token_grid_side(image_size, 1)  # type checks; divisibility is checked against the VQ model below
    output_dir = Path(output_dir)
    inputs = _check_inputs(transformer_checkpoint, vq_checkpoint, vq_path, text_encoder_path, output_dir, overwrite)

    logger.info(f"Loading {transformer_checkpoint}")
    state_dict = load_checkpoint_state_dict(transformer_checkpoint, trust_pickle=trust_pickle, label=TRANSFORMER_LABEL)
    if text_encoder_path is not None and "cls_embedding.embedding_table.weight" in state_dict:
        raise ValueError(
            f"{TEXT_ENCODER_LABEL} is only for text-to-image models, but this checkpoint is "
            "class-conditional (it has cls_embedding.embedding_table.weight)."
        )

    vqvae = load_or_convert_vqvae(vq_checkpoint, vq_path, image_size, torch_dtype, trust_pickle=trust_pickle)
    downsample = vq_downsample_factor(vqvae)
    config = nar_config_from_state_dict(state_dict, size, image_size, architecture, vq_downsample=downsample)
    check_model_config(NARTransformer, config, f"{TRANSFORMER_LABEL} {transformer_checkpoint}")
    if config["vocab_size"] != vqvae.config.num_vq_embeddings:
        raise ValueError(
            f"vocabulary mismatch: the transformer predicts {config['vocab_size']} tokens (tok_embeddings.weight) "
            f"but the VQ codebook has {vqvae.config.num_vq_embeddings} entries."
        )
    transformer = transformer_from_state_dict(state_dict, config, torch_dtype)
    del state_dict

    grid = tuple(config["grid_size"])
    scheduler = scheduler_class_for_heads(num_heads)(grid_size=grid)

    text_encoder, tokenizer = _text_encoder_for(text_encoder_path, torch_dtype, config["caption_dim"])
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


def __getattr__(name: str):
    # Deprecated aliases of the command-line functions, which moved to nar_diffusers.commands.convert.
    return moved_attribute(__name__, name, ("add_arguments", "run_conversion"))
