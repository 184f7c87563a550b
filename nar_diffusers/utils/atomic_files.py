"""Small files written atomically: a reader sees the old file or the whole new one, never a partial one."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to a hidden sibling, flush it to disk, then rename it over `path`."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp_path = os.path.join(folder, f".{name}.tmp")
    try:
        with open(tmp_path, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def write_json_atomically(path: str | os.PathLike, value: Any) -> None:
    """`value` as indented JSON, written atomically."""
    write_text_atomically(path, json.dumps(value, indent=2) + "\n")
