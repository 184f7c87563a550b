"""The code-shard format: token grids (and labels, captions, caption embeddings) in parquet shards described by a
`metadata.json`. `training/extract_codes.py` writes them with `write_code_shard` / `write_code_metadata`;
`load_code_dataset` reads them back for training through 🤗 `datasets`, memory-mapped by Arrow (`CodeDataset`), so no
process holds the dataset in its own memory.

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

from ..utils.atomic_files import write_json_atomically


CODES_METADATA_NAME = "metadata.json"


CODES_FORMAT_VERSION = 1

ROW_GROUP_BYTES = 1 << 20
"""About how many bytes of rows a parquet row group of a shard holds."""

GRID_COLUMNS = ("time", "height", "width")
"""Per-row grid size columns; image codes have the last two."""


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
    # Small row groups bound the memory of every later reader: Arrow's parquet scanner decodes a row group at once.
    row_bytes = max(1, table.nbytes // max(1, num_rows))
    pq.write_table(table, tmp_path, write_page_checksum=True, row_group_size=max(1, ROW_GROUP_BYTES // row_bytes))
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
        raise _corrupted(path, error) from error
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
    write_json_atomically(os.path.join(output_dir, CODES_METADATA_NAME), metadata)


class _ChunkedColumn:
    """Zero-copy NumPy views of the chunks of one Arrow column, and the chunk holding a given row."""

    def __init__(self, column, to_view):
        self.chunks = [to_view(chunk) for chunk in column.chunks]
        self.starts = np.cumsum([0] + [len(chunk) for chunk in column.chunks])

    def locate(self, index: int) -> tuple[Any, int]:
        chunk = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.chunks[chunk], index - int(self.starts[chunk])


def _codes_view(num_tokens: int):
    def view(chunk):  # FixedSizeList<uint16 | int32>[num_tokens] -> (rows, num_tokens), no copy
        return chunk.flatten().to_numpy(zero_copy_only=True).reshape(len(chunk), num_tokens)

    return view


def _embeddings_view(chunk):  # LargeList<float16 | float32> -> (offsets from 0, flat values), no copy
    offsets = chunk.offsets.to_numpy(zero_copy_only=True)
    return offsets - offsets[0], chunk.flatten().to_numpy(zero_copy_only=True)


class CodeDataset(torch.utils.data.Dataset):
    """Token grids with their labels or captions, memory-mapped: rows are read from the Arrow files 🤗 `datasets`
    converted the shards into, never copied into the process's memory as a whole.

    The operating system pages the file in on demand and shares those pages between every process (and DataLoader
    worker) of a node that reads it, so a process's own memory does not grow with the dataset. `load_code_dataset`
    checks the shards and returns this class.

    Items are `(codes, condition)`: `codes` a LongTensor (h, w), or (T, h, w) for videos, in raster layout,
    `condition` an int label, a caption string, or None for unconditional codes. Codes extracted with a text encoder
    also hold the encoder output of every caption's valid tokens: `caption_embedding(index)`, memory-mapped too.

    Attributes:
        dataset: The `datasets.Dataset` behind it (columns `codes`, flattened; `label` or `caption`; and
            `caption_embeds`, flattened `(length * caption_dim,)`, when present).
        metadata: The parsed `metadata.json`.
        grid: The token grid, `(h, w)` or `(T, h, w)`.
        height, width: Its last two sizes.
        vocab_size: The VQ codebook size.
        condition_column: "label", "caption" or None.
    """

    def __init__(self, dataset, metadata: dict[str, Any]):
        if getattr(dataset, "_indices", None) is not None:
            raise ValueError("`CodeDataset` needs a dataset without an indices mapping (no `select` / `shuffle`).")
        self.dataset = dataset
        self.metadata = metadata
        self.grid = tuple(int(g) for g in metadata["grid"])
        self.height, self.width = self.grid[-2:]
        self.vocab_size = metadata["vocab_size"]
        self.condition_column = metadata.get("condition_column")
        self.caption_dim = None
        if "caption_embeds" in dataset.column_names:
            self.caption_dim = int((metadata.get("text_encoder") or {}).get("caption_dim") or 0) or None
            if self.caption_dim is None:
                raise ValueError("The codes hold caption embeddings but metadata.json has no `text_encoder.caption_dim`.")
        self._views: dict[str, _ChunkedColumn] | None = None

    # The views point into this process's memory map: rebuild them after pickling (DataLoader workers).
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_views": None}

    def _column(self, name: str) -> _ChunkedColumn:
        if self._views is None:
            table = self.dataset.data.table
            views = {"codes": _ChunkedColumn(table.column("codes"), _codes_view(int(np.prod(self.grid))))}
            if self.condition_column == "label":
                views["label"] = _ChunkedColumn(table.column("label"), lambda c: c.to_numpy(zero_copy_only=True))
            elif self.condition_column == "caption":
                views["caption"] = _ChunkedColumn(table.column("caption"), lambda c: c)
            if self.caption_dim is not None:
                views["caption_embeds"] = _ChunkedColumn(table.column("caption_embeds"), _embeddings_view)
            self._views = views
        return self._views[name]

    def _row(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"`CodeDataset` indices must be integers, got {type(index).__name__}.")
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} is out of range for {length} token grids.")
        return int(index) % length

    @property
    def has_caption_embeddings(self) -> bool:
        """Whether text-encoder outputs of the captions were extracted with the codes."""
        return self.caption_dim is not None

    def caption_embedding(self, index: int) -> torch.Tensor:
        """The text-encoder output of caption `index`'s valid tokens, `(length, caption_dim)` (stored dtype)."""
        if self.caption_dim is None:
            raise ValueError(
                "These codes hold no caption embeddings; extract them with `training/extract_codes.py "
                "--text_encoder_path ...`."
            )
        (offsets, values), row = self._column("caption_embeds").locate(self._row(index))
        return torch.from_numpy(values[offsets[row] : offsets[row + 1]].reshape(-1, self.caption_dim).copy())

    def __len__(self) -> int:
        return self.dataset.num_rows

    def __getitem__(self, index: int) -> tuple[torch.LongTensor, int | str | None]:
        row = self._row(index)
        codes, offset = self._column("codes").locate(row)
        grid = torch.from_numpy(codes[offset].astype(np.int64)).view(*self.grid)
        condition = None
        if self.condition_column in ("label", "caption"):
            values, offset = self._column(self.condition_column).locate(row)
            condition = int(values[offset]) if self.condition_column == "label" else values[offset].as_py()
        return grid, condition

    @property
    def labels(self) -> torch.LongTensor | None:
        """All labels as a LongTensor (N,) (a copy: 8 bytes a row), or None when the codes carry captions or
        nothing. `label_range()` gives the smallest and largest label without the copy."""
        if self.condition_column != "label":
            return None
        return torch.from_numpy(np.concatenate(self._column("label").chunks).astype(np.int64))

    def label_range(self) -> tuple[int, int] | None:
        """`(smallest, largest)` label, read from the memory-mapped column; None without labels or rows."""
        import pyarrow.compute as pc

        if self.condition_column != "label" or len(self) == 0:
            return None
        stats = pc.min_max(self.dataset.data.table.column("label"))
        return int(stats["min"].as_py()), int(stats["max"].as_py())

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


READ_BYTES = 1 << 20
"""About how many decoded bytes `load_code_dataset` reads from a shard at a time while 🤗 datasets converts it
(pyarrow's list decoding needs several times that), so the conversion's memory stays small and flat."""


def _code_features(metadata: dict[str, Any], schema):
    """The 🤗 `datasets.Features` the shards are cast to: `codes` a fixed-length list of uint16 (int32 above 65536
    codes), half the bytes of the stored int32 and a zero-copy (rows, tokens) view; the other columns as stored."""
    import datasets

    features = datasets.Features.from_arrow_schema(schema)
    code_type = "uint16" if metadata["vocab_size"] <= np.iinfo(np.uint16).max + 1 else "int32"
    features["codes"] = datasets.List(datasets.Value(code_type), length=int(np.prod(metadata["grid"])))
    return features


def _expected_columns(metadata: dict[str, Any]) -> list[str]:
    columns = ["codes", *GRID_COLUMNS[-len(metadata["grid"]) :]]
    if metadata.get("condition_column"):
        columns.append(metadata["condition_column"])
    if "caption_embeds" in metadata["columns"]:
        if not (metadata.get("text_encoder") or {}).get("caption_dim"):
            raise ValueError("metadata.json lists caption embeddings but no `text_encoder.caption_dim`.")
        columns += ["caption_embeds", "caption_length"]
    return columns


def _check_shard_files(path: str, metadata: dict[str, Any], columns: list[str]):
    """Check every shard's footer (row count, columns) before any conversion; return the first shard's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = None
    for shard in metadata["shards"]:
        shard_path = os.path.join(path, shard["file"])
        try:
            footer = pq.read_metadata(shard_path)
        except (pa.ArrowException, OSError) as error:
            raise _corrupted(shard_path, error) from error
        if footer.num_rows != shard["num_rows"]:
            raise ValueError(
                f"Code shard {shard_path} holds {footer.num_rows} rows but metadata.json expects {shard['num_rows']}. "
                "Delete it and rerun training/extract_codes.py to rewrite it."
            )
        absent = [c for c in columns if c not in footer.schema.to_arrow_schema().names]
        if absent:
            raise ValueError(f"Code shard {shard_path} lacks the column(s) {absent} that metadata.json lists.")
        schema = schema or footer.schema.to_arrow_schema()
    return schema


def _corrupted(shard_path: str, error: BaseException) -> ValueError:
    return ValueError(
        f"Code shard {shard_path} is corrupted or unreadable ({type(error).__name__}: {error}). Delete it and rerun "
        "training/extract_codes.py to rewrite it."
    )


def _read_shards(path: str, metadata: dict[str, Any], cache_dir: str | None, progress: bool):
    """The shards as one memory-mapped `datasets.Dataset`: 🤗 datasets converts them once into Arrow files of its
    cache (keyed by the shard files and their modification times) and maps those files on every later call."""
    import datasets
    import pyarrow.dataset as ds
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    columns = _expected_columns(metadata)
    schema = _check_shard_files(path, metadata, columns)
    features = _code_features(metadata, schema.remove_metadata())
    features = datasets.Features({name: features[name] for name in columns})
    row_bytes = 4 * int(np.prod(metadata["grid"]))
    if "caption_embeds" in columns:
        text_encoder = metadata["text_encoder"]
        row_bytes += 4 * int(text_encoder["caption_dim"]) * int(text_encoder.get("max_sequence_length") or 120)
    # Page checksums catch damaged data pages; a buffered stream reads a page at a time, not whole column chunks.
    scan_options = ds.ParquetFragmentScanOptions(
        page_checksum_verification=True, use_buffered_stream=True, buffer_size=1 << 20, pre_buffer=False
    )
    files = [os.path.join(path, shard["file"]) for shard in metadata["shards"]]
    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        return datasets.load_dataset(
            "parquet", data_files=files, split="train", cache_dir=cache_dir, features=features, columns=columns,
            batch_size=max(1, READ_BYTES // row_bytes), fragment_scan_options=scan_options,
        )  # fmt: skip
    except Exception as error:  # datasets wraps pyarrow's decoding and cast errors in its own types
        for file in files:  # name the damaged shard: reading it alone raises the error that names it
            read_code_shard(file)
        raise ValueError(
            f"The code shards of {path!r} do not hold {'x'.join(map(str, metadata['grid']))} token grids of the "
            f"columns metadata.json lists ({type(error).__name__}: {error})."
        ) from error
    finally:
        if silence:
            enable_progress_bars()


def _check_contents(path: str, dataset, metadata: dict[str, Any]) -> None:
    """Check grid sizes, code range and caption embedding lengths on the memory-mapped columns (no copy)."""
    import pyarrow.compute as pc

    if dataset.num_rows == 0:
        return
    table = dataset.data.table
    grid = tuple(metadata["grid"])
    for name, size in zip(GRID_COLUMNS[-len(grid) :], grid):
        stats = pc.min_max(table.column(name))
        if stats["min"].as_py() != size or stats["max"].as_py() != size:
            raise ValueError(f"The code shards of {path!r} do not hold {'x'.join(map(str, grid))} token grids as metadata.json says.")
    codes = pc.min_max(pc.list_flatten(table.column("codes")))
    if codes["min"].as_py() < 0 or codes["max"].as_py() >= metadata["vocab_size"]:
        raise ValueError(
            f"Codes in {path!r} are outside [0, {metadata['vocab_size'] - 1}], the vocabulary of metadata.json."
        )
    if "caption_embeds" in dataset.column_names:
        dim = int(metadata["text_encoder"]["caption_dim"])
        lengths = table.column("caption_length")
        valid = pc.all(pc.equal(pc.list_value_length(table.column("caption_embeds")), pc.multiply(lengths, dim)))
        if pc.min(lengths).as_py() < 1 or not valid.as_py():
            raise ValueError(
                f"The `caption_embeds` column of {path!r} does not hold `caption_length` x {dim} values per row as "
                "metadata.json says."
            )


def load_code_dataset(path: str, progress: bool = True, cache_dir: str | None = None) -> CodeDataset:
    """Open the code shards of a directory written by `training/extract_codes.py`, memory-mapped.

    The shards are read through 🤗 `datasets` (`load_dataset("parquet", ...)`): the first call converts them into
    Arrow files of the datasets cache, a batch of rows at a time with page checksums verified; later calls, in any
    process, map those files again. Rows are then read from the memory map: the process's memory does not grow with
    the dataset, and every process of a node shares the same pages. Grid sizes, code range and caption embedding
    lengths are checked on every open. In a multi-process run, let one process convert first
    (`accelerator.main_process_first()`); datasets locks its cache so concurrent conversions wait for each other.

    Args:
        path: The `--output_dir` of `extract_codes.py`.
        progress: Show datasets' progress bars while converting.
        cache_dir: A 🤗 datasets cache folder (default: `HF_DATASETS_CACHE`). The conversion takes about 2 bytes
            per token (4 with a vocabulary above 65536) plus the caption embeddings.

    Returns:
        A `CodeDataset` of `(codes LongTensor (h, w), label | caption | None)`, with the caption embeddings when the
        codes were extracted with `--text_encoder_path`.

    Raises:
        FileNotFoundError: `metadata.json` or a shard listed in it is missing (the file is named).
        ValueError: Extraction did not finish, or a shard is corrupted, unreadable or inconsistent (named).
    """
    metadata = load_code_metadata(path)
    if not metadata["complete"]:
        raise ValueError(
            f"Code extraction into {path!r} did not finish (metadata.json has complete=false); rerun "
            "training/extract_codes.py with the same arguments to resume it."
        )
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
    dataset = _read_shards(path, metadata, cache_dir, progress)
    _check_contents(path, dataset, metadata)
    return CodeDataset(dataset, metadata)
