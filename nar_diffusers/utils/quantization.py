"""Quantized weights through diffusers' own configs: short names for torchao's configs, and what is quantized.

diffusers >= 0.36 takes a torchao config object (`TorchAoConfig(Int8WeightOnlyConfig())`), no longer the short
strings ("int8wo", ...) older releases took; `torchao_config("int8wo")` builds that object from the short name, and
`pipeline_quantization_config("int8wo")` the `PipelineQuantizationConfig` that quantizes a pipeline's transformer.
Both are plain diffusers configs: pass them as `quantization_config=` to `from_pretrained`, with a `dtype` (without
one, diffusers loads a torchao-quantized model's other layers in bfloat16).

What runs where (torchao 0.18, torch 2.13):

- "int8wo" (int8 weights, float activations) and "int8dq" (int8 weights, activations quantized per token on the
  fly) run on CPU and CUDA.
- "int4wo" (int4 weights in groups of `group_size`, torchao's tinygemm layout) runs on CUDA only, with bfloat16
  weights: load with `dtype=torch.bfloat16, device_map="cuda"`. Without CUDA `torchao_config("int4wo")` raises.
  torchao leaves a layer whose input size is not a multiple of `group_size` unquantized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

TORCHAO_QUANT_TYPES: dict[str, str] = {
    "int8wo": "Int8WeightOnlyConfig",
    "int8dq": "Int8DynamicActivationInt8WeightConfig",
    "int4wo": "Int4WeightOnlyConfig",
}
"""The short names `torchao_config` accepts -> the torchao config class each stands for."""

INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)


def _torchao_quantization():
    try:
        import torchao.quantization
    except ImportError:
        raise ImportError(
            "Quantizing with torchao needs the torchao package: `pip install nar-diffusers[quantization]` "
            "(or `pip install torchao`)."
        ) from None
    return torchao.quantization


def torchao_quant_type(quant_type: str, group_size: int = 128):
    """The torchao config object (an `AOBaseConfig`) a short name stands for (see `TORCHAO_QUANT_TYPES`);
    `group_size` is used by "int4wo" only."""
    if quant_type not in TORCHAO_QUANT_TYPES:
        raise ValueError(f"`quant_type` must be one of {list(TORCHAO_QUANT_TYPES)}, got {quant_type!r}.")
    if quant_type == "int4wo" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"`group_size` must be one of {list(INT4_GROUP_SIZES)} for int4wo, got {group_size!r}.")
    if quant_type == "int4wo" and not torch.cuda.is_available():
        raise ValueError(
            "`quant_type` 'int4wo' needs a CUDA device (torchao has no CPU kernel for int4 weight-only "
            "quantization here); on CPU use 'int8wo' or 'int8dq'."
        )
    quantization = _torchao_quantization()
    config_class = getattr(quantization, TORCHAO_QUANT_TYPES[quant_type])
    if quant_type == "int4wo":
        # tinygemm's layout (what diffusers' "int4wo" meant); torchao's default "plain" layout needs the extra
        # `mslk` kernels package.
        return config_class(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    return config_class()


def torchao_config(quant_type: str, modules_to_not_convert: Sequence[str] | None = None, group_size: int = 128):
    """diffusers' `TorchAoConfig` for a short name ("int8wo", "int8dq", "int4wo"), e.g.
    `NARTransformer.from_pretrained(folder, quantization_config=torchao_config("int8wo"), dtype=torch.float32)`.

    Args:
        quant_type: one of `TORCHAO_QUANT_TYPES`.
        modules_to_not_convert: module names (prefixes) to keep in full precision, e.g. `["decoding_heads"]`.
        group_size: the int4 group size (int4wo only): 32, 64, 128 or 256.
    """
    from diffusers import TorchAoConfig

    not_converted = None if modules_to_not_convert is None else list(modules_to_not_convert)
    return TorchAoConfig(torchao_quant_type(quant_type, group_size), modules_to_not_convert=not_converted)


def pipeline_quantization_config(
    quant_type: str,
    components_to_quantize: Sequence[str] = ("transformer",),
    modules_to_not_convert: Sequence[str] | None = None,
    group_size: int = 128,
):
    """diffusers' `PipelineQuantizationConfig` quantizing the named components (the transformer by default) with
    torchao, for `NARPipeline.from_pretrained(folder, quantization_config=...)` (or `NARVideoPipeline`)."""
    from diffusers import PipelineQuantizationConfig

    components = [components_to_quantize] if isinstance(components_to_quantize, str) else list(components_to_quantize)
    if not components or not all(isinstance(name, str) and name for name in components):
        raise ValueError(f"`components_to_quantize` must name at least one component, got {components_to_quantize!r}.")
    config = torchao_config(quant_type, modules_to_not_convert, group_size)
    return PipelineQuantizationConfig(quant_mapping={name: config for name in components})


def quantized_linear_layers(model: nn.Module) -> dict[str, str]:
    """`{module name: what holds its weight}` of every linear layer that is quantized: a torchao tensor subclass as
    weight (e.g. "Int8Tensor"), or a bitsandbytes layer in place of the linear layer (e.g. "Linear8bitLt")."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if type(module).__module__.startswith("bitsandbytes"):
            found[name] = type(module).__name__
        elif type(weight) not in (nn.Parameter, torch.Tensor):
            found[name] = type(weight).__name__
    return found



def _tensor_bytes(tensor: torch.Tensor) -> int:
    if type(tensor) in (nn.Parameter, torch.Tensor) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()  # a quantized tensor: what it stores (int8 data, scales), not what it reports
    return sum(_tensor_bytes(getattr(tensor, name)) for name in names)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the parameters and buffers of `model` hold, a quantized weight counted by what it stores (its int8
    data and scales; `numel() * element_size()` reports the float32 it stands for)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(_tensor_bytes(t) for t in tensors.values())
