# Copyright 2025 The nar-diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Data helpers shared by the training scripts: image datasets, transforms, VQ tokens and code shards.

Images become tensors in [-1, 1] of shape (C, H, W); a diffusers `VQModel` turns a batch of them into a
(B, h, w) grid of codebook indices (`encode_to_tokens`). `training/extract_codes.py` stores such grids once,
as parquet shards described by a `metadata.json`, and `load_code_dataset` reads them back for training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import VQModel
from diffusers.utils import logging
from PIL import Image

from ..pipelines.pipeline_nar import decode_tokens, vq_downsample_factor  # noqa: F401 (decode_tokens re-exported)


logger = logging.get_logger(__name__)

AUGMENTATIONS: dict[str, int] = {"none": 1, "flip": 2, "ten_crop": 10}
"""Augmentation name -> number of views produced per source image."""

CODES_METADATA_NAME = "metadata.json"
CODES_FORMAT_VERSION = 1

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# ----------------------------------------------------------------------------------------------------------------
# Image datasets
# ----------------------------------------------------------------------------------------------------------------


def load_image_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    max_samples: int | None = None,
):
    """Load an image dataset with 🤗 `datasets`.

    Args:
        dataset_name: A Hub dataset id or any `datasets.load_dataset` source (a local folder included).
        train_data_dir: A local image folder (`imagefolder` layout: one sub-folder per class gives a `label`
            column; an optional `metadata.jsonl` with `file_name` and e.g. `text` gives captions).
        dataset_config_name: The dataset configuration, if the source has several.
        split: The split to load.
        cache_dir: Where `datasets` caches the prepared data.
        max_samples: Keep only the first `max_samples` rows (debugging, tests).

    Returns:
        A `datasets.Dataset`.
    """
    from datasets import load_dataset

    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "Pass exactly one of `--dataset_name` (a Hub id or any `datasets.load_dataset` source) or "
            f"`--train_data_dir` (a local image folder); got dataset_name={dataset_name!r}, "
            f"train_data_dir={train_data_dir!r}."
        )
    if dataset_name is not None:
        dataset = load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    else:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"`--train_data_dir` {train_data_dir!r} is not a directory.")
        dataset = load_dataset("imagefolder", data_dir=train_data_dir, split=split, cache_dir=cache_dir)
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"`max_samples` must be a positive integer or None, got {max_samples}.")
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def resolve_column(dataset, column: str | None, flag: str, required: bool = True) -> str | None:
    """Check that `column` is a column of `dataset` and return it.

    Args:
        dataset: A `datasets.Dataset`.
        column: The requested column name, or None for "not used".
        flag: The command-line flag that set `column`; named in the error message.
        required: Raise when `column` is None.

    Raises:
        ValueError: Naming `flag` and the available columns when the column is missing.
    """
    columns = list(dataset.column_names)
    if column is None:
        if required:
            raise ValueError(f"`{flag}` is required; the dataset has columns {columns}.")
        return None
    if column not in columns:
        raise ValueError(f"`{flag}` value {column!r} is not a column of the dataset; available columns: {columns}.")
    return column



def add_image_dataset_arguments(parser) -> None:
    """Add the flags that pick an image dataset to an argparse parser or argument group: `--dataset_name` or
    `--train_data_dir`, `--dataset_config_name`, `--split`, `--cache_dir`, `--image_column`."""
    parser.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id or any load_dataset source.")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Dataset configuration name.")
    parser.add_argument(
        "--train_data_dir", type=str, default=None,
        help="Local image folder (imagefolder layout; class sub-folders or a metadata.jsonl with captions).",
    )
    parser.add_argument("--split", type=str, default="train", help="Dataset split.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Cache folder for `datasets`.")
    parser.add_argument("--image_column", type=str, default="image", help="Column holding the images.")


def load_image_dataset_from_args(args, max_samples: int | None = None) -> tuple[Any, str]:
    """`(dataset, image column)` for the flags of `add_image_dataset_arguments`."""
    dataset = load_image_dataset(
        args.dataset_name, args.train_data_dir, args.dataset_config_name, args.split, args.cache_dir, max_samples
    )
    return dataset, resolve_column(dataset, args.image_column, "--image_column")

# ----------------------------------------------------------------------------------------------------------------
# Image transforms (PIL in, tensors in [-1, 1] out)
# ----------------------------------------------------------------------------------------------------------------


def _check_num_channels(num_channels: int) -> None:
    if num_channels not in (1, 3):
        raise ValueError(f"`num_channels` must be 1 (grayscale) or 3 (RGB), got {num_channels}.")


def pil_to_tensor(image: Image.Image, num_channels: int = 3) -> torch.Tensor:
    """Convert a PIL image to a float tensor (C, H, W) in [-1, 1], as RGB (3 channels) or grayscale (1)."""
    _check_num_channels(num_channels)
    image = image.convert("RGB" if num_channels == 3 else "L")
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert a batch (B, C, H, W) in [-1, 1] to PIL images (RGB for 3 channels, "L" for 1)."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arrays = images.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[:, :, 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a) for a in arrays]


def resize_shorter_side(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so that the shorter side is `size`, keeping the aspect ratio."""
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"`interpolation` must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}.")
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, resample=_INTERPOLATIONS[interpolation])


def crop(image: Image.Image, top: int, left: int, size: int) -> Image.Image:
    """Crop a `size` x `size` square whose top-left corner is (`top`, `left`)."""
    return image.crop((left, top, left + size, top + size))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central `size` x `size` square."""
    width, height = image.size
    return crop(image, (height - size) // 2, (width - size) // 2, size)


def hflip(image: Image.Image) -> Image.Image:
    """Mirror an image left-right."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square, optionally flip, and return a tensor in [-1, 1].

    Args:
        resolution: Output height and width.
        center_crop: Center crop when True, random crop when False.
        random_flip: Mirror left-right with probability 0.5.
        num_channels: 3 for RGB, 1 for grayscale.
        interpolation: One of "nearest", "bilinear", "bicubic", "lanczos".
        generator: Optional `torch.Generator` for the random crop and flip.
    """

    def __init__(
        self,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        num_channels: int = 3,
        interpolation: str = "bicubic",
        generator: torch.Generator | None = None,
    ):
        if resolution < 1:
            raise ValueError(f"`resolution` must be a positive integer, got {resolution}.")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"`interpolation` must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}.")
        _check_num_channels(num_channels)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.num_channels = num_channels
        self.interpolation = interpolation
        self.generator = generator

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator).item())

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = resize_shorter_side(image, self.resolution, self.interpolation)
        if self.center_crop:
            image = center_crop(image, self.resolution)
        else:
            width, height = image.size
            top = self._randint(height - self.resolution + 1)
            left = self._randint(width - self.resolution + 1)
            image = crop(image, top, left, self.resolution)
        if self.random_flip and self._randint(2) == 1:
            image = hflip(image)
        return pil_to_tensor(image, self.num_channels)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip}, num_channels={self.num_channels}, interpolation={self.interpolation!r})"
        )


def flip_augment(image: Image.Image) -> list[Image.Image]:
    """Return `[image, mirrored image]`."""
    return [image, hflip(image)]


def ten_crop_augment(
    image: Image.Image, resolution: int, crop_scale: float = 1.1, interpolation: str = "bicubic"
) -> list[Image.Image]:
    """Ten views: resize the shorter side to `round(resolution * crop_scale)`, crop the four corners and the center
    at `resolution`, then the five crops mirrored (order: top-left, top-right, bottom-left, bottom-right, center,
    then the same five flipped)."""
    if crop_scale < 1.0:
        raise ValueError(f"`crop_scale` must be >= 1.0, got {crop_scale}.")
    image = resize_shorter_side(image, round(resolution * crop_scale), interpolation)
    width, height = image.size
    bottom, right = height - resolution, width - resolution
    crops = [
        crop(image, 0, 0, resolution),
        crop(image, 0, right, resolution),
        crop(image, bottom, 0, resolution),
        crop(image, bottom, right, resolution),
        center_crop(image, resolution),
    ]
    return crops + [hflip(c) for c in crops]


def augment_views(
    image: Image.Image, resolution: int, aug: str = "none", interpolation: str = "bicubic"
) -> list[Image.Image]:
    """The deterministic views of one image used for code extraction.

    Args:
        image: The source image.
        resolution: Side of the square views.
        aug: "none" (one center crop), "flip" (center crop and its mirror) or "ten_crop" (see `ten_crop_augment`).
        interpolation: Resize filter.

    Returns:
        `AUGMENTATIONS[aug]` PIL images of size `resolution` x `resolution`.
    """
    if aug not in AUGMENTATIONS:
        raise ValueError(f"`aug` must be one of {list(AUGMENTATIONS)}, got {aug!r}.")
    if aug == "ten_crop":
        return ten_crop_augment(image, resolution, interpolation=interpolation)
    view = center_crop(resize_shorter_side(image, resolution, interpolation), resolution)
    return flip_augment(view) if aug == "flip" else [view]


def load_digits_images(resolution: int = 32, num_channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, no download) as a tiny image dataset.

    Args:
        resolution: Output side, a multiple of 8 (nearest-neighbour would look blocky, bilinear is used).
        num_channels: 3 (gray replicated to RGB) or 1.

    Returns:
        `(images, labels)`: float tensor (1797, num_channels, resolution, resolution) in [-1, 1] with white
        digits on black, and long tensor (1797,) of labels 0-9.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("`load_digits_images` needs scikit-learn: `pip install scikit-learn`.") from error
    _check_num_channels(num_channels)
    if resolution < 8:
        raise ValueError(f"`resolution` must be >= 8, got {resolution}.")
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear")
    images = images.clamp(0, 1).mul(2).sub(1).expand(-1, num_channels, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target).long()


# ----------------------------------------------------------------------------------------------------------------
# VQ tokens
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_to_tokens(vqvae: VQModel, pixels: torch.Tensor) -> torch.LongTensor:
    """Encode images to the grid of their nearest codebook indices.

    Args:
        vqvae: A diffusers `VQModel`.
        pixels: Images (B, C, H, W) in [-1, 1]; H and W must be multiples of the downsample factor.

    Returns:
        Token ids, LongTensor (B, H / f, W / f) on `pixels`' device, in raster order when flattened.
    """
    if pixels.ndim != 4:
        raise ValueError(f"`pixels` must have shape (batch, channels, height, width), got {tuple(pixels.shape)}.")
    factor = vq_downsample_factor(vqvae)
    batch, channels, height, width = pixels.shape
    if height % factor or width % factor:
        raise ValueError(
            f"Image size {height}x{width} must be a multiple of the VQ downsample factor {factor} "
            f"(2 ** (len(block_out_channels) - 1))."
        )
    if channels != vqvae.config.in_channels:
        raise ValueError(f"`pixels` has {channels} channels but the VQModel expects {vqvae.config.in_channels}.")
    latents = vqvae.encode(pixels.to(device=vqvae.device, dtype=vqvae.dtype)).latents
    # The VQModel's VectorQuantizer returns flat indices (sane_index_shape=False): reshape to the latent grid.
    _, _, (_, _, indices) = vqvae.quantize(latents)
    return indices.reshape(batch, latents.shape[2], latents.shape[3]).long().to(pixels.device)


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
        codes: Token grids, integer tensor (N, h, w).
        conditions: N labels (int) or captions (str), or None for unconditional codes.
        condition_column: "label" or "caption"; None when `conditions` is None.
        caption_embeds: With captions, optionally N text-encoder outputs `(length_i, dim)` of the VALID caption
            tokens only (no padding rows), float32 or float16. Stored flattened in a `caption_embeds` column with
            the token counts in `caption_length`; `load_code_dataset` reads them back.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if codes.ndim != 3:
        raise ValueError(f"`codes` must have shape (num_samples, height, width), got {tuple(codes.shape)}.")
    num_rows, height, width = codes.shape
    flat = codes.reshape(num_rows, height * width).cpu().numpy().astype(np.int32)
    columns = {
        "codes": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), height * width).cast(
            pa.list_(pa.int32())
        ),
        "height": pa.array(np.full(num_rows, height, dtype=np.int32)),
        "width": pa.array(np.full(num_rows, width, dtype=np.int32)),
    }
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


class CodeDataset(torch.utils.data.Dataset):
    """Token grids with their labels or captions, held in memory.

    Items are `(codes, condition)`: `codes` a LongTensor (h, w) in raster layout, `condition` an int label, a
    caption string, or None for unconditional codes. Codes extracted with a text encoder also hold the encoder
    output of every caption's valid tokens: `caption_embedding(index)`.

    Attributes:
        metadata: The parsed `metadata.json`.
        height, width: The token grid.
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
        self.height, self.width = metadata["grid"]
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
        codes = torch.from_numpy(self._codes[index].astype(np.int64)).view(self.height, self.width)
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
            f"{self.__class__.__name__}(num_samples={len(self)}, grid={self.height}x{self.width}, "
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
    height, width = metadata["grid"]
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
    codes = np.empty((total_rows, height * width), dtype=code_dtype)
    conditions: list | None = [] if condition_column else None
    columns = ["codes", "height", "width"] + ([condition_column] if condition_column else [])
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
        heights, widths = table.column("height").to_numpy(), table.column("width").to_numpy()
        if flat.size != table.num_rows * height * width or (heights != height).any() or (widths != width).any():
            raise ValueError(
                f"Code shard {shard_path} does not hold {height}x{width} token grids as metadata.json says."
            )
        codes[row : row + table.num_rows] = flat.reshape(table.num_rows, height * width)
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
