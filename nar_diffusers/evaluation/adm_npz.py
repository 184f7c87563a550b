"""The `.npz` sample batch of the ADM (guided-diffusion) evaluation suite, written and read without holding it in
memory.

The suite (`evaluations/evaluator.py` of openai/guided-diffusion) reads `arr_0`: uint8 images `(N, H, W, 3)`.
Sampling scripts also store the class labels as `arr_1` (int64, `(N,)`); the evaluator ignores them. The file is
what `np.savez(path, images, labels)` writes: an uncompressed ZIP64 archive of `.npy` members, so `np.load(path)`
reads it too. 50,000 images at 256 px are 9.8 GB: `write_adm_npz` streams them in, one image at a time.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable

import numpy as np


def _write_member_header(member, shape: tuple[int, ...], dtype: np.dtype) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(member, header)


def write_adm_npz(
    path: str,
    images: Iterable[np.ndarray],
    num_images: int,
    height: int,
    width: int,
    labels: np.ndarray | None = None,
) -> str:
    """Write `arr_0` (uint8 `(num_images, height, width, 3)`, from `images` one `(height, width, 3)` array at a
    time) and, when given, `arr_1` (the labels), atomically: a temporary file in the same folder renamed into place.

    Raises:
        ValueError: an image has another shape or dtype, or `images` does not hold exactly `num_images` images.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp_path = os.path.join(folder, f".{name}.tmp")
    expected = (height, width, 3)
    try:
        with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                _write_member_header(member, (num_images, *expected), np.uint8)
                count = 0
                for image in images:
                    if image.shape != expected or image.dtype != np.uint8:
                        raise ValueError(
                            f"Image {count} is {image.dtype} {tuple(image.shape)}; the npz holds uint8 {expected}."
                        )
                    if count == num_images:
                        raise ValueError(f"More than {num_images} images were given for {path}.")
                    member.write(np.ascontiguousarray(image).tobytes())
                    count += 1
                if count != num_images:
                    raise ValueError(f"{count} images were given for {path}, {num_images} expected.")
            if labels is not None:
                labels = np.asarray(labels, dtype=np.int64)
                if labels.shape != (num_images,):
                    raise ValueError(f"`labels` has shape {labels.shape}, ({num_images},) expected.")
                with archive.open("arr_1.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, labels, allow_pickle=False)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path


def npz_layout(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{member: (shape, dtype)}` of an `.npz`, from the `.npy` headers only (as the evaluator opens `arr_0`)."""
    layout = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(member)
            layout[info.filename[: -len(".npy")]] = (tuple(shape), dtype)
    return layout
