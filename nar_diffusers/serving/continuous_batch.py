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
from ..schedulers.token_order import TokenOrder, mix_packed_logits
from .requests import PreparedRequest


@dataclass
class OutputSlot:
    """One output in flight: its request, its index in the request, its step and its model rows (`padded_condition`:
    its condition has padded tokens that attention must hide)."""

    request: PreparedRequest
    index: int
    step: int
    cond_row: int
    uncond_row: int | None
    padded_condition: bool = False


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
        self.condition_embeds = torch.zeros(2 * max_batch, transformer.num_condition_tokens,
                                            transformer.config.hidden_size, dtype=transformer.dtype, device=device)
        self.slot_ids = torch.arange(self.cache.capacity, device=device)
        offsets = order.group_offsets
        self.group_sizes = [offsets[s + 1] - offsets[s] for s in range(len(order))]
        self.fed_ends = self.tables.fed_end.tolist()
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
        """Give each request `n` slots and rows (the caller checked that they fit) and embed their conditions; the
        next `step` prefills them and draws their first tokens. Returns the new slots."""
        new_slots = []
        for request in requests:
            guided = request.settings.guidance
            base = len(self.row_owner)
            slots = [self.free.pop(0) for _ in range(request.n)]
            inputs = request.condition.prefill_inputs(guided)
            padded = inputs.get("encoder_attention_mask") is not None
            for index, slot in enumerate(slots):
                uncond_row = base + request.n + index if guided else None
                self.slots[slot] = OutputSlot(request, index, 0, base + index, uncond_row, padded)
                if request.uniforms is not None:
                    self.uniforms[slot, : self.order.num_tokens] = request.uniforms[index]
                self.tokens[slot].fill_(-1)
                self.nonfinite[slot] = False
            self.row_owner += [(slot, False) for slot in slots] + [(slot, True) for slot in slots if guided]
            rows = slice(base, len(self.row_owner))
            self.condition_embeds[rows] = self.transformer.embed_condition(
                inputs.get("class_labels"), inputs.get("encoder_hidden_states")
            ).to(self.condition_embeds.dtype)
            self.condition_valid[rows] = True
            if inputs.get("encoder_attention_mask") is not None:
                self.condition_valid[rows, : self.num_condition_tokens] = inputs["encoder_attention_mask"].bool()
            self.cache.rows(base, len(self.row_owner)).zero_()  # no stale NaN/inf reaches attention as 0 * value
            new_slots += slots
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
            self.condition_embeds.index_copy_(0, target, self.condition_embeds.index_select(0, source))
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
        """One forward pass over every output in flight, each at its own step: new outputs prefill their condition
        and draw their first token, the others feed their last group and draw the next. Returns the slots stepped."""
        slots = [slot for slot, output in sorted(self.slots.items()) if output.step < len(self.order)]
        if not slots:
            return []
        tables, num_cond, num_rows = self.tables, self.num_condition_tokens, len(self.row_owner)
        steps = {slot: self.slots[slot].step for slot in slots}
        row_slot = [owner for owner, _ in self.row_owner]
        prefilling = self._tensor([steps[slot] == 0 for slot in row_slot], torch.bool)
        # Table rows of each row's step (a prefilling row reads step 1's, then has them replaced).
        row_steps = self._tensor([max(steps[slot], 1) for slot in row_slot])
        counts = [num_cond if steps[slot] == 0 else self.group_sizes[steps[slot] - 1] for slot in row_slot]
        width = max(counts)
        count_tensor = self._tensor(counts)
        columns_grid = torch.arange(width, device=self.device)[None, :]
        rows, columns = (columns_grid < count_tensor[:, None]).nonzero(as_tuple=True)
        # Packed inputs: the fed tokens of decoding rows, the condition of prefilling rows.
        fed_positions = tables.fed_positions.index_select(0, row_steps)
        fed_positions = torch.cat([fed_positions, fed_positions.new_zeros(num_rows, max(width - fed_positions.shape[1], 0))], 1)
        fed = self.tokens.index_select(0, self._tensor(row_slot)).gather(1, fed_positions[:, :width])[rows, columns]
        prefill_token = prefilling[rows]
        embeds = self.transformer.token_embedding(fed.clamp(min=0))  # prefilling rows have no tokens yet
        condition = self.condition_embeds[rows, columns.clamp(max=num_cond - 1)]
        embeds = torch.where(prefill_token[:, None], condition, embeds)[None]
        write = tables.write_positions.index_select(0, row_steps)
        write = torch.cat([write, write.new_zeros(num_rows, max(width - write.shape[1], 0))], 1)[:, :width]
        write_slots = torch.where(prefill_token, columns, write[rows, columns] + num_cond)
        filled = [num_cond if steps[slot] == 0 else self.fed_ends[steps[slot]] + num_cond for slot in row_slot]
        # A row reads all its filled slots unless its condition is padded or it prefills (causally) several tokens.
        masked = [self.slots[slot].padded_condition or (steps[slot] == 0 and num_cond > 1) for slot in row_slot]
        packed = PackedRows(rows, columns, write_slots, num_rows, width, max(filled),
                            PackedRows.group_rows(counts, filled, masked))  # fmt: skip
        mask = self._attention_mask(prefilling, self._tensor(filled), width, max(filled)) if any(masked) else None
        offsets = [0]
        for count in counts[:-1]:
            offsets.append(offsets[-1] + count)  # where each row's tokens start in the packed sequence
        head_logits = self.transformer.decode_packed(
            self.cache.rows(0, num_rows), embeds, packed, mask, self._head_guidance(slots, steps, offsets)
        )
        self._draw_steps(slots, steps, head_logits)
        for slot in slots:
            self.slots[slot].step += 1
        return slots

    def _attention_mask(self, prefilling, filled, width: int, key_length: int) -> torch.BoolTensor:
        """`(rows, 1, width, key_length)`: a decoding row's queries read its filled slots; a prefilling row's
        condition token `i` reads the condition tokens up to `i` (padded ones hidden, except from themselves)."""
        num_rows = filled.shape[0]
        keys = torch.arange(key_length, device=self.device)
        valid = self.condition_valid[:num_rows, :key_length]
        decoding = (keys[None, :] < filled[:, None]) & valid
        queries = torch.arange(width, device=self.device)
        causal = keys[None, None, :] <= queries[None, :, None]
        condition = causal & (valid[:, None, :] | (keys[None, None, :] == queries[None, :, None]))
        return torch.where(prefilling[:, None, None], condition, decoding[:, None, :])[:, None]

    def _head_guidance(self, slots: list[int], steps: dict[int, int], offsets: list[int]) -> list[RowGuidance]:
        """Per head, the packed tokens it is evaluated at: each output's positions for that head at its step (a
        prefilling output's last condition token), each with its unconditional twin, scale and guided flag."""
        guidance = []
        for head in range(self.order.num_heads):
            step_of, column, cond_offset, uncond_offset, scales, guided = [], [], [], [], [], []
            for slot in slots:
                output, step = self.slots[slot], steps[slot]
                uncond_row = output.cond_row if output.uncond_row is None else output.uncond_row
                count = self.order.head_position_counts[step][head]
                step_of += [step] * count
                column += range(count)
                cond_offset += [offsets[output.cond_row]] * count
                uncond_offset += [offsets[uncond_row]] * count
                scales += [output.request.settings.guidance_scale] * count
                guided += [output.uncond_row is not None and output.request.guided_steps[step]] * count
            step_tensor = self._tensor(step_of)
            local = self.tables.head_positions[step_tensor, head, self._tensor(column)]
            local = torch.where(step_tensor == 0, self.num_condition_tokens - 1, local)
            guidance.append(RowGuidance(local + self._tensor(cond_offset), local + self._tensor(uncond_offset),
                                        self._tensor(scales, torch.float32), self._tensor(guided, torch.bool)))  # fmt: skip
        return guidance

    def _draw_steps(self, slots: list[int], steps: dict[int, int], head_logits: list[torch.Tensor]) -> None:
        """Mix each output's head logits by its own step's parents rule and draw its step's tokens."""
        tables = self.tables
        target_width = max(self.group_sizes[steps[slot]] for slot in slots)
        slot_steps = self._tensor([steps[slot] for slot in slots])
        # Where each output's positions start among each head's packed logits.
        counts = torch.tensor([self.order.head_position_counts[steps[slot]] for slot in slots]).T  # (heads, outputs)
        starts = (counts.cumsum(1) - counts).T.to(self.device)  # (outputs, heads)
        head_index = tables.head_index.index_select(0, slot_steps)[:, :, :target_width] + starts[:, :, None]
        logits = mix_packed_logits(
            head_logits,
            head_index,
            tables.parent_mask.index_select(0, slot_steps)[:, :, :target_width],
            tables.parent_count.index_select(0, slot_steps)[:, :target_width],
        )
        valid = tables.target_valid.index_select(0, slot_steps)[:, :target_width]
        self._draw(slots, logits, tables.target_positions.index_select(0, slot_steps)[:, :target_width], valid)

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
