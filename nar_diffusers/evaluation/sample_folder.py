"""The output folder of a bulk sampling run, written so that a killed run resumes without redoing or duplicating
samples.

    <output-dir>/
      sample_settings.json       what the samples were made with (with the model's fingerprint); a rerun must
                                 ask for the same
      .sample.lock               while a run writes: who it is (`run_lock.py`)
      images/000000.png ...      one file per sample index (videos: videos/000000.mp4, .gif or .npy)
      shards/shard-00000.json    a shard's completion marker: its index range and every file with its size
      samples_<N>x<H>x<W>x3.npz  images: the ADM evaluation batch (written last)

A shard is generated into `.shard-<k>.tmp/`, its files are then moved into place (each rename is atomic) and its
marker is written last (atomically). A shard counts as done only when its marker matches the plan and every file
it lists is there with its size; otherwise it is generated again and its files, named by sample index, are
replaced, never duplicated. Only files this module names are ever removed: the sample files of leftover
`.shard-<k>.tmp` folders (a folder holding anything else is kept, and the run refused).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from diffusers.utils import logging

from ..utils.atomic_files import write_json_atomically
from .model_fingerprint import changed_files

logger = logging.get_logger(__name__)

SETTINGS_NAME = "sample_settings.json"
MARKERS_FOLDER = "shards"
FINGERPRINT_KEY = "model_fingerprint"
FORMAT_VERSION = 1
_TEMPORARY_SHARD = re.compile(r"\.shard-\d+\.tmp")
# What a shard folder may hold: sample files, and the temporary files of the writers (`write_video`'s `.tmp-*`).
_SHARD_FILE = re.compile(r"(\d+|\.tmp-\w+)\.(png|mp4|gif|npy)")


class SampleFolder:
    """The folder of one run.

    Args:
        root: The `--output-dir`.
        files_folder: "images" or "videos".
        extension: ".png", ".mp4", ".gif" or ".npy".
        num_digits: Digits of the zero-padded sample index in file names.
    """

    def __init__(self, root: str, files_folder: str, extension: str, num_digits: int = 6):
        self.root = root
        self.files_dir = os.path.join(root, files_folder)
        self.markers_dir = os.path.join(root, MARKERS_FOLDER)
        self.extension = extension
        self.num_digits = num_digits

    def file_name(self, index: int) -> str:
        return f"{index:0{self.num_digits}d}{self.extension}"

    def file_path(self, index: int) -> str:
        return os.path.join(self.files_dir, self.file_name(index))

    def marker_path(self, shard: int) -> str:
        return os.path.join(self.markers_dir, f"shard-{shard:05d}.json")

    def temporary_dir(self, shard: int) -> str:
        return os.path.join(self.root, f".shard-{shard:05d}.tmp")

    # --- settings ------------------------------------------------------------------------------------

    def check_settings(self, settings: Mapping[str, Any]) -> bool:
        """Raise a ValueError when the folder holds samples made with another model (`FINGERPRINT_KEY`) or other
        settings (names the differences). Reads only: every process can call it before the main process writes.

        Returns whether the settings on disk are to be replaced: they differ, but no sample was made with them
        (a run refused after writing them, or killed before its first file), so nothing could mix."""
        path = os.path.join(self.root, SETTINGS_NAME)
        if os.path.isdir(self.root) and not os.path.isfile(path):
            foreign = [name for name in os.listdir(self.root) if not name.startswith(".")]
            if foreign:
                raise ValueError(
                    f"--output-dir {self.root!r} is not empty and was not written by `nar-diffusers sample` (no "
                    f"{SETTINGS_NAME}; it holds {sorted(foreign)[:5]}): choose a new or empty folder."
                )
            return False
        if not os.path.isfile(path):
            return False
        try:
            with open(path, encoding="utf-8") as file:
                previous = json.load(file)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is unreadable ({error}); choose another --output-dir.") from None
        if not isinstance(previous, dict):
            raise ValueError(f"{path} does not hold a JSON object; choose another --output-dir.")
        current = json.loads(json.dumps(settings))  # tuples -> lists, as read back from JSON
        if not self.holds_samples():
            return previous != current
        self._check_fingerprint(previous.pop(FINGERPRINT_KEY, None), current.pop(FINGERPRINT_KEY, None))
        differences = [key for key in sorted(set(previous) | set(current)) if previous.get(key) != current.get(key)]
        if differences:
            shown = "; ".join(f"{key}: {previous.get(key)!r} -> {current.get(key)!r}" for key in differences[:6])
            raise ValueError(
                f"--output-dir {self.root!r} holds samples made with other settings ({shown}). Resume with the same "
                "settings, or choose another --output-dir."
            )
        return False

    def _check_fingerprint(self, previous: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> None:
        if previous is None:
            # Folders written before fingerprints were stored: their weights cannot be compared.
            logger.warning(f"{SETTINGS_NAME} in {self.root} has no model fingerprint: the weights are not checked.")
            return
        if current is not None and previous.get("sha256") != current.get("sha256"):
            changed = changed_files(dict(previous), dict(current))
            raise ValueError(
                f"--model holds other weights than the samples in --output-dir {self.root!r} were made with (changed: "
                f"{', '.join(changed[:4]) or 'the files'}): sample this model into a new --output-dir."
            )

    def holds_samples(self) -> bool:
        """Whether any sample file or shard marker is in the folder."""
        return any(
            os.path.isdir(folder) and any(not name.startswith(".") for name in os.listdir(folder))
            for folder in (self.files_dir, self.markers_dir)
        )

    def write_settings(self, settings: Mapping[str, Any], replace: bool = False) -> None:
        """Create the folders and write the settings (main process, after `check_settings` passed everywhere;
        `replace`: what it returned)."""
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, SETTINGS_NAME)
        if replace or not os.path.isfile(path):
            write_json_atomically(path, dict(settings))
        os.makedirs(self.files_dir, exist_ok=True)
        os.makedirs(self.markers_dir, exist_ok=True)

    def _remove_shard_dir(self, tmp_dir: str) -> None:
        """Remove a temporary shard folder and the sample files (and writers' temporary files) in it; a file this
        module did not name is kept, and the run refused, naming it."""
        names = os.listdir(tmp_dir)
        foreign = sorted(name for name in names if not _SHARD_FILE.fullmatch(name))
        if foreign:
            raise ValueError(
                f"{tmp_dir} holds files `nar-diffusers sample` did not write ({', '.join(foreign[:5])}): move them "
                "out, then rerun."
            )
        for name in names:
            os.remove(os.path.join(tmp_dir, name))
        os.rmdir(tmp_dir)

    def remove_temporary_dirs(self) -> list[str]:
        """Remove `.shard-<k>.tmp` folders a killed run left behind; return their names."""
        removed = []
        if os.path.isdir(self.root):
            for name in sorted(os.listdir(self.root)):
                if _TEMPORARY_SHARD.fullmatch(name) and os.path.isdir(os.path.join(self.root, name)):
                    self._remove_shard_dir(os.path.join(self.root, name))
                    removed.append(name)
        return removed

    # --- shards --------------------------------------------------------------------------------------

    def read_marker(self, shard: int) -> dict[str, Any] | None:
        try:
            with open(self.marker_path(shard), encoding="utf-8") as file:
                marker = json.load(file)
        except (OSError, json.JSONDecodeError):
            return None
        return marker if isinstance(marker, dict) else None

    def is_done(self, shard: int, indices: range) -> bool:
        """Whether shard `shard` was completed for exactly `indices` and all its files are in place."""
        marker = self.read_marker(shard)
        if marker is None or (marker.get("start"), marker.get("end")) != (indices.start, indices.stop):
            return False
        files = marker.get("files")
        if not isinstance(files, dict) or sorted(files) != [self.file_name(i) for i in indices]:
            return False
        for name, size in files.items():
            path = os.path.join(self.files_dir, name)
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                return False
        return True

    def begin_shard(self, shard: int) -> str:
        """A fresh temporary folder to write shard `shard`'s files into."""
        tmp_dir = self.temporary_dir(shard)
        if os.path.isdir(tmp_dir):
            self._remove_shard_dir(tmp_dir)
        os.makedirs(tmp_dir)
        return tmp_dir

    def commit_shard(self, shard: int, indices: range, details: Mapping[str, Any]) -> dict[str, Any]:
        """Move the shard's files from its temporary folder into place, then write its marker (with `details`)."""
        tmp_dir = self.temporary_dir(shard)
        files = {}
        for index in indices:
            name = self.file_name(index)
            source = os.path.join(tmp_dir, name)
            if not os.path.isfile(source):
                raise RuntimeError(f"Shard {shard}: sample {index} was not written to {source}.")
            files[name] = os.path.getsize(source)
            os.replace(source, os.path.join(self.files_dir, name))
        self._remove_shard_dir(tmp_dir)
        marker = {
            "format_version": FORMAT_VERSION, "shard": shard, "start": indices.start, "end": indices.stop,
            **details, "files": files,
        }  # fmt: skip
        write_json_atomically(self.marker_path(shard), marker)
        return marker
