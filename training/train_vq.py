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
"""Train a diffusers VQModel tokenizer on your own images.

    accelerate launch training/train_vq.py --train_data_dir images/ --resolution 64 \
        --block_out_channels 64 128 256 --num_vq_embeddings 1024 --max_train_steps 20000 \
        --checkpointing_steps 1000 --output_dir my-vq

Loss: L1 or L2 reconstruction + codebook loss + commitment_weight * commitment loss. There is no perceptual
(LPIPS) loss: it needs pretrained VGG/AlexNet weights that cannot be fetched offline. The output folder holds the
trained `VQModel` (`VQModel.from_pretrained(output_dir)`) with a model card (README.md), `checkpoint-<step>` folders
and `reconstructions.png` (originals above their token round trip; also logged to the trackers). `--push_to_hub`
uploads the model and its card.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import VQModel

from nar_diffusers.models.vq_codec import vq_downsample_factor
from nar_diffusers.training.arguments import (
    add_crop_arguments,
    add_hub_arguments,
    add_pretrained_arguments,
    add_resume_arguments,
    add_tracking_arguments,
    add_training_arguments,
    apply_allow_tf32,
    check_script_arguments,
    pretrained_kwargs,
    steps_for_epochs,
)
from nar_diffusers.training.batches import ImageExamples
from nar_diffusers.training.checkpointing import prepare_output_dir
from nar_diffusers.training.image_data import add_image_dataset_arguments, load_image_dataset_from_args
from nar_diffusers.training.image_transforms import ImageTransform
from nar_diffusers.training.hub import create_hub_repo, push_output_dir
from nar_diffusers.training.optimization import add_optimizer_arguments, check_optimizer_arguments, optimizer_settings
from nar_diffusers.training.tracking import init_trackers, log_images, log_with
from nar_diffusers.training.vq_training import (
    RECONSTRUCTION_LOSSES,
    build_vqmodel,
    reconstruction_grid,
    reconstruction_mse,
    train_vqmodel,
)
from nar_diffusers.utils.atomic_files import write_json_atomically
from nar_diffusers.utils.model_card import build_vq_model_card, save_model_card
from nar_diffusers.utils.distributed import distributed_session


logger = get_logger(__name__)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # data
    add_image_dataset_arguments(parser, skip_corrupt_images=True)
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N images.")
    parser.add_argument("--resolution", type=int, default=256, help="Square training resolution.")
    add_crop_arguments(parser, center_crop=True)
    parser.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    # model
    add_pretrained_arguments(
        parser, "--vq_model_path", help="Start from this VQModel (a folder or Hub model id; default: a new one)."
    )
    parser.add_argument("--in_channels", type=int, default=3, choices=[1, 3], help="1 grayscale, 3 RGB.")
    parser.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=[64, 128, 256, 256],
        help="Channels per level; the downsample factor is 2 ** (levels - 1).",
    )
    parser.add_argument("--layers_per_block", type=int, default=2, help="ResNet layers per encoder level.")
    parser.add_argument("--latent_channels", type=int, default=64, help="Channels of the encoder output.")
    parser.add_argument("--vq_embed_dim", type=int, default=8, help="Codebook vector size.")
    parser.add_argument("--num_vq_embeddings", type=int, default=4096, help="Codebook size (the token vocabulary).")
    parser.add_argument("--norm_num_groups", type=int, default=32, help="GroupNorm groups.")
    parser.add_argument("--no_mid_block_attention", action="store_true", help="Drop the mid-block self-attention.")
    # optimisation
    parser.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    parser.add_argument("--max_train_steps", type=int, default=10000, help="Total optimizer steps.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    add_training_arguments(parser)
    add_optimizer_arguments(
        parser, lr_scheduler="constant_with_warmup", lr_warmup_steps=500, adam_beta2=0.99, adam_weight_decay=0.0
    )
    parser.add_argument("--reconstruction_loss", type=str, default="l1", choices=list(RECONSTRUCTION_LOSSES))
    parser.add_argument("--commitment_weight", type=float, default=0.25, help="Weight of the commitment loss.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--seed", type=int, default=None)
    # checkpoints and logs
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--checkpointing_steps", type=int, default=1000, help="Save the training state every N steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    add_resume_arguments(parser)
    add_tracking_arguments(parser, tracker_project_name="train_vq")
    parser.add_argument("--num_validation_images", type=int, default=16, help="Images in reconstructions.png.")
    add_hub_arguments(parser)
    args = parser.parse_args(input_args)

    for name in (
        "resolution",
        "train_batch_size",
        "max_train_steps",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "num_validation_images",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if (args.dataset_name is None) == (args.train_data_dir is None):
        parser.error("pass exactly one of --dataset_name or --train_data_dir.")
    check_optimizer_arguments(args)
    check_script_arguments(args)
    return args


def collate_pixels(rows: list[dict]) -> torch.Tensor:
    return torch.stack([row["pixel_values"] for row in rows])


def setup_accelerator(args: argparse.Namespace):
    """The run's accelerator, after checking `--output_dir`; seeds and TF32 set; the Hub repo id (main process)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with(args.report_to),
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    prepare_output_dir(accelerator, args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    if args.seed is not None:
        set_seed(args.seed)
    apply_allow_tf32(args)
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        repo_id = create_hub_repo(args)
    return accelerator, repo_id


def load_or_build_vqmodel(args: argparse.Namespace) -> VQModel:
    """The pretrained tokenizer to fine-tune, or a new one of the architecture flags."""
    if args.pretrained_model_name_or_path is not None:
        vqvae = VQModel.from_pretrained(args.pretrained_model_name_or_path, **pretrained_kwargs(args))
        if not vqvae.config.lookup_from_codebook:
            vqvae.register_to_config(lookup_from_codebook=True)
        return vqvae
    return build_vqmodel(
        block_out_channels=args.block_out_channels,
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        vq_embed_dim=args.vq_embed_dim,
        num_vq_embeddings=args.num_vq_embeddings,
        norm_num_groups=args.norm_num_groups,
        in_channels=args.in_channels,
        sample_size=args.resolution,
        mid_block_add_attention=not args.no_mid_block_attention,
    )


def build_dataloader(args: argparse.Namespace, accelerator, num_channels: int):
    """The image dataset, its image column and the shuffling DataLoader of training pixels."""
    with accelerator.main_process_first():
        dataset, image_column = load_image_dataset_from_args(args, args.max_train_samples)
    train_transform = ImageTransform(
        args.resolution, center_crop=args.center_crop, random_flip=args.random_flip, num_channels=num_channels
    )
    # Unreadable images are named (or skipped with --skip_corrupt_images); random crops / flips vary per epoch.
    train_dataset = ImageExamples(
        dataset, train_transform, image_column, seed=args.seed or 0, skip_corrupt_images=args.skip_corrupt_images
    )
    dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        collate_fn=collate_pixels,
    )
    return dataset, image_column, dataloader


def export_tokenizer(args, accelerator, vqvae, result, dataset, image_column, repo_id) -> dict:
    """Save the trained tokenizer, its card, reconstructions and the summary; push to the Hub when asked."""
    summary = {"global_step": result.global_step, "start_step": result.start_step}
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return summary
    vqvae = accelerator.unwrap_model(vqvae)
    vqvae.save_pretrained(args.output_dir)
    save_model_card(vq_model_card(args, vqvae, result.global_step), args.output_dir)
    eval_transform = ImageTransform(args.resolution, center_crop=True, num_channels=vqvae.config.in_channels)
    examples = ImageExamples(dataset, eval_transform, image_column, skip_corrupt_images=args.skip_corrupt_images)
    count = min(args.num_validation_images, len(dataset))
    pixels = torch.stack([examples[i]["pixel_values"] for i in range(count)]).to(accelerator.device)
    vqvae.eval()
    summary["reconstruction_mse"] = reconstruction_mse(vqvae, pixels)
    grid = reconstruction_grid(vqvae, pixels, columns=min(8, count))
    grid.save(os.path.join(args.output_dir, "reconstructions.png"))
    log_images(accelerator, "reconstructions", [grid], result.global_step)
    if result.losses:
        summary["final_loss"] = result.losses[-1]
    write_json_atomically(os.path.join(args.output_dir, "train_summary.json"), summary)
    if repo_id is not None:
        push_output_dir(args, repo_id, model_card=lambda repo: vq_model_card(args, vqvae, result.global_step, repo))
        logger.info(f"Uploaded {args.output_dir} to the Hub repository {repo_id}")
    return summary


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator, repo_id = setup_accelerator(args)
    vqvae = load_or_build_vqmodel(args)
    factor = vq_downsample_factor(vqvae)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of the VQ downsample factor {factor}.")
    dataset, image_column, dataloader = build_dataloader(args, accelerator, vqvae.config.in_channels)
    args.max_train_steps = steps_for_epochs(args, len(dataloader), accelerator.num_processes)
    init_trackers(accelerator, args)
    logger.info(
        f"{len(dataset)} images at {args.resolution}px -> {args.resolution // factor}x"
        f"{args.resolution // factor} tokens, vocab {vqvae.config.num_vq_embeddings}"
    )
    logger.info(
        f"Batch {args.train_batch_size} x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation, {args.max_train_steps} steps"
    )
    result = train_vqmodel(
        vqvae,
        dataloader,
        args.max_train_steps,
        **optimizer_settings(args),
        reconstruction_loss=args.reconstruction_loss,
        commitment_weight=args.commitment_weight,
        accelerator=accelerator,
        output_dir=args.output_dir,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint,
        overwrite_output_dir=args.overwrite_output_dir,
        allow_world_size_change=args.allow_world_size_change,
        seed=args.seed or 0,
    )
    summary = export_tokenizer(args, accelerator, vqvae, result, dataset, image_column, repo_id)
    accelerator.end_training()
    return summary


def vq_model_card(args: argparse.Namespace, vqvae: VQModel, global_step: int, repo: str = "path/to/this/folder"):
    """The model card of the trained tokenizer: what it is, how it was trained, how to use it."""
    source = args.dataset_name or Path(args.train_data_dir).name
    start = f"fine-tuned from `{args.pretrained_model_name_or_path}`" if args.pretrained_model_name_or_path else "trained"
    return build_vq_model_card(
        summary=f"A VQ image tokenizer {start} with nar-diffusers' training/train_vq.py on `{source}` at "
        f"{args.resolution} px.",
        num_vq_embeddings=vqvae.config.num_vq_embeddings, vq_embed_dim=vqvae.config.vq_embed_dim,
        downsample_factor=vq_downsample_factor(vqvae), in_channels=vqvae.config.in_channels, repo=repo,
        base_model=args.pretrained_model_name_or_path,
        training={
            "steps": global_step, "batch size": f"{args.train_batch_size} x {args.gradient_accumulation_steps} accumulation",
            "learning rate": args.learning_rate, "reconstruction loss": args.reconstruction_loss,
        },
    )  # fmt: skip


if __name__ == "__main__":
    with distributed_session():
        summary = main(parse_args())
    if "reconstruction_mse" in summary:
        print(
            f"Trained to step {summary['global_step']} (from {summary['start_step']}); reconstruction MSE on "
            f"pixels in [-1, 1]: {summary['reconstruction_mse']:.5f}."
        )
