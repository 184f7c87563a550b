"""Static key/value cache for one generation call."""

from __future__ import annotations

import copy

import torch


class NARKVCache:
    """Keys and values of every block, allocated once for `(batch, max_length)` and filled left to right.

    Besides the buffers, the cache holds what is fixed for the whole generation: the position information
    of every sequence slot (rotary tables or learned-position indices) and, for padded text conditions,
    which condition keys are valid. `length` counts the filled slots; a step writes at `length` and reads
    the prefix `[0, length + n)`, so decoding needs no mask and no reallocation.

    `num_spare_slots` extra slots after the `max_length` real ones serve the static decode path
    (`NARTransformer.decode_static`): its padded tokens write there, and its key mask never shows them. Their
    position information is zero.
    """

    def __init__(
        self,
        num_blocks: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.LongTensor | None = None,
        num_spare_slots: int = 0,
    ):
        capacity = max_length + num_spare_slots
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_blocks)
        ]
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_spare_slots = num_spare_slots
        if num_spare_slots:
            if rope is not None:
                rope = tuple(torch.cat([table, table.new_zeros(num_spare_slots, table.shape[1])]) for table in rope)
            if position_ids is not None:
                position_ids = torch.cat([position_ids, position_ids.new_zeros(num_spare_slots)])
        self.rope = rope
        self.position_ids = position_ids
        self.key_mask: torch.BoolTensor | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        """Slots allocated: `max_length` plus the spare slots."""
        return self.max_length + self.num_spare_slots

    def reserve(self, num_new: int) -> int:
        """Check that `num_new` more slots fit and return where they start."""
        if self.length + num_new > self.max_length:
            raise ValueError(
                f"KV cache overflow: {self.length} slots used + {num_new} new > max_length {self.max_length}."
            )
        return self.length

    def rope_slice(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.rope is None else (self.rope[0][start:end], self.rope[1][start:end])

    def decode_mask(self, end: int) -> torch.BoolTensor | None:
        """Key mask for queries reading the prefix `[0, end)`: only padded condition keys are hidden."""
        return None if self.key_mask is None else self.key_mask[:, :, :, :end]

    def rows(self, start: int, end: int) -> NARKVCache:
        """A cache over the batch rows `[start, end)` of this one: views of the same buffers, the same position
        tables, empty (`length` 0, no condition mask): e.g. to prefill new requests into their rows of a shared cache."""
        view = copy.copy(self)
        view.layers = [(keys[start:end], values[start:end]) for keys, values in self.layers]
        view.batch_size, view.length, view.key_mask = end - start, 0, None
        return view

    def move_rows(self, source: torch.LongTensor, target: torch.LongTensor) -> None:
        """Copy the keys and values of batch rows `source` into rows `target` (compacting a shared cache)."""
        for keys, values in self.layers:
            keys.index_copy_(0, target, keys.index_select(0, source))
            values.index_copy_(0, target, values.index_select(0, source))

    def zero_(self) -> NARKVCache:
        """Zero every key and value. Masked-out slots still enter attention as `0 * value`, so a slot left holding
        NaN/inf (from an earlier generation that overflowed) would poison the next one: a reused cache is zeroed."""
        for keys, values in self.layers:
            keys.zero_()
            values.zero_()
        return self
