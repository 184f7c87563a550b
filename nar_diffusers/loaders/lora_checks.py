"""Checks behind NAR LoRA loading: the adapter config, the fit of the weights to the transformer, adapter weights.

What fits is peft's decision: the adapter is injected into a meta-device copy of the transformer's Linear/Embedding
layers and the keys and shapes peft gives it are compared with the LoRA's. The errors name what does not fit.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from typing import TYPE_CHECKING

import torch
from diffusers.utils import logging

from ..schedulers.sampling import is_real

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.get_logger(__name__)

PEFT_ADAPTER_CONFIG_NAME = "adapter_config.json"

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


def parse_adapter_config(config: dict) -> tuple[dict, LoraConfig]:
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
    if not is_real(alpha):
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


def check_lora_fits(
    transformer: torch.nn.Module, lora_state_dict: dict[str, torch.Tensor], config: LoraConfig | None = None
) -> None:
    """Raise a ValueError unless every LoRA key names a layer of `transformer` with fitting, finite weights.

    peft decides what fits: the adapter is injected into a meta-device copy of the transformer's Linear/Embedding
    layers, and `get_peft_model_state_dict` lists the keys and shapes a fitting LoRA has. With an adapter `config`,
    the modules it targets must be exactly the ones with weights (a LoRA from a model with fewer blocks is refused).
    Without one, a LoRA missing some blocks only gets a warning naming them.
    """
    if not lora_state_dict:
        raise ValueError("The LoRA has no weights for the transformer.")
    unknown_names = [key for key in lora_state_dict if ".lora_" not in key]
    if unknown_names:
        raise ValueError(
            f"Unsupported LoRA parameter names: {summarize_names(unknown_names)}. Expected "
            "`<module>.lora_A.weight` and `<module>.lora_B.weight` (peft's names; also `lora_B.bias`, "
            "`lora_magnitude_vector`, `lora_embedding_A`/`lora_embedding_B`)."
        )
    not_finite = [
        key for key, value in lora_state_dict.items()
        if not torch.is_floating_point(value) or (not value.is_meta and not torch.isfinite(value).all())
    ]  # fmt: skip
    if not_finite:
        raise ValueError(f"The LoRA has non-finite or non-float weights in {summarize_names(not_finite)}.")
    layers = _lora_target_layers(transformer)
    params: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora_state_dict.items():
        module, _, name = key.partition(".lora_")
        name = f"lora_{name}"
        # peft saves a DoRA magnitude as `lora_magnitude_vector`; diffusers' files may add `.weight`.
        params.setdefault(module, {})[name.removesuffix(".weight") if "magnitude" in name else name] = value
    _check_modules_exist(params, layers)
    expected = _fitting_lora_shapes(layers, config if config is not None else _config_from_weights(params))
    _check_targets(params, expected, config)
    misfits = (_misfit(module, tensors, expected.get(module, {})) for module, tensors in params.items())
    errors = [error for error in misfits if error]
    if errors:
        raise ValueError(
            "The LoRA does not fit the transformer's layers (a LoRA for a model of another size?):\n  "
            + "\n  ".join(errors[:12])
            + (f"\n  ... and {len(errors) - 12} more" if len(errors) > 12 else "")
        )
    if config is None:
        _warn_partial_coverage(params, layers)


def _warn_partial_coverage(params: dict[str, dict], layers: dict[str, torch.nn.Module]) -> None:
    """Warn when some blocks get no LoRA weights while the same layers in other blocks do."""
    covered_patterns = {_index_pattern(module) for module in params}
    uncovered = [name for name in layers if name not in params and _index_pattern(name) in covered_patterns]
    if uncovered:
        logger.warning(
            f"The LoRA covers only some of the transformer's blocks: {summarize_names(uncovered)} get no LoRA "
            "weights while the same layers in other blocks do. It may come from a model with fewer blocks; it is "
            "loaded as a partial LoRA."
        )


def _check_modules_exist(params: dict[str, dict], layers: dict[str, torch.nn.Module]) -> None:
    unmatched = [module for module in params if module not in layers]
    if not unmatched:
        return
    if len(unmatched) == len(params):
        what = "None of the LoRA's modules exists in the transformer (a LoRA for another model?)"
    else:
        what = (
            f"{len(unmatched)} of the LoRA's {len(params)} modules do not exist in the transformer (a LoRA from a "
            "model with more blocks or heads?)"
        )
    raise ValueError(
        f"{what}: {summarize_names(unmatched)}. The transformer's Linear/Embedding layers: {summarize_names(layers)}."
    )


def _config_from_weights(params: dict[str, dict[str, torch.Tensor]]) -> LoraConfig:
    """A `LoraConfig` targeting exactly the modules with weights, each with the rank of its down projection."""
    from peft import LoraConfig

    ranks = {}
    for module, tensors in params.items():
        down = tensors.get("lora_A.weight", tensors.get("lora_embedding_A"))
        ranks[module] = down.shape[0] if down is not None and down.ndim == 2 and down.shape[0] > 0 else 1
    return LoraConfig(
        r=1, target_modules=sorted(params), rank_pattern={f"^{re.escape(m)}": r for m, r in ranks.items()},
        use_dora=any("lora_magnitude_vector" in t for t in params.values()),
        lora_bias=any("lora_B.bias" in t for t in params.values()),
    )  # fmt: skip


def _fitting_lora_shapes(layers: dict[str, torch.nn.Module], config: LoraConfig) -> dict[str, dict[str, tuple]]:
    """`{module: {parameter: shape}}` of a LoRA with `config` on these layers, as peft injects and saves it."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model
    from peft.utils.error import NoMatchingPeftModuleError

    probe = torch.nn.Module()
    with torch.device("meta"):
        for name, layer in layers.items():
            *path, leaf = name.split(".")
            parent = probe
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            if isinstance(layer, torch.nn.Embedding):
                parent.add_module(leaf, torch.nn.Embedding(layer.num_embeddings, layer.embedding_dim))
            else:
                parent.add_module(leaf, torch.nn.Linear(layer.in_features, layer.out_features, layer.bias is not None))
    adapter = "nar_fit_check"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real load reports peft's warnings
            inject_adapter_in_model(copy.deepcopy(config), probe, adapter_name=adapter, low_cpu_mem_usage=True)
            state_dict = get_peft_model_state_dict(probe, adapter_name=adapter)
    except NoMatchingPeftModuleError:
        return {}
    except (TypeError, ValueError) as e:
        raise ValueError(f"The LoRA's adapter config cannot be applied to the transformer's layers: {e}") from e
    shapes: dict[str, dict[str, tuple]] = {}
    for key, value in state_dict.items():
        module, _, name = key.partition(".lora_")
        shapes.setdefault(module, {})[f"lora_{name}"] = tuple(value.shape)
    return shapes


def _check_targets(params: dict[str, dict], expected: dict[str, dict], config: LoraConfig | None) -> None:
    """With an adapter config, the modules it targets (peft's matching) must be the modules with weights."""
    if config is None:
        return
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules or [])
    missing = sorted(set(expected) - set(params), key=_natural)
    extra = sorted(set(params) - set(expected), key=_natural)
    if missing:
        raise ValueError(
            f"The LoRA's adapter config targets `target_modules={targets}`, but it has no weights "
            f"for {summarize_names(missing)}: it was probably trained on a model with fewer blocks or heads."
        )
    if extra:
        raise ValueError(
            f"The LoRA has weights for {summarize_names(extra)}, which its adapter config "
            f"(`target_modules={targets}`) does not target: the weights and the config do not match."
        )


def _misfit(module: str, tensors: dict[str, torch.Tensor], expected: dict[str, tuple]) -> str | None:
    """Why the LoRA weights of `module` do not have the shapes peft expects (`expected`), or None when they do."""
    if "lora_A.weight" in expected:
        down, up = "lora_A.weight", "lora_B.weight"
    else:
        down, up = "lora_embedding_A", "lora_embedding_B"
    if set(tensors) - set(expected) or down not in tensors or up not in tensors:
        kind = "Linear" if down == "lora_A.weight" else "Embedding"
        return f"{module} ({kind}) needs `{down}` and `{up}`, has {sorted(tensors)}"
    a, b = tensors[down], tensors[up]
    fan_in, fan_out, rank = expected[down][1], expected[up][0], expected[down][0]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or b.shape[1] != a.shape[0]:
        return (
            f"{module}: `{down}` {tuple(a.shape)} and `{up}` {tuple(b.shape)} do not fit a {fan_in} -> {fan_out} "
            f"layer (expected (rank, {fan_in}) and ({fan_out}, rank))"
        )
    if a.shape[0] != rank:
        return f"{module}: rank {a.shape[0]} in the weights but r={rank} in the adapter config"
    wrong = [f"`{n}` {tuple(t.shape)} should be {expected[n]}" for n, t in tensors.items() if t.shape != expected[n]]
    return f"{module}: " + ", ".join(wrong) if wrong else None


def check_adapter_weights(adapter_weights, components: list[str]) -> None:
    """Raise a ValueError unless `adapter_weights` is None, a finite number, `{component: number}` or a list of them."""

    def check(weight) -> None:
        if weight is None or is_real(weight):
            return
        if isinstance(weight, dict):
            unknown = sorted(str(key) for key in weight if key not in components)
            if unknown:
                raise ValueError(
                    f"`adapter_weights` has the components {unknown}; the LoRA components are {components}."
                )
            for value in weight.values():
                if value is not None and not is_real(value):
                    raise ValueError(f"`adapter_weights` values must be finite numbers or None, got {value!r}.")
            return
        raise ValueError(
            f"`adapter_weights` entries must be finite numbers, None, or {{'transformer': number}}, got {weight!r}."
        )

    for weight in adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights]:
        check(weight)


def _natural(name: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def _index_pattern(name: str) -> str:
    return re.sub(r"(?<![^.])\d+(?![^.])", "*", name)


def summarize_names(names, limit: int = 8) -> str:
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
