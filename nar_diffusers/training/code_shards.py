"""The code-shard format: token grids (and labels, captions, caption embeddings) in parquet shards described by a
`metadata.json`. `training/extract_codes.py` writes them with `write_code_shard` / `write_code_metadata`;
`load_code_dataset` reads them back for training.

Image codes are `(h, w)` grids (metadata "grid" `[h, w]`, columns `height`, `width`); video codes are `(T, h, w)`
grids (metadata "grid" `[T, h, w]`, plus a `time` column). Codes are stored flattened in raster order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


CODES_METADATA_NAME = "metadata.json"


CODES_FORMAT_VERSION = 1

GRID_COLUMNS = ("time", "height", "width")
"""Per-row grid size columns; image codes have the last two."""


@torch.no_grad()
# ----------------------------------------------------------------------------------------------------------------
# Code shards (written by training/extract_codes.py)
# ----------------------------------------------------------------------------------------------------------------


def code_shard_name(index: int) -> str:
    """File name of code shard `index`, e.g. `codes-00000.parquet`."""
    return f"codes-{index:05d}.parquet"


def write_code_shard(
    path: str,
    codes: torch.Tensor,
    conditions: Sequence[int] | Sequence[str] | None = None,
    condition_column: str | None = None,
    caption_embeds: Sequence[torch.Tensor] | None = None,
) -> None:
    """Write one parquet shard atomically (a temporary file renamed into place).

    Args:
        path: Destination file.
        codes: Token grids, integer tensor (N, h, w) for images or (N, T, h, w) for videos.
        conditions: N labels (int) or captions (str), or None for unconditional codes.
        condition_column: "label" or "caption"; None when `conditions` is None.
        caption_embeds: With captions, optionally N text-encoder outputs `(length_i, dim)` of the VALID caption
            tokens only (no padding rows), float32 or float16. Stored flattened in a `caption_embeds` column with
            the token counts in `caption_length`; `load_code_dataset` reads them back.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if codes.ndim not in (3, 4):
        raise ValueError(
            f"`codes` must have shape (num_samples, height, width) or (num_samples, time, height, width), got "
            f"{tuple(codes.shape)}."
        )
    num_rows, *grid = codes.shape
    num_tokens = int(np.prod(grid))
    flat = codes.reshape(num_rows, num_tokens).cpu().numpy().astype(np.int32)
    columns = {
        "codes": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), num_tokens).cast(pa.list_(pa.int32())),
    }
    for name, size in zip(GRID_COLUMNS[-len(grid) :], grid):
        columns[name] = pa.array(np.full(num_rows, size, dtype=np.int32))
    if condition_column is not None:
        if condition_column not in ("label", "caption"):
            raise ValueError(f"`condition_column` must be 'label', 'caption' or None, got {condition_column!r}.")
        if conditions is None or len(conditions) != num_rows:
            raise ValueError(
                f"Expected {num_rows} {condition_column}s, got {None if conditions is None else len(conditions)}."
            )
        value_type = pa.int64() if condition_column == "label" else pa.string()
        columns[condition_column] = pa.array(list(conditions), type=value_type)
    if caption_embeds is not None:
        columns.update(_caption_embedding_columns(caption_embeds, num_rows, condition_column))
    table = pa.table(columns)
    tmp_path = f"{path}.tmp"
    pq.write_table(table, tmp_path, write_page_checksum=True)
    os.replace(tmp_path, path)


def _caption_embedding_columns(caption_embeds: Sequence[torch.Tensor], num_rows: int, condition_column: str | None):
    """The `caption_embeds` (flattened, float32 or float16) and `caption_length` columns of a shard."""
    import pyarrow as pa

    if condition_column != "caption":
        raise ValueError("`caption_embeds` can only be stored with captions (`condition_column='caption'`).")
    if len(caption_embeds) != num_rows:
        raise ValueError(f"Expected {num_rows} caption embeddings, got {len(caption_embeds)}.")
    dtypes = {e.dtype for e in caption_embeds}
    dims = {e.shape[-1] for e in caption_embeds}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float16} or len(dims) != 1:
        raise ValueError(
            f"`caption_embeds` must be (length, dim) tensors of one float32 or float16 dtype and one dim, got "
            f"dtypes {sorted(map(str, dtypes))} and dims {sorted(dims)}."
        )
    if any(e.ndim != 2 or e.shape[0] < 1 for e in caption_embeds):
        raise ValueError("Every caption embedding must have shape (length >= 1, dim).")
    lengths = np.array([e.shape[0] for e in caption_embeds], dtype=np.int32)
    values = torch.cat([e.detach().reshape(-1) for e in caption_embeds]).cpu().numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) * dims.pop())]).astype(np.int64)
    return {
        "caption_embeds": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)),
        "caption_length": pa.array(lengths),
    }


def read_code_shard(path: str, expected_rows: int | None = None, columns: Sequence[str] | None = None):
    """Read one code shard into a `pyarrow.Table`, verifying page checksums and the row count.

    Raises:
        FileNotFoundError: The shard is absent.
        ValueError: The shard is corrupted, unreadable, or holds an unexpected number of rows (the file is named).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Code shard {path} is missing.")
    try:
        table = pq.read_table(path, columns=list(columns) if columns else None, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(
            f"Code shard {path} is corrupted or unreadable ({type(error).__name__}: {error}). Delete it and rerun "
            "training/extract_codes.py to rewrite it."
        ) from error
    if expected_rows is not None and table.num_rows != expected_rows:
        raise ValueError(
            f"Code shard {path} holds {table.num_rows} rows but metadata.json expects {expected_rows}. Delete it and "
            "rerun training/extract_codes.py to rewrite it."
        )
    return table


def is_valid_code_shard(path: str, expected_rows: int, columns: Sequence[str]) -> bool:
    """Whether a shard can be kept when resuming: it reads with valid page checksums and has the expected rows and
    columns."""
    if not os.path.isfile(path):
        return False
    try:
        table = read_code_shard(path, expected_rows=expected_rows)
    except ValueError:
        return False
    return set(columns) <= set(table.column_names)


def write_code_metadata(output_dir: str, metadata: dict[str, Any]) -> None:
    """Write the `metadata.json` of a code directory atomically (a temporary file renamed into place)."""
    path = os.path.join(output_dir, CODES_METADATA_NAME)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    os.replace(f"{path}.tmp", path)


class CodeDataset(torch.utils.data.Dataset):
    """Token grids with their labels or captions, held in memory.

    Items are `(codes, condition)`: `codes` a LongTensor (h, w), or (T, h, w) for videos, in raster layout,
    `condition` an int label, a caption string, or None for unconditional codes. Codes extracted with a text encoder also hold the encoder
    output of every caption's valid tokens: `caption_embedding(index)`.

    Attributes:
        metadata: The parsed `metadata.json`.
        grid: The token grid, `(h, w)` or `(T, h, w)`.
        height, width: Its last two sizes.
        vocab_size: The VQ codebook size.
        condition_column: "label", "caption" or None.
    """

    def __init__(
        self,
        codes: np.ndarray,
        conditions: list | None,
        metadata: dict[str, Any],
        caption_embeds: np.ndarray | None = None,
        caption_offsets: np.ndarray | None = None,
    ):
        self.metadata = metadata
        self.grid = tuple(int(g) for g in metadata["grid"])
        self.height, self.width = self.grid[-2:]
        self.vocab_size = metadata["vocab_size"]
        self.condition_column = metadata.get("condition_column")
        self._codes = codes
        self._conditions = conditions
        if (caption_embeds is None) != (caption_offsets is None):
            raise ValueError("Pass both `caption_embeds` (tokens, dim) and `caption_offsets` (N + 1,), or neither.")
        self._caption_embeds = caption_embeds
        self._caption_offsets = caption_offsets

    @property
    def has_caption_embeddings(self) -> bool:
        """Whether text-encoder outputs of the captions were extracted with the codes."""
        return self._caption_embeds is not None

    @property
    def caption_dim(self) -> int | None:
        """Width of the stored caption embeddings, or None without them."""
        return None if self._caption_embeds is None else int(self._caption_embeds.shape[1])

    def caption_embedding(self, index: int) -> torch.Tensor:
        """The text-encoder output of caption `index`'s valid tokens, `(length, caption_dim)` (stored dtype)."""
        if self._caption_embeds is None:
            raise ValueError(
                "These codes hold no caption embeddings; extract them with `training/extract_codes.py "
                "--text_encoder_path ...`."
            )
        start, end = self._caption_offsets[index], self._caption_offsets[index + 1]
        return torch.from_numpy(self._caption_embeds[start:end])

    def __len__(self) -> int:
        return self._codes.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.LongTensor, int | str | None]:
        codes = torch.from_numpy(self._codes[index].astype(np.int64)).view(*self.grid)
        condition = None if self._conditions is None else self._conditions[index]
        return codes, condition

    @property
    def labels(self) -> torch.LongTensor | None:
        """All labels as a LongTensor (N,), or None when the codes carry captions or nothing."""
        if self.condition_column != "label":
            return None
        return torch.tensor(self._conditions, dtype=torch.long)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_samples={len(self)}, grid={'x'.join(map(str, self.grid))}, "
            f"vocab_size={self.vocab_size}, condition_column={self.condition_column!r}, "
            f"caption_dim={self.caption_dim})"
        )


def load_code_metadata(path: str) -> dict[str, Any]:
    """Read and check the `metadata.json` of a code directory written by `training/extract_codes.py`."""
    metadata_path = os.path.join(path, CODES_METADATA_NAME)
    if not os.path.isfile(metadata_path):
        raise FileNotFoundError(
            f"{metadata_path} not found: {path!r} is not a code directory written by training/extract_codes.py."
        )
    try:
        with open(metadata_path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{metadata_path} is unreadable: {error}") from error
    for key in ("grid", "vocab_size", "num_shards", "shards", "columns", "complete"):
        if key not in metadata:
            raise ValueError(f"{metadata_path} lacks the key {key!r}; rerun training/extract_codes.py.")
    grid = metadata["grid"]
    if not isinstance(grid, list) or len(grid) not in (2, 3) or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"{metadata_path}: `grid` must be [height, width] or [time, height, width], got {grid!r}.")
    return metadata


def load_code_dataset(path: str, progress: bool = True) -> CodeDataset:
    """Load the code shards of a directory written by `training/extract_codes.py`.

    Args:
        path: The `--output_dir` of `extract_codes.py`.
        progress: Show a progress bar over the shards.

    Returns:
        A `CodeDataset` of `(codes LongTensor (h, w), label | caption | None)`, with the caption embeddings when the
        codes were extracted with `--text_encoder_path`.

    Raises:
        FileNotFoundError: `metadata.json` or a shard listed in it is missing (the file is named).
        ValueError: Extraction did not finish, or a shard is corrupted, unreadable or inconsistent (named).
    """
    from tqdm.auto import tqdm

    metadata = load_code_metadata(path)
    if not metadata["complete"]:
        raise ValueError(
            f"Code extraction into {path!r} did not finish (metadata.json has complete=false); rerun "
            "training/extract_codes.py with the same arguments to resume it."
        )
    grid = tuple(metadata["grid"])
    num_tokens = int(np.prod(grid))
    grid_columns = list(GRID_COLUMNS[-len(grid) :])
    condition_column = metadata.get("condition_column")
    shards = metadata["shards"]
    if len(shards) != metadata["num_shards"]:
        raise ValueError(f"{path}/metadata.json lists {len(shards)} shards but num_shards={metadata['num_shards']}.")
    missing = [s["file"] for s in shards if not os.path.isfile(os.path.join(path, s["file"]))]
    if missing:
        raise FileNotFoundError(
            f"Code shard {os.path.join(path, missing[0])} is missing: metadata.json lists {len(shards)} shards and "
            f"{len(missing)} are absent ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). Rerun "
            "training/extract_codes.py with the same arguments to rewrite them."
        )

    code_dtype = np.uint16 if metadata["vocab_size"] <= np.iinfo(np.uint16).max + 1 else np.int32
    total_rows = sum(s["num_rows"] for s in shards)
    codes = np.empty((total_rows, num_tokens), dtype=code_dtype)
    conditions: list | None = [] if condition_column else None
    columns = ["codes", *grid_columns] + ([condition_column] if condition_column else [])
    with_embeddings = "caption_embeds" in metadata["columns"]
    if with_embeddings:
        columns += ["caption_embeds", "caption_length"]
        caption_dim = (metadata.get("text_encoder") or {}).get("caption_dim")
        if not caption_dim:
            raise ValueError(f"{path}/metadata.json lists caption embeddings but no `text_encoder.caption_dim`.")
        embedding_chunks, lengths = [], []
    row = 0
    for shard in tqdm(shards, desc="Loading code shards", disable=not progress):
        shard_path = os.path.join(path, shard["file"])
        table = read_code_shard(shard_path, expected_rows=shard["num_rows"], columns=columns)
        try:
            flat = table.column("codes").combine_chunks().flatten().to_numpy()
        except Exception as error:  # pyarrow raises several error types on malformed lists
            raise ValueError(f"Code shard {shard_path} has a malformed `codes` column: {error}") from error
        sizes_match = all((table.column(name).to_numpy() == size).all() for name, size in zip(grid_columns, grid))
        if flat.size != table.num_rows * num_tokens or not sizes_match:
            raise ValueError(
                f"Code shard {shard_path} does not hold {'x'.join(map(str, grid))} token grids as metadata.json says."
            )
        codes[row : row + table.num_rows] = flat.reshape(table.num_rows, num_tokens)
        if conditions is not None:
            conditions.extend(table.column(condition_column).to_pylist())
        if with_embeddings:
            shard_embeds, shard_lengths = _read_caption_embeddings(table, caption_dim, shard_path)
            embedding_chunks.append(shard_embeds)
            lengths.append(shard_lengths)
        row += table.num_rows
    if codes.size and int(codes.max()) >= metadata["vocab_size"]:
        raise ValueError(f"Codes in {path} exceed the vocabulary size {metadata['vocab_size']} of metadata.json.")
    if not with_embeddings:
        return CodeDataset(codes, conditions, metadata)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    return CodeDataset(codes, conditions, metadata, np.concatenate(embedding_chunks), offsets)


def _read_caption_embeddings(table, caption_dim: int, shard_path: str) -> tuple[np.ndarray, np.ndarray]:
    """`(embeddings (tokens, caption_dim), lengths (rows,))` from a shard's `caption_embeds` / `caption_length`."""
    try:
        values = table.column("caption_embeds").combine_chunks().flatten().to_numpy()
    except Exception as error:  # pyarrow raises several error types on malformed lists
        raise ValueError(f"Code shard {shard_path} has a malformed `caption_embeds` column: {error}") from error
    lengths = table.column("caption_length").to_numpy().astype(np.int64)
    if (lengths < 1).any() or values.size != int(lengths.sum()) * caption_dim:
        raise ValueError(
            f"Code shard {shard_path}: the `caption_embeds` column does not hold `caption_length` x {caption_dim} "
            "values per row as metadata.json says."
        )
    return values.reshape(-1, caption_dim), lengths
