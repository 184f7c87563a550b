"""Tokens of several batch rows packed into one sequence, for rows that feed different numbers of tokens.

The serving engine runs outputs at different steps in one forward pass; a NAR step feeds as many tokens as its plane
has cells (1, 2, ..., 16, ..., 1 for a 16x16 grid), so padding every row to the widest would compute up to twice
the tokens. Packed, every token-wise layer (embeddings, norms, projections, feed-forward) runs on exactly the real
tokens as one `(1, num_tokens, ...)` sequence; only attention, which reads each row's own KV-cache row, lays the
queries out per row (`pad` / `unpad`). Attention runs once per run of neighbouring rows with the same shape
(`attention_groups`): rows at different steps padded to the widest row and the longest key length would cost
attention up to 2-3x its real work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    """Where each packed token belongs.

    Args:
        rows: `(num_tokens,)` the batch (KV-cache) row of each token.
        columns: `(num_tokens,)` its index among its row's tokens.
        slots: `(num_tokens,)` the cache slot its key and value are written to.
        num_rows: batch rows (every row of the cache view has at least one token).
        width: the most tokens of one row.
        key_length: cache slots attention reads (`[0, key_length)`; every row's filled slots lie below it).
        attention_groups: `(first_row, end_row, width, key_length, masked)` runs of rows that attend together,
            reading their first `width` query columns and `key_length` slots, through the attention mask where
            `masked`; None: all rows as one masked group.
    """

    rows: torch.LongTensor
    columns: torch.LongTensor
    slots: torch.LongTensor
    num_rows: int
    width: int
    key_length: int
    attention_groups: list[tuple[int, int, int, int, bool]] | None = None

    @staticmethod
    def group_rows(widths: list[int], key_lengths: list[int], masked: list[bool]) -> list[tuple[int, int, int, int, bool]]:
        """`attention_groups` for rows of these widths, key lengths and mask needs (False: a row's queries may read
        every one of its key slots): runs of neighbours alike in all three."""
        groups: list[tuple[int, int, int, int, bool]] = []
        for row, shape in enumerate(zip(widths, key_lengths, masked)):
            if groups and groups[-1][2:] == shape:
                groups[-1] = (groups[-1][0], row + 1, *shape)
            else:
                groups.append((row, row + 1, *shape))
        return groups

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """`(num_tokens, ...)` -> `(num_rows, width, ...)`, zeros where a row has fewer tokens."""
        out = packed.new_zeros(self.num_rows, self.width, *packed.shape[1:])
        out[self.rows, self.columns] = packed
        return out

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """`(num_rows, width, ...)` -> `(num_tokens, ...)`."""
        return padded[self.rows, self.columns]
