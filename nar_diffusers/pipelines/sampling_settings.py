"""The sampling settings of a generation as one value object, checked once at the public boundary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..schedulers.sampling import draw_uniforms, is_int, is_real, validate_sampling_args

__all__ = ["SamplingSettings"]


@dataclass(frozen=True)
class SamplingSettings:
    """How the tokens of one generation are drawn (`SamplingSettings.checked` validates; inside, taken as valid).

    Args:
        guidance_scale: classifier-free guidance scale; > 1 enables guidance.
        cfg_interval: -1 guides every step; otherwise steps starting with more tokens than this are unguided.
        temperature, top_k, top_p, do_sample: the token draw (`do_sample=False` is greedy).
        generator: None, one `torch.Generator`, or one per output.
    """

    guidance_scale: float = 4.0
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    generator: torch.Generator | list[torch.Generator] | None = None

    @classmethod
    def checked(
        cls, num_outputs: int, unit: str, guidance_scale: Any, cfg_interval: Any, temperature: Any, top_k: Any,
        top_p: Any, do_sample: Any = True, generator: Any = None,
    ) -> SamplingSettings:
        """Validate the settings of a call generating `num_outputs` `unit`s ("image", "video"); NumPy numbers are
        accepted like Python ones and stored as Python numbers. A ValueError names the argument."""
        if not is_real(guidance_scale) or guidance_scale < 0:
            raise ValueError(
                f"`guidance_scale` must be a finite number >= 0 (> 1 enables guidance), got {guidance_scale!r}."
            )
        if not is_int(cfg_interval) or cfg_interval < -1:
            raise ValueError(f"`cfg_interval` must be an int >= -1 (-1 = guide every step), got {cfg_interval!r}.")
        validate_sampling_args(temperature, top_k, top_p)
        if isinstance(generator, (list, tuple)):
            if len(generator) != num_outputs or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(
                    f"`generator` is a list of {len(generator)} item(s), but {num_outputs} {unit}s are generated: "
                    f"pass one torch.Generator, or a list of exactly {num_outputs} torch.Generator (one per {unit})."
                )
            generator = list(generator)
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                "`generator` must be None, a torch.Generator (e.g. torch.Generator().manual_seed(0)), or a list "
                f"with one torch.Generator per {unit}, got {type(generator).__name__} {generator!r}."
            )
        return cls(float(guidance_scale), int(cfg_interval), float(temperature), int(top_k), float(top_p),
                   bool(do_sample), generator)  # fmt: skip

    @property
    def guidance(self) -> bool:
        """Whether classifier-free guidance runs (`guidance_scale > 1`)."""
        return self.guidance_scale > 1

    @property
    def draw(self) -> dict[str, Any]:
        """The keyword arguments of a token draw (`sample_tokens`, `scheduler.step`)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "do_sample": self.do_sample}

    def guided_steps(self, order) -> list[bool]:
        """Per step of `order`, whether it is guided (`cfg_interval`: steps starting with more tokens than it are
        not)."""
        return [
            self.guidance and (self.cfg_interval == -1 or order.generated_before(i) <= self.cfg_interval)
            for i in range(len(order))
        ]

    def uniforms(self, batch_size: int, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """All the randomness of a generation up front (`draw_uniforms`), or None for greedy decoding: the draws do
        not depend on how the steps are run, and a per-output generator makes an output independent of the batch."""
        return draw_uniforms(batch_size, num_tokens, self.generator, device) if self.do_sample else None
