"""`callback_on_step_end`, checked once per call and run after every step of the decode loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from .condition import is_integer_array

CALLBACK_TENSOR_INPUTS = ("tokens",)


@dataclass(frozen=True)
class StepCallback:
    """A checked `callback_on_step_end` and the tensors it asks for (`StepCallback.checked`)."""

    function: Callable
    tensor_inputs: tuple[str, ...]

    @classmethod
    def checked(cls, callback: Any, tensor_inputs: list[str] | None) -> StepCallback | None:
        """None without a callback; a ValueError names the argument when it is not callable or asks for unknown
        tensors. diffusers' `PipelineCallback` / `MultiPipelineCallbacks` bring their own tensor inputs."""
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        if callback is not None and not callable(callback):
            raise ValueError(
                "`callback_on_step_end` must be None or a callable `f(pipe, step, timestep, callback_kwargs)` "
                f"returning a dict, got {type(callback).__name__}."
            )
        unknown = [k for k in tensor_inputs or [] if k not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be in {list(CALLBACK_TENSOR_INPUTS)}, got {unknown}."
            )
        return None if callback is None else cls(callback, tuple(tensor_inputs or ()))

    def __call__(self, pipe, step_index: int, timestep, tokens: torch.LongTensor, vocab_size: int):
        """Run the callback on this step's grid; return the grid it hands back (checked), or None."""
        step_tensors = {"tokens": tokens}
        outputs = self.function(pipe, step_index, timestep, {k: step_tensors[k] for k in self.tensor_inputs})
        if not isinstance(outputs, dict):
            raise TypeError(
                "`callback_on_step_end` must return a dict (`{}`, or `{\"tokens\": grid}` to replace the "
                f"grid), got {type(outputs).__name__}."
            )
        if "tokens" not in outputs:
            return None
        return check_callback_tokens(outputs.pop("tokens"), tokens, step_index, vocab_size)


def check_callback_tokens(
    new_tokens: Any, tokens: torch.LongTensor, step_index: int, vocab_size: int
) -> torch.LongTensor:
    """Validate a grid returned by `callback_on_step_end` at `step_index`; return it as a long tensor."""
    where = f"`callback_on_step_end` returned `tokens` at step {step_index}"
    if not isinstance(new_tokens, torch.Tensor):
        raise TypeError(f"{where} as {type(new_tokens).__name__}; it must be a torch.Tensor.")
    if not is_integer_array(new_tokens):
        raise TypeError(
            f"{where} of dtype {new_tokens.dtype}; it must be an integer tensor (token ids, -1 = not generated)."
        )
    if new_tokens.shape != tokens.shape:
        raise ValueError(f"{where} of shape {tuple(new_tokens.shape)}; it must keep the grid's shape {tuple(tokens.shape)}.")
    new_tokens = new_tokens.to(device=tokens.device, dtype=torch.long)
    # `tokens` is the pipeline's own grid: every cell generated so far holds an id >= 0 there.
    out_of_range = (new_tokens < -1) | (new_tokens >= vocab_size) | ((new_tokens < 0) & (tokens >= 0))
    if bool(out_of_range.any()):
        raise ValueError(
            f"{where} with ids outside the allowed range: every cell must be in [-1, {vocab_size - 1}], and the "
            f"cells generated so far (steps 0-{step_index}) in [0, {vocab_size - 1}]; -1 marks cells not "
            "generated yet."
        )
    return new_tokens
