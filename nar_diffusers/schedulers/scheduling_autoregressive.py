"""The machinery shared by every token order: groups, parents, logit mixing, training mask, token draws.

A scheduler here describes HOW a token grid is generated autoregressively: the grid is split into groups
that are generated one forward pass each, in a fixed order. The tokens of one group are fed to the model
at the next step, and each decoding head's output at a fed token predicts one neighbouring token (its
"child"). Subclasses only say which group a grid cell belongs to and which cell is each head's parent of
a target; everything else (the generation order, the per-step parent lookup, mixing head logits, the
block-causal training mask) is derived here once per grid, so training and inference cannot disagree.

Vocabulary used throughout:
- *raster index*: position of a cell in the row-major flattened grid.
- *generation order*: cells sorted by group, then raster index. The model keeps its visual sequence in
  this order, so every group is a contiguous slice.
- *source*: a model output that can feed a prediction. Source 0 is the last condition position; source
  `1 + i` is the i-th token of the generation order (only tokens outside the last group are ever fed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .sampling import sample_tokens, validate_sampling_args


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


@dataclass
class StaticDecodeTables:
    """Index tables that give every decode step of one generation the same shapes (built by
    `AutoregressiveScheduler.static_decode_tables`).

    Step `s` (1 <= s < num_steps) feeds group `s - 1` and draws group `s`; row 0 (the prefill) is unused. Every
    group is padded to the largest one, `group_size` (G), and every head's positions to `num_head_positions` (M).
    Padded fed tokens read the origin's token and write into spare cache slots `num_fed_tokens + j`, which no
    query ever sees; padded targets write into dummy cells `num_tokens + j` that are dropped (every index of a
    step is distinct, so scattered writes are deterministic).

    Args:
        group_size: G, the largest group.
        num_head_positions: M, the most positions a head is evaluated at in one step.
        fed_positions: `(steps, G)` generation positions of the tokens fed at each step (padding: 0).
        write_positions: `(steps, G)` visual cache positions written at each step (padding: spare slots).
        fed_end: `(steps,)` number of visual tokens in the cache once the step has written: keys at or beyond it
            are invalid.
        target_positions: `(steps, G)` generation positions drawn at each step (padding: dummies `num_tokens + j`).
        target_valid: `(steps, G)` whether a target is real.
        head_positions: `(steps, num_heads, M)` per head, the fed-token indices whose output it is evaluated at.
        head_index: `(steps, num_heads, G)` per target and head, the index of its parent in `head_positions`.
        parent_mask: `(steps, num_heads, G)` whether that parent exists (False for padding).
        parent_count: `(steps, G)` number of parents of each target (1 for padding).
    """

    group_size: int
    num_head_positions: int
    fed_positions: torch.LongTensor
    write_positions: torch.LongTensor
    fed_end: torch.LongTensor
    target_positions: torch.LongTensor
    target_valid: torch.BoolTensor
    head_positions: torch.LongTensor
    head_index: torch.LongTensor
    parent_mask: torch.BoolTensor
    parent_count: torch.LongTensor


def validate_grid(grid: tuple[int, ...] | list[int], name: str = "grid_size") -> tuple[int, ...]:
    """Return `grid` as a tuple of positive ints of rank 1-3, or raise a ValueError naming `name`."""
    if isinstance(grid, int) or not hasattr(grid, "__len__"):
        raise ValueError(f"`{name}` must be a tuple of 1 to 3 positive ints such as (16, 16), got {grid!r}.")
    grid = tuple(grid)
    if not 1 <= len(grid) <= 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in grid):
        raise ValueError(f"`{name}` must be a tuple of 1 to 3 positive ints such as (16, 16), got {grid!r}.")
    return grid


class AutoregressiveScheduler(SchedulerMixin, ConfigMixin):
    """Base class of the token-order schedulers. Subclasses implement `_group_of` and `_parents_of`.

    After `set_grid`, the scheduler exposes (all tensors on the requested device):

    - `timesteps`: `arange(len(self))`, one per forward pass (the prefill is step 0).
    - `generation_order` / `inverse_generation_order`: generation position -> raster index and back.
    - `coordinates`: `(num_tokens, ndim)` grid coordinates in generation order.
    - `group_offsets`: Python list, group `s` is generation positions `group_offsets[s]:group_offsets[s+1]`.
    - `parent_sources`, `parent_mask`: `(num_heads, num_tokens)`, per target and head the source index of
      its parent and whether that parent exists.

    For inference, `head_positions(step)` says where each head must be evaluated at a step (only the fed tokens
    that are a parent of a target: no logits are computed that no target reads), `mix_selected_head_logits`
    mixes such logits, and `static_decode_tables()` lays the same plan out with one shape for every step.
    """

    _compatibles = ["NeighborScheduler", "RasterScheduler"]
    order = 1

    def __init__(self, grid_size: tuple[int, ...]):
        self.grid_size = validate_grid(grid_size)
        self.set_grid()

    # --- what a subclass defines -------------------------------------------------------------------

    @property
    def num_heads(self) -> int:
        """Number of decoding heads a model needs to be driven by this scheduler."""
        raise NotImplementedError

    def _group_of(self, coordinates: torch.LongTensor) -> torch.LongTensor:
        """Group index of every cell, given `(num_tokens, ndim)` raster-ordered coordinates."""
        raise NotImplementedError

    def _parents_of(self, coordinates: torch.LongTensor, shape: tuple[int, ...]) -> torch.LongTensor:
        """`(num_heads, num_tokens)` raster index of each target's parent per head, -1 where there is none.

        Targets of the first group are not looked up here: they are always predicted from the condition.
        """
        raise NotImplementedError

    # --- derived layout ----------------------------------------------------------------------------

    def set_grid(self, shape: tuple[int, ...] | None = None, device: str | torch.device | None = None) -> None:
        """Prepare the order for the grid actually generated (default: the configured `grid_size`)."""
        shape = self.grid_size if shape is None else validate_grid(shape, name="shape")
        if len(shape) != len(self.grid_size):
            raise ValueError(
                f"`shape` {shape} must have the same rank as the scheduler's grid_size {self.grid_size}."
            )
        self.grid_shape = shape
        self.num_tokens = math.prod(shape)

        coords = torch.cartesian_prod(*[torch.arange(d) for d in shape]).view(self.num_tokens, len(shape))
        groups = self._group_of(coords)
        self.generation_order = torch.sort(groups * self.num_tokens + torch.arange(self.num_tokens)).indices
        self.inverse_generation_order = torch.argsort(self.generation_order)
        group_sizes = torch.bincount(groups).tolist()
        if group_sizes[0] != 1:
            raise ValueError("The first group of a token order must be the single origin token.")
        self.group_offsets = [0] + torch.tensor(group_sizes).cumsum(0).tolist()
        self.num_fed_tokens = self.group_offsets[-2]
        self.coordinates = coords[self.generation_order]
        self.group_ids = groups[self.generation_order]
        self.timesteps = torch.arange(len(group_sizes))

        # Parent lookup, in generation order: raster parent -> generation position -> source index.
        parents = self._parents_of(coords, shape)[:, self.generation_order]
        self.parent_mask = parents >= 0
        self.parent_sources = torch.where(self.parent_mask, 1 + self.inverse_generation_order[parents.clamp(min=0)], 0)
        self.parent_sources[:, 0] = 0
        self.parent_mask[:, 0] = True
        self.parent_count = self.parent_mask.sum(0)
        # Index of each parent among the tokens fed at the target's own step (step s feeds group s - 1).
        first_source_of_group = torch.tensor([0] + [1 + off for off in self.group_offsets[:-2]])
        self.parent_local = (self.parent_sources - first_source_of_group[self.group_ids]) * self.parent_mask
        self._check_parents_are_in_previous_group()
        self._plan_heads()
        self._mask_cache: dict = {}
        self._static_tables: StaticDecodeTables | None = None
        if device is not None:
            self.to(device)

    def _plan_heads(self) -> None:
        """Where each head is evaluated at each step: once per (target, head) pair with a parent.

        `head_index[k, t]` is the index of target `t`'s head-`k` parent among the positions head `k` is evaluated
        at during `t`'s step; `_head_position_table[s, k, :M_s]` are those positions (fed-token indices).
        """
        num_heads, num_steps = self.parent_mask.shape[0], len(self.group_offsets) - 1
        offsets = torch.tensor(self.group_offsets)
        counts = torch.cat([torch.zeros(num_heads, 1, dtype=torch.long), self.parent_mask.long().cumsum(1)], dim=1)
        before = counts[:, offsets[:-1]]  # (heads, steps): pairs of earlier steps
        self.head_index = torch.where(self.parent_mask, counts[:, 1:] - 1 - before[:, self.group_ids], 0)
        per_head = counts[:, offsets[1:]] - before  # (heads, steps)
        self._num_head_positions = per_head.max(0).values.tolist()
        table = torch.zeros(num_steps, num_heads, max(self._num_head_positions), dtype=torch.long)
        heads, targets = self.parent_mask.nonzero(as_tuple=True)
        table[self.group_ids[targets], heads, self.head_index[heads, targets]] = self.parent_local[heads, targets]
        self._head_position_table = table
        # Steps where every head reads every fed token in order need no selection at all (`head_positions` None).
        fed_sizes = [1] + [self.group_offsets[s] - self.group_offsets[s - 1] for s in range(1, num_steps)]
        in_order = (table == torch.arange(table.shape[2])) | (torch.arange(table.shape[2]) >= per_head.T[:, :, None])
        self._reads_all_fed = [
            bool(ok) and m == n for ok, m, n in zip(in_order.flatten(1).all(1), self._num_head_positions, fed_sizes)
        ]

    def _check_parents_are_in_previous_group(self) -> None:
        fed_groups = torch.cat([torch.tensor([-1]), self.group_ids[: self.num_fed_tokens]])
        parent_groups = fed_groups[self.parent_sources]
        ok = (parent_groups == self.group_ids - 1) | ~self.parent_mask
        if not bool(ok.all()) or bool((self.parent_count == 0).any()):
            raise RuntimeError(f"{type(self).__name__} produced a parent outside the previous group.")

    def to(self, device: str | torch.device) -> "AutoregressiveScheduler":
        """Move the order tensors to `device` (`timesteps` stay on the CPU: reading them must not sync)."""
        for name in (
            "generation_order", "inverse_generation_order", "coordinates", "group_ids",
            "parent_mask", "parent_sources", "parent_count", "parent_local", "head_index", "_head_position_table",
        ):
            setattr(self, name, getattr(self, name).to(device))
        self._mask_cache = {}
        self._static_tables = None
        return self

    @property
    def compatibles(self) -> list:
        """The scheduler classes that load this one's config: the token orders of nar-diffusers (a pipeline still
        checks that the order drives its transformer's heads)."""
        import nar_diffusers

        return [getattr(nar_diffusers, name) for name in self._compatibles]

    def __len__(self) -> int:
        """Number of forward passes needed to generate the current grid (the prefill included)."""
        return len(self.group_offsets) - 1

    def group_slice(self, step_index: int) -> slice:
        """Generation positions of the tokens drawn at `step_index`."""
        return slice(self.group_offsets[step_index], self.group_offsets[step_index + 1])

    def generated_before(self, step_index: int) -> int:
        """How many tokens exist before `step_index` runs."""
        return self.group_offsets[step_index]

    # --- inference ---------------------------------------------------------------------------------

    def tokens_to_feed(self, sample: torch.LongTensor, step_index: int) -> torch.LongTensor:
        """The tokens the model reads at `step_index` (those drawn at the step before), `(batch, n)`."""
        if step_index < 1:
            raise ValueError("Step 0 is the prefill: it reads the condition, not tokens.")
        positions = self.generation_order[self.group_slice(step_index - 1)]
        return sample.reshape(sample.shape[0], -1)[:, positions]

    def mix_head_logits(self, head_logits: torch.Tensor, step_index: int | None = None) -> torch.Tensor:
        """Combine per-head logits into the logits of the targets: the mean over each target's parents.

        Args:
            head_logits: `(batch, num_heads, num_sources, vocab)` head outputs. With `step_index`, the
                sources are the tokens fed at that step (or the last condition position at step 0);
                without it, all `1 + num_fed_tokens` sources of a teacher-forced sequence.
            step_index: the step whose targets to produce; `None` produces every target of the grid.

        Returns:
            `(batch, num_targets, vocab)` logits, targets in generation order.
        """
        if head_logits.shape[1] != self.num_heads:
            raise ValueError(f"Expected logits of {self.num_heads} heads, got {head_logits.shape[1]}.")
        if step_index is None:
            index, mask, count = self.parent_sources, self.parent_mask, self.parent_count
        else:
            targets = self.group_slice(step_index)
            index, mask = self.parent_local[:, targets], self.parent_mask[:, targets]
            count = self.parent_count[targets]
        return _mix(head_logits, index, mask, count)

    def head_positions(self, step_index: int) -> torch.LongTensor | None:
        """`(num_heads, m)` indices of the fed tokens each head must be evaluated at in step `step_index` (only the
        parents of this step's targets, padded with 0 where a head needs fewer), or None when every head needs
        every fed token in order. Pass it to `NARTransformer.decode(..., head_positions=...)` and mix the result
        with `mix_selected_head_logits`."""
        if self._reads_all_fed[step_index]:
            return None
        return self._head_position_table[step_index, :, : self._num_head_positions[step_index]]

    def mix_selected_head_logits(self, head_logits: torch.Tensor, step_index: int) -> torch.Tensor:
        """`mix_head_logits` for head logits evaluated at `head_positions(step_index)`.

        Args:
            head_logits: `(batch, num_heads, m, vocab)`: head `k`'s logits at the fed tokens
                `head_positions(step_index)[k]` (all fed tokens when that is None).

        Returns:
            `(batch, group_size, vocab)` logits of the step's targets, in generation order.
        """
        if head_logits.shape[1] != self.num_heads:
            raise ValueError(f"Expected logits of {self.num_heads} heads, got {head_logits.shape[1]}.")
        targets = self.group_slice(step_index)
        return _mix(head_logits, self.head_index[:, targets], self.parent_mask[:, targets], self.parent_count[targets])

    def static_decode_tables(self) -> StaticDecodeTables:
        """The per-step plan of the current grid padded to one shape for every step (see `StaticDecodeTables`),
        on the scheduler's device; built once per `set_grid`."""
        if self._static_tables is not None:
            return self._static_tables
        device = self.generation_order.device
        num_steps, num_heads = len(self), self.num_heads
        sizes = [self.group_offsets[s + 1] - self.group_offsets[s] for s in range(num_steps)]
        group_size, num_positions = max(sizes), max(self._num_head_positions)
        slots = torch.arange(group_size)
        fed_positions = torch.zeros(num_steps, group_size, dtype=torch.long)
        write_positions = self.num_fed_tokens + slots.repeat(num_steps, 1)
        target_positions = self.num_tokens + slots.repeat(num_steps, 1)
        for step in range(num_steps):
            target_positions[step, : sizes[step]] = torch.arange(self.group_offsets[step], self.group_offsets[step + 1])
            if step > 0:
                fed = torch.arange(self.group_offsets[step - 1], self.group_offsets[step])
                fed_positions[step, : len(fed)] = fed
                write_positions[step, : len(fed)] = fed
        target_valid = target_positions < self.num_tokens
        # Per (step, head, padded target): gathered from the per-target tables through dummy last columns.
        def padded(table: torch.Tensor, fill) -> torch.Tensor:
            table = torch.cat([table.cpu(), torch.full((num_heads, group_size), fill, dtype=table.dtype)], dim=1)
            return table[:, target_positions].transpose(0, 1).contiguous()

        count = torch.cat([self.parent_count.cpu(), torch.ones(group_size, dtype=self.parent_count.dtype)])
        self._static_tables = StaticDecodeTables(
            group_size=group_size,
            num_head_positions=num_positions,
            fed_positions=fed_positions.to(device),
            write_positions=write_positions.to(device),
            fed_end=torch.tensor(self.group_offsets[:-1], device=device),
            target_positions=target_positions.to(device),
            target_valid=target_valid.to(device),
            head_positions=self._head_position_table[:, :, :num_positions].to(device),
            head_index=padded(self.head_index, 0).to(device),
            parent_mask=padded(self.parent_mask, False).to(device),
            parent_count=count[target_positions].to(device),
        )
        return self._static_tables

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

        Args:
            logits: `(batch, group_size, vocab)` logits of this step's targets, as `mix_head_logits` orders them.
            timestep: the step index (an entry of `self.timesteps`).
            sample: `(batch, *grid)` token grid in raster layout; not modified.
            uniforms: `(batch, group_size)` numbers in [0, 1), one per drawn token (see `draw_uniforms`: the
                pipelines draw a whole generation's up front and pass each step its slice). Without them they are
                drawn here from `generator`.
            known_tokens: `(batch, group_size)` token ids of this step's targets that are known in advance (generation
                from a partial grid), -1 where a token is to be drawn: a known id replaces the draw, so it is written
                into the grid and fed to the model next step (see `keep_known_tokens`).

        Returns:
            `prev_sample`: a new grid, `sample` with this step's tokens written in (so a grid kept from an earlier
            step still shows -1 where later steps write); `group_tokens`: the drawn tokens.
        """
        step_index = int(timestep)
        validate_sampling_args(temperature, top_k, top_p)
        tokens = sample_tokens(logits, temperature, top_k, top_p, do_sample, generator, uniforms)
        tokens = keep_known_tokens(tokens, known_tokens)
        positions = self.generation_order[self.group_slice(step_index)]
        sample = sample.clone()
        sample.view(sample.shape[0], -1)[:, positions] = tokens.to(sample.dtype)
        if not return_dict:
            return (sample, tokens)
        return AutoregressiveSchedulerOutput(prev_sample=sample, group_tokens=tokens)

    # --- training ----------------------------------------------------------------------------------

    def training_attention_mask(
        self, num_condition_tokens: int, condition_mask: torch.Tensor | None = None
    ) -> torch.BoolTensor:
        """Boolean mask (True = may attend) for a teacher-forced sequence `[condition, fed tokens]`.

        Condition tokens are causal among themselves; a fed token sees every condition token and every fed
        token of its own or an earlier group (the proximity mask, block-causal in generation order). With
        `condition_mask` (`(batch, num_condition_tokens)`, True = valid), no query sees a padded condition
        key except the padded position itself. Shape `(1 or batch, 1, L, L)`.
        """
        key = (num_condition_tokens, self.generation_order.device)
        if key not in self._mask_cache:
            fed_groups = self.group_ids[: self.num_fed_tokens]
            length = num_condition_tokens + self.num_fed_tokens
            mask = torch.zeros(length, length, dtype=torch.bool, device=self.generation_order.device)
            cond = slice(0, num_condition_tokens)
            fed = slice(num_condition_tokens, length)
            mask[cond, cond] = torch.ones(num_condition_tokens, num_condition_tokens, dtype=torch.bool).tril()
            mask[fed, cond] = True
            mask[fed, fed] = fed_groups[None, :] <= fed_groups[:, None]
            self._mask_cache[key] = mask[None, None]
        mask = self._mask_cache[key]
        if condition_mask is None:
            return mask
        return apply_condition_padding(mask, condition_mask)


def keep_known_tokens(drawn: torch.LongTensor, known: torch.LongTensor | None) -> torch.LongTensor:
    """The tokens of a step once its known cells are applied: `known` where it is >= 0, the drawn token elsewhere.

    Generation from a partial grid (inpainting, outpainting, video continuation) is this one rule, applied after every
    draw and before the tokens are fed back, by the eager loop (`step`) and the static decode path alike: the order of
    the steps and the KV cache stay as they are, a known cell only decides which token is written and fed. `drawn`
    and `known` have the same shape; `known` None keeps every draw. No host sync.
    """
    if known is None:
        return drawn
    return torch.where(known >= 0, known.to(drawn.dtype), drawn)


def _mix(head_logits: torch.Tensor, index: torch.LongTensor, mask: torch.BoolTensor, count: torch.Tensor) -> torch.Tensor:
    """Mean over heads of `head_logits[:, k, index[k, t]]` where `mask[k, t]`: `(batch, targets, vocab)`."""
    batch, heads, _, vocab = head_logits.shape
    gathered = head_logits.gather(2, index[None, :, :, None].expand(batch, heads, -1, vocab))
    summed = torch.where(mask[None, :, :, None], gathered, 0).sum(dim=1)
    return summed / count[None, :, None].to(summed.dtype)


def mix_static_head_logits(
    head_logits: torch.Tensor, head_index: torch.LongTensor, parent_mask: torch.BoolTensor, parent_count: torch.Tensor
) -> torch.Tensor:
    """`mix_selected_head_logits` for the static decode path: `head_logits` `(batch, num_heads, M, vocab)` at one
    step's `StaticDecodeTables.head_positions`, and that step's rows of `head_index`, `parent_mask` and
    `parent_count`; returns `(batch, G, vocab)` (padded targets: 0)."""
    return _mix(head_logits, head_index, parent_mask, parent_count)


def apply_condition_padding(mask: torch.BoolTensor, condition_mask: torch.Tensor) -> torch.BoolTensor:
    """Hide padded condition keys from every query of `mask` `(1, 1, Lq, Lk)`, except a position from itself.

    Queries are the last `Lq` positions of a sequence of `Lk` keys whose first `condition_mask.shape[1]`
    positions are the condition (`condition_mask` True = valid).
    """
    batch, num_cond = condition_mask.shape
    q_len, k_len = mask.shape[-2:]
    valid_keys = torch.ones(batch, k_len, dtype=torch.bool, device=mask.device)
    valid_keys[:, :num_cond] = condition_mask.to(device=mask.device, dtype=torch.bool)
    query_positions = torch.arange(k_len - q_len, k_len, device=mask.device)
    is_self = query_positions[:, None] == torch.arange(k_len, device=mask.device)[None, :]
    return mask & (valid_keys[:, None, None, :] | is_self[None, None])
