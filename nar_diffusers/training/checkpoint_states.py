# Copyright 2025 The nar-diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""States saved with every checkpoint beside accelerate's own (the position in the data, an EMA model), through
accelerate's save / load pre-hooks: JSON plus safetensors for their tensors, never pickle (unlike
`accelerator.register_for_checkpointing`, whose `custom_checkpoint_<i>.pkl` would be unpickled on resume)."""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Mapping
from typing import Any

import torch


_STATE_NAME = re.compile(r"[A-Za-z0-9_]+")
_TENSOR_KEY = "__tensor__"


_registered_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_checkpoint_state(accelerator, name: str, obj: Any) -> None:
    """Save and load `obj` with every `accelerator.save_state` / `load_state`, like
    `accelerator.register_for_checkpointing(obj)` but without pickle.

    `obj.state_dict()` must hold JSON values (numbers, strings, bools, lists, dicts), tensors, or lists of tensors;
    it is written as `<name>.json`, its tensors as `<name>.safetensors`. Registering a name again replaces the object.

    Args:
        accelerator: The run's `accelerate.Accelerator`.
        name: File name stem, letters, digits and underscores (e.g. "data_position", "ema").
        obj: Anything with `state_dict()` and `load_state_dict(state)`, e.g. a diffusers `EMAModel`.
    """
    if not _STATE_NAME.fullmatch(name):
        raise ValueError(f"A checkpoint state name must be letters, digits and underscores, got {name!r}.")
    if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
        raise TypeError(f"The checkpoint state {name!r} needs `state_dict()` and `load_state_dict()`; got {type(obj)}.")
    states = _registered_states.get(accelerator)
    if states is None:
        states = _registered_states[accelerator] = {}

        def save_states(models, weights, output_dir: str) -> None:
            if accelerator.is_main_process:
                for state_name, state_obj in states.items():
                    write_state(state_obj.state_dict(), output_dir, state_name)

        def load_states(models, input_dir: str) -> None:
            for state_name, state_obj in states.items():
                state_obj.load_state_dict(read_state(input_dir, state_name, like=state_obj.state_dict()))

        accelerator.register_save_state_pre_hook(save_states)
        accelerator.register_load_state_pre_hook(load_states)
    states[name] = obj


def write_state(state: Mapping[str, Any], folder: str, name: str) -> None:
    """Write a state dict as `<folder>/<name>.json`, its tensors (and lists of tensors) as `<name>.safetensors`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(key: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
            return {_TENSOR_KEY: key}
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return [encode(f"{key}.{index}", v) for index, v in enumerate(value)]
        return value

    document = {str(key): encode(str(key), value) for key, value in state.items()}
    try:
        text = json.dumps(document, indent=2)
    except TypeError as error:
        raise TypeError(
            f"The checkpoint state {name!r} holds a value that is neither JSON nor a tensor ({error}); its "
            "`state_dict()` must return numbers, strings, lists, dicts and tensors."
        ) from error
    if tensors:
        save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
    with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as f:
        f.write(text)


def read_state(folder: str, name: str, like: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a state written by `write_state`; no code runs. Tensors go to the device of the matching tensors in
    `like` (e.g. the object's current state), else stay on the CPU.

    Raises:
        ValueError: `<name>.json` or `<name>.safetensors` is missing or unreadable.
    """
    from safetensors.torch import load_file

    path = os.path.join(folder, f"{name}.json")
    if not os.path.isfile(path):
        raise ValueError(f"The checkpoint {folder} has no {name}.json, so its {name!r} state cannot be resumed.")
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is unreadable ({error}).") from error
    tensors: dict[str, torch.Tensor] = {}
    tensor_path = os.path.join(folder, f"{name}.safetensors")
    if os.path.isfile(tensor_path):
        try:
            tensors = load_file(tensor_path)
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{tensor_path} is unreadable ({error}).") from error
    like = like or {}

    def decode(value: Any, reference: Any) -> Any:
        if isinstance(value, dict) and set(value) == {_TENSOR_KEY}:
            key = value[_TENSOR_KEY]
            if key not in tensors:
                raise ValueError(f"{tensor_path} lacks the tensor {key!r} that {path} refers to.")
            tensor = tensors[key]
            return tensor.to(reference.device) if isinstance(reference, torch.Tensor) else tensor
        if isinstance(value, list) and value and all(isinstance(v, dict) and set(v) == {_TENSOR_KEY} for v in value):
            references = reference if isinstance(reference, (list, tuple)) and len(reference) == len(value) else []
            return [decode(v, references[i] if references else None) for i, v in enumerate(value)]
        return value

    return {key: decode(value, like.get(key)) for key, value in document.items()}
