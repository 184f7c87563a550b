"""LoRA adapters on a NARTransformer with peft: configuration, checks, the weights to save, and checkpoints that
hold only the LoRA layers."""

from __future__ import annotations

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

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


def register_lora_checkpoint_hooks(accelerator, lora_config: LoraConfig, adapter_name: str = "default") -> None:
    """Make `accelerator.save_state` / `load_state` store only the LoRA layers of the (single) prepared model, in
    the diffusers LoRA layout; the frozen base weights come from the pretrained pipeline on resume."""
    from ..pipelines.pipeline_nar import NARPipeline

    def save_lora_layers(models, weights, output_dir):
        if accelerator.is_main_process:
            NARPipeline.save_lora_weights(
                output_dir,
                transformer_lora_layers=lora_state_dict(accelerator.unwrap_model(models[0]), adapter_name),
                transformer_lora_adapter_metadata=lora_config.to_dict(),
            )
        weights.pop()

    def load_lora_layers(models, input_dir):
        model = models.pop()
        state = NARPipeline.lora_state_dict(input_dir)
        state = {key.removeprefix("transformer."): value for key, value in state.items()}
        incompatible = set_peft_model_state_dict(accelerator.unwrap_model(model), state, adapter_name=adapter_name)
        if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
            raise ValueError(f"Checkpoint {input_dir} has unexpected LoRA keys: {incompatible.unexpected_keys}")

    accelerator.register_save_state_pre_hook(save_lora_layers)
    accelerator.register_load_state_pre_hook(load_lora_layers)
