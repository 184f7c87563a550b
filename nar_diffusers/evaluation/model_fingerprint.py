"""The fingerprint of a saved pipeline folder: the SHA-256 of each of its configs, weights and tokenizer files.

A resumed `sample` run compares it with the one stored in `sample_settings.json`, so samples of other weights
re-saved under the same path never join the same folder (and `.npz`). Every file is hashed on every run: a cache
keyed on sizes and modification times could be fooled by a re-save, so there is none.
"""

from __future__ import annotations

import hashlib
import os

CHUNK_BYTES = 8 * 1024 * 1024
# Not part of what the model computes: the model card and the code module a saved folder carries for the Hub.
_IGNORED_SUFFIXES = (".md", ".py", ".pyc", ".lock")


def file_sha256(path: str) -> str:
    """The SHA-256 of a file, read in chunks (weights can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(folder: str) -> dict[str, object]:
    """`{"sha256": <digest of all>, "files": {relative path: sha256}}` of the files of the pipeline in `folder`
    (hidden files and folders, model cards and code modules left out)."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.startswith(".") or name.endswith(_IGNORED_SUFFIXES) or not os.path.isfile(path):
                continue
            files[os.path.relpath(path, folder).replace(os.sep, "/")] = file_sha256(path)
    overall = hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in sorted(files.items())).encode())
    return {"sha256": overall.hexdigest(), "files": files}


def changed_files(previous: dict, current: dict) -> list[str]:
    """The files added, removed or changed between two fingerprints."""
    before, after = previous.get("files") or {}, current.get("files") or {}
    return sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
