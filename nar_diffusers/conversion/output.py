"""Writing conversion results: output folder checks, atomic saves, readable key lists.

Every folder a converter writes holds a manifest (`MANIFEST_NAME`) listing the files it wrote. `--overwrite` replaces
a folder only when it holds nothing but those files, so it never deletes anything the converter did not write.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path

from diffusers.utils import logging

from ..utils.model_card import save_model_card

logger = logging.get_logger(__name__)


def format_keys(keys: list[str], limit: int = 20) -> str:
    """`[a, b, ... (n more)]`: a key list short enough for an error message."""
    shown = keys[:limit] + ([f"... ({len(keys) - limit} more)"] if len(keys) > limit else [])
    return "[" + ", ".join(shown) + "]"


# Errors the command lines report in one line with exit status 2 (bad inputs, refused or failed writes).
REPORTED_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError)


def one_line(err: BaseException) -> str:
    """The error message on a single line, for the command line's report."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


MANIFEST_NAME = "nar_diffusers_manifest.json"
# Marks a temporary or backup folder as belonging to a running conversion (process id and host).
IN_PROGRESS_NAME = ".nar_diffusers_in_progress.json"


# --------------------------------------------------------------------------------------------------------------------
# Ownership: the manifest
# --------------------------------------------------------------------------------------------------------------------


def _files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of every non-folder entry under `folder` (symbolic links are listed, never followed)."""
    found: list[str] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.append(Path(os.path.relpath(os.path.join(root, name), folder)).as_posix())
    return sorted(found)


def read_manifest(folder: str | os.PathLike) -> set[str] | None:
    """The files the converter wrote into `folder`, from its manifest; None without a valid manifest."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def write_manifest(folder: Path) -> None:
    """List every file now in `folder` (the converter's own output) in its manifest."""
    files = [f for f in _files_under(folder) if f not in (MANIFEST_NAME, IN_PROGRESS_NAME)]
    manifest = {
        "written_by": "nar-diffusers converter",
        "note": "Files the converter wrote. --overwrite replaces this folder only while it holds nothing else.",
        "files": files,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Files under `folder` that its manifest does not list (every file when there is no valid manifest)."""
    listed = read_manifest(folder)
    own = {IN_PROGRESS_NAME} | ({MANIFEST_NAME} | listed if listed is not None else set())
    return [f for f in _files_under(Path(folder)) if f not in own]


def _remove_own_files(folder: Path) -> None:
    """Delete the manifest-listed files of `folder`, then its empty sub-folders and itself; keep anything else."""
    listed = read_manifest(folder) or set()
    own = listed | {MANIFEST_NAME, IN_PROGRESS_NAME}
    for rel in _files_under(folder):
        if rel in own:
            try:
                (folder / rel).unlink()
            except OSError as err:
                logger.warning(f"Could not remove {folder / rel}: {err}")
    for root, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):  # deepest first
        try:
            os.rmdir(root)
        except OSError:
            pass  # not empty: it holds something the converter did not write
    if folder.exists():
        logger.warning(f"Left {folder} in place: it holds files the converter did not write {foreign_files(folder)}.")


# --------------------------------------------------------------------------------------------------------------------
# Checks before anything is loaded or written
# --------------------------------------------------------------------------------------------------------------------


def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool, inputs: Mapping[str, str | os.PathLike | None] | None = None
) -> None:
    """Refuse an output folder the converter must not write; raises before anything is touched.

    Refused: an existing file or symbolic link; a folder (or parent) that cannot be created or written; a folder
    containing one of `inputs` (label -> path, e.g. `{"`vq_path` (--vq-path)": ...}`); a non-empty folder unless
    `overwrite`; and, even with `overwrite`, a folder holding files its manifest does not list.
    """
    output_dir = Path(output_dir)
    label = f"`output_dir` (--output-dir) {output_dir}"
    if output_dir.is_symlink():
        raise FileExistsError(f"{label} is a symbolic link; pass the folder it points to.")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{label} exists and is not a folder.")

    resolved = output_dir.resolve()
    for input_label, path in (inputs or {}).items():
        if path is not None and Path(path).resolve().is_relative_to(resolved):
            raise ValueError(
                f"{input_label} {path} lies inside {label}, which the conversion replaces; choose an --output-dir "
                "that holds none of the inputs."
            )

    # The temporary folder is created next to `output_dir`: the nearest existing ancestor must be a writable folder.
    ancestor = output_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{label} cannot be created: {ancestor} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{label} cannot be written: the folder {ancestor} is not writable.")

    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{label} exists and is not empty; pass overwrite=True (--overwrite) to replace a folder the "
                "converter wrote."
            )
        foreign = foreign_files(output_dir)
        if foreign:
            why = (
                f"not listed in its {MANIFEST_NAME}"
                if read_manifest(output_dir) is not None
                else f"it has no {MANIFEST_NAME}, so it was not written by this converter (or by an older version)"
            )
            raise FileExistsError(
                f"{label} holds files the converter did not write ({why}): {format_keys(foreign)}. --overwrite only "
                "replaces the converter's own files; move the others away or choose another --output-dir."
            )
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise PermissionError(f"{label} is not writable.")


# --------------------------------------------------------------------------------------------------------------------
# Atomic save, and recovery from an interrupted one
# --------------------------------------------------------------------------------------------------------------------


def _mark_in_progress(folder: Path) -> None:
    (folder / IN_PROGRESS_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _owner_running(folder: Path) -> bool:
    """Whether the conversion that created `folder` may still be running (unknown owners on other hosts count)."""
    try:
        info = json.loads((folder / IN_PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        return False  # killed before the mark was (fully) written
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return False
    if info.get("host") != socket.gethostname():
        return True
    if info["pid"] == os.getpid():
        return True
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


def clean_stale_siblings(output_dir: Path) -> None:
    """Tidy up after a conversion into `output_dir` that was killed: restore or remove its backup, remove its
    temporary folder. Folders of a conversion still running, and anything the converter did not write, are kept."""
    try:
        _clean_stale_siblings(output_dir)
    except OSError as err:  # best effort: the leftovers never block a new conversion
        logger.warning(f"Could not tidy up after an interrupted conversion into {output_dir}: {err}")


def _clean_stale_siblings(output_dir: Path) -> None:
    parent, name = output_dir.parent, output_dir.name
    if not parent.is_dir():
        return
    siblings = [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink()]
    backups = sorted(
        (p for p in siblings if p.name.startswith(f".{name}.old-") and not _owner_running(p)),
        key=lambda p: p.stat().st_mtime,
    )
    if backups and not output_dir.exists() and not output_dir.is_symlink():
        # Killed between moving the previous output aside and moving the new one in: put the previous one back.
        restored = backups.pop()
        restored.rename(output_dir)
        (output_dir / IN_PROGRESS_NAME).unlink(missing_ok=True)
        logger.warning(f"Restored {output_dir} from {restored.name}, left by an interrupted conversion.")
    for backup in backups:
        logger.info(f"Removing {backup.name}, left by an interrupted conversion.")
        _remove_own_files(backup)
    for tmp in (p for p in siblings if p.name.startswith(f".{name}.tmp-")):
        if not any(tmp.iterdir()):
            tmp.rmdir()
        elif (tmp / IN_PROGRESS_NAME).is_file() and not _owner_running(tmp):
            logger.info(f"Removing {tmp.name}, left by an interrupted conversion.")
            shutil.rmtree(tmp, ignore_errors=True)
        elif not (tmp / IN_PROGRESS_NAME).is_file():
            logger.warning(f"Not removing {tmp}: it does not carry the converter's {IN_PROGRESS_NAME} mark.")


def _write_error(output_dir: Path, err: Exception) -> OSError:
    return OSError(f"Could not write `output_dir` (--output-dir) {output_dir}: {one_line(err)}")


def _write_errors() -> tuple[type[Exception], ...]:
    """What a failed write raises: OSError, and safetensors' own error type, which reports a full disk
    ("No space left on device (os error 28)") without being an OSError."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors
        return (OSError,)
    return (OSError, SafetensorError)


def save_atomically(
    obj,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    model_card=None,
) -> Path:
    """`obj.save_pretrained` (safetensors), `model_card` (a `huggingface_hub.ModelCard`, written as README.md) when
    given, and a manifest into a temporary sibling folder, then rename it to `output_dir`.

    `output_dir` is checked again with :func:`check_output_dir` right before it is replaced. A failure at any point
    leaves `output_dir` as it was and no temporary folder behind; leftovers of a killed earlier run are tidied first.
    The replaced folder held only files the converter wrote (checked), and only those are deleted.
    """
    output_dir = Path(output_dir)
    parent = output_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale_siblings(output_dir)
        tmp_dir = parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp_dir.mkdir()  # not tempfile.mkdtemp: the final folder should get the usual (umask) permissions
    except OSError as err:
        raise _write_error(output_dir, err) from err

    backup: Path | None = None
    try:
        try:
            _mark_in_progress(tmp_dir)
            obj.save_pretrained(tmp_dir, safe_serialization=True)
            if model_card is not None:
                save_model_card(model_card, tmp_dir)
            write_manifest(tmp_dir)
        except _write_errors() as err:
            raise _write_error(output_dir, err) from err
        check_output_dir(output_dir, overwrite, inputs)  # again: the folder may have changed meanwhile
        try:
            if output_dir.exists():
                backup = parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
                output_dir.rename(backup)
                try:
                    _mark_in_progress(backup)
                    tmp_dir.rename(output_dir)
                except BaseException:
                    backup.rename(output_dir)
                    (output_dir / IN_PROGRESS_NAME).unlink(missing_ok=True)
                    backup = None
                    raise
            else:
                tmp_dir.rename(output_dir)
        except OSError as err:
            raise _write_error(output_dir, err) from err
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    (output_dir / IN_PROGRESS_NAME).unlink(missing_ok=True)
    if backup is not None:
        _remove_own_files(backup)
    return output_dir
