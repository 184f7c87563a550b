"""Writing conversion results: output folder checks, atomic saves, readable key lists."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def format_keys(keys: list[str], limit: int = 20) -> str:
    """`[a, b, ... (n more)]`: a key list short enough for an error message."""
    shown = keys[:limit] + ([f"... ({len(keys) - limit} more)"] if len(keys) > limit else [])
    return "[" + ", ".join(shown) + "]"


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse an existing file, or a non-empty folder unless `overwrite`."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"`output_dir` {output_dir} exists and is not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"`output_dir` {output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )


def save_atomically(obj, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """`obj.save_pretrained` (safetensors) into a temporary sibling folder, then rename it to `output_dir`.

    A failure at any point leaves neither a partial `output_dir` nor the temporary folder behind.
    """
    output_dir = Path(output_dir)
    parent = output_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()  # not tempfile.mkdtemp: the final folder should get the usual (umask) permissions
    try:
        obj.save_pretrained(tmp_dir, safe_serialization=True)
        check_output_dir(output_dir, overwrite)  # again: the folder may have appeared meanwhile
        if output_dir.exists():
            backup = parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
            output_dir.rename(backup)
            try:
                tmp_dir.rename(output_dir)
            except BaseException:
                backup.rename(output_dir)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp_dir.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return output_dir
