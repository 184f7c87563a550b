"""Transformer sizes: the published LlamaGen / NAR family and two small presets for CPU work, with one resolver."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    """Transformer size of a published model family member (not stored in its checkpoints)."""

    num_layers: int
    num_attention_heads: int
    hidden_size: int
    ffn_multiple_of: int = 256


# The LlamaGen GPT sizes, shared by the NAR models (NAR paper, LlamaGen paper): layers / heads / width.
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

# The published NAR video models' sizes ("llama-abs-*": LlamaGen blocks with learned absolute positions); the
# checkpoints carry two blocks more than `num_layers` (for the "down" and "back" heads).
VIDEO_MODEL_SIZES: dict[str, ModelSize] = {
    "llama-abs-S": ModelSize(12, 6, 384),
    "llama-abs-B": ModelSize(12, 12, 768),
    "llama-abs-L": ModelSize(24, 16, 1024),
    "llama-abs-LP": ModelSize(30, 20, 1280),
    "llama-abs-XL": ModelSize(36, 20, 1280),
    "llama-abs-XXL": ModelSize(48, 24, 1536),
    "llama-abs-XXXL": ModelSize(48, 40, 2560),
}

# Sizes for training on a CPU (the digits demo, tests); not a published family.
SMALL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(num_layers=2, num_attention_heads=4, hidden_size=64, ffn_multiple_of=16),
    "small": ModelSize(num_layers=4, num_attention_heads=4, hidden_size=128, ffn_multiple_of=32),
}

MODEL_PRESETS: tuple[str, ...] = (*SMALL_SIZES, *MODEL_SIZES, *VIDEO_MODEL_SIZES)
"""Every size name `resolve_model_size` accepts ("B" is accepted for "GPT-B", and so on)."""


def resolve_model_size(
    model_size: str | ModelSize | Mapping[str, int], flag: str = "model_size"
) -> tuple[str, ModelSize]:
    """`(name, ModelSize)` of a size name ("tiny", "small", "GPT-B" or "B", ...), a `ModelSize`, or a dict of its
    fields.

    Custom sizes (a `ModelSize` or a dict with `num_layers`, `num_attention_heads`, `hidden_size` and optionally
    `ffn_multiple_of`) are meant for tests and private models. `flag` names the argument in error messages.
    """
    if isinstance(model_size, str):
        for name in (model_size, f"GPT-{model_size}"):
            size = MODEL_SIZES.get(name) or VIDEO_MODEL_SIZES.get(name) or SMALL_SIZES.get(name)
            if size is not None:
                return name, size
        raise ValueError(f"Unknown `{flag}` {model_size!r}; choose one of {list(MODEL_PRESETS)}.")
    if isinstance(model_size, Mapping):
        try:
            model_size = ModelSize(**model_size)
        except TypeError as err:
            raise ValueError(
                f"A custom `{flag}` dict needs num_layers, num_attention_heads, hidden_size (and optionally "
                f"ffn_multiple_of): {err}"
            ) from None
    if not isinstance(model_size, ModelSize):
        raise ValueError(
            f"`{flag}` must be one of {list(MODEL_PRESETS)}, a ModelSize or a dict, got {type(model_size).__name__}."
        )
    fields = (model_size.num_layers, model_size.num_attention_heads, model_size.hidden_size, model_size.ffn_multiple_of)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in fields):
        raise ValueError(f"Every field of a custom `{flag}` must be a positive int, got {model_size}.")
    return f"custom size {model_size}", model_size
