"""Convert a LlamaGen VQ image tokenizer checkpoint (VQ-16 / VQ-8) into a diffusers `VQModel` folder.

The LlamaGen tokenizer (its published checkpoint layout, github.com/FoundationVision/LlamaGen) is a VQGAN-style convolutional autoencoder whose topology maps
one-to-one onto diffusers' `VQModel`:

=====================================================  ======================================================
LlamaGen key prefix                                     diffusers key prefix
=====================================================  ======================================================
``{enc,dec}oder.conv_in`` / ``conv_out``                same
``{enc,dec}oder.norm_out``                              ``...conv_norm_out``
``encoder.conv_blocks.{l}.res.{b}``                     ``encoder.down_blocks.{l}.resnets.{b}``
``encoder.conv_blocks.{l}.attn.{b}``                    ``encoder.down_blocks.{l}.attentions.{b}``
``encoder.conv_blocks.{l}.downsample.conv``             ``encoder.down_blocks.{l}.downsamplers.0.conv``
``decoder.conv_blocks.{l}.res.{b}`` / ``attn.{b}``      ``decoder.up_blocks.{l}.resnets.{b}`` / ``attentions.{b}``
``decoder.conv_blocks.{l}.upsample.conv``               ``decoder.up_blocks.{l}.upsamplers.0.conv``
``{enc,dec}oder.mid.0`` / ``mid.1`` / ``mid.2``         ``...mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``quant_conv``, ``post_quant_conv``, ``quantize.embedding``  same (codebook rows l2-normalised)
=====================================================  ======================================================

Inside a res block ``nin_shortcut`` becomes ``conv_shortcut``; inside an attention block ``norm``/``q``/``k``/``v``/
``proj_out`` (1x1 convs) become ``group_norm``/``to_q``/``to_k``/``to_v``/``to_out.0`` (linears, weights squeezed).
Both models list decoder levels lowest resolution first, so level indices carry over unchanged.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import VQModel
from diffusers.utils import logging

from ..models.vq_codec import vq_downsample_factor
from ..utils.dtypes import resolve_dtype
from ..utils.model_card import build_vq_model_card
from ..utils.size_guard import check_model_config
from ._moved import moved_attribute
from .checkpoint import check_checkpoint_file, clean_state_dict, load_checkpoint_state_dict
from .output import check_output_dir, format_keys, save_atomically

logger = logging.get_logger(__name__)

NORM_NUM_GROUPS = 32
DEFAULT_SAMPLE_SIZE = 256

# --------------------------------------------------------------------------------------------------------------------
# Key mapping. Each rule maps a block prefix in both directions; parameter names inside the block are then mapped by
# the table of the rule's kind. `{m}` stands for "encoder"/"decoder", `{l}` for a level and `{b}` for a block index.
# --------------------------------------------------------------------------------------------------------------------

_PREFIX_RULES: tuple[tuple[str, str, str], ...] = (
    ("{m}.conv_in.", "{m}.conv_in.", "plain"),
    ("{m}.norm_out.", "{m}.conv_norm_out.", "plain"),
    ("{m}.conv_out.", "{m}.conv_out.", "plain"),
    ("quant_conv.", "quant_conv.", "plain"),
    ("post_quant_conv.", "post_quant_conv.", "plain"),
    ("quantize.embedding.", "quantize.embedding.", "codebook"),
    ("encoder.conv_blocks.{l}.res.{b}.", "encoder.down_blocks.{l}.resnets.{b}.", "res"),
    ("encoder.conv_blocks.{l}.attn.{b}.", "encoder.down_blocks.{l}.attentions.{b}.", "attn"),
    ("encoder.conv_blocks.{l}.downsample.conv.", "encoder.down_blocks.{l}.downsamplers.0.conv.", "plain"),
    ("decoder.conv_blocks.{l}.res.{b}.", "decoder.up_blocks.{l}.resnets.{b}.", "res"),
    ("decoder.conv_blocks.{l}.attn.{b}.", "decoder.up_blocks.{l}.attentions.{b}.", "attn"),
    ("decoder.conv_blocks.{l}.upsample.conv.", "decoder.up_blocks.{l}.upsamplers.0.conv.", "plain"),
    ("{m}.mid.0.", "{m}.mid_block.resnets.0.", "res"),
    ("{m}.mid.1.", "{m}.mid_block.attentions.0.", "attn"),
    ("{m}.mid.2.", "{m}.mid_block.resnets.1.", "res"),
)


def _param_table(pairs: list[tuple[str, str]], params: tuple[str, ...] = ("weight", "bias")) -> dict[str, str]:
    return {f"{src}.{p}".lstrip("."): f"{dst}.{p}".lstrip(".") for src, dst in pairs for p in params}


_PARAM_TABLES: dict[str, dict[str, str]] = {
    "plain": _param_table([("", "")]),
    "codebook": _param_table([("", "")], params=("weight",)),
    "res": _param_table([("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                         ("nin_shortcut", "conv_shortcut")]),
    "attn": _param_table([("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
                          ("proj_out", "to_out.0")]),
}


def _template_regex(template: str) -> re.Pattern[str]:
    """Compile a prefix template into a regex matching the prefix and capturing the parameter name after it."""
    pattern = re.escape(template)
    pattern = pattern.replace(re.escape("{m}"), "(?P<m>encoder|decoder)")
    pattern = pattern.replace(re.escape("{l}"), r"(?P<l>0|[1-9]\d*)")
    pattern = pattern.replace(re.escape("{b}"), r"(?P<b>0|[1-9]\d*)")
    return re.compile(f"^{pattern}(?P<param>.+)$")


_COMPILED_RULES = tuple(
    (_template_regex(src), src, _template_regex(dst), dst, kind) for src, dst, kind in _PREFIX_RULES
)


def llamagen_to_diffusers_key(key: str) -> tuple[str, str] | None:
    """Map a LlamaGen VQ key to `(diffusers_key, kind)`, or None if the key is not part of the layout."""
    for src_re, _, _, dst, kind in _COMPILED_RULES:
        match = src_re.match(key)
        if match and match["param"] in _PARAM_TABLES[kind]:
            fields = {k: v for k, v in match.groupdict().items() if k != "param"}
            return dst.format(**fields) + _PARAM_TABLES[kind][match["param"]], kind
    return None


def diffusers_to_llamagen_key(key: str) -> str | None:
    """Inverse of :func:`llamagen_to_diffusers_key` (used to name missing keys in the LlamaGen layout)."""
    for _, src, dst_re, _, kind in _COMPILED_RULES:
        match = dst_re.match(key)
        if match:
            inverse = {v: k for k, v in _PARAM_TABLES[kind].items()}
            if match["param"] in inverse:
                fields = {k: v for k, v in match.groupdict().items() if k != "param"}
                return src.format(**fields) + inverse[match["param"]]
    return None


# --------------------------------------------------------------------------------------------------------------------
# Config inference
# --------------------------------------------------------------------------------------------------------------------


def _require_shape(sd: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"Not a LlamaGen VQ tokenizer checkpoint: required key {key!r} is missing.")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"Key {key!r} has shape {list(shape)}, expected a {ndim}-d tensor.")
    return shape


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> set[int]:
    """All integers captured by group 1 of `pattern` over the state dict keys."""
    regex = re.compile(pattern)
    return {int(m.group(1)) for key in sd if (m := regex.match(key))}


def _level_channels(sd: Mapping[str, torch.Tensor], module: str, level: int) -> int:
    """Output channels of a level's res blocks, by majority over all the tensors that reveal it."""
    prefix = f"{module}.conv_blocks.{level}.res."
    votes: Counter[int] = Counter()
    for key, tensor in sd.items():
        if not key.startswith(prefix) or tensor.ndim == 0:
            continue
        param = key.split(".", 5)[-1]  # e.g. "conv1.weight"
        if param in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "norm2.weight", "norm2.bias",
                     "nin_shortcut.weight", "nin_shortcut.bias"):
            votes[int(tensor.shape[0])] += 1
    if not votes:
        raise ValueError(f"Cannot infer the channel count of {module} level {level}: no keys under {prefix!r}.")
    return votes.most_common(1)[0][0]


def vq_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], sample_size: int = DEFAULT_SAMPLE_SIZE
) -> dict[str, Any]:
    """Infer the diffusers `VQModel` config of a LlamaGen VQ tokenizer from its tensor shapes.

    Returns keyword arguments for `VQModel(**config)`: `block_out_channels = ch * ch_mult`, `layers_per_block` = res
    blocks per encoder level, attention block types at the levels that hold attention weights, `latent_channels` =
    z_channels, `vq_embed_dim`/`num_vq_embeddings` from the codebook, and `lookup_from_codebook=True`.
    """
    sd = clean_state_dict(state_dict)

    in_channels = _require_shape(sd, "encoder.conv_in.weight", 4)[1]
    base_channels = _require_shape(sd, "encoder.conv_in.weight", 4)[0]
    out_channels = _require_shape(sd, "decoder.conv_out.weight", 4)[0]
    z_channels = _require_shape(sd, "encoder.conv_out.weight", 4)[0]
    num_embeddings, embed_dim = _require_shape(sd, "quantize.embedding.weight", 2)

    enc_levels = _indices(sd, r"^encoder\.conv_blocks\.(\d+)\.res\.")
    dec_levels = _indices(sd, r"^decoder\.conv_blocks\.(\d+)\.res\.")
    if not enc_levels or not dec_levels:
        raise ValueError("Not a LlamaGen VQ tokenizer checkpoint: no 'encoder/decoder.conv_blocks.{l}.res' keys.")
    num_levels = max(enc_levels) + 1
    if max(dec_levels) + 1 != num_levels:
        raise ValueError(
            f"Encoder has {num_levels} levels but decoder has {max(dec_levels) + 1}; they must match."
        )
    layers_per_block = max(_indices(sd, r"^encoder\.conv_blocks\.0\.res\.(\d+)\.")) + 1

    block_out_channels = [_level_channels(sd, "encoder", level) for level in range(num_levels)]
    if block_out_channels[0] != base_channels:
        raise ValueError(
            f"encoder.conv_in outputs {base_channels} channels but level 0 works at {block_out_channels[0]}: "
            "ch_mult[0] != 1 is not expressible as a diffusers VQModel."
        )
    bad = [c for c in block_out_channels if c % NORM_NUM_GROUPS]
    if bad:
        raise ValueError(f"Channel counts {bad} are not divisible by the {NORM_NUM_GROUPS} GroupNorm groups.")

    def has_attention(module: str, level: int) -> bool:
        return any(key.startswith(f"{module}.conv_blocks.{level}.attn.") for key in sd)

    down_block_types = [
        "AttnDownEncoderBlock2D" if has_attention("encoder", lvl) else "DownEncoderBlock2D" for lvl in range(num_levels)
    ]
    up_block_types = [
        "AttnUpDecoderBlock2D" if has_attention("decoder", lvl) else "UpDecoderBlock2D" for lvl in range(num_levels)
    ]

    config: dict[str, Any] = {
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "down_block_types": down_block_types,
        "up_block_types": up_block_types,
        "block_out_channels": block_out_channels,
        "layers_per_block": int(layers_per_block),
        "act_fn": "silu",
        "latent_channels": int(z_channels),
        "sample_size": int(sample_size),
        "num_vq_embeddings": int(num_embeddings),
        "norm_num_groups": NORM_NUM_GROUPS,
        "vq_embed_dim": int(embed_dim),
        "scaling_factor": 1.0,
        "norm_type": "group",
        "mid_block_add_attention": True,
        "lookup_from_codebook": True,
        "force_upcast": True,
    }
    logger.info(
        f"Inferred VQ config: block_out_channels={block_out_channels} ({num_levels - 1} downsamples), "
        f"layers_per_block={layers_per_block}, z={z_channels}, codebook {num_embeddings}x{embed_dim}, "
        f"down={down_block_types}, up={up_block_types}"
    )
    return config


# --------------------------------------------------------------------------------------------------------------------
# State dict conversion
# --------------------------------------------------------------------------------------------------------------------


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Parameter shapes of a `VQModel` with this config (built on the meta device, no memory used)."""
    with torch.device("meta"):
        model = VQModel(**config)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def _convert_tensor(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """Apply the value transform of one key: float32 copy, 1x1 conv -> linear, codebook l2 normalisation."""
    tensor = tensor.detach().to(torch.float32).clone()
    if kind == "attn" and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        tensor = tensor[:, :, 0, 0].contiguous()
    elif kind == "codebook" and tensor.ndim == 2:
        tensor = F.normalize(tensor, p=2, dim=1)
    return tensor


def convert_vq_state_dict(
    state_dict: Mapping[str, torch.Tensor], sample_size: int = DEFAULT_SAMPLE_SIZE
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a LlamaGen VQ state dict into `(VQModel config, diffusers state dict)` (float32 tensors).

    Every source key must map to a `VQModel` parameter of the right shape and every parameter must be produced;
    otherwise a ValueError lists the missing (named in the LlamaGen layout), unexpected and mis-shaped keys.
    """
    sd = clean_state_dict(state_dict)
    config = vq_config_from_state_dict(sd, sample_size=sample_size)
    expected = _expected_shapes(config)

    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    seen_targets: set[str] = set()  # targets produced, with the right shape or not
    for key, tensor in sd.items():
        mapped = llamagen_to_diffusers_key(key)
        if mapped is None or mapped[0] not in expected:
            unexpected.append(key)
            continue
        target_key, kind = mapped
        value = _convert_tensor(tensor, kind)
        if value.shape != expected[target_key]:
            seen_targets.add(target_key)
            want = list(expected[target_key]) + ([1, 1] if kind == "attn" and tensor.ndim == 4 else [])
            mismatched.append(f"{key}: got {list(tensor.shape)}, expected {want}")
            continue
        seen_targets.add(target_key)
        converted[target_key] = value

    missing = sorted(diffusers_to_llamagen_key(key) or key for key in expected if key not in seen_targets)

    if missing or unexpected or mismatched:
        parts = ["The checkpoint does not match the LlamaGen VQ tokenizer layout inferred from its shapes "
                 f"(block_out_channels={config['block_out_channels']}, layers_per_block={config['layers_per_block']})."]
        if missing:
            parts.append(f"Missing keys ({len(missing)}): {format_keys(missing)}")
        if unexpected:
            parts.append(f"Unexpected keys ({len(unexpected)}): {format_keys(sorted(unexpected))}")
        if mismatched:
            parts.append(f"Wrong shapes ({len(mismatched)}): {format_keys(sorted(mismatched))}")
        raise ValueError(" ".join(parts))

    logger.info(f"Converted {len(converted)} tensors.")
    return config, converted


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint -> folder
# --------------------------------------------------------------------------------------------------------------------


def convert_vq_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    overwrite: bool = False,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    trust_pickle: bool = False,
) -> Path:
    """Convert a LlamaGen VQ tokenizer checkpoint into a diffusers `VQModel` folder (safetensors) at `output_dir`.

    Refuses a non-empty existing `output_dir` unless `overwrite`, and even then one holding files the converter did
    not write (see :func:`~nar_diffusers.conversion.output.check_output_dir`). The folder is written under a
    temporary name and renamed into place, so a failed conversion leaves no (partial) output behind. The checkpoint
    is loaded without running code from it unless `trust_pickle` (see `load_checkpoint_state_dict`). Returns the
    output path.
    """
    output_dir = Path(output_dir)
    torch_dtype = resolve_dtype(dtype)
    label = "`checkpoint_path` (--checkpoint)"
    inputs = {label: checkpoint_path}
    check_checkpoint_file(checkpoint_path, label)
    check_output_dir(output_dir, overwrite, inputs)

    logger.info(f"Loading {checkpoint_path}")
    state_dict = load_checkpoint_state_dict(checkpoint_path, trust_pickle=trust_pickle, label=label)
    config, diffusers_state_dict = convert_vq_state_dict(state_dict, sample_size=sample_size)
    check_model_config(VQModel, config, f"{label} {checkpoint_path}")

    # Build on the meta device and adopt the converted tensors (already in the target dtype): no random init.
    with torch.device("meta"):
        model = VQModel(**config)
    cast = {key: tensor.to(torch_dtype) for key, tensor in diffusers_state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    model.eval()

    card = build_vq_model_card(
        summary="A LlamaGen VQ image tokenizer (arXiv 2406.06525), converted to a diffusers `VQModel` with "
        "nar-diffusers: the tokenizer of the published NAR and LlamaGen image models. License: that of the published "
        "weights.",
        num_vq_embeddings=config["num_vq_embeddings"], vq_embed_dim=config["vq_embed_dim"],
        downsample_factor=vq_downsample_factor(model), in_channels=config.get("in_channels", 3),
        converted_from=Path(checkpoint_path).name, license="other",
    )  # fmt: skip
    save_atomically(model, output_dir, overwrite, inputs, model_card=card)
    logger.info(f"Saved diffusers VQModel ({torch_dtype}) to {output_dir}")
    return output_dir


def __getattr__(name: str):
    # Deprecated aliases of the command-line functions, which moved to nar_diffusers.commands.convert.
    return moved_attribute(__name__, name, ("add_vq_arguments", "add_safety_arguments", "run_vq_conversion"))
