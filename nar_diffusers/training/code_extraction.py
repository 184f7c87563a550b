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
"""Encoding a dataset into code shards (what `training/extract_codes.py` runs): the views fed to the tokenizer,
the metadata.json of an extraction, and the per-process shard loop.

The functions take the script's parsed flags (`args`, an `argparse.Namespace` of `extract_codes.py`) and a
`state` with accelerate's `PartialState` interface (`process_index`, `num_processes`, `wait_for_everyone()`).
The shard format itself lives in `code_shards`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..models.video_tokenizer import tokenizer_num_channels
from ..models.vq_codec import vq_downsample_factor
from ..pipelines.text_encoding import encode_captions
from ..utils.image_utils import pil_to_tensor
from .batches import UNREADABLE_IMAGE_ERRORS
from .code_shards import (
    CODES_FORMAT_VERSION,
    CODES_METADATA_NAME,
    code_shard_name,
    is_valid_code_shard,
    write_code_metadata,
    write_code_shard,
)
from .image_data import describe_image
from .image_transforms import AUGMENTATIONS, augment_views
from .video_data import VideoClipTransform

logger = logging.getLogger(__name__)

VIDEO_AUGMENTATIONS = ("none", "flip")
"""The `--aug` values that apply to clips (ten-crop is for still images)."""


class ImageViews(torch.utils.data.Dataset):
    """Rows of a 🤗 dataset -> (views tensor (V, C, R, R) in [-1, 1], condition)."""

    def __init__(
        self,
        dataset,
        image_column: str,
        condition_column: str,
        resolution: int,
        aug: str,
        interpolation: str,
        num_channels: int,
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.condition_column = condition_column
        self.resolution = resolution
        self.aug = aug
        self.interpolation = interpolation
        self.num_channels = num_channels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | str]:
        try:
            row = self.dataset[index]
            views = augment_views(row[self.image_column], self.resolution, self.aug, self.interpolation)
        except UNREADABLE_IMAGE_ERRORS as error:
            source = describe_image(self.dataset, self.image_column, index)
            raise ValueError(
                f"Cannot read the image of {source}: {error}. Replace or remove the file and rerun with the same "
                "arguments (finished shards are kept)."
            ) from error
        return torch.stack([pil_to_tensor(view, self.num_channels) for view in views]), row[self.condition_column]


class VideoViews(torch.utils.data.Dataset):
    """Rows of a video dataset -> (views tensor (V, C, F, H, W) in the tokenizer's pixel range, condition).

    With `clip_position="random"` each row draws its clip from a generator seeded by `(seed, index)`.
    """

    def __init__(self, dataset, video_column: str, condition_column: str, transform: VideoClipTransform, aug: str,
                 seed: int = 0):  # fmt: skip
        self.dataset = dataset
        self.video_column = video_column
        self.condition_column = condition_column
        self.transform = transform
        self.aug = aug
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | str]:
        row = self.dataset[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        clip = self.transform(row[self.video_column], generator=generator)
        views = [clip, clip.flip(-1)] if self.aug == "flip" else [clip]
        return torch.stack(views), row[self.condition_column]


def collate_views(batch: list[tuple[torch.Tensor, int | str]]) -> tuple[torch.Tensor, list]:
    """Concatenate the views of every image; repeat each condition once per view."""
    pixels = torch.cat([views for views, _ in batch])
    conditions = [condition for views, condition in batch for _ in range(views.shape[0])]
    return pixels, conditions


def _token_layout(args: argparse.Namespace, vqvae, video_tokenizer) -> dict:
    """Grid, vocabulary, downsample factor and pixel channels of the tokenizer at the requested size."""
    if video_tokenizer is None:
        factor = vq_downsample_factor(vqvae)
        return {
            "grid": [args.resolution // factor, args.resolution // factor],
            "vocab_size": vqvae.config.num_vq_embeddings,
            "downsample_factor": factor,
            "resolution": args.resolution,
            "num_channels": vqvae.config.in_channels,
        }
    return {
        "grid": list(video_tokenizer.token_grid(args.num_frames, args.height, args.width)),
        "vocab_size": video_tokenizer.vocab_size,
        "downsample_factor": video_tokenizer.spatial_compression,
        "resolution": None,
        "num_channels": tokenizer_num_channels(video_tokenizer),
    }


def _shard_plan(num_images: int, images_per_shard: int, views: int) -> list[dict]:
    """One `{"file", "num_rows"}` entry per shard of `images_per_shard` source images (at least one shard)."""
    num_shards = max(1, math.ceil(num_images / images_per_shard))
    rows = [min(images_per_shard, num_images - index * images_per_shard) * views for index in range(num_shards)]
    return [{"file": code_shard_name(index), "num_rows": count} for index, count in enumerate(rows)]


def _source_description(args: argparse.Namespace, source_column: str, is_video: bool) -> dict:
    return {
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "train_data_dir": os.path.abspath(args.train_data_dir) if args.train_data_dir else None,
        "split": args.split,
        "image_column": None if is_video else args.image_column,
        "condition_source_column": source_column,
        "max_samples": args.max_samples,
        **({"video_column": args.video_column} if is_video else {}),
    }


def build_code_metadata(
    args: argparse.Namespace,
    vqvae,
    dataset,
    condition_column: str,
    source_column: str,
    caption_dim: int | None = None,
    video_tokenizer=None,
) -> dict:
    """The metadata.json of an extraction (with complete=False); `caption_dim` when caption embeddings are
    stored; `video_tokenizer` (the tokenizer behind `vqvae`) for videos."""
    is_video = video_tokenizer is not None
    views, num_images = AUGMENTATIONS[args.aug], len(dataset)
    shards = _shard_plan(num_images, args.images_per_shard, views)
    label_names = None
    if condition_column == "label":
        label_names = list(getattr(dataset.features[source_column], "names", None) or []) or None
    metadata = {
        "format_version": CODES_FORMAT_VERSION,
        "complete": False,
        **_token_layout(args, vqvae, video_tokenizer),
        "vq_model_path": os.path.abspath(args.vq_model_path),
        "aug": args.aug,
        "views_per_image": views,
        "interpolation": args.interpolation,
        "num_images": num_images,
        "num_samples": num_images * views,
        "images_per_shard": args.images_per_shard,
        "num_shards": len(shards),
        "shards": shards,
        "columns": ["codes", *(["time"] if is_video else []), "height", "width", condition_column],
        "condition_column": condition_column,
        "label_names": label_names,
        "source": _source_description(args, source_column, is_video),
    }
    if is_video:
        metadata["video"] = {
            "num_frames": args.num_frames,
            "frame_stride": args.frame_stride,
            "height": args.height,
            "width": args.width,
            "clip_position": args.clip_position,
            "temporal_compression": video_tokenizer.temporal_compression,
            "pixel_range": list(video_tokenizer.pixel_range),
        }
    if caption_dim is not None:
        metadata["columns"] += ["caption_embeds", "caption_length"]
        metadata["text_encoder"] = {
            "path": os.path.abspath(args.text_encoder_path),
            "caption_dim": caption_dim,
            "max_sequence_length": args.max_sequence_length,
            "dtype": args.text_embedding_dtype,
        }
    return metadata


@torch.no_grad()
def caption_token_embeddings(
    tokenizer, text_encoder, captions: list[str], views_per_image: int, args: argparse.Namespace, device
) -> list[torch.Tensor]:
    """T5 outputs of each caption's valid tokens, `(length, caption_dim)` per caption, in the storage dtype.

    `captions` repeats every image's caption once per view: each distinct image caption is encoded once.
    """
    unique = [str(c) for c in captions[::views_per_image]]
    length = args.max_sequence_length
    embeds, mask = encode_captions(tokenizer, text_encoder, unique, length, length, truncation=True, device=device)
    dtype = torch.float16 if args.text_embedding_dtype == "float16" else torch.float32
    valid = [embeds[i, mask[i]].to(device="cpu", dtype=dtype) for i in range(len(unique))]
    return [embedding for embedding in valid for _ in range(views_per_image)]


def previous_settings_differ(output_dir: str, metadata: dict, overwrite: bool) -> bool:
    """Whether `output_dir` holds an extraction made with other settings (to be removed, with --overwrite);
    raises a ValueError without --overwrite. Reads only: every process can call it."""
    metadata_path = os.path.join(output_dir, CODES_METADATA_NAME)
    if not os.path.isfile(metadata_path):
        return False
    with open(metadata_path, encoding="utf-8") as f:
        try:
            previous = json.load(f)
        except json.JSONDecodeError:
            previous = {}
    same = {k: v for k, v in previous.items() if k != "complete"} == {
        k: v for k, v in metadata.items() if k != "complete"
    }
    if same:
        return False
    if not overwrite:
        raise ValueError(
            f"{output_dir} holds codes extracted with different settings (see {metadata_path}); choose another "
            "--output_dir or pass --overwrite to replace them."
        )
    return True


def remove_previous_extraction(output_dir: str) -> None:
    """--overwrite: remove the shards and metadata.json of an earlier extraction (nothing else)."""
    logger.warning(f"--overwrite: removing the previous extraction in {output_dir}")
    for name in os.listdir(output_dir):
        if name == CODES_METADATA_NAME or (name.startswith("codes-") and ".parquet" in name):
            os.remove(os.path.join(output_dir, name))


def start_output_dir(args: argparse.Namespace, state, metadata: dict) -> None:
    """Write the (incomplete) metadata.json, after removing an extraction of other settings when allowed."""
    # Every process checks the folder before the main process changes it, so a refusal stops them all.
    differ = previous_settings_differ(args.output_dir, metadata, args.overwrite)
    state.wait_for_everyone()
    if state.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if differ:
            remove_previous_extraction(args.output_dir)
        write_code_metadata(args.output_dir, metadata)
    state.wait_for_everyone()


def finish_output_dir(args: argparse.Namespace, state, metadata: dict) -> None:
    """One metadata.json for the whole set, marked complete once every process has written its shards."""
    state.wait_for_everyone()
    if state.is_main_process:
        absent = [s["file"] for s in metadata["shards"] if not os.path.isfile(os.path.join(args.output_dir, s["file"]))]
        if absent:
            raise RuntimeError(f"Shards {absent[:5]} were not written; rerun the extraction to resume it.")
        metadata["complete"] = True
        write_code_metadata(args.output_dir, metadata)
    state.wait_for_everyone()
    metadata["complete"] = True


class ShardEncoder:
    """Encodes one shard's rows of the source views into codes (and caption embeddings) and writes the shard."""

    def __init__(self, args, views, encode, vqvae, device, metadata, condition_column, text_encoder, tokenizer):
        self.args, self.views, self.encode, self.vqvae, self.device = args, views, encode, vqvae, device
        self.metadata, self.condition_column = metadata, condition_column
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    def __call__(self, shard: dict, start: int, end: int, progress) -> None:
        args, views_per_image = self.args, self.metadata["views_per_image"]
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.views, range(start, end)),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            collate_fn=collate_views,
        )
        codes, conditions, caption_embeds = [], [], []
        for pixels, batch_conditions in loader:
            codes.append(self.encode(pixels.to(device=self.device, dtype=self.vqvae.dtype)).cpu())
            conditions.extend(int(c) if self.condition_column == "label" else str(c) for c in batch_conditions)
            if self.text_encoder is not None:
                caption_embeds.extend(
                    caption_token_embeddings(
                        self.tokenizer, self.text_encoder, batch_conditions, views_per_image, args, self.device
                    )
                )
            progress.update(pixels.shape[0] // views_per_image)
        write_code_shard(
            os.path.join(args.output_dir, shard["file"]), torch.cat(codes), conditions, self.condition_column,
            caption_embeds if self.text_encoder else None,
        )  # fmt: skip


def encode_my_shards(
    args: argparse.Namespace, state, metadata: dict, num_rows: int, encode_shard: Callable, unit: str
) -> None:
    """Encode the shards of this process (i, i + n, ...), skipping those a previous run already wrote."""
    mine = [index for index in range(len(metadata["shards"])) if index % state.num_processes == state.process_index]
    share = sum(min(args.images_per_shard, num_rows - index * args.images_per_shard) for index in mine)
    where = f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""
    if state.num_processes > 1:
        logger.info(f"Process {state.process_index} of {state.num_processes}: shards {mine}")
    progress = tqdm(total=share, desc=f"Encoding {unit}s{where}", unit=unit, disable=not state.is_main_process)
    skipped = 0
    for index in mine:
        shard = metadata["shards"][index]
        start = index * args.images_per_shard
        end = min(start + args.images_per_shard, num_rows)
        if is_valid_code_shard(os.path.join(args.output_dir, shard["file"]), shard["num_rows"], metadata["columns"]):
            skipped += 1
            progress.update(end - start)
            continue
        encode_shard(shard, start, end, progress)
    progress.close()
    if skipped:
        logger.info(f"Process {state.process_index}: skipped {skipped} shard(s) already written.")
