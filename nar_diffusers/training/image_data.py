"""Image datasets for training: 🤗 `datasets` sources and their command-line flags, and scikit-learn's digits."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..utils.image_utils import check_num_channels


def load_image_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    max_samples: int | None = None,
    folder_kind: str = "image",
):
    """Load an image (or, with `folder_kind="video"`, video) dataset with 🤗 `datasets`.

    Args:
        dataset_name: A Hub dataset id or any `datasets.load_dataset` source (a local folder included).
        train_data_dir: A local image folder (`imagefolder` layout: one sub-folder per class gives a `label`
            column; an optional `metadata.jsonl` with `file_name` and e.g. `text` gives captions).
        dataset_config_name: The dataset configuration, if the source has several.
        split: The split to load.
        cache_dir: Where `datasets` caches the prepared data.
        max_samples: Keep only the first `max_samples` rows (debugging, tests).
        folder_kind: "image" (`train_data_dir` is an `imagefolder`) or "video" (a `videofolder`).

    Returns:
        A `datasets.Dataset`.
    """
    from datasets import load_dataset

    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "Pass exactly one of `--dataset_name` (a Hub id or any `datasets.load_dataset` source) or "
            f"`--train_data_dir` (a local {folder_kind} folder); got dataset_name={dataset_name!r}, "
            f"train_data_dir={train_data_dir!r}."
        )
    if dataset_name is not None:
        dataset = load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    else:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"`--train_data_dir` {train_data_dir!r} is not a directory.")
        dataset = load_dataset(f"{folder_kind}folder", data_dir=train_data_dir, split=split, cache_dir=cache_dir)
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


def check_label_column(dataset, column: str, flag: str = "--label_column") -> None:
    """Check that `column` holds integer class ids (a `datasets.ClassLabel` or an integer `Value`).

    Raises:
        ValueError: Naming `flag`, the column and an example value, and suggesting `--caption_column` (text) or a
            `ClassLabel` column (classes), when the column holds strings, floats or anything else.
    """
    from datasets import ClassLabel, Value

    feature = dataset.features[column]
    if isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
        return
    example = dataset.select_columns([column])[0][column] if len(dataset) else None
    kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__
    raise ValueError(
        f"`{flag}` {column!r} holds {kind} values (e.g. {example!r}), not integer class ids. For text-to-image pass "
        f"`--caption_column {column}` (with a text encoder); for classes make it a `datasets.ClassLabel` column "
        f"(`dataset.class_encode_column({column!r})`) or use an imagefolder with one sub-folder per class."
    )


def describe_image(dataset, image_column: str, index: int) -> str:
    """"row <index> (<file>)" for error messages: the file an image of `dataset` comes from, when it is known."""
    path = None
    try:
        from datasets import Image as ImageFeature

        raw = dataset.cast_column(image_column, ImageFeature(decode=False))[int(index)][image_column]
        path = raw.get("path") if isinstance(raw, dict) else None
    except Exception:  # not a 🤗 dataset with an image feature: the row number is all there is
        pass
    return f"row {index} ({path})" if path else f"row {index}"


def add_image_dataset_arguments(parser, skip_corrupt_images: bool = False) -> None:
    """Add the flags that pick an image dataset to an argparse parser or argument group: `--dataset_name` or
    `--train_data_dir`, `--dataset_config_name`, `--split`, `--cache_dir`, `--image_column`, and with
    `skip_corrupt_images` the `--skip_corrupt_images` flag (see `ImageExamples`)."""
    parser.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id or any load_dataset source.")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Dataset configuration name.")
    parser.add_argument(
        "--train_data_dir", type=str, default=None,
        help="Local image folder (imagefolder layout; class sub-folders or a metadata.jsonl with captions).",
    )
    parser.add_argument("--split", type=str, default="train", help="Dataset split.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Cache folder for `datasets`.")
    parser.add_argument("--image_column", type=str, default="image", help="Column holding the images.")
    if skip_corrupt_images:
        parser.add_argument(
            "--skip_corrupt_images", action="store_true",
            help="Train on the next readable image instead of stopping at an unreadable one (each is logged once).",
        )  # fmt: skip


def load_image_dataset_from_args(args, max_samples: int | None = None) -> tuple[Any, str]:
    """`(dataset, image column)` for the flags of `add_image_dataset_arguments`."""
    dataset = load_image_dataset(
        args.dataset_name, args.train_data_dir, args.dataset_config_name, args.split, args.cache_dir, max_samples
    )
    return dataset, resolve_column(dataset, args.image_column, "--image_column")


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
    check_num_channels(num_channels)
    if resolution < 8:
        raise ValueError(f"`resolution` must be >= 8, got {resolution}.")
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear")
    images = images.clamp(0, 1).mul(2).sub(1).expand(-1, num_channels, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target).long()
