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
"""Library code behind the training scripts in `training/`, one concept a module:

- `image_data`, `image_transforms`: image datasets (🤗 `datasets`, scikit-learn's digits) and their transforms.
- `video_data`: video datasets (a folder with `metadata.jsonl`, a 🤗 video column) decoded to clips, and the clips.
- `code_shards`: the parquet format of pre-extracted token grids; `code_extraction`: writing it (the views, the
  metadata.json and the per-process shard loop that `extract_codes.py` runs).
- `factory`: new transformers of a preset size and their pipelines; `optimization`: AdamW and its flags.
- `batches`: examples, collation and model inputs; `nar_training`: the training loop; `checkpointing`.
- `lora`: LoRA adapters for fine-tuning; `vq_training`: training a VQ tokenizer; `sample_grids` (and sample clips).
- `arguments`: the flags every script shares (diffusers' names); `tracking`: trackers and image logging; `hub`:
  `--push_to_hub`.
"""

from .batches import CodeExamples, ImageExamples, TokenBatchCollator, TrainingBatchEncoder, nar_loss
from .checkpointing import (
    find_checkpoint,
    prepare_output_dir,
    register_checkpoint_state,
    resume_training_state,
    save_training_state,
)
from .code_shards import CodeDataset, load_code_dataset, write_code_metadata, write_code_shard
from .factory import build_pipeline, build_transformer, default_dropout
from .image_data import check_label_column, load_digits_images, load_image_dataset, resolve_column
from .image_transforms import AUGMENTATIONS, ImageTransform, augment_views, flip_augment, ten_crop_augment
from .nar_training import (
    NARTrainingConfig,
    NARTrainingOutput,
    create_accelerator,
    create_dataloader,
    create_ema,
    train_nar_transformer,
)
from .optimization import add_optimizer_arguments, build_optimizer
from .sample_grids import generate_sample_grid, generate_sample_videos, save_sample_videos
from .video_data import VideoClipTransform, VideoExamples, load_video_dataset
from .vq_training import (
    VQTrainingOutput,
    build_vqmodel,
    codebook_usage,
    reconstruct,
    reconstruction_grid,
    reconstruction_mse,
    train_vqmodel,
)


__all__ = [
    "AUGMENTATIONS",
    "CodeDataset",
    "CodeExamples",
    "ImageExamples",
    "ImageTransform",
    "NARTrainingConfig",
    "NARTrainingOutput",
    "TokenBatchCollator",
    "TrainingBatchEncoder",
    "VideoClipTransform",
    "VideoExamples",
    "VQTrainingOutput",
    "add_optimizer_arguments",
    "augment_views",
    "build_optimizer",
    "build_pipeline",
    "build_transformer",
    "build_vqmodel",
    "check_label_column",
    "codebook_usage",
    "create_accelerator",
    "create_dataloader",
    "create_ema",
    "default_dropout",
    "find_checkpoint",
    "flip_augment",
    "generate_sample_grid",
    "generate_sample_videos",
    "load_code_dataset",
    "load_digits_images",
    "load_image_dataset",
    "load_video_dataset",
    "nar_loss",
    "prepare_output_dir",
    "reconstruct",
    "reconstruction_grid",
    "reconstruction_mse",
    "register_checkpoint_state",
    "resolve_column",
    "resume_training_state",
    "save_sample_videos",
    "save_training_state",
    "ten_crop_augment",
    "train_nar_transformer",
    "train_vqmodel",
    "write_code_metadata",
    "write_code_shard",
]
