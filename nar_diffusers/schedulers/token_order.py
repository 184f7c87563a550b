"""The generation order of a token grid, as tables: the one source read by the model and by the schedulers.

A token order says HOW a grid is generated autoregressively: the grid is split into groups that are generated one
forward pass each, in a fixed order. The tokens of one group are fed to the model at the next step, and each decoding
head's output at a fed token predicts one neighbouring token (its "child"). An order is defined by two rules (which
group a cell belongs to, and which cell is each head's parent of a target); everything else (the generation order,
the per-step parent lookup, mixing head logits, the block-causal training mask, the static decode tables) is derived
here once per grid, so training and inference cannot disagree.

Vocabulary used throughout:
- *raster index*: position of a cell in the row-major flattened grid.
- *generation order*: cells sorted by group, then raster index. The model keeps its visual sequence in
  this order, so every group is a contiguous slice.
- *source*: a model output that can feed a prediction. Source 0 is the last condition position; source
  `1 + i` is the i-th token of the generation order (only tokens outside the last group are ever fed).

This module imports nothing of the package: the model (`NARTransformer.token_order`) and the schedulers both build on
it, and neither depends on the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ORDER_KINDS: tuple[str, ...] = ("neighbor", "raster")
""""neighbor": one Manhattan plane per step, one head per grid axis (NAR); "raster": one token per step, one head."""


def validate_grid(grid: tuple[int, ...] | list[int], name: str = "grid_size") -> tuple[int, ...]:
    """Return `grid` as a tuple of positive ints of rank 1-3, or raise a ValueError naming `name`."""
    if isinstance(grid, int) or not hasattr(grid, "__len__"):
        raise ValueError(f"`{name}` must be a tuple of 1 to 3 positive ints such as (16, 16), got {grid!r}.")
    grid = tuple(grid)
    if not 1 <= len(grid) <= 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in grid):
        raise ValueError(f"`{name}` must be a tuple of 1 to 3 positive ints such as (16, 16), got {grid!r}.")
    return grid


def order_kind_for_heads(num_decoding_heads: int) -> str:
    """"raster" for a one-head transformer (LlamaGen), "neighbor" for one head per grid axis (NAR)."""
    if num_decoding_heads < 1:
        raise ValueError(f"`num_decoding_heads` must be >= 1, got {num_decoding_heads}.")
    return "raster" if num_decoding_heads == 1 else "neighbor"


def num_heads_for_order(kind: str, grid_rank: int) -> int:
    """Decoding heads a model needs to be driven by an order: one per grid axis for "neighbor", one for "raster"."""
    return grid_rank if kind == "neighbor" else 1


# --- the two rules of each order ---------------------------------------------------------------------------------


def _neighbor_groups(coordinates: torch.LongTensor) -> torch.LongTensor:
    return coordinates.sum(dim=1)


def _neighbor_parents(coordinates: torch.LongTensor, shape: tuple[int, ...]) -> torch.LongTensor:
    """Head `k` reads the cell one step back along axis `ndim - 1 - k` (head 0 "right", 1 "down", 2 "back")."""
    ndim = len(shape)
    strides = [math.prod(shape[axis + 1 :]) for axis in range(ndim)]
    raster = torch.arange(coordinates.shape[0])
    parents = []
    for head in range(ndim):
        axis = ndim - 1 - head
        parents.append(torch.where(coordinates[:, axis] > 0, raster - strides[axis], -1))
    return torch.stack(parents)


def _raster_groups(coordinates: torch.LongTensor) -> torch.LongTensor:
    return torch.arange(coordinates.shape[0])


def _raster_parents(coordinates: torch.LongTensor, shape: tuple[int, ...]) -> torch.LongTensor:
    return (torch.arange(coordinates.shape[0]) - 1)[None]


_RULES: dict[str, tuple[Callable, Callable]] = {
    "neighbor": (_neighbor_groups, _neighbor_parents),
    "raster": (_raster_groups, _raster_parents),
}


@dataclass
class StaticDecodeTables:
    """Index tables that give every decode step of one generation the same shapes (`TokenOrder.static_decode_tables`).

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


_DEVICE_TABLES = (
    "generation_order", "inverse_generation_order", "coordinates", "group_ids", "parent_mask", "parent_sources",
    "parent_count", "parent_local", "head_index", "head_position_table",
)  # fmt: skip


class TokenOrder:
    """The generation order of one grid `shape` under one order `kind`, with every table derived from its rules.

    Attributes (tensors on `device`):
        `generation_order` / `inverse_generation_order`: generation position -> raster index and back.
        `coordinates`: `(num_tokens, ndim)` grid coordinates in generation order.
        `group_offsets`: Python list, group `s` is generation positions `group_offsets[s]:group_offsets[s+1]`.
        `parent_sources`, `parent_mask`: `(num_heads, num_tokens)`, per target and head the source index of its
            parent and whether that parent exists; `parent_count` `(num_tokens,)`.
        `head_index`: per target and head, the index of its parent among the positions that head is evaluated
            at during the target's step (`head_positions`).
    """

    def __init__(self, shape: tuple[int, ...], kind: str, device: str | torch.device | None = None):
        if kind not in _RULES:
            raise ValueError(f"Unknown token order {kind!r}; choose one of {list(ORDER_KINDS)}.")
        self.kind = kind
        self.shape = validate_grid(shape, name="shape")
        self.num_tokens = math.prod(self.shape)
        self.num_heads = num_heads_for_order(kind, len(self.shape))
        groups_of, parents_of = _RULES[kind]
        coords = torch.cartesian_prod(*[torch.arange(d) for d in self.shape]).view(self.num_tokens, len(self.shape))
        groups = groups_of(coords)
        self.generation_order = torch.sort(groups * self.num_tokens + torch.arange(self.num_tokens)).indices
        self.inverse_generation_order = torch.argsort(self.generation_order)
        group_sizes = torch.bincount(groups).tolist()
        if group_sizes[0] != 1:
            raise ValueError("The first group of a token order must be the single origin token.")
        self.group_offsets = [0] + torch.tensor(group_sizes).cumsum(0).tolist()
        self.num_fed_tokens = self.group_offsets[-2]
        self.coordinates = coords[self.generation_order]
        self.group_ids = groups[self.generation_order]
        self._derive_parents(parents_of(coords, self.shape)[:, self.generation_order])
        self._plan_heads()
        self._mask_cache: dict = {}
        self._static_tables: StaticDecodeTables | None = None
        if device is not None:
            self.to(device)

    def _derive_parents(self, parents: torch.LongTensor) -> None:
        """Parent lookup in generation order: raster parent -> generation position -> source index."""
        self.parent_mask = parents >= 0
        self.parent_sources = torch.where(self.parent_mask, 1 + self.inverse_generation_order[parents.clamp(min=0)], 0)
        self.parent_sources[:, 0] = 0
        self.parent_mask[:, 0] = True
        self.parent_count = self.parent_mask.sum(0)
        # Index of each parent among the tokens fed at the target's own step (step s feeds group s - 1).
        first_source_of_group = torch.tensor([0] + [1 + off for off in self.group_offsets[:-2]])
        self.parent_local = (self.parent_sources - first_source_of_group[self.group_ids]) * self.parent_mask
        fed_groups = torch.cat([torch.tensor([-1]), self.group_ids[: self.num_fed_tokens]])
        in_previous_group = (fed_groups[self.parent_sources] == self.group_ids - 1) | ~self.parent_mask
        if not bool(in_previous_group.all()) or bool((self.parent_count == 0).any()):
            raise RuntimeError(f"The {self.kind} order produced a parent outside the previous group.")

    def _plan_heads(self) -> None:
        """Where each head is evaluated at each step: once per (target, head) pair with a parent.

        `head_index[k, t]` is the index of target `t`'s head-`k` parent among the positions head `k` is evaluated
        at during `t`'s step; `head_position_table[s, k, :M_s]` are those positions (fed-token indices).
        """
        num_heads, num_steps = self.num_heads, len(self)
        offsets = torch.tensor(self.group_offsets)
        counts = torch.cat([torch.zeros(num_heads, 1, dtype=torch.long), self.parent_mask.long().cumsum(1)], dim=1)
        before = counts[:, offsets[:-1]]  # (heads, steps): pairs of earlier steps
        self.head_index = torch.where(self.parent_mask, counts[:, 1:] - 1 - before[:, self.group_ids], 0)
        per_head = counts[:, offsets[1:]] - before  # (heads, steps)
        self.num_head_positions = per_head.max(0).values.tolist()
        self.head_position_counts = per_head.T.tolist()  # [step][head]: positions that head is evaluated at
        table = torch.zeros(num_steps, num_heads, max(self.num_head_positions), dtype=torch.long)
        heads, targets = self.parent_mask.nonzero(as_tuple=True)
        table[self.group_ids[targets], heads, self.head_index[heads, targets]] = self.parent_local[heads, targets]
        self.head_position_table = table
        # Steps where every head reads every fed token in order need no selection at all (`head_positions` None).
        fed_sizes = [1] + [self.group_offsets[s] - self.group_offsets[s - 1] for s in range(1, num_steps)]
        width = torch.arange(table.shape[2])
        in_order = (table == width) | (width >= per_head.T[:, :, None])
        self._reads_all_fed = [
            bool(ok) and m == n for ok, m, n in zip(in_order.flatten(1).all(1), self.num_head_positions, fed_sizes)
        ]

    def to(self, device: str | torch.device) -> TokenOrder:
        """Move the tables to `device` (the Python lists stay on the host: reading them must not sync)."""
        for name in _DEVICE_TABLES:
            setattr(self, name, getattr(self, name).to(device))
        self._mask_cache = {}
        self._static_tables = None
        return self

    @property
    def device(self) -> torch.device:
        return self.generation_order.device

    def __len__(self) -> int:
        """Number of forward passes that generate the grid (the prefill included)."""
        return len(self.group_offsets) - 1

    def group_slice(self, step_index: int) -> slice:
        """Generation positions of the tokens drawn at `step_index`."""
        return slice(self.group_offsets[step_index], self.group_offsets[step_index + 1])

    def generated_before(self, step_index: int) -> int:
        """How many tokens exist before `step_index` runs."""
        return self.group_offsets[step_index]

    def tokens_to_feed(self, sample: torch.LongTensor, step_index: int) -> torch.LongTensor:
        """The tokens the model reads at `step_index` (those drawn at the step before) from a `(batch, *grid)`
        raster grid, `(batch, n)`."""
        if step_index < 1:
            raise ValueError("Step 0 is the prefill: it reads the condition, not tokens.")
        positions = self.generation_order[self.group_slice(step_index - 1)]
        return sample.reshape(sample.shape[0], -1)[:, positions]

    # --- mixing head logits ------------------------------------------------------------------------------------

    def mix_head_logits(self, head_logits: torch.Tensor, step_index: int | None = None) -> torch.Tensor:
        """Combine per-head logits into the logits of the targets: the mean over each target's parents.

        Args:
            head_logits: `(batch, num_heads, num_sources, vocab)` head outputs. With `step_index`, the sources are
                the tokens fed at that step (or the last condition position at step 0); without it, all
                `1 + num_fed_tokens` sources of a teacher-forced sequence.
            step_index: the step whose targets to produce; `None` produces every target of the grid.

        Returns:
            `(batch, num_targets, vocab)` logits, targets in generation order.
        """
        self._check_heads(head_logits)
        if step_index is None:
            return mix_logits(head_logits, self.parent_sources, self.parent_mask, self.parent_count)
        targets = self.group_slice(step_index)
        return mix_logits(
            head_logits, self.parent_local[:, targets], self.parent_mask[:, targets], self.parent_count[targets]
        )

    def head_positions(self, step_index: int) -> torch.LongTensor | None:
        """`(num_heads, m)` indices of the fed tokens each head must be evaluated at in step `step_index` (only the
        parents of this step's targets, padded with 0 where a head needs fewer), or None when every head needs
        every fed token in order."""
        if self._reads_all_fed[step_index]:
            return None
        return self.head_position_table[step_index, :, : self.num_head_positions[step_index]]

    def mix_selected_head_logits(self, head_logits: torch.Tensor, step_index: int) -> torch.Tensor:
        """`mix_head_logits` for head logits `(batch, num_heads, m, vocab)` evaluated at `head_positions(step_index)`
        (all fed tokens when that is None); returns `(batch, group_size, vocab)` in generation order."""
        self._check_heads(head_logits)
        targets = self.group_slice(step_index)
        return mix_logits(
            head_logits, self.head_index[:, targets], self.parent_mask[:, targets], self.parent_count[targets]
        )

    def _check_heads(self, head_logits: torch.Tensor) -> None:
        if head_logits.shape[1] != self.num_heads:
            raise ValueError(f"Expected logits of {self.num_heads} heads, got {head_logits.shape[1]}.")

    # --- the static decode plan and the training mask ----------------------------------------------------------

    def static_decode_tables(self) -> StaticDecodeTables:
        """The per-step plan padded to one shape for every step (see `StaticDecodeTables`), on the order's device;
        built once."""
        if self._static_tables is None:
            self._static_tables = _build_static_tables(self)
        return self._static_tables

    def training_attention_mask(
        self, num_condition_tokens: int, condition_mask: torch.Tensor | None = None
    ) -> torch.BoolTensor:
        """Boolean mask (True = may attend) for a teacher-forced sequence `[condition, fed tokens]`.

        Condition tokens are causal among themselves; a fed token sees every condition token and every fed token of
        its own or an earlier group (the proximity mask, block-causal in generation order). With `condition_mask`
        (`(batch, num_condition_tokens)`, True = valid), no query sees a padded condition key except the padded
        position itself. Shape `(1 or batch, 1, L, L)`.
        """
        if num_condition_tokens not in self._mask_cache:
            fed_groups = self.group_ids[: self.num_fed_tokens]
            length = num_condition_tokens + self.num_fed_tokens
            mask = torch.zeros(length, length, dtype=torch.bool, device=self.device)
            cond, fed = slice(0, num_condition_tokens), slice(num_condition_tokens, length)
            mask[cond, cond] = torch.ones(num_condition_tokens, num_condition_tokens, dtype=torch.bool).tril()
            mask[fed, cond] = True
            mask[fed, fed] = fed_groups[None, :] <= fed_groups[:, None]
            self._mask_cache[num_condition_tokens] = mask[None, None]
        mask = self._mask_cache[num_condition_tokens]
        return mask if condition_mask is None else apply_condition_padding(mask, condition_mask)


def _build_static_tables(order: TokenOrder) -> StaticDecodeTables:
    device, num_steps, num_heads = order.device, len(order), order.num_heads
    offsets = order.group_offsets
    sizes = [offsets[s + 1] - offsets[s] for s in range(num_steps)]
    group_size, num_positions = max(sizes), max(order.num_head_positions)
    slots = torch.arange(group_size)
    fed_positions = torch.zeros(num_steps, group_size, dtype=torch.long)
    write_positions = order.num_fed_tokens + slots.repeat(num_steps, 1)
    target_positions = order.num_tokens + slots.repeat(num_steps, 1)
    for step in range(num_steps):
        target_positions[step, : sizes[step]] = torch.arange(offsets[step], offsets[step + 1])
        if step > 0:
            fed = torch.arange(offsets[step - 1], offsets[step])
            fed_positions[step, : len(fed)] = fed
            write_positions[step, : len(fed)] = fed

    def padded(table: torch.Tensor, fill) -> torch.Tensor:
        """Per (step, head, padded target), gathered from a per-target table through dummy last columns."""
        table = torch.cat([table.cpu(), torch.full((num_heads, group_size), fill, dtype=table.dtype)], dim=1)
        return table[:, target_positions].transpose(0, 1).contiguous()

    count = torch.cat([order.parent_count.cpu(), torch.ones(group_size, dtype=order.parent_count.dtype)])
    return StaticDecodeTables(
        group_size=group_size,
        num_head_positions=num_positions,
        fed_positions=fed_positions.to(device),
        write_positions=write_positions.to(device),
        fed_end=torch.tensor(offsets[:-1], device=device),
        target_positions=target_positions.to(device),
        target_valid=(target_positions < order.num_tokens).to(device),
        head_positions=order.head_position_table[:, :, :num_positions].to(device),
        head_index=padded(order.head_index, 0).to(device),
        parent_mask=padded(order.parent_mask, False).to(device),
        parent_count=count[target_positions].to(device),
    )


def mix_logits(head_logits: torch.Tensor, index: torch.LongTensor, mask: torch.BoolTensor, count: torch.Tensor) -> torch.Tensor:
    """The parents rule: mean over heads of `head_logits[:, k, index[k, t]]` where `mask[k, t]`,
    `(batch, targets, vocab)`. The static decode path calls it with one step's rows of `StaticDecodeTables`; with
    tables of one step per batch row (`index`, `mask` `(batch, heads, targets)`, `count` `(batch, targets)`), each row
    is mixed by its own step's rule."""
    if index.dim() == 2:
        index, mask, count = index[None], mask[None], count[None]
    batch, heads, _, vocab = head_logits.shape
    gathered = head_logits.gather(2, index[..., None].expand(batch, heads, -1, vocab))
    summed = torch.where(mask[..., None], gathered, 0).sum(dim=1)
    return summed / count[..., None].to(summed.dtype)


def mix_packed_logits(
    head_logits: list[torch.Tensor], index: torch.LongTensor, mask: torch.BoolTensor, count: torch.Tensor
) -> torch.Tensor:
    """`mix_logits` for logits evaluated only where needed (the serving engine): head `k`'s `(positions_k, vocab)`
    rows packed over the batch, `index` `(batch, heads, targets)` into them, `mask` and `count` as `mix_logits`."""
    summed = 0
    for k, logits in enumerate(head_logits):
        if len(logits):  # a head no target reads at these steps has no logits
            summed = summed + torch.where(mask[:, k, :, None], logits[index[:, k].clamp(max=len(logits) - 1)], 0)
    return summed / count[..., None].to(summed.dtype)


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
