"""LoRA loading for NAR pipelines, on top of diffusers' `LoraBaseMixin` (as diffusers' own pipelines do).

Loading is checked before anything changes: every LoRA key must name a Linear/Embedding layer of the transformer
with fitting shapes, or a ValueError lists what does not fit; a failure midway puts the transformer back as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import os
import re
from typing import TYPE_CHECKING, Callable

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.utils import _get_model_file, get_adapter_name, logging, require_peft_backend
from huggingface_hub.utils import validate_hf_hub_args

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.get_logger(__name__)

PEFT_ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_KEY_PREFIX = "base_model.model."

# `<module>.<name>` parameter names of a LoRA (peft's, without the adapter name), for Linear and Embedding layers.
_LINEAR_LORA_PARAMS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector")
_EMBEDDING_LORA_PARAMS = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

# `LoraConfig` fields an adapter config may set. Fields that only describe where the adapter came from are ignored;
# any other field set to a non-default value is refused rather than silently dropped.
_SUPPORTED_CONFIG_FIELDS = (
    "r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
    "lora_bias", "lora_dropout", "fan_in_fan_out", "layers_to_transform", "layers_pattern", "bias",
)
_IGNORED_CONFIG_FIELDS = (
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "init_lora_weights",
)
# Initialisations that leave the base weights alone. The others (PiSSA, OLoRA, LoftQ, ...) change them, so such an
# adapter only works on top of its own modified base model.
_BASE_NEUTRAL_INITS = (True, False, "gaussian", "orthogonal", "eva")


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
                + (f"; these do not: {_summarize(not_lora)}." if not_lora else "; it has no parameters.")
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
        config_kwargs, config = _lora_config(metadata) if metadata else (None, None)
        _check_lora_fits(transformer, {key.removeprefix(prefix): value for key, value in state_dict.items()}, config)

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
        _check_adapter_weights(adapter_weights, self._lora_loadable_modules)
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
        if not _is_finite_number(lora_scale):
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


def _lora_config(config: dict) -> tuple[dict, LoraConfig]:
    """The `LoraConfig` arguments and the `LoraConfig` of an adapter config (adapter_config.json or metadata).

    Raises a ValueError for non-LoRA adapters, adapters trained on a modified base (PiSSA, OLoRA, ...), and settings
    this loader does not support.
    """
    from peft import LoraConfig

    source = f"The LoRA's adapter config ({PEFT_ADAPTER_CONFIG_NAME} or the safetensors `lora_adapter_metadata`)"
    peft_type = str(config.get("peft_type", "LORA")).rsplit(".", 1)[-1]
    if peft_type.upper() != "LORA":
        raise ValueError(f"{source} has `peft_type={config['peft_type']!r}`; only LoRA adapters (`LORA`) load here.")
    init = config.get("init_lora_weights", True)
    if init not in _BASE_NEUTRAL_INITS:
        raise ValueError(
            f"{source} has `init_lora_weights={init!r}`: such an adapter only works on its own modified base model. "
            f"Supported: {list(_BASE_NEUTRAL_INITS)} (convert a PiSSA/OLoRA/CorDA adapter to a plain LoRA first)."
        )
    defaults = {
        field.name: field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        for field in dataclasses.fields(LoraConfig)
    }
    kwargs, refused = {}, []
    for name, value in config.items():
        if name in _SUPPORTED_CONFIG_FIELDS:
            kwargs[name] = value
        elif name not in _IGNORED_CONFIG_FIELDS and value not in (None, False, {}, [], ""):
            if value != defaults.get(name):
                refused.append(f"{name}={value!r}")
    if refused:
        raise ValueError(
            f"{source} sets {', '.join(refused)}, which this loader does not support; supported settings: "
            f"{list(_SUPPORTED_CONFIG_FIELDS)}."
        )
    rank, alpha = kwargs.get("r", 8), kwargs.get("lora_alpha", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{source} has `r={rank!r}`; it must be a positive integer.")
    if not _is_finite_number(alpha):
        raise ValueError(f"{source} has `lora_alpha={alpha!r}`; it must be a finite number.")
    if not kwargs.get("target_modules"):
        raise ValueError(f"{source} has no `target_modules`.")
    try:
        return kwargs, LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source} is not a valid LoraConfig: {e}") from e


def _lora_target_layers(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The transformer's Linear and Embedding layers by name (the base layer where a LoRA is already attached)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers, wrapped = {}, []
    for name, module in transformer.named_modules():
        if any(name.startswith(f"{outer}.") for outer in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name)
            module = module.get_base_layer()
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            layers[name] = module
    return layers


def _check_lora_fits(
    transformer: torch.nn.Module, lora_state_dict: dict[str, torch.Tensor], config: LoraConfig | None = None
) -> None:
    """Raise a ValueError unless every LoRA key names a layer of `transformer` with fitting, finite weights.

    With an adapter `config`, the modules it targets must be exactly the ones with weights (a LoRA from a model with
    fewer blocks is refused). Without one, a LoRA missing some blocks only gets a warning naming them.
    """
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    if not lora_state_dict:
        raise ValueError("The LoRA has no weights for the transformer.")
    layers = _lora_target_layers(transformer)
    params: dict[str, dict[str, torch.Tensor]] = {}
    unknown_names, not_finite = [], []
    for key, value in lora_state_dict.items():
        module, sep, name = key.partition(".lora_")
        name = f"lora_{name}"
        if not sep or name not in _LINEAR_LORA_PARAMS + _EMBEDDING_LORA_PARAMS + ("lora_magnitude_vector.weight",):
            unknown_names.append(key)
            continue
        params.setdefault(module, {})[name.removesuffix(".weight") if "magnitude" in name else name] = value
        if not torch.is_floating_point(value) or (not value.is_meta and not torch.isfinite(value).all()):
            not_finite.append(key)
    if unknown_names:
        raise ValueError(
            f"Unsupported LoRA parameter names: {_summarize(unknown_names)}. Expected `<module>.lora_A.weight` and "
            "`<module>.lora_B.weight` (peft's names; also `lora_B.bias`, `lora_magnitude_vector`, "
            "`lora_embedding_A`/`lora_embedding_B`)."
        )
    if not_finite:
        raise ValueError(f"The LoRA has non-finite or non-float weights in {_summarize(not_finite)}.")

    unmatched = [module for module in params if module not in layers]
    if unmatched:
        if len(unmatched) == len(params):
            what = "None of the LoRA's modules exists in the transformer (a LoRA for another model?)"
        else:
            what = (
                f"{len(unmatched)} of the LoRA's {len(params)} modules do not exist in the transformer (a LoRA from a "
                "model with more blocks or heads?)"
            )
        raise ValueError(
            f"{what}: {_summarize(unmatched)}. The transformer's Linear/Embedding layers: {_summarize(layers)}."
        )

    errors = []
    for module, tensors in params.items():
        layer = layers[module]
        if isinstance(layer, torch.nn.Embedding):
            allowed, down, up = _EMBEDDING_LORA_PARAMS, "lora_embedding_A", "lora_embedding_B"
            fan_in, fan_out = layer.num_embeddings, layer.embedding_dim
        else:
            allowed, down, up = _LINEAR_LORA_PARAMS, "lora_A.weight", "lora_B.weight"
            fan_in, fan_out = layer.in_features, layer.out_features
        wrong = sorted(set(tensors) - set(allowed))
        if wrong or down not in tensors or up not in tensors:
            errors.append(f"{module} ({type(layer).__name__}) needs `{down}` and `{up}`, has {sorted(tensors)}")
            continue
        a, b = tensors[down], tensors[up]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or b.shape[1] != a.shape[0]:
            errors.append(
                f"{module}: `{down}` {tuple(a.shape)} and `{up}` {tuple(b.shape)} do not fit a {fan_in} -> {fan_out} "
                f"layer (expected (rank, {fan_in}) and ({fan_out}, rank))"
            )
            continue
        for name in ("lora_B.bias", "lora_magnitude_vector"):
            if name in tensors and tuple(tensors[name].shape) != (fan_out,):
                errors.append(f"{module}: `{name}` {tuple(tensors[name].shape)} should be ({fan_out},)")
        if config is not None:
            rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
            if a.shape[0] != rank:
                errors.append(f"{module}: rank {a.shape[0]} in the weights but r={rank} in the adapter config")
    if errors:
        raise ValueError(
            "The LoRA does not fit the transformer's layers (a LoRA for a model of another size?):\n  "
            + "\n  ".join(errors[:12])
            + (f"\n  ... and {len(errors) - 12} more" if len(errors) > 12 else "")
        )

    if config is not None and config.target_modules is not None:
        targets = config.target_modules
        targets = targets if isinstance(targets, str) else sorted(targets)
        if targets == "all-linear":
            targeted = {name for name, layer in layers.items() if isinstance(layer, torch.nn.Linear)}
        else:
            targeted = {name for name in layers if check_target_module_exists(config, name)}
        missing, extra = sorted(targeted - set(params), key=_natural), sorted(set(params) - targeted, key=_natural)
        if missing:
            raise ValueError(
                f"The LoRA's adapter config targets `target_modules={targets}`, but it has no weights "
                f"for {_summarize(missing)}: it was probably trained on a model with fewer blocks or heads."
            )
        if extra:
            raise ValueError(
                f"The LoRA has weights for {_summarize(extra)}, which its adapter config "
                f"(`target_modules={targets}`) does not target: the weights and the config do not match."
            )
    else:
        covered_patterns = {_index_pattern(module) for module in params}
        uncovered = [name for name in layers if name not in params and _index_pattern(name) in covered_patterns]
        if uncovered:
            logger.warning(
                f"The LoRA covers only some of the transformer's blocks: {_summarize(uncovered)} get no LoRA weights "
                "while the same layers in other blocks do. It may come from a model with fewer blocks; it is loaded "
                "as a partial LoRA."
            )


def _check_adapter_weights(adapter_weights, components: list[str]) -> None:
    """Raise a ValueError unless `adapter_weights` is None, a finite number, `{component: number}` or a list of them."""

    def check(weight) -> None:
        if weight is None or _is_finite_number(weight):
            return
        if isinstance(weight, dict):
            unknown = sorted(str(key) for key in weight if key not in components)
            if unknown:
                raise ValueError(
                    f"`adapter_weights` has the components {unknown}; the LoRA components are {components}."
                )
            for value in weight.values():
                if value is not None and not _is_finite_number(value):
                    raise ValueError(f"`adapter_weights` values must be finite numbers or None, got {value!r}.")
            return
        raise ValueError(
            f"`adapter_weights` entries must be finite numbers, None, or {{'transformer': number}}, got {weight!r}."
        )

    for weight in adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights]:
        check(weight)


def _is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


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


def _natural(name: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def _index_pattern(name: str) -> str:
    return re.sub(r"(?<![^.])\d+(?![^.])", "*", name)


def _summarize(names, limit: int = 8) -> str:
    """Module names grouped by their pattern, e.g. `blocks.{0-2}.attention.qkv`, at most `limit` groups."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=_natural):
        groups.setdefault(_index_pattern(name), []).append(name)
    items = []
    for pattern, members in groups.items():
        indices = [re.findall(r"(?<![^.])\d+(?![^.])", member) for member in members]
        if len(members) > 1 and all(len(index) == 1 for index in indices):
            numbers_ = sorted(int(index[0]) for index in indices)
            contiguous = numbers_ == list(range(numbers_[0], numbers_[-1] + 1))
            span = f"{numbers_[0]}-{numbers_[-1]}" if contiguous else ",".join(map(str, numbers_))
            items.append(pattern.replace("*", "{" + span + "}", 1))
        else:
            items.extend(members if len(members) <= 2 else [f"{pattern} ({len(members)} modules)"])
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
