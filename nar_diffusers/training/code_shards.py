"""The code-shard format: token grids (and labels, captions, caption embeddings) in parquet shards described by a
`metadata.json`. `training/extract_codes.py` writes them with `write_code_shard` / `write_code_metadata`;
`load_code_dataset` reads them back for training, memory-mapped: it converts the checked shards once into an Arrow
file that 🤗 `datasets` memory-maps (`CodeDataset`), so no process holds the dataset in its own memory.

Image codes are `(h, w)` grids (metadata "grid" `[h, w]`, columns `height`, `width`); video codes are `(T, h, w)`
grids (metadata "grid" `[T, h, w]`, plus a `time` column). Codes are stored flattened in raster order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..utils.atomic_files import write_json_atomically


CODES_METADATA_NAME = "metadata.json"


CODES_FORMAT_VERSION = 1

GRID_COLUMNS = ("time", "height", "width")
"""Per-row grid size columns; image codes have the last two."""


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
    """Token grids with their labels or captions, memory-mapped: rows are read from an Arrow file through 🤗
    `datasets` (`datasets.Dataset.from_file`), never copied into the process's memory as a whole.

    The operating system pages the file in on demand and shares those pages between every process (and DataLoader
    worker) of a node that reads it, so a process's own memory does not grow with the dataset. `load_code_dataset`
    builds the Arrow file from the parquet shards once (checking them) and returns this class.

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




ARROW_CACHE_VERSION = 1

ARROW_CACHE_FOLDER = "nar_diffusers_codes"
"""Sub-folder of the 🤗 datasets cache (`HF_DATASETS_CACHE`) that holds the Arrow files of code directories."""


def code_cache_folder(cache_dir: str | None = None) -> str:
    """Where `load_code_dataset` keeps Arrow files: `<cache_dir>/nar_diffusers_codes`, by default in the 🤗
    datasets cache (`HF_DATASETS_CACHE`)."""
    import datasets.config

    return os.path.join(cache_dir or str(datasets.config.HF_DATASETS_CACHE), ARROW_CACHE_FOLDER)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def code_cache_file(path: str, metadata: dict[str, Any], cache_dir: str | None = None) -> str:
    """The Arrow file `load_code_dataset` reads for the code directory `path`: named after the directory and a
    digest of its metadata and of every shard's size and modification time, so rewritten shards get a new file."""
    shards = []
    for shard in metadata["shards"]:
        stat = os.stat(os.path.join(path, shard["file"]))
        shards.append([shard["file"], stat.st_size, stat.st_mtime_ns])
    key = _digest({"version": ARROW_CACHE_VERSION, "metadata": metadata, "shards": shards})
    return os.path.join(code_cache_folder(cache_dir), f"codes-{_digest(os.path.realpath(path))}-{key}.arrow")


def load_code_dataset(path: str, progress: bool = True, cache_dir: str | None = None) -> CodeDataset:
    """Open the code shards of a directory written by `training/extract_codes.py`, memory-mapped.

    The first call converts the parquet shards, one batch of rows at a time, into one Arrow file in the cache
    (checking page checksums, row counts, grid sizes and code ranges on the way); later calls, in any process,
    open that file directly. Rows are then read from the memory map (`datasets.Dataset.from_file`): the process's
    memory does not grow with the dataset, and every process of a node shares the same pages. In a multi-process
    run, let one process build the file first (`accelerator.main_process_first()`); concurrent builds are safe
    (each writes its own temporary file and renames it into place) but do the work twice.

    Args:
        path: The `--output_dir` of `extract_codes.py`.
        progress: Show a progress bar while building the Arrow file.
        cache_dir: A 🤗 datasets cache folder (default: `HF_DATASETS_CACHE`); the Arrow file goes into its
            `nar_diffusers_codes` sub-folder. It takes about 2 bytes per token (4 with a vocabulary above 65536)
            plus the caption embeddings.

    Returns:
        A `CodeDataset` of `(codes LongTensor (h, w), label | caption | None)`, with the caption embeddings when the
        codes were extracted with `--text_encoder_path`.

    Raises:
        FileNotFoundError: `metadata.json` or a shard listed in it is missing (the file is named).
        ValueError: Extraction did not finish, or a shard is corrupted, unreadable or inconsistent (named).
    """
    import datasets

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
    cache_file = code_cache_file(path, metadata, cache_dir)
    if not os.path.isfile(cache_file):
        _build_arrow_file(path, metadata, cache_file, progress)
    dataset = datasets.Dataset.from_file(cache_file)  # memory-mapped
    return CodeDataset(dataset, metadata)


def _build_arrow_file(path: str, metadata: dict[str, Any], cache_file: str, progress: bool) -> None:
    """Convert the checked parquet shards into one Arrow stream file (what `datasets` memory-maps), atomically;
    then remove this directory's Arrow files of earlier shard versions."""
    import socket

    import pyarrow as pa
    from tqdm.auto import tqdm

    folder, name = os.path.split(cache_file)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"Cannot create the Arrow cache folder {folder!r} ({error}); pass another `cache_dir`.") from None
    source_prefix = name.rsplit("-", 1)[0]  # codes-<directory digest>
    host = socket.gethostname()
    _remove_dead_temporaries(folder, source_prefix, host)
    tmp_path = os.path.join(folder, f".{name}.{host}.{os.getpid()}.tmp")
    converter = _ShardConverter(path, metadata)
    try:
        with pa.OSFile(tmp_path, "wb") as sink, pa.ipc.new_stream(sink, converter.schema) as writer:
            for shard in tqdm(metadata["shards"], desc="Memory-mapping code shards", disable=not progress):
                for batch in converter.batches(shard):
                    writer.write_batch(batch)
        os.replace(tmp_path, cache_file)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        pa.default_memory_pool().release_unused()  # hand the conversion buffers back to the system
    for other in os.listdir(folder):
        if other.startswith(source_prefix + "-") and other.endswith(".arrow") and other != name:
            try:
                os.remove(os.path.join(folder, other))
            except OSError:  # another process removed it, or it is in use on a platform that forbids removal
                pass


def _remove_dead_temporaries(folder: str, source_prefix: str, host: str) -> None:
    """Remove temporary Arrow files of this directory left by killed builds on this host (their process is gone)."""
    pattern = re.compile(rf"\.{re.escape(source_prefix)}-[0-9a-f]+\.arrow\.{re.escape(host)}\.(\d+)\.tmp")
    for other in os.listdir(folder):
        match = pattern.fullmatch(other)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            os.remove(os.path.join(folder, other))
        except OSError:  # alive, owned by another user
            pass


class _ShardConverter:
    """Checks parquet code shards batch by batch and turns them into the Arrow layout `CodeDataset` reads:
    `codes` a fixed-size list of uint16 (int32 above 65536 codes), `label` int64 or `caption` string, and
    `caption_embeds` a large list of the stored float type."""

    READ_BYTES = 1 << 20
    """Decoded bytes per parquet read (pyarrow's list decoding needs several times that)."""
    WRITE_BYTES = 8 << 20
    """Converted bytes per Arrow record batch: few large chunks keep the table's own overhead small."""

    def __init__(self, path: str, metadata: dict[str, Any]):
        import pyarrow as pa

        self.path = path
        self.grid = tuple(metadata["grid"])
        self.num_tokens = int(np.prod(self.grid))
        self.vocab_size = metadata["vocab_size"]
        self.grid_columns = list(GRID_COLUMNS[-len(self.grid) :])
        self.condition_column = metadata.get("condition_column")
        self.caption_dim = None
        code_type = pa.uint16() if self.vocab_size <= np.iinfo(np.uint16).max + 1 else pa.int32()
        self.code_dtype = code_type.to_pandas_dtype()
        fields = [pa.field("codes", pa.list_(code_type, self.num_tokens))]
        if self.condition_column == "label":
            fields.append(pa.field("label", pa.int64()))
        elif self.condition_column == "caption":
            fields.append(pa.field("caption", pa.string()))
        self.columns = ["codes", *self.grid_columns] + ([self.condition_column] if self.condition_column else [])
        if "caption_embeds" in metadata["columns"]:
            text_encoder = metadata.get("text_encoder") or {}
            self.caption_dim = text_encoder.get("caption_dim")
            if not self.caption_dim:
                raise ValueError(f"{path}/metadata.json lists caption embeddings but no `text_encoder.caption_dim`.")
            self.embedding_type = pa.float16() if text_encoder.get("dtype") == "float16" else pa.float32()
            fields.append(pa.field("caption_embeds", pa.large_list(self.embedding_type)))
            self.columns += ["caption_embeds", "caption_length"]
        self.schema = pa.schema(fields)
        row_bytes = 4 * self.num_tokens
        if self.caption_dim is not None:
            row_bytes += 4 * self.caption_dim * int(text_encoder.get("max_sequence_length") or 120)
        self.read_rows = max(1, self.READ_BYTES // row_bytes)

    def _combine(self, batches):
        """One record batch of converted batches."""
        import pyarrow as pa

        if len(batches) == 1:
            return batches[0]
        return pa.Table.from_batches(batches, schema=self.schema).combine_chunks().to_batches()[0]

    def batches(self, shard: dict[str, Any]):
        """The checked Arrow record batches of one shard."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        shard_path = os.path.join(self.path, shard["file"])
        rows = 0
        try:
            # A buffered stream reads a page at a time instead of whole column chunks.
            parquet = pq.ParquetFile(
                shard_path, page_checksum_verification=True, buffer_size=1 << 20, pre_buffer=False
            )
            if parquet.metadata.num_rows != shard["num_rows"]:
                raise ValueError(
                    f"Code shard {shard_path} holds {parquet.metadata.num_rows} rows but metadata.json expects "
                    f"{shard['num_rows']}. Delete it and rerun training/extract_codes.py to rewrite it."
                )
            absent = [c for c in self.columns if c not in parquet.schema_arrow.names]
            if absent:
                raise ValueError(f"Code shard {shard_path} lacks the column(s) {absent} that metadata.json lists.")
            pending, pending_bytes = [], 0
            for batch in parquet.iter_batches(batch_size=self.read_rows, columns=self.columns):
                rows += batch.num_rows
                pending.append(self._convert(batch, shard_path))
                pending_bytes += pending[-1].nbytes
                if pending_bytes >= self.WRITE_BYTES:
                    yield self._combine(pending)
                    pending, pending_bytes = [], 0
            if pending:
                yield self._combine(pending)
        except (pa.ArrowException, OSError) as error:
            raise ValueError(
                f"Code shard {shard_path} is corrupted or unreadable ({type(error).__name__}: {error}). Delete it and "
                "rerun training/extract_codes.py to rewrite it."
            ) from error
        if rows != shard["num_rows"]:
            raise ValueError(f"Code shard {shard_path} yielded {rows} rows but metadata.json expects {shard['num_rows']}.")

    def _convert(self, batch, shard_path: str):
        import pyarrow as pa
        import pyarrow.compute as pc

        rows = batch.num_rows
        try:
            flat = batch.column("codes").flatten().to_numpy()
        except Exception as error:  # pyarrow raises several error types on malformed lists
            raise ValueError(f"Code shard {shard_path} has a malformed `codes` column: {error}") from error
        sizes_match = all(
            (batch.column(name).to_numpy(zero_copy_only=False) == size).all()
            for name, size in zip(self.grid_columns, self.grid)
        )
        lengths_match = rows == 0 or pc.all(pc.equal(pc.list_value_length(batch.column("codes")), self.num_tokens)).as_py()
        if flat.size != rows * self.num_tokens or not sizes_match or not lengths_match:
            raise ValueError(
                f"Code shard {shard_path} does not hold {'x'.join(map(str, self.grid))} token grids as metadata.json "
                "says."
            )
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size):
            raise ValueError(
                f"Codes in {shard_path} are outside [0, {self.vocab_size - 1}], the vocabulary of metadata.json."
            )
        columns = [pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(self.code_dtype)), self.num_tokens)]
        if self.condition_column is not None:
            columns.append(batch.column(self.condition_column).cast(self.schema.field(self.condition_column).type))
        if self.caption_dim is not None:
            columns.append(self._embeddings(batch, shard_path))
        return pa.record_batch(columns, schema=self.schema)

    def _embeddings(self, batch, shard_path: str):
        import pyarrow as pa

        try:
            embeds = batch.column("caption_embeds")
            values = embeds.flatten().cast(self.embedding_type)
            list_lengths = np.diff(embeds.offsets.to_numpy())
        except Exception as error:  # pyarrow raises several error types on malformed lists
            raise ValueError(f"Code shard {shard_path} has a malformed `caption_embeds` column: {error}") from error
        lengths = batch.column("caption_length").to_numpy(zero_copy_only=False).astype(np.int64)
        if (lengths < 1).any() or not np.array_equal(list_lengths, lengths * self.caption_dim):
            raise ValueError(
                f"Code shard {shard_path}: the `caption_embeds` column does not hold `caption_length` x "
                f"{self.caption_dim} values per row as metadata.json says."
            )
        offsets = np.concatenate([[0], np.cumsum(list_lengths)]).astype(np.int64)
        return pa.LargeListArray.from_arrays(pa.array(offsets), values)
