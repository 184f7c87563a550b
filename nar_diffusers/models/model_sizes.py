"""Transformer sizes of the published LlamaGen / NAR model families."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    """Transformer size of a published model family member (not stored in its checkpoints)."""

    num_layers: int
    num_attention_heads: int
    hidden_size: int
    ffn_multiple_of: int = 256


# The LlamaGen GPT sizes, shared by the NAR models (NAR_SPEC.md section 6): layers / heads / width.
MODEL_SIZES: dict[str, ModelSize] = {
    "GPT-B": ModelSize(12, 12, 768),
    "GPT-M": ModelSize(18, 16, 1024),
    "GPT-L": ModelSize(24, 16, 1024),
    "GPT-XL": ModelSize(36, 20, 1280),
    "GPT-XXL": ModelSize(48, 24, 1536),
    "GPT-XXXL": ModelSize(48, 40, 2560),
    "GPT-1B": ModelSize(22, 32, 2048),
    "GPT-3B": ModelSize(24, 32, 3200),
    "GPT-7B": ModelSize(32, 32, 4096),
}
