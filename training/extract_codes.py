#!/usr/bin/env python
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
"""Encode an image dataset once into VQ token grids for NAR training.

    python training/extract_codes.py --vq_model_path my-vq --train_data_dir images/ \
        --resolution 256 --aug ten_crop --output_dir codes/

Writes parquet shards `codes-00000.parquet`, ... with columns `codes` (token ids in raster order), `height`,
`width` (the token grid) and `label` (int) or `caption` (str), plus `metadata.json`. The folder loads with
`nar_diffusers.training.load_code_dataset(output_dir)`, or with plain `datasets` as
`load_dataset(output_dir)` / `load_dataset("parquet", data_files=f"{output_dir}/codes-*.parquet")`.
Rerunning with the same arguments skips the shards already written, so an interrupted run resumes.

On several GPUs (or CPU processes), launch it with `accelerate launch` (or `torchrun`): process i of n encodes
shards i, i + n, i + 2n, ... on its own device, and the main process writes the one `metadata.json` once all are
written. The shards are the same whatever the number of processes (each is encoded in the same batches):

    accelerate launch --multi_gpu --num_processes 8 training/extract_codes.py --vq_model_path my-vq \
        --train_data_dir images/ --resolution 256 --aug ten_crop --output_dir codes/

With `--caption_column` and `--text_encoder_path` (a local T5 folder, e.g. flan-t5-xl), the T5 outputs of each
caption's valid tokens are stored too (`caption_embeds`, flattened, and `caption_length`; no padding rows), so that
training needs no text encoder:

    python training/extract_codes.py --vq_model_path my-vq --train_data_dir captioned/ --caption_column text \
        --text_encoder_path ./flan-t5-xl --max_sequence_length 120 --resolution 256 --output_dir codes/

Videos: `--video_column` switches to clips of `--num_frames` frames taken every `--frame_stride` frames, resized and
cropped to `--height` x `--width` (default `--resolution`), tokenized frame by frame by a VQModel (or by a video
tokenizer model); the shards then hold `(T, h, w)` grids (a `time` column, metadata "grid" `[T, h, w]`). A video
folder is video files plus a `metadata.jsonl` (`{"file_name": "a.mp4", "label": 3}` or `"text": ...` per line):

    python training/extract_codes.py --vq_model_path my-vq --train_data_dir my_videos --video_column video \
        --num_frames 16 --frame_stride 2 --resolution 128 --output_dir video-codes/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

import torch
from diffusers import VQModel
from tqdm.auto import tqdm

from nar_diffusers.models.video_tokenizer import as_video_tokenizer, load_tokenizer_model, tokenizer_num_channels
from nar_diffusers.models.vq_codec import encode_images_to_tokens, load_vq_model, vq_downsample_factor
from nar_diffusers.pipelines.text_encoding import encode_captions, load_text_encoder
from nar_diffusers.training.code_shards import (
    CODES_FORMAT_VERSION,
    CODES_METADATA_NAME,
    code_shard_name,
    is_valid_code_shard,
    write_code_metadata,
    write_code_shard,
)
from nar_diffusers.training.batches import UNREADABLE_IMAGE_ERRORS
from nar_diffusers.training.image_data import (
    add_image_dataset_arguments,
    check_label_column,
    describe_image,
    load_image_dataset_from_args,
    resolve_column,
)
from nar_diffusers.training.image_transforms import AUGMENTATIONS, augment_views
from nar_diffusers.training.video_data import (
    VideoClipTransform,
    add_video_arguments,
    check_video_arguments,
    encode_label_column,
    load_video_dataset,
)
from nar_diffusers.utils.distributed import distributed_state
from nar_diffusers.utils.dtypes import DTYPES, dtype_kwargs
from nar_diffusers.utils.image_utils import pil_to_tensor


logger = logging.getLogger(__name__)

def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vq_model_path", type=str, required=True, help="Folder of a saved diffusers VQModel.")
    add_image_dataset_arguments(parser)
    add_video_arguments(parser.add_argument_group("videos"))
    parser.add_argument("--label_column", type=str, default="label", help="Column of integer class labels.")
    parser.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="Column of captions; when set, captions are stored instead of labels.",
    )
    parser.add_argument(
        "--text_encoder_path",
        type=str,
        default=None,
        help="With --caption_column: a local T5 folder (encoder + tokenizer, or text_encoder/ and tokenizer/ "
        "subfolders); its outputs for the valid caption tokens are stored with the codes.",
    )
    parser.add_argument(
        "--max_sequence_length", type=int, default=120, help="Caption tokens kept (the published models use 120)."
    )
    parser.add_argument(
        "--text_embedding_dtype",
        type=str,
        default="float16",
        choices=["float16", "float32"],
        help="Storage dtype of the caption embeddings.",
    )
    parser.add_argument("--max_samples", type=int, default=None, help="Encode only the first N images.")
    parser.add_argument("--resolution", type=int, default=256, help="Square image side fed to the VQ model.")
    parser.add_argument("--aug", type=str, default="none", choices=list(AUGMENTATIONS), help="Views per image.")
    parser.add_argument(
        "--interpolation", type=str, default="bicubic", choices=["nearest", "bilinear", "bicubic", "lanczos"]
    )
    parser.add_argument("--images_per_shard", type=int, default=10000, help="Source images per parquet shard.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per encoder batch (before augmentation).")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding images.")
    parser.add_argument(
        "--device", type=str, default=None,
        help="Encoder device; default: the process's accelerator (cuda:<local rank>) when there is one, else cpu.",
    )  # fmt: skip
    parser.add_argument("--dtype", type=str, default="float32", choices=list(DTYPES), help="Encoder dtype.")
    parser.add_argument("--output_dir", type=str, required=True, help="Where shards and metadata.json go.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Delete an existing extraction made with different settings."
    )
    args = parser.parse_args(input_args)
    for name in ("resolution", "images_per_shard", "batch_size", "max_sequence_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be >= 0, got {args.num_workers}.")
    if (args.dataset_name is None) == (args.train_data_dir is None):
        parser.error("pass exactly one of --dataset_name or --train_data_dir.")
    if args.text_encoder_path is not None and args.caption_column is None:
        parser.error("--text_encoder_path encodes captions: it needs --caption_column.")
    if args.video_column is not None:
        try:
            check_video_arguments(args)
        except ValueError as error:
            parser.error(str(error))
        if args.aug not in VIDEO_AUGMENTATIONS:
            parser.error(f"--aug {args.aug} is for images; videos take one of {list(VIDEO_AUGMENTATIONS)}.")
    return args


VIDEO_AUGMENTATIONS = ("none", "flip")


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


def build_metadata(
    args: argparse.Namespace,
    vqvae: VQModel,
    dataset,
    condition_column: str,
    source_column: str,
    caption_dim: int | None = None,
    video_tokenizer=None,
) -> dict:
    """The metadata.json of this extraction (with complete=False); `caption_dim` when caption embeddings are
    stored; `video_tokenizer` (the tokenizer behind `vqvae`) for videos."""
    if video_tokenizer is None:
        factor = vq_downsample_factor(vqvae)
        grid = [args.resolution // factor, args.resolution // factor]
        vocab_size, num_channels = vqvae.config.num_vq_embeddings, vqvae.config.in_channels
    else:
        factor = video_tokenizer.spatial_compression
        grid = list(video_tokenizer.token_grid(args.num_frames, args.height, args.width))
        vocab_size, num_channels = video_tokenizer.vocab_size, tokenizer_num_channels(video_tokenizer)
    views = AUGMENTATIONS[args.aug]
    num_images = len(dataset)
    num_shards = max(1, math.ceil(num_images / args.images_per_shard))
    shards = []
    for index in range(num_shards):
        images = min(args.images_per_shard, num_images - index * args.images_per_shard)
        shards.append({"file": code_shard_name(index), "num_rows": images * views})
    label_names = None
    if condition_column == "label":
        feature = dataset.features[source_column]
        label_names = list(getattr(feature, "names", None) or []) or None
    metadata = {
        "format_version": CODES_FORMAT_VERSION,
        "complete": False,
        "grid": grid,
        "vocab_size": vocab_size,
        "downsample_factor": factor,
        "resolution": args.resolution if video_tokenizer is None else None,
        "num_channels": num_channels,
        "vq_model_path": os.path.abspath(args.vq_model_path),
        "aug": args.aug,
        "views_per_image": views,
        "interpolation": args.interpolation,
        "num_images": num_images,
        "num_samples": num_images * views,
        "images_per_shard": args.images_per_shard,
        "num_shards": num_shards,
        "shards": shards,
        "columns": ["codes", *(["time"] if video_tokenizer is not None else []), "height", "width", condition_column],
        "condition_column": condition_column,
        "label_names": label_names,
        "source": {
            "dataset_name": args.dataset_name,
            "dataset_config_name": args.dataset_config_name,
            "train_data_dir": os.path.abspath(args.train_data_dir) if args.train_data_dir else None,
            "split": args.split,
            "image_column": args.image_column,
            "condition_source_column": source_column,
            "max_samples": args.max_samples,
        },
    }
    if video_tokenizer is not None:
        metadata["video"] = {
            "num_frames": args.num_frames,
            "frame_stride": args.frame_stride,
            "height": args.height,
            "width": args.width,
            "clip_position": args.clip_position,
            "temporal_compression": video_tokenizer.temporal_compression,
            "pixel_range": list(video_tokenizer.pixel_range),
        }
        metadata["source"]["video_column"] = args.video_column
        metadata["source"]["image_column"] = None
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


def encoding_device(args: argparse.Namespace, state) -> torch.device:
    """--device, or this process's device (`cuda:<local rank>` under a multi-GPU launch, else cpu)."""
    if args.device is None:
        device = state.device
    else:
        device = torch.device(args.device)
        if state.num_processes > 1 and device.type != "cpu" and device.index is None:
            device = state.device  # one device per process, not all on the first one
    return torch.device("cpu") if device.type == "cpu" else device


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # One process, or several under `accelerate launch` / `torchrun`: process i encodes the shards i, i + n, ...
    state = distributed_state(cpu=args.device is not None and torch.device(args.device).type == "cpu")
    device = encoding_device(args, state)
    video_tokenizer = None
    dtype = dtype_kwargs(DTYPES[args.dtype])  # dtype= (torch_dtype= on diffusers < 0.40)
    if args.video_column is not None:
        vqvae = load_tokenizer_model(args.vq_model_path, "--vq_model_path", **dtype).to(device)
        video_tokenizer = as_video_tokenizer(vqvae, "--vq_model_path")
        video_tokenizer.token_grid(args.num_frames, args.height, args.width)  # names --num_frames / height / width
        with state.main_process_first():  # the main process prepares the datasets cache, the others reuse it
            dataset = load_video_dataset(
                args.dataset_name, args.train_data_dir, args.dataset_config_name, args.split, args.cache_dir,
                args.max_samples, args.video_column,
            )  # fmt: skip
        if args.caption_column is None and args.label_column in dataset.column_names:
            dataset = encode_label_column(dataset, args.label_column)
    else:
        vqvae = load_vq_model(args.vq_model_path, "--vq_model_path", **dtype).to(device)
        factor = vq_downsample_factor(vqvae)
        if args.resolution % factor:
            raise ValueError(f"--resolution {args.resolution} must be a multiple of the VQ downsample factor {factor}.")
        with state.main_process_first():
            dataset, image_column = load_image_dataset_from_args(args, args.max_samples)
    if args.caption_column is not None:
        condition_column, source_column = "caption", resolve_column(dataset, args.caption_column, "--caption_column")
    else:
        try:
            source_column = resolve_column(dataset, args.label_column, "--label_column")
        except ValueError as error:
            raise ValueError(f"{error} For captions pass --caption_column instead.") from error
        check_label_column(dataset, source_column)
        condition_column = "label"

    text_encoder = tokenizer = caption_dim = None
    if args.text_encoder_path is not None:
        text_encoder, tokenizer = load_text_encoder(args.text_encoder_path, DTYPES[args.dtype])
        text_encoder.to(device)
        caption_dim = text_encoder.config.d_model

    metadata = build_metadata(args, vqvae, dataset, condition_column, source_column, caption_dim, video_tokenizer)
    # Every process checks the folder before the main process changes it, so a refusal stops them all.
    differ = previous_settings_differ(args.output_dir, metadata, args.overwrite)
    state.wait_for_everyone()
    if state.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if differ:
            remove_previous_extraction(args.output_dir)
        write_code_metadata(args.output_dir, metadata)
    state.wait_for_everyone()

    if video_tokenizer is None:
        views = ImageViews(
            dataset, image_column, source_column, args.resolution, args.aug, args.interpolation, vqvae.config.in_channels
        )
        encode, unit = (lambda pixels: encode_images_to_tokens(vqvae, pixels)), "img"
    else:
        transform = VideoClipTransform(
            args.num_frames, args.frame_stride, args.height, args.width, args.clip_position,
            num_channels=tokenizer_num_channels(video_tokenizer), pixel_range=video_tokenizer.pixel_range,
        )  # fmt: skip
        views = VideoViews(dataset, args.video_column, source_column, transform, args.aug)
        encode, unit = video_tokenizer.encode_video, "video"
    mine = [index for index in range(len(metadata["shards"])) if index % state.num_processes == state.process_index]
    share = sum(min(args.images_per_shard, len(dataset) - index * args.images_per_shard) for index in mine)
    where = f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""
    if state.num_processes > 1:
        logger.info(f"Process {state.process_index} of {state.num_processes}: shards {mine}")
    progress = tqdm(total=share, desc=f"Encoding {unit}s{where}", unit=unit, disable=not state.is_main_process)
    skipped = 0
    for index in mine:
        shard = metadata["shards"][index]
        start = index * args.images_per_shard
        end = min(start + args.images_per_shard, len(dataset))
        shard_path = os.path.join(args.output_dir, shard["file"])
        if is_valid_code_shard(shard_path, shard["num_rows"], metadata["columns"]):
            skipped += 1
            progress.update(end - start)
            continue
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(views, range(start, end)),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            collate_fn=collate_views,
        )
        codes, conditions, caption_embeds = [], [], []
        for pixels, batch_conditions in loader:
            codes.append(encode(pixels.to(device=device, dtype=vqvae.dtype)).cpu())
            conditions.extend(int(c) if condition_column == "label" else str(c) for c in batch_conditions)
            if text_encoder is not None:
                caption_embeds.extend(
                    caption_token_embeddings(
                        tokenizer, text_encoder, batch_conditions, metadata["views_per_image"], args, device
                    )
                )
            progress.update(pixels.shape[0] // metadata["views_per_image"])
        write_code_shard(
            shard_path, torch.cat(codes), conditions, condition_column, caption_embeds if text_encoder else None
        )
    progress.close()
    if skipped:
        logger.info(f"Process {state.process_index}: skipped {skipped} shard(s) already written.")

    # One metadata.json for the whole set, once every process has written its shards.
    state.wait_for_everyone()
    if state.is_main_process:
        absent = [s["file"] for s in metadata["shards"] if not os.path.isfile(os.path.join(args.output_dir, s["file"]))]
        if absent:
            raise RuntimeError(f"Shards {absent[:5]} were not written; rerun the extraction to resume it.")
        metadata["complete"] = True
        write_code_metadata(args.output_dir, metadata)
    state.wait_for_everyone()
    metadata["complete"] = True
    return metadata


if __name__ == "__main__":
    result = main(parse_args())
    if distributed_state().is_main_process:
        print(
            f"Wrote {result['num_samples']} token grids ({'x'.join(map(str, result['grid']))}, vocab "
            f"{result['vocab_size']}) from {result['num_images']} {'videos' if 'video' in result else 'images'} in "
            f"{result['num_shards']} shard(s)."
        )
