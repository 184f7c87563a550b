"""Static key/value cache for one generation call, stored in the model dtype, a 16-bit float or float8."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .packed_rows import PackedRows

FLOAT8 = getattr(torch, "float8_e4m3fn", None)
FLOAT8_MAX = 448.0  # the largest finite float8_e4m3fn value
KV_CACHE_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    **({"float8_e4m3fn": FLOAT8} if FLOAT8 is not None else {}),
}  # fmt: skip


def resolve_kv_cache_dtype(kv_cache_dtype: torch.dtype | str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of a KV cache: `kv_cache_dtype` (a dtype or its name), or the model dtype when None."""
    if kv_cache_dtype is None or kv_cache_dtype == model_dtype:
        return model_dtype
    dtype = KV_CACHE_DTYPES.get(kv_cache_dtype) if isinstance(kv_cache_dtype, str) else kv_cache_dtype
    if dtype not in KV_CACHE_DTYPES.values():
        allowed = ", ".join(f"torch.{name}" for name in KV_CACHE_DTYPES)
        raise ValueError(
            f"`kv_cache_dtype` must be None (the model dtype) or one of {allowed} (or its name as a string), "
            f"got {kv_cache_dtype!r}."
        )
    return dtype


@dataclass
class KVCacheLayer:
    """One block's keys and values `(batch, kv_heads, capacity, head_dim)`, and how attention writes and reads them.

    With float8 storage, `key_scales` / `value_scales` `(batch, kv_heads, capacity, 1)` float32 hold one scale per
    (row, head, slot): a written key or value vector is divided by its own absmax / 448 before the cast, so every
    stored element fits e4m3's range whatever comes later (no scale fixed at prefill time that later tokens could
    exceed, and nothing to re-scale: a static-shape write, as `torch.compile` wants). Reads upcast to `dtype`.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    def write(self, k: torch.Tensor, v: torch.Tensor, where: int | torch.LongTensor | PackedRows) -> None:
        """Store the new `(batch, kv_heads, n, head_dim)` keys/values: at the slots from `where` on (an int, the
        eager loop), at the slots `where` (a `(n,)` tensor, the static step), or, for `PackedRows` (`k` `(1, kv_heads,
        tokens, head_dim)`), each token at its own row and slot (the serving engine)."""
        for buffer, scales, new in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            if isinstance(where, PackedRows):
                new = new[0].transpose(0, 1)  # (tokens, kv_heads, head_dim)
            scale = None
            if scales is not None:
                new, scale = _quantize(new)
            new = _bits(new.to(buffer.dtype))
            if isinstance(where, PackedRows):
                _bits(buffer)[where.rows, :, where.slots] = new
                if scale is not None:
                    scales[where.rows, :, where.slots] = scale
            elif isinstance(where, torch.Tensor):
                _bits(buffer).index_copy_(2, where, new)
                if scale is not None:
                    scales.index_copy_(2, where, scale)
            else:
                _bits(buffer)[:, :, where : where + new.shape[2]] = new
                if scale is not None:
                    scales[:, :, where : where + new.shape[2]] = scale

    def read(self, dtype: torch.dtype, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the slots `[0, end)` (every slot when None) in `dtype`: the buffers themselves when
        they are stored in `dtype`, else upcast copies (float8: times their scales)."""
        keys, values = self.keys, self.values
        if end is not None:
            keys, values = keys[:, :, :end], values[:, :, :end]
        if self.key_scales is None:
            return keys.to(dtype), values.to(dtype)
        key_scales, value_scales = self.key_scales, self.value_scales
        if end is not None:
            key_scales, value_scales = key_scales[:, :, :end], value_scales[:, :, :end]
        # In place on the upcast copies: one temporary per tensor, not two.
        return keys.to(dtype).mul_(key_scales.to(dtype)), values.to(dtype).mul_(value_scales.to(dtype))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """float8 tensors as their bytes (a view): CPU has no `index_copy_` / indexed writes for float8 dtypes."""
    return tensor.view(torch.uint8) if FLOAT8 is not None and tensor.dtype == FLOAT8 else tensor


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x / scale` as float8 and the float32 `scale` (its absmax / 448 over the last axis, 1 where all zero)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / FLOAT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # The division can land a hair above 448 by rounding; e4m3 would turn that into NaN on some devices.
    return (x / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


class NARKVCache:
    """Keys and values of every block, allocated once for `(batch, max_length)` and filled left to right.

    Besides the buffers, the cache holds what is fixed for the whole generation: the position information
    of every sequence slot (rotary tables or learned-position indices) and, for padded text conditions,
    which condition keys are valid. `length` counts the filled slots; a step writes at `length` and reads
    the prefix `[0, length + n)`, so decoding needs no mask and no reallocation.

    `num_spare_slots` extra slots after the `max_length` real ones serve the static decode path
    (`NARTransformer.decode_static`): its padded tokens write there, and its key mask never shows them. Their
    position information is zero.

    `dtype` is the storage dtype; attention computes in `compute_dtype` (the model's; default: `dtype`) and reads
    the cache upcast to it (`KVCacheLayer.read`). With `torch.float8_e4m3fn` storage, `scales` holds a float32 scale
    per (layer, row, kv head, slot) for the keys and the values (`KVCacheLayer`).
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
        compute_dtype: torch.dtype | None = None,
    ):
        capacity = max_length + num_spare_slots
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_blocks)
        ]
        self.scales = None
        if FLOAT8 is not None and dtype == FLOAT8:
            scale_shape = (*shape[:3], 1)
            self.scales = [
                (torch.ones(scale_shape, device=device), torch.ones(scale_shape, device=device)) for _ in range(num_blocks)
            ]
        self.dtype = dtype
        self.compute_dtype = compute_dtype or dtype
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

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value buffers and their scales."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor attention writes to (the key/value buffers and float8 scales)."""
        return [t for layer in self.layers + (self.scales or []) for t in layer]

    def layer(self, index: int) -> KVCacheLayer:
        """Block `index`'s buffers, with the methods attention writes and reads them through."""
        scales = (None, None) if self.scales is None else self.scales[index]
        return KVCacheLayer(*self.layers[index], *scales)

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
        if self.scales is not None:
            view.scales = [(keys[start:end], values[start:end]) for keys, values in self.scales]
        view.batch_size, view.length, view.key_mask = end - start, 0, None
        return view

    def move_rows(self, source: torch.LongTensor, target: torch.LongTensor) -> None:
        """Copy the keys and values of batch rows `source` into rows `target` (compacting a shared cache; a row
        listed several times in `source` is copied into each of its targets)."""
        for tensor in map(_bits, self.buffers()):
            tensor.index_copy_(0, target, tensor.index_select(0, source))

    def copy_row_prefix(self, source: int, start: int, end: int, length: int) -> None:
        """Copy the first `length` slots of batch row `source` into rows `[start, end)` (a prefill shared by rows)."""
        for tensor in map(_bits, self.buffers()):
            tensor[start:end, :, :length] = tensor[source : source + 1, :, :length]

    def zero_(self) -> NARKVCache:
        """Zero every key and value. Masked-out slots still enter attention as `0 * value`, so a slot left holding
        NaN/inf (from an earlier generation that overflowed) would poison the next one: a reused cache is zeroed."""
        for keys, values in self.layers:
            keys.zero_()
            values.zero_()
        for key_scales, value_scales in self.scales or []:
            key_scales.fill_(1)
            value_scales.fill_(1)
        return self
