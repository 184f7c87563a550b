"""The base of the token-order schedulers: a diffusers scheduler over a `TokenOrder`.

A scheduler describes HOW a token grid is generated (its `TokenOrder`: groups, parents, logit mixing, training mask,
static decode tables, all derived in `token_order.py`) and draws the tokens of a step (`step`). A subclass names its
order (`order_kind`); everything else is shared, so training and inference cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .sampling import keep_known_tokens, sample_tokens
from .token_order import (
    StaticDecodeTables,
    TokenOrder,
    apply_condition_padding,
    mix_logits,
    num_heads_for_order,
    validate_grid,
)

__all__ = [
    "AutoregressiveScheduler", "AutoregressiveSchedulerOutput", "StaticDecodeTables", "apply_condition_padding",
    "keep_known_tokens", "mix_static_head_logits", "validate_grid",
]  # fmt: skip

# The order's tables, read through the scheduler as attributes of its own (`scheduler.generation_order`, ...).
_ORDER_ATTRIBUTES = frozenset({
    "generation_order", "inverse_generation_order", "coordinates", "group_offsets", "group_ids", "num_fed_tokens",
    "num_tokens", "parent_sources", "parent_mask", "parent_count", "parent_local", "head_index",
    "head_position_table", "num_head_positions",
})  # fmt: skip


@dataclass
class AutoregressiveSchedulerOutput(BaseOutput):
    """Output of a scheduler step.

    Args:
        prev_sample (`torch.LongTensor` of shape `(batch_size, *grid)`):
            The token grid (raster layout) with the tokens of this step written in.
        group_tokens (`torch.LongTensor` of shape `(batch_size, group_size)`):
            The tokens drawn at this step, in generation order; these are fed to the model next step.
    """

    prev_sample: torch.LongTensor
    group_tokens: torch.LongTensor


class AutoregressiveScheduler(SchedulerMixin, ConfigMixin):
    """Base class of the token-order schedulers; a subclass sets `order_kind` ("neighbor" or "raster").

    After `set_grid`, `self.order` is the grid's `TokenOrder` and its tables read as the scheduler's attributes:
    `generation_order` / `inverse_generation_order`, `coordinates`, `group_offsets`, `parent_sources`,
    `parent_mask`, ... (see `TokenOrder`); `timesteps` is `arange(len(self))`, one per forward pass (the prefill is
    step 0), on the CPU.
    """

    _compatibles = ["NeighborScheduler", "RasterScheduler"]
    order_kind: str = ""
    order = 1  # diffusers' scheduler order (one model call per step); the token order is `self.token_order`

    def __init__(self, grid_size: tuple[int, ...]):
        self.grid_size = validate_grid(grid_size)
        self.set_grid()

    @property
    def num_heads(self) -> int:
        """Number of decoding heads a model needs to be driven by this scheduler."""
        return num_heads_for_order(self.order_kind, len(self.grid_size))

    def set_grid(self, shape: tuple[int, ...] | None = None, device: str | torch.device | None = None) -> None:
        """Prepare the order for the grid actually generated (default: the configured `grid_size`)."""
        shape = self.grid_size if shape is None else validate_grid(shape, name="shape")
        if len(shape) != len(self.grid_size):
            raise ValueError(f"`shape` {shape} must have the same rank as the scheduler's grid_size {self.grid_size}.")
        self.grid_shape = shape
        self.token_order = TokenOrder(shape, self.order_kind, device=device)
        self.timesteps = torch.arange(len(self.token_order))

    def __getattr__(self, name: str):
        if name in _ORDER_ATTRIBUTES and "token_order" in self.__dict__:
            return getattr(self.__dict__["token_order"], name)
        return super().__getattr__(name)

    def to(self, device: str | torch.device) -> AutoregressiveScheduler:
        """Move the order's tables to `device` (`timesteps` stay on the CPU: reading them must not sync)."""
        self.token_order.to(device)
        return self

    @property
    def compatibles(self) -> list:
        """The scheduler classes that load this one's config: the token orders of nar-diffusers (a pipeline still
        checks that the order drives its transformer's heads)."""
        return [cls for cls in AutoregressiveScheduler.__subclasses__() if cls.__name__ in self._compatibles]

    def __len__(self) -> int:
        """Number of forward passes needed to generate the current grid (the prefill included)."""
        return len(self.token_order)

    def group_slice(self, step_index: int) -> slice:
        """Generation positions of the tokens drawn at `step_index`."""
        return self.token_order.group_slice(step_index)

    def generated_before(self, step_index: int) -> int:
        """How many tokens exist before `step_index` runs."""
        return self.token_order.generated_before(step_index)

    def mix_head_logits(self, head_logits: torch.Tensor, step_index: int | None = None) -> torch.Tensor:
        """`TokenOrder.mix_head_logits`: per-head logits -> the targets' logits (the mean over their parents)."""
        return self.token_order.mix_head_logits(head_logits, step_index)

    def head_positions(self, step_index: int) -> torch.LongTensor | None:
        """`TokenOrder.head_positions`: where each head is evaluated at a step (None: every fed token in order).
        Pass it to `NARTransformer.decode(..., head_positions=...)` and mix with `mix_selected_head_logits`."""
        return self.token_order.head_positions(step_index)

    def mix_selected_head_logits(self, head_logits: torch.Tensor, step_index: int) -> torch.Tensor:
        """`mix_head_logits` for head logits evaluated at `head_positions(step_index)`: `(batch, group, vocab)`."""
        return self.token_order.mix_selected_head_logits(head_logits, step_index)

    def static_decode_tables(self) -> StaticDecodeTables:
        """The per-step plan of the current grid padded to one shape for every step (see `StaticDecodeTables`)."""
        return self.token_order.static_decode_tables()

    def training_attention_mask(
        self, num_condition_tokens: int, condition_mask: torch.Tensor | None = None
    ) -> torch.BoolTensor:
        """`TokenOrder.training_attention_mask`: the block-causal proximity mask of a teacher-forced sequence."""
        return self.token_order.training_attention_mask(num_condition_tokens, condition_mask)

    def tokens_to_feed(self, sample: torch.LongTensor, step_index: int) -> torch.LongTensor:
        """The tokens the model reads at `step_index` (those drawn at the step before), `(batch, n)`."""
        return self.token_order.tokens_to_feed(sample, step_index)

    def step(
        self,
        logits: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.LongTensor,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        do_sample: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        uniforms: torch.Tensor | None = None,
        known_tokens: torch.LongTensor | None = None,
    ) -> AutoregressiveSchedulerOutput | tuple:
        """Draw the tokens of step `timestep` from their (mixed, guided) logits and write them into a copy of `sample`.

        The sampling settings are taken as valid (the pipelines check them once, `SamplingSettings`); only the
        shapes are checked here.

        Args:
            logits: `(batch, group_size, vocab)` logits of this step's targets, as `mix_head_logits` orders them.
            timestep: the step index (an entry of `self.timesteps`).
            sample: `(batch, *grid)` token grid in raster layout; not modified.
            uniforms: `(batch, group_size)` numbers in [0, 1), one per drawn token (see `draw_uniforms`: the
                pipelines draw a whole generation's up front and pass each step its slice). Without them they are
                drawn here from `generator`.
            known_tokens: `(batch, group_size)` token ids of this step's targets that are known in advance (generation
                from a partial grid), -1 where a token is to be drawn: a known id replaces the draw.

        Returns:
            `prev_sample`: a new grid, `sample` with this step's tokens written in (so a grid kept from an earlier
            step still shows -1 where later steps write); `group_tokens`: the drawn tokens.
        """
        step_index = int(timestep)
        group = self.group_slice(step_index)
        expected = (sample.shape[0], group.stop - group.start)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != expected:
            raise ValueError(
                f"`logits` of step {step_index} must have shape (batch, group_size, vocab) = {expected} + (vocab,), "
                f"got {tuple(logits.shape)}."
            )
        tokens = sample_tokens(logits, temperature, top_k, top_p, do_sample, generator, uniforms)
        tokens = keep_known_tokens(tokens, known_tokens)
        sample = sample.clone()
        sample.view(sample.shape[0], -1)[:, self.generation_order[group]] = tokens.to(sample.dtype)
        if not return_dict:
            return (sample, tokens)
        return AutoregressiveSchedulerOutput(prev_sample=sample, group_tokens=tokens)


def mix_static_head_logits(
    head_logits: torch.Tensor, head_index: torch.LongTensor, parent_mask: torch.BoolTensor, parent_count: torch.Tensor
) -> torch.Tensor:
    """Deprecated alias (one release) of `token_order.mix_logits`: the parents rule at one step's rows of
    `StaticDecodeTables`."""
    return mix_logits(head_logits, head_index, parent_mask, parent_count)
