"""The condition of a generation as value objects: checked once at the public boundary, then taken as valid.

`ConditionInputs` is what a call gave (class labels, or prompts / prompt embeddings with their masks and the negative
branch), validated against the transformer; `Condition` is the same encoded for the model: the `prefill` inputs of the
conditional and the unconditional branch, one row per output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ..schedulers.sampling import is_int

TEXT_ARGUMENTS = (
    "prompt", "negative_prompt", "prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
    "negative_prompt_attention_mask",
)  # fmt: skip


@dataclass(frozen=True)
class ConditionInputs:
    """A call's condition, validated (`ConditionInputs.checked`).

    Args:
        class_labels: class models: the labels as a 1-D long tensor (CPU).
        prompt ... negative_prompt_attention_mask: text models, as passed (`encode_prompt`'s layout for embeddings).
        max_sequence_length, truncation: how prompts are tokenized.
        num_per_prompt: outputs per label / prompt.
        num_conditions: how many labels / prompts there are.
    """

    num_per_prompt: int
    num_conditions: int
    class_labels: torch.LongTensor | None = None
    prompt: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    prompt_embeds: torch.Tensor | None = None
    prompt_attention_mask: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_attention_mask: torch.Tensor | None = None
    max_sequence_length: int | None = None
    truncation: bool = True

    @property
    def num_outputs(self) -> int:
        """Images / videos generated: conditions x `num_per_prompt`."""
        return self.num_conditions * self.num_per_prompt

    @classmethod
    def checked(
        cls, transformer, num_per_prompt: Any, num_per_prompt_name: str, class_labels: Any = None,
        max_sequence_length: Any = None, truncation: bool = True, **text: Any,
    ) -> ConditionInputs:
        """Validate a call's condition for `transformer`; a ValueError names the argument and its allowed values.

        `text` holds the `TEXT_ARGUMENTS`; `num_per_prompt_name` names `num_per_prompt` in errors.
        """
        if not is_int(num_per_prompt) or num_per_prompt < 1:
            raise ValueError(f"`{num_per_prompt_name}` must be an int >= 1, got {num_per_prompt!r}.")
        unknown = sorted(set(text) - set(TEXT_ARGUMENTS))
        if unknown:
            raise TypeError(f"Unknown condition arguments {unknown}.")
        if transformer.condition_type == "class":
            given = [name for name in TEXT_ARGUMENTS if text.get(name) is not None]
            if given:
                raise ValueError(f"This is a class-conditional model: {given} are not accepted; pass `class_labels`.")
            labels = check_class_labels(class_labels, transformer.config.num_classes)
            return cls(int(num_per_prompt), labels.numel(), class_labels=labels)
        if class_labels is not None:
            raise ValueError("This is a text-conditional model: pass `prompt` or `prompt_embeds`, not `class_labels`.")
        text = {name: text.get(name) for name in TEXT_ARGUMENTS}
        num_prompts = check_text_inputs(transformer, max_sequence_length, **text)
        max_sequence_length = None if max_sequence_length is None else int(max_sequence_length)
        return cls(int(num_per_prompt), num_prompts, max_sequence_length=max_sequence_length,
                   truncation=bool(truncation), **text)  # fmt: skip

    def text_arguments(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in TEXT_ARGUMENTS}


@dataclass
class Condition:
    """The encoded condition: `prefill` keyword arguments of both branches, `batch_size` rows each (one per output).

    Args:
        cond: the conditional branch (`class_labels`, or `encoder_hidden_states` + `encoder_attention_mask`).
        uncond: the unconditional branch of classifier-free guidance (the null class / caption or the negative one).
        batch_size: rows per branch.
    """

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    batch_size: int

    def prefill_inputs(self, guidance: bool) -> dict[str, torch.Tensor]:
        """The inputs of one prefill: the conditional rows, followed by the unconditional ones with guidance."""
        if not guidance:
            return self.cond
        return {key: torch.cat([self.cond[key], self.uncond[key]]) for key in self.cond}


def check_class_labels(class_labels: Any, num_classes: int) -> torch.LongTensor:
    """Validate `class_labels` for a model of `num_classes` classes; return them as a 1-D long CPU tensor."""
    allowed = f"an int in [0, {num_classes - 1}], a non-empty list of such ints, or a 1-D integer tensor/array"
    if class_labels is None:
        raise ValueError(f"This is a class-conditional model: `class_labels` is required ({allowed}).")
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        if not is_integer_array(class_labels) or class_labels.ndim > 1 or math.prod(class_labels.shape) == 0:
            raise ValueError(
                f"`class_labels` must be {allowed}, got a {type(class_labels).__name__} of {class_labels.dtype} "
                f"with shape {tuple(class_labels.shape)}."
            )
        labels = torch.as_tensor(np.ascontiguousarray(class_labels) if isinstance(class_labels, np.ndarray)
                                 else class_labels.detach().cpu()).reshape(-1).long()  # fmt: skip
    elif is_int(class_labels):
        labels = torch.tensor([int(class_labels)])
    elif isinstance(class_labels, (list, tuple)) and class_labels and all(is_int(c) for c in class_labels):
        labels = torch.tensor([int(c) for c in class_labels])
    else:
        raise ValueError(f"`class_labels` must be {allowed}, got {class_labels!r}.")
    if bool((labels < 0).any() or (labels >= num_classes).any()):
        raise ValueError(f"`class_labels` must be in [0, {num_classes - 1}], got {labels.tolist()}.")
    return labels


def is_integer_array(values: torch.Tensor | np.ndarray) -> bool:
    """Whether a tensor / array holds integers (not bools, floats or complex numbers)."""
    if isinstance(values, np.ndarray):
        return np.issubdtype(values.dtype, np.integer)
    dtype = values.dtype
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_text_inputs(
    transformer, max_sequence_length, prompt, negative_prompt, prompt_embeds, prompt_attention_mask,
    negative_prompt_embeds, negative_prompt_attention_mask,
) -> int:
    """Validate the text condition of a text-conditional model; return the number of prompts."""
    num_cond = transformer.num_condition_tokens
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("A text-conditional model needs exactly one of `prompt` or `prompt_embeds`.")
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if value is not None and not isinstance(value, str) and not (
            isinstance(value, list) and value and all(isinstance(p, str) for p in value)
        ):
            raise ValueError(f"`{name}` must be a string or a non-empty list of strings, got {value!r}.")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
    if negative_prompt is not None and prompt is None:
        raise ValueError("`negative_prompt` needs `prompt`; with `prompt_embeds` pass `negative_prompt_embeds`.")
    expected = (num_cond, transformer.config.caption_dim)
    _check_embeddings("prompt_embeds", prompt_embeds, expected)
    _check_embeddings("negative_prompt_embeds", negative_prompt_embeds, expected)
    _check_attention_mask("prompt_attention_mask", prompt_attention_mask, "prompt_embeds", prompt_embeds)
    _check_attention_mask("negative_prompt_attention_mask", negative_prompt_attention_mask, "negative_prompt_embeds",
                          negative_prompt_embeds)  # fmt: skip
    if prompt is not None:
        batch, batch_name = (1 if isinstance(prompt, str) else len(prompt)), "`prompt`"
    else:
        batch, batch_name = prompt_embeds.shape[0], "`prompt_embeds`"
    if negative_prompt is not None:
        negative_batch = 1 if isinstance(negative_prompt, str) else len(negative_prompt)
        if negative_batch not in (1, batch):
            raise ValueError(
                f"`negative_prompt` has {negative_batch} entries but {batch_name} has {batch}: give one or as many."
            )
    if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != batch:
        raise ValueError(
            f"`negative_prompt_embeds` has batch size {negative_prompt_embeds.shape[0]} but {batch_name} has "
            f"{batch}: they must match."
        )
    if max_sequence_length is not None and (not is_int(max_sequence_length) or not 1 <= max_sequence_length <= num_cond):
        raise ValueError(f"`max_sequence_length` must be an int in [1, {num_cond}], got {max_sequence_length!r}.")
    return batch


def _check_embeddings(name: str, embeds: Any, expected: tuple[int, int]) -> None:
    if embeds is None:
        return
    if not isinstance(embeds, torch.Tensor) or not embeds.dtype.is_floating_point:
        raise ValueError(f"`{name}` must be a floating-point torch.Tensor, got {type(embeds).__name__}.")
    if embeds.dim() != 3 or tuple(embeds.shape[1:]) != expected or embeds.shape[0] == 0:
        raise ValueError(f"`{name}` must have shape (batch >= 1, {expected[0]}, {expected[1]}), got {tuple(embeds.shape)}.")
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"`{name}` contains NaN or inf values; every entry must be finite.")


def _check_attention_mask(name: str, mask: Any, embeds_name: str, embeds: torch.Tensor | None) -> None:
    if mask is None:
        return
    if embeds is None:
        raise ValueError(f"`{name}` goes with `{embeds_name}`; pass both or neither.")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"`{name}` must be a torch.Tensor of shape (batch, num_tokens) = {tuple(embeds.shape[:2])} like "
            f"`{embeds_name}` (True/1 = valid token), got {shape}."
        )
