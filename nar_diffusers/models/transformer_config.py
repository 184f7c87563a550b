"""Checks of a `NARTransformer` configuration (a ValueError naming the setting and its allowed values)."""

from __future__ import annotations


def validate_transformer_config(
    hidden_size, num_attention_heads, num_key_value_heads, position_embedding_type, grid_size,
    num_decoding_heads, num_classes, caption_dim, num_condition_tokens,
) -> None:
    if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 2:
        raise ValueError(
            f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` ({num_attention_heads}) "
            "into an even head dimension."
        )
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"`num_attention_heads` ({num_attention_heads}) must be a multiple of `num_key_value_heads` "
            f"({num_key_value_heads})."
        )
    if position_embedding_type not in ("rope", "learned"):
        raise ValueError(f"`position_embedding_type` must be 'rope' or 'learned', got {position_embedding_type!r}.")
    if num_decoding_heads not in (1, len(grid_size)):
        raise ValueError(
            f"`num_decoding_heads` must be 1 (raster) or {len(grid_size)} (one per axis of grid_size "
            f"{grid_size}), got {num_decoding_heads}."
        )
    if (num_classes is None) == (caption_dim is None):
        raise ValueError("Set exactly one of `num_classes` (class conditioning) or `caption_dim` (text conditioning).")
    if num_classes is not None and (num_classes < 1 or num_condition_tokens != 1):
        raise ValueError(
            f"A class-conditional model needs `num_classes` >= 1 and `num_condition_tokens` == 1, got "
            f"{num_classes} and {num_condition_tokens}."
        )
    if num_condition_tokens < 1:
        raise ValueError(f"`num_condition_tokens` must be >= 1, got {num_condition_tokens}.")
