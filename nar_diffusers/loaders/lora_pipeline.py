"""LoRA loading for NAR pipelines, on top of diffusers' `LoraBaseMixin` (as diffusers' own pipelines do)."""

from __future__ import annotations

import os
from typing import Callable

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.utils import logging, require_peft_backend
from huggingface_hub.utils import validate_hf_hub_args

logger = logging.get_logger(__name__)


class NARLoraLoaderMixin(LoraBaseMixin):
    """`load_lora_weights`, `save_lora_weights`, `fuse_lora`/`unfuse_lora` for the pipeline's `transformer`.

    `set_adapters`, `unload_lora_weights`, `delete_adapters`, `disable_lora`/`enable_lora` and
    `get_active_adapters` come from `LoraBaseMixin`. Files use the diffusers layout: keys prefixed with
    `transformer.` in `pytorch_lora_weights.safetensors`, with the adapter config in the file metadata.
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    @validate_hf_hub_args
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor], **kwargs):
        """Load a LoRA state dict from a local folder, a file, a hub id, or pass a dict through.

        With `return_lora_metadata=True`, returns `(state_dict, metadata)`.
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", None)
        weight_name = kwargs.pop("weight_name", None)
        path = pretrained_model_name_or_path_or_dict
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            path, weight_name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=path,
            weight_name=weight_name,
            use_safetensors=True if use_safetensors is None else use_safetensors,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=use_safetensors is None,
        )
        return (state_dict, metadata) if return_lora_metadata else state_dict

    @require_peft_backend
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """Load LoRA weights into the transformer as the adapter `adapter_name` (default: `default_{i}`)."""
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint: every parameter name must contain 'lora'.")
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
        """Load the `transformer.`-prefixed part of `state_dict` into `transformer` through peft."""
        logger.info(f"Loading {cls.transformer_name}.")
        transformer.load_lora_adapter(
            state_dict,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

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

    def fuse_lora(
        self,
        components: list[str] = ["transformer"],
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Merge the active LoRA layers into the transformer weights (undo with `unfuse_lora`)."""
        super().fuse_lora(
            components=components, lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs
        )

    def unfuse_lora(self, components: list[str] = ["transformer"], **kwargs) -> None:
        """Restore the transformer weights from before `fuse_lora`."""
        super().unfuse_lora(components=components, **kwargs)
