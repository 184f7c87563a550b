"""Captions -> the transformer's text condition: the T5 encoder, its embeddings, left-padded as the published
text-to-image NAR models expect."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)


def left_pad_condition(
    embeds: torch.Tensor, mask: torch.Tensor, num_condition_tokens: int
) -> tuple[torch.Tensor, torch.BoolTensor]:
    """Move each row's valid tokens to the END of `num_condition_tokens` slots and zero the padded rows.

    Args:
        embeds: `(batch, length, dim)` with `length <= num_condition_tokens`.
        mask: `(batch, length)`, True/1 for the valid tokens, which form a prefix of each row (right padding,
            as tokenizers produce it).

    Returns:
        `(embeds, mask)` of shapes `(batch, num_condition_tokens, dim)` and `(batch, num_condition_tokens)`.
    """
    if embeds.shape[1] > num_condition_tokens:
        raise ValueError(f"{embeds.shape[1]} caption tokens do not fit in {num_condition_tokens} condition slots.")
    valid = mask.bool().sum(dim=1, keepdim=True)
    slots = torch.arange(num_condition_tokens, device=embeds.device)[None]
    first_valid = num_condition_tokens - valid
    new_mask = slots >= first_valid
    source = (slots - first_valid).clamp(min=0)
    moved = embeds.gather(1, source[..., None].expand(-1, -1, embeds.shape[-1]))
    return moved * new_mask[..., None].to(moved.dtype), new_mask


def encode_captions(
    tokenizer,
    text_encoder,
    captions: list[str],
    num_condition_tokens: int,
    max_sequence_length: int | None = None,
    truncation: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.BoolTensor]:
    """Tokenize (right padding to `max_sequence_length`, default `num_condition_tokens`), run the T5 encoder
    with the padding mask, and return the left-padded condition `(embeds, mask)`.

    Longer captions are truncated with a warning, or rejected when `truncation=False`.
    """
    max_length = max_sequence_length or num_condition_tokens
    inputs = tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )
    full_length = tokenizer(captions, padding="longest", return_tensors="pt").input_ids.shape[-1]
    if full_length > max_length:
        if not truncation:
            raise ValueError(
                f"A prompt is {full_length} tokens long, more than `max_sequence_length` {max_length}; shorten it "
                "or allow truncation."
            )
        logger.warning(f"Prompts longer than {max_length} tokens were truncated.")
    device = device or text_encoder.device
    mask = inputs.attention_mask.to(device)
    embeds = text_encoder(inputs.input_ids.to(device), attention_mask=mask).last_hidden_state
    return left_pad_condition(embeds, mask, num_condition_tokens)


def load_text_encoder(text_encoder_path: str | os.PathLike, dtype: torch.dtype) -> tuple[Any, Any]:
    """T5 encoder and tokenizer from a transformers folder holding both (e.g. flan-t5-xl), or from a folder with
    `text_encoder/` and `tokenizer/` subfolders (a pipeline folder)."""
    import transformers
    from transformers import AutoTokenizer, T5EncoderModel

    path = Path(text_encoder_path)
    if not path.is_dir():
        raise FileNotFoundError(f"`text_encoder_path` {path} is not a folder.")
    encoder_dir, tokenizer_dir = path, path
    if (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
        encoder_dir, tokenizer_dir = path / "text_encoder", path / "tokenizer"
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_kwarg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    # float16 loading keeps T5's `_keep_in_fp32_modules` in float32 (T5 overflows in half precision).
    text_encoder = T5EncoderModel.from_pretrained(encoder_dir, **{dtype_kwarg: dtype}).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return text_encoder, tokenizer
