"""LoRA adapters on a NARTransformer with peft: configuration, checks, and the weights to save."""

from __future__ import annotations

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ..models.transformer_nar import NARTransformer

ATTENTION_MODULES = ("qkv", "out_proj")
FEED_FORWARD_MODULES = ("w1", "w2", "w3")


def lora_target_candidates(transformer: NARTransformer) -> list[str]:
    """Names of the Linear layers a LoRA can target (the last component of each module name)."""
    names = {name.rsplit(".", 1)[-1] for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def add_lora(
    transformer: NARTransformer,
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] = ATTENTION_MODULES,
    adapter_name: str = "default",
) -> LoraConfig:
    """Freeze `transformer` and attach a trainable LoRA adapter (float32 parameters) to `target_modules`.

    Raises a ValueError naming `target_modules` when one of them is not a Linear layer of the model.
    """
    if rank < 1:
        raise ValueError(f"`rank` must be >= 1, got {rank}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
    candidates = lora_target_candidates(transformer)
    unknown = [name for name in target_modules if name not in candidates]
    if not target_modules or unknown:
        raise ValueError(
            f"Unknown LoRA `target_modules` {unknown or list(target_modules)}; the transformer's Linear layers are "
            f"{candidates} (attention: {list(ATTENTION_MODULES)}, feed-forward: {list(FEED_FORWARD_MODULES)})."
        )
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    cast_training_params(transformer, dtype=torch.float32)
    return config


def lora_state_dict(transformer: NARTransformer, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights, ready for `NARPipeline.save_lora_weights(transformer_lora_layers=...)`."""
    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)
