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
"""The data sources of `training/train_nar.py`: pre-extracted codes, images or videos tokenized on the fly, and the
text encoder of caption data. Each reads the script's flags and returns a `TrainingData`."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import VQModel

from ..models.video_tokenizer import as_video_tokenizer, load_tokenizer_model, tokenizer_num_channels
from ..models.vq_codec import load_vq_model, vq_downsample_factor
from ..pipelines.text_encoding import load_text_encoder
from .batches import CodeExamples, ImageExamples
from .code_shards import load_code_dataset
from .image_data import check_label_column, load_image_dataset_from_args, resolve_column
from .image_transforms import ImageTransform
from .video_data import VideoClipTransform, VideoExamples, encode_label_column, load_video_dataset


__all__ = ["TrainingData", "attach_text_encoder", "load_code_source", "load_image_source", "load_video_source"]


@dataclass
class TrainingData:
    """Everything the data source determines."""

    examples: torch.utils.data.Dataset
    grid: tuple[int, ...]  # (h, w) for images, (T, h, w) for videos
    vocab_size: int
    vqvae: VQModel  # or a video tokenizer model
    num_classes: int | None = None
    caption_dim: int | None = None
    text_encoder: Any = None
    tokenizer: Any = None
    validation_captions: list[Any] | None = None  # examples whose captions head the text sample grids
    label_names: list[str] | None = None  # class names by class id (ClassLabel names, or the codes' label_names)


def _num_classes(args: argparse.Namespace, labels: list[int], names: list[str] | None) -> int:
    found = max(len(names or []), max(labels) + 1 if labels else 0)
    if min(labels, default=0) < 0:
        raise ValueError("Class labels must be non-negative integers.")
    if args.num_classes is not None and args.num_classes < found:
        raise ValueError(f"--num_classes {args.num_classes} is smaller than the {found} classes found in the data.")
    return args.num_classes or found


def load_code_source(args: argparse.Namespace, accelerator) -> TrainingData:
    # The main process has datasets convert the shards once (in --cache_dir); the others then map the same files.
    with accelerator.main_process_first():
        codes = load_code_dataset(args.codes_dir, progress=accelerator.is_main_process, cache_dir=args.cache_dir)
    metadata = codes.metadata
    is_video = len(codes.grid) == 3
    if is_video and args.resolution is not None:
        raise ValueError(
            f"The codes in {args.codes_dir} are video clips of {'x'.join(map(str, codes.grid))} tokens; omit "
            "--resolution (the clip size was fixed at extraction)."
        )
    if args.resolution is not None and args.resolution != metadata.get("resolution"):
        raise ValueError(
            f"--resolution {args.resolution} differs from the {metadata.get('resolution')} px the codes in "
            f"{args.codes_dir} were extracted at; omit it or re-extract."
        )
    vq_path = args.vq_model_path or metadata.get("vq_model_path")
    if vq_path is None or not os.path.isdir(vq_path):
        raise ValueError(
            f"--vq_model_path is needed to export the pipeline (the codes' metadata names {vq_path!r}, not a folder)."
        )
    if is_video:
        vqvae = load_tokenizer_model(vq_path, "--vq_model_path")
        tokenizer = as_video_tokenizer(vqvae, "--vq_model_path")
        vocab_size, factor = tokenizer.vocab_size, tokenizer.spatial_compression
    else:
        vqvae = load_vq_model(vq_path, "--vq_model_path")
        vocab_size, factor = vqvae.config.num_vq_embeddings, vq_downsample_factor(vqvae)
    if vocab_size != codes.vocab_size or factor != metadata.get("downsample_factor", factor):
        raise ValueError(f"--vq_model_path {vq_path} is not the tokenizer the codes in {args.codes_dir} came from.")
    data = TrainingData(CodeExamples(codes), codes.grid, codes.vocab_size, vqvae)
    if codes.condition_column == "label":
        data.label_names = metadata.get("label_names")
        data.num_classes = _num_classes(args, list(codes.label_range() or ()), data.label_names)
    elif codes.condition_column == "caption":
        if codes.has_caption_embeddings:
            data.caption_dim = codes.caption_dim
            stored = (metadata.get("text_encoder") or {}).get("max_sequence_length", 0)
            if stored > args.max_sequence_length:
                raise ValueError(
                    f"The caption embeddings in {args.codes_dir} hold up to {stored} tokens, more than "
                    f"--max_sequence_length {args.max_sequence_length}."
                )
        elif args.text_encoder_path is None:
            raise ValueError(
                f"The codes in {args.codes_dir} hold captions without embeddings: pass --text_encoder_path to encode "
                "them on the fly, or re-extract them with extract_codes.py --text_encoder_path."
            )
        data.validation_captions = [data.examples[i] for i in range(min(4, len(codes)))]
    else:
        raise ValueError(f"The codes in {args.codes_dir} hold neither labels nor captions; NAR training needs one.")
    return data


def _condition_columns(args: argparse.Namespace, dataset, task: str) -> tuple[str | None, str | None]:
    """`(label_column, caption_column)`: captions with --caption_column, class labels otherwise."""
    if args.caption_column is not None:
        return None, resolve_column(dataset, args.caption_column, "--caption_column")
    try:
        return resolve_column(dataset, args.label_column, "--label_column"), None
    except ValueError as error:
        raise ValueError(f"{error} For text-to-{task} pass --caption_column and --text_encoder_path.") from error


def _describe_condition(data: TrainingData, args, dataset, label_column: str | None, caption_column: str | None) -> None:
    """The class names and count of a labelled dataset, or a few captions to validate a text model with."""
    if label_column is not None:
        data.label_names = getattr(dataset.features[label_column], "names", None)
        data.num_classes = _num_classes(args, [int(v) for v in dataset[label_column]], data.label_names)
    else:
        first_rows = dataset.select(range(min(4, len(dataset))))
        data.validation_captions = [{"caption": str(c)} for c in first_rows[caption_column]]


def load_image_source(args: argparse.Namespace, accelerator) -> TrainingData:
    vqvae = load_vq_model(args.vq_model_path, "--vq_model_path")
    factor = vq_downsample_factor(vqvae)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of the VQ downsample factor {factor}.")
    with accelerator.main_process_first():
        dataset, image_column = load_image_dataset_from_args(args, args.max_train_samples)
    label_column, caption_column = _condition_columns(args, dataset, "image")
    if label_column is not None:
        check_label_column(dataset, label_column, "--label_column")
    transform = ImageTransform(
        args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
        num_channels=vqvae.config.in_channels,
    )  # fmt: skip
    examples = ImageExamples(
        dataset, transform, image_column, label_column, caption_column, seed=args.seed,
        skip_corrupt_images=args.skip_corrupt_images,
    )  # fmt: skip
    side = args.resolution // factor
    data = TrainingData(examples, (side, side), vqvae.config.num_vq_embeddings, vqvae)
    _describe_condition(data, args, dataset, label_column, caption_column)
    return data


def load_video_source(args: argparse.Namespace, accelerator) -> TrainingData:
    """A video dataset (a folder with metadata.jsonl, or a dataset with --video_column), tokenized on the fly."""
    vqvae = load_tokenizer_model(args.vq_model_path, "--vq_model_path")
    tokenizer = as_video_tokenizer(vqvae, "--vq_model_path")
    grid = tokenizer.token_grid(args.num_frames, args.height, args.width)  # names --num_frames / height / width
    with accelerator.main_process_first():
        dataset = load_video_dataset(
            args.dataset_name, args.train_data_dir, args.dataset_config_name, args.split, args.cache_dir,
            args.max_train_samples, args.video_column,
        )  # fmt: skip
    label_column, caption_column = _condition_columns(args, dataset, "video")
    if label_column is not None:
        dataset = encode_label_column(dataset, label_column)
    transform = VideoClipTransform(
        args.num_frames, args.frame_stride, args.height, args.width, args.clip_position,
        random_crop=not args.center_crop, random_flip=args.random_flip, num_channels=tokenizer_num_channels(tokenizer),
        pixel_range=tokenizer.pixel_range,
    )  # fmt: skip
    examples = VideoExamples(dataset, transform, args.video_column, label_column, caption_column, seed=args.seed)
    data = TrainingData(examples, grid, tokenizer.vocab_size, vqvae)
    _describe_condition(data, args, dataset, label_column, caption_column)
    return data


def attach_text_encoder(args: argparse.Namespace, data: TrainingData, device: torch.device) -> None:
    """Load the T5 encoder of --text_encoder_path (frozen) and check it against stored caption embeddings."""
    if args.text_encoder_path is None:
        return
    if data.num_classes is not None:
        raise ValueError("--text_encoder_path is for caption data; this data has class labels.")
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    text_encoder, tokenizer = load_text_encoder(args.text_encoder_path, dtype)
    if data.caption_dim is not None and data.caption_dim != text_encoder.config.d_model:
        raise ValueError(
            f"--text_encoder_path has width {text_encoder.config.d_model} but the stored caption embeddings have "
            f"{data.caption_dim}: use the encoder they were extracted with."
        )
    data.caption_dim = text_encoder.config.d_model
    data.text_encoder, data.tokenizer = text_encoder.to(device).requires_grad_(False), tokenizer
