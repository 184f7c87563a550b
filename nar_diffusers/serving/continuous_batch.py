"""The device side of continuous batching: every active output at its own step, one forward pass per iteration.

Built from the static decode path's pieces (`pipelines/static_decode.py`), generalised from one step for the whole
batch to one step per row:

- one shared KV cache of `2 * max_batch` model rows (a conditional row per output, plus an unconditional one when
  its request is guided), each laid out as condition then fed tokens; the rows in use are kept compact
  (`[0, num_rows)`), so a forward pass reads views of the cache, never copies, and attention reads only the slots
  up to the furthest row's;
- per row, its step's tables from `StaticDecodeTables`: the fed tokens, the cache slots they are written to, the
  key-validity mask, the head positions, and, per output, the parents rule and the targets; the rows' tokens are
  packed into one sequence (`PackedRows`), so every token-wise layer runs on exactly the tokens fed;
- guidance row by row (`RowGuidance`: each output's scale, its own unconditional row, its `cfg_interval` schedule);
- each output's draws from its own pre-drawn uniforms, so an output's tokens do not depend on its neighbours: they
  equal `pipe(...)`'s with the same generator, exactly in float64.

A new output's condition is prefilled into fresh rows when it is admitted (`admit`), which also draws its first
token; `step` runs one decode pass over every admitted output; `release` frees an output's rows and slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.decoding_head import RowGuidance
from ..models.packed_rows import PackedRows
from ..schedulers.sampling import sample_tokens
from ..schedulers.token_order import TokenOrder, mix_logits
from .requests import PreparedRequest


@dataclass
class OutputSlot:
    """One output in flight: its request, its index in the request, its step and its model rows."""

    request: PreparedRequest
    index: int
    step: int
    cond_row: int
    uncond_row: int | None


class ContinuousBatch:
    """Batch slots over one transformer and one token order (see the module docstring).

    Args:
        transformer: the `NARTransformer`.
        order: the served grid's `TokenOrder` (on the device).
        max_batch: outputs in flight at once.
    """

    def __init__(self, transformer, order: TokenOrder, max_batch: int):
        self.transformer, self.order, self.max_batch = transformer, order, max_batch
        device = order.device
        self.tables = order.static_decode_tables()
        group_size = self.tables.group_size
        coordinates = order.coordinates[: order.num_fed_tokens]
        self.cache = transformer.init_kv_cache(2 * max_batch, coordinates, device=device)  # packed: no padding slots
        width = order.num_tokens + group_size
        self.tokens = torch.full((max_batch, width), -1, dtype=torch.long, device=device)
        self.uniforms = torch.zeros(max_batch, width, device=device)
        self.nonfinite = torch.zeros(max_batch, dtype=torch.bool, device=device)
        self.condition_valid = torch.ones(2 * max_batch, self.cache.capacity, dtype=torch.bool, device=device)
        self.slot_ids = torch.arange(self.cache.capacity, device=device)
        offsets = order.group_offsets
        self.group_sizes = [offsets[s + 1] - offsets[s] for s in range(len(order))]
        self.num_condition_tokens = transformer.num_condition_tokens
        self.slots: dict[int, OutputSlot] = {}
        self.free = list(range(max_batch))
        self.row_owner: list[tuple[int, bool]] = []  # model row -> (slot, is_unconditional)

    @property
    def device(self) -> torch.device:
        return self.order.device

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    # --- joining and leaving ------------------------------------------------------------------------------------

    def admit(self, requests: list[PreparedRequest]) -> list[int]:
        """Give each request `n` slots and rows, prefill their conditions in one pass and draw their first tokens;
        returns the new slots (the caller checked that they fit)."""
        start = len(self.row_owner)
        new_slots, cond_rows, uncond_rows, inputs = [], [], [], []
        for request in requests:
            guided = request.settings.guidance
            base = len(self.row_owner)
            inputs.append(request.condition.prefill_inputs(guided))
            for index in range(request.n):
                slot = self.free.pop(0)
                cond_row = base + index
                uncond_row = base + request.n + index if guided else None
                self.slots[slot] = OutputSlot(request, index, 0, cond_row, uncond_row)
                new_slots.append(slot)
                if request.uniforms is not None:
                    self.uniforms[slot, : self.order.num_tokens] = request.uniforms[index]
                self.tokens[slot].fill_(-1)
                self.nonfinite[slot] = False
            self.row_owner += [(slot, False) for slot in new_slots[-request.n :]]
            if guided:
                self.row_owner += [(slot, True) for slot in new_slots[-request.n :]]
        for slot in new_slots:
            output = self.slots[slot]
            cond_rows.append(output.cond_row - start)
            uncond_rows.append((output.uncond_row if output.uncond_row is not None else output.cond_row) - start)
        prefill_inputs = {key: torch.cat([entry[key] for entry in inputs]) for key in inputs[0]}
        view = self.cache.rows(start, len(self.row_owner)).zero_()
        guidance = self._guidance(new_slots, cond_rows, uncond_rows)
        head_logits = self.transformer.prefill(view, **prefill_inputs, row_guidance=guidance)
        if view.key_mask is not None:
            self.condition_valid[start : len(self.row_owner)] = view.key_mask[:, 0, 0, :]
        logits = self.order.mix_selected_head_logits(head_logits, 0)
        self._draw(new_slots, logits, self._tensor([[0]] * len(new_slots)))
        for slot in new_slots:
            self.slots[slot].step = 1
        return new_slots

    def release(self, slots: list[int]) -> None:
        """Free `slots` and their rows; the rows still in use are moved down to stay `[0, num_rows)`."""
        freed = set()
        for slot in slots:
            output = self.slots.pop(slot)
            freed.add(output.cond_row)
            if output.uncond_row is not None:
                freed.add(output.uncond_row)
            self.free.append(slot)
        self.free.sort()
        num_rows = len(self.row_owner) - len(freed)
        holes = sorted(row for row in freed if row < num_rows)
        movers = [row for row in range(num_rows, len(self.row_owner)) if row not in freed]
        if holes:
            source, target = self._tensor(movers), self._tensor(holes)
            self.cache.move_rows(source, target)
            self.condition_valid.index_copy_(0, target, self.condition_valid.index_select(0, source))
            for old, new in zip(movers, holes):
                slot, unconditional = self.row_owner[old]
                self.row_owner[new] = (slot, unconditional)
                if unconditional:
                    self.slots[slot].uncond_row = new
                else:
                    self.slots[slot].cond_row = new
        del self.row_owner[num_rows:]
        self.condition_valid[num_rows:] = True

    # --- one iteration ------------------------------------------------------------------------------------------

    def step(self) -> list[int]:
        """One decode pass over every output in flight (each at its own step >= 1); returns the slots stepped."""
        slots = [slot for slot, output in sorted(self.slots.items()) if output.step < len(self.order)]
        if not slots:
            return []
        tables, num_cond, num_rows = self.tables, self.num_condition_tokens, len(self.row_owner)
        steps = {slot: self.slots[slot].step for slot in slots}
        # Each row feeds exactly its step's group (the tokens drawn at the step before), packed into one sequence.
        row_slot = [owner for owner, _ in self.row_owner]
        row_steps = self._tensor([steps[slot] for slot in row_slot])
        counts = [self.group_sizes[steps[slot] - 1] for slot in row_slot]
        width = max(counts)
        real = torch.arange(width, device=self.device)[None, :] < self._tensor(counts)[:, None]
        rows, columns = real.nonzero(as_tuple=True)
        fed_positions = tables.fed_positions.index_select(0, row_steps)[:, :width]
        fed = self.tokens.index_select(0, self._tensor(row_slot)).gather(1, fed_positions)[rows, columns]
        write_slots = tables.write_positions.index_select(0, row_steps)[:, :width][rows, columns] + num_cond
        filled = tables.fed_end.index_select(0, row_steps) + num_cond
        key_length = num_cond + max(self.order.group_offsets[steps[slot]] for slot in row_slot)
        packed = PackedRows(rows, columns, write_slots, num_rows, width, key_length)
        key_mask = (self.slot_ids[None, :] < filled[:, None]) & self.condition_valid[:num_rows]
        # Head positions index the row's tokens; packed, they are offset by the tokens of the rows before.
        offsets = self._tensor([0] + counts[:-1]).cumsum(0)
        head_positions = tables.head_positions.index_select(0, row_steps).clamp(max=width - 1)
        head_positions = head_positions.minimum(self._tensor(counts)[:, None, None] - 1) + offsets[:, None, None]
        cond_rows = [self.slots[slot].cond_row for slot in slots]
        uncond_rows = [self.slots[slot].uncond_row if self.slots[slot].uncond_row is not None else
                       self.slots[slot].cond_row for slot in slots]  # fmt: skip
        guidance = self._guidance(slots, cond_rows, uncond_rows)
        head_logits = self.transformer.decode_static(
            self.cache.rows(0, num_rows), fed[None], packed, key_mask[:, None, None, :], head_positions,
            row_guidance=guidance,
        )
        target_width = max(self.group_sizes[steps[slot]] for slot in slots)
        slot_steps = self._tensor([steps[slot] for slot in slots])
        logits = mix_logits(
            head_logits,
            tables.head_index.index_select(0, slot_steps)[:, :, :target_width],
            tables.parent_mask.index_select(0, slot_steps)[:, :, :target_width],
            tables.parent_count.index_select(0, slot_steps)[:, :target_width],
        )
        valid = tables.target_valid.index_select(0, slot_steps)[:, :target_width]
        self._draw(slots, logits, tables.target_positions.index_select(0, slot_steps)[:, :target_width], valid)
        for slot in slots:
            self.slots[slot].step += 1
        return slots

    def _guidance(self, slots: list[int], cond_rows: list[int], uncond_rows: list[int]) -> RowGuidance:
        scales, guided = [], []
        for slot in slots:
            output = self.slots[slot]
            scales.append(output.request.settings.guidance_scale)
            guided.append(output.uncond_row is not None and output.request.guided_steps[output.step])
        return RowGuidance(self._tensor(cond_rows), self._tensor(uncond_rows), self._tensor(scales, torch.float32),
                           self._tensor(guided, torch.bool))  # fmt: skip

    def _draw(self, slots: list[int], logits: torch.Tensor, targets: torch.LongTensor, valid=None) -> None:
        """Draw `logits` `(len(slots), targets, vocab)` into the slots' `targets` (generation positions), each
        group of outputs with the same draw settings in one call, from the outputs' own uniforms; flag NaN/inf."""
        finite = torch.isfinite(logits)
        if valid is not None:
            finite = finite | ~valid[:, :, None]
        slot_index = self._tensor(slots)
        self.nonfinite.index_copy_(0, slot_index, self.nonfinite.index_select(0, slot_index) | ~finite.flatten(1).all(1))
        groups: dict[tuple, list[int]] = {}
        for position, slot in enumerate(slots):
            groups.setdefault(self.slots[slot].request.draw_key, []).append(position)
        for positions in groups.values():
            rows = self._tensor(positions)
            group_slots = slot_index.index_select(0, rows)
            group_targets = targets.index_select(0, rows)
            settings = self.slots[slots[positions[0]]].request.settings
            uniforms = self.uniforms.index_select(0, group_slots).gather(1, group_targets) if settings.do_sample else None
            drawn = sample_tokens(logits.index_select(0, rows), **settings.draw, uniforms=uniforms)
            self.tokens[group_slots[:, None], group_targets] = drawn

    # --- reading the grids --------------------------------------------------------------------------------------

    def grids(self, slots: list[int]) -> torch.LongTensor:
        """The `(len(slots), *grid)` raster grids of `slots`, -1 where nothing is drawn yet (a new tensor)."""
        tokens = self.tokens.index_select(0, self._tensor(slots))[:, : self.order.num_tokens]
        return tokens.index_select(1, self.order.inverse_generation_order).view(len(slots), *self.order.shape)

    def finished(self) -> list[int]:
        """Slots whose every step has run."""
        return [slot for slot, output in self.slots.items() if output.step >= len(self.order)]
