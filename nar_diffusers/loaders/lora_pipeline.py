"""LoRA loading for NAR pipelines, on top of diffusers' `LoraBaseMixin` (as diffusers' own pipelines do).

Loading is checked before anything changes: every LoRA key must name a Linear/Embedding layer of the transformer
with fitting shapes, or a ValueError lists what does not fit; a failure midway puts the transformer back as it was.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Callable

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.utils import _get_model_file, get_adapter_name, logging, require_peft_backend
from huggingface_hub.utils import validate_hf_hub_args

from ..schedulers.sampling import is_real
from .lora_checks import (
    PEFT_ADAPTER_CONFIG_NAME,
    check_adapter_weights,
    check_lora_fits,
    parse_adapter_config,
    summarize_names,
)

logger = logging.get_logger(__name__)

PEFT_KEY_PREFIX = "base_model.model."


class NARLoraLoaderMixin(LoraBaseMixin):
    """`load_lora_weights`, `save_lora_weights`, `fuse_lora`/`unfuse_lora` for the pipeline's `transformer`.

    `unload_lora_weights`, `delete_adapters`, `disable_lora`/`enable_lora` and `get_active_adapters` come from
    `LoraBaseMixin`. Files use the diffusers layout (keys prefixed with `transformer.` in
    `pytorch_lora_weights.safetensors`, the adapter config in the file metadata); peft's layout
    (`adapter_model.safetensors` with `base_model.model.` keys and an `adapter_config.json`) and keys without a
    prefix load too.
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    @validate_hf_hub_args
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor], **kwargs):
        """Load a LoRA state dict from a local folder, a file, a hub id, or a dict, with keys in the diffusers layout.

        peft keys (`base_model.model.<module>...`) and prefix-less keys get the `transformer.` prefix. Without adapter
        metadata in the safetensors file, an `adapter_config.json` next to a file that is not in the diffusers layout is
        read instead. With
        `return_lora_metadata=True`, returns `(state_dict, metadata)`.
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", None)
        weight_name = kwargs.pop("weight_name", None)
        hub_kwargs = dict(
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
        )
        path = pretrained_model_name_or_path_or_dict
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            path, weight_name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=path,
            weight_name=weight_name,
            use_safetensors=True if use_safetensors is None else use_safetensors,
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=use_safetensors is None,
            **hub_kwargs,
        )
        prefix = f"{cls.transformer_name}."
        in_diffusers_layout = all(key.startswith(prefix) for key in state_dict)
        if not in_diffusers_layout:
            if metadata is None and not isinstance(path, dict):
                config = _read_peft_adapter_config(path, hub_kwargs)
                if config is not None:
                    metadata = {f"{prefix}{key}": value for key, value in config.items()}
            if metadata is None and any(key.startswith(PEFT_KEY_PREFIX) for key in state_dict):
                logger.warning(
                    f"This peft-format LoRA has no {PEFT_ADAPTER_CONFIG_NAME} next to it: its rank is read from the "
                    "weights and `lora_alpha` is taken equal to the rank (scale 1.0)."
                )
            state_dict = _to_diffusers_layout(state_dict, cls.transformer_name)
        return (state_dict, metadata) if return_lora_metadata else state_dict

    @require_peft_backend
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """Load LoRA weights into the transformer as the adapter `adapter_name` (default: `default_{i}`).

        Raises a ValueError, before changing anything, when the LoRA does not fit the transformer.
        """
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        not_lora = [key for key in state_dict if "lora" not in key]
        if not state_dict or not_lora:
            raise ValueError(
                "Invalid LoRA checkpoint: every parameter name must contain 'lora'"
                + (f"; these do not: {summarize_names(not_lora)}." if not_lora else "; it has no parameters.")
            )
        self.load_lora_into_transformer(
            state_dict,
            transformer=self.transformer,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def load_lora_into_transformer(
        cls, state_dict, transformer, adapter_name=None, _pipeline=None, low_cpu_mem_usage=False, hotswap=False,
        metadata=None,
    ) -> None:
        """Check that the LoRA in `state_dict` fits `transformer`, then load it through peft.

        On any error the transformer is left as it was: no LoRA layer and no adapter config stay behind.
        """
        prefix = f"{cls.transformer_name}."
        state_dict = _to_diffusers_layout(state_dict, cls.transformer_name)
        if metadata:
            metadata = {key.removeprefix(prefix): value for key, value in metadata.items() if key.startswith(prefix)}
        config_kwargs, config = parse_adapter_config(metadata) if metadata else (None, None)
        check_lora_fits(transformer, {key.removeprefix(prefix): value for key, value in state_dict.items()}, config)

        if adapter_name is None:
            adapter_name = get_adapter_name(transformer)
        snapshot = _snapshot_adapters(transformer)
        logger.info(f"Loading {cls.transformer_name}.")
        try:
            transformer.load_lora_adapter(
                state_dict,
                network_alphas=None,
                adapter_name=adapter_name,
                metadata={f"{prefix}{key}": value for key, value in config_kwargs.items()} if config_kwargs else None,
                _pipeline=_pipeline,
                low_cpu_mem_usage=low_cpu_mem_usage,
                hotswap=hotswap,
            )
        except BaseException:
            if adapter_name not in snapshot["adapters"]:
                _restore_adapters(transformer, snapshot, adapter_name)
            raise

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
    ) -> None:
        """Write `pytorch_lora_weights.safetensors` (diffusers layout) for the transformer's LoRA layers."""
        if not transformer_lora_layers:
            raise ValueError("`transformer_lora_layers` is required: there is nothing else to save.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def set_adapters(
        self,
        adapter_names: list[str] | str,
        adapter_weights: float | dict | list[float | dict | None] | None = None,
    ) -> None:
        """Activate `adapter_names`, each scaled by its weight in `adapter_weights` (default 1.0).

        `adapter_weights` is a finite number, `{"transformer": number}`, None, or a list of those, one per adapter.
        """
        check_adapter_weights(adapter_weights, self._lora_loadable_modules)
        if isinstance(adapter_weights, tuple):
            adapter_weights = list(adapter_weights)
        super().set_adapters(adapter_names, adapter_weights)

    def fuse_lora(
        self,
        components: list[str] = ["transformer"],
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Merge the active LoRA layers into the transformer weights.

        `unfuse_lora` undoes it. `unload_lora_weights` after `fuse_lora` keeps the merged weights (the LoRA is baked
        in); call `unfuse_lora` first to get the base model back.
        """
        if not is_real(lora_scale):
            raise ValueError(f"`lora_scale` must be a finite number, got {lora_scale!r}.")
        super().fuse_lora(
            components=components, lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs
        )

    def unfuse_lora(self, components: list[str] = ["transformer"], **kwargs) -> None:
        """Restore the transformer weights from before `fuse_lora`."""
        super().unfuse_lora(components=components, **kwargs)


def _to_diffusers_layout(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Prefix every key with `{prefix}.`: keys already prefixed stay, peft's `base_model.model.` is replaced."""
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(f"{prefix}."):
            new_key = key
        else:
            new_key = f"{prefix}.{key.removeprefix(PEFT_KEY_PREFIX)}"
        if new_key in converted:
            raise ValueError(f"The LoRA state dict has the parameter `{new_key}` twice (with and without a prefix).")
        converted[new_key] = value
    return converted


def _read_peft_adapter_config(path: str | os.PathLike, hub_kwargs: dict) -> dict | None:
    """The parsed `adapter_config.json` of the folder or hub repo `path`, or None when it has none."""
    try:
        config_file = _get_model_file(
            path,
            weights_name=PEFT_ADAPTER_CONFIG_NAME,
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            **{**hub_kwargs, "local_files_only": bool(hub_kwargs.get("local_files_only"))},
        )
    except (OSError, ValueError):
        return None
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"Could not read the LoRA's {config_file}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}.")
    return config


def _snapshot_adapters(transformer: torch.nn.Module) -> dict:
    """What `_restore_adapters` needs to undo a failed adapter load."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = dict(transformer.named_modules())
    return {
        "modules": modules,
        "active": {
            name: copy.copy(module._active_adapter)
            for name, module in modules.items()
            if isinstance(module, BaseTunerLayer)
        },
        "adapters": set(getattr(transformer, "peft_config", None) or {}),
        "has_peft_config": hasattr(transformer, "peft_config"),
        "peft_config_loaded": getattr(transformer, "_hf_peft_config_loaded", None),
    }


def _restore_adapters(transformer: torch.nn.Module, snapshot: dict, adapter_name: str) -> None:
    """Remove what a failed load of `adapter_name` left behind, returning the transformer to `snapshot`."""
    modules = snapshot["modules"]
    for name, module in modules.items():
        if not name:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = modules[parent_name]
        if parent._modules.get(child_name) is not module:
            setattr(parent, child_name, module)
    for name, active in snapshot["active"].items():
        layer = modules[name]
        if adapter_name in layer._all_available_adapter_names():
            layer.delete_adapter(adapter_name)
        layer._active_adapter = active
    peft_config = getattr(transformer, "peft_config", None)
    if peft_config is not None:
        peft_config.pop(adapter_name, None)
        if not snapshot["has_peft_config"]:
            del transformer.peft_config
    if hasattr(transformer, "_hf_peft_config_loaded"):
        transformer._hf_peft_config_loaded = snapshot["peft_config_loaded"]
