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
"""Helpers shared by the training scripts in `training/` (datasets, VQ tokens, code shards, VQ training, NAR
transformer training, checkpoints)."""

from .checkpointing import find_checkpoint, resume_training_state, save_training_state
from .data import (
    AUGMENTATIONS,
    CodeDataset,
    ImageTransform,
    augment_views,
    decode_tokens,
    encode_to_tokens,
    flip_augment,
    load_code_dataset,
    load_digits_images,
    load_image_dataset,
    resolve_column,
    ten_crop_augment,
    vq_downsample_factor,
)
from .nar_training import (
    MODEL_PRESETS,
    CodeExamples,
    NARTrainingConfig,
    NARTrainingOutput,
    TokenBatchCollator,
    TrainingBatchEncoder,
    build_optimizer,
    build_pipeline,
    build_transformer,
    create_accelerator,
    create_dataloader,
    create_ema,
    generate_sample_grid,
    image_examples,
    train_nar_transformer,
)
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
    "MODEL_PRESETS",
    "CodeDataset",
    "CodeExamples",
    "ImageTransform",
    "NARTrainingConfig",
    "NARTrainingOutput",
    "TokenBatchCollator",
    "TrainingBatchEncoder",
    "VQTrainingOutput",
    "augment_views",
    "build_optimizer",
    "build_pipeline",
    "build_transformer",
    "build_vqmodel",
    "codebook_usage",
    "create_accelerator",
    "create_dataloader",
    "create_ema",
    "decode_tokens",
    "encode_to_tokens",
    "find_checkpoint",
    "flip_augment",
    "generate_sample_grid",
    "image_examples",
    "load_code_dataset",
    "load_digits_images",
    "load_image_dataset",
    "reconstruct",
    "reconstruction_grid",
    "reconstruction_mse",
    "resolve_column",
    "resume_training_state",
    "save_training_state",
    "ten_crop_augment",
    "train_nar_transformer",
    "train_vqmodel",
    "vq_downsample_factor",
]
