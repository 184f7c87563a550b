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
import logging

import torch

from nar_diffusers.models.video_tokenizer import as_video_tokenizer, load_tokenizer_model, tokenizer_num_channels
from nar_diffusers.models.vq_codec import encode_images_to_tokens, load_vq_model, vq_downsample_factor
from nar_diffusers.pipelines.text_encoding import load_text_encoder
from nar_diffusers.training.code_extraction import (  # noqa: F401 (the script's names before they moved)
    VIDEO_AUGMENTATIONS,
    ImageViews,
    ShardEncoder,
    VideoViews,
    build_code_metadata,
    caption_token_embeddings,
    collate_views,
    encode_my_shards,
    finish_output_dir,
    previous_settings_differ,
    remove_previous_extraction,
    start_output_dir,
)
from nar_diffusers.training.image_data import (
    add_image_dataset_arguments,
    check_label_column,
    load_image_dataset_from_args,
    resolve_column,
)
from nar_diffusers.training.image_transforms import AUGMENTATIONS
from nar_diffusers.training.video_data import (
    VideoClipTransform,
    add_video_arguments,
    check_video_arguments,
    encode_label_column,
    load_video_dataset,
)
from nar_diffusers.utils.distributed import distributed_session, distributed_state
from nar_diffusers.utils.dtypes import DTYPES, dtype_kwargs


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


build_metadata = build_code_metadata  # the script's name for it


def encoding_device(args: argparse.Namespace, state) -> torch.device:
    """--device, or this process's device (`cuda:<local rank>` under a multi-GPU launch, else cpu)."""
    if args.device is None:
        device = state.device
    else:
        device = torch.device(args.device)
        if state.num_processes > 1 and device.type != "cpu" and device.index is None:
            device = state.device  # one device per process, not all on the first one
    return torch.device("cpu") if device.type == "cpu" else device


def load_tokenizer_and_dataset(args: argparse.Namespace, state, device: torch.device):
    """The VQ model (and, for videos, its video tokenizer view), the source dataset and its image column."""
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
        return vqvae, video_tokenizer, dataset, None
    vqvae = load_vq_model(args.vq_model_path, "--vq_model_path", **dtype).to(device)
    factor = vq_downsample_factor(vqvae)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of the VQ downsample factor {factor}.")
    with state.main_process_first():
        dataset, image_column = load_image_dataset_from_args(args, args.max_samples)
    return vqvae, None, dataset, image_column


def condition_columns(args: argparse.Namespace, dataset) -> tuple[str, str]:
    """`(condition column of the shards, source column of the dataset)`: captions or labels."""
    if args.caption_column is not None:
        return "caption", resolve_column(dataset, args.caption_column, "--caption_column")
    try:
        source_column = resolve_column(dataset, args.label_column, "--label_column")
    except ValueError as error:
        raise ValueError(f"{error} For captions pass --caption_column instead.") from error
    check_label_column(dataset, source_column)
    return "label", source_column


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # One process, or several under `accelerate launch` / `torchrun`: process i encodes the shards i, i + n, ...
    state = distributed_state(cpu=args.device is not None and torch.device(args.device).type == "cpu")
    device = encoding_device(args, state)
    vqvae, video_tokenizer, dataset, image_column = load_tokenizer_and_dataset(args, state, device)
    condition_column, source_column = condition_columns(args, dataset)
    text_encoder = tokenizer = caption_dim = None
    if args.text_encoder_path is not None:
        text_encoder, tokenizer = load_text_encoder(args.text_encoder_path, DTYPES[args.dtype])
        text_encoder.to(device)
        caption_dim = text_encoder.config.d_model

    metadata = build_code_metadata(args, vqvae, dataset, condition_column, source_column, caption_dim, video_tokenizer)
    start_output_dir(args, state, metadata)
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
    encode_shard = ShardEncoder(args, views, encode, vqvae, device, metadata, condition_column, text_encoder, tokenizer)
    encode_my_shards(args, state, metadata, len(dataset), encode_shard, unit)
    finish_output_dir(args, state, metadata)
    return metadata


if __name__ == "__main__":
    with distributed_session():
        result = main(parse_args())
        if distributed_state().is_main_process:
            print(
                f"Wrote {result['num_samples']} token grids ({'x'.join(map(str, result['grid']))}, vocab "
                f"{result['vocab_size']}) from {result['num_images']} {'videos' if 'video' in result else 'images'} "
                f"in {result['num_shards']} shard(s)."
            )
