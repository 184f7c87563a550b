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
"""Training a diffusers `VQModel` tokenizer: model construction, the loss, the loop, and reconstruction checks.

Loss = reconstruction (L1 or L2 in pixel space) + codebook loss + commitment_weight * commitment loss, the
VQ-VAE objective of van den Oord et al. (2017). diffusers' `VectorQuantizer` returns the two VQ terms already
combined, but in its default `legacy=True` mode the weight `beta` multiplies the codebook term instead of the
commitment term; training switches the quantizer to `legacy=False` (and `beta=commitment_weight`) for the
duration of the loop and restores it afterwards. Neither attribute is part of the saved config.

No perceptual (LPIPS) or adversarial loss: LPIPS needs pretrained VGG/AlexNet weights that cannot be fetched
offline, and a GAN loss is not worth its instability for the small tokenizers this module targets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import VQModel
from diffusers.optimization import get_scheduler
from diffusers.utils import logging
from PIL import Image

from ..models.vq_codec import decode_tokens_to_images, encode_images_to_tokens
from ..utils.image_utils import image_grid, tensor_to_pil
from .checkpointing import prepare_output_dir, resume_training_state, save_training_state


logger = logging.get_logger(__name__)

RECONSTRUCTION_LOSSES = ("l1", "l2")



def build_vqmodel(
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    latent_channels: int = 16,
    vq_embed_dim: int | None = None,
    num_vq_embeddings: int = 256,
    norm_num_groups: int = 8,
    in_channels: int = 3,
    sample_size: int = 32,
    mid_block_add_attention: bool = True,
) -> VQModel:
    """Create a randomly initialised diffusers `VQModel` usable as a NAR tokenizer.

    The model downsamples by `2 ** (len(block_out_channels) - 1)` and always uses `lookup_from_codebook=True`, so
    `VQModel.decode(indices, force_not_quantize=True, shape=...)` decodes token ids.

    Raises:
        ValueError: When `norm_num_groups` does not divide every channel count, or a size is not positive.
    """
    block_out_channels = tuple(int(c) for c in block_out_channels)
    if not block_out_channels or min(block_out_channels) < 1:
        raise ValueError(f"`block_out_channels` must be a non-empty list of positive ints, got {block_out_channels}.")
    for name, value in (
        ("layers_per_block", layers_per_block),
        ("latent_channels", latent_channels),
        ("num_vq_embeddings", num_vq_embeddings),
        ("norm_num_groups", norm_num_groups),
    ):
        if value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value}.")
    if vq_embed_dim is not None and vq_embed_dim < 1:
        raise ValueError(f"`vq_embed_dim` must be a positive integer or None, got {vq_embed_dim}.")
    bad = [c for c in (*block_out_channels, latent_channels) if c % norm_num_groups]
    if bad:
        raise ValueError(
            f"`norm_num_groups` ({norm_num_groups}) must divide every entry of `block_out_channels` "
            f"{list(block_out_channels)} and `latent_channels` ({latent_channels}); it does not divide {bad}."
        )
    return VQModel(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        sample_size=sample_size,
        num_vq_embeddings=num_vq_embeddings,
        norm_num_groups=norm_num_groups,
        vq_embed_dim=vq_embed_dim,
        mid_block_add_attention=mid_block_add_attention,
        lookup_from_codebook=True,
    )


@dataclass
class VQLoss:
    """The terms of the VQ-VAE objective for one batch."""

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    quantizer_loss: torch.Tensor
    reconstruction: torch.Tensor


def vq_loss(model: torch.nn.Module, pixels: torch.Tensor, reconstruction_loss: str = "l2") -> VQLoss:
    """Run `model` (a `VQModel`, possibly wrapped by accelerate) on `pixels` and compute the training loss.

    The quantizer term is whatever the model's `VectorQuantizer` returns; `train_vqmodel` configures it as
    `codebook + commitment_weight * commitment` (see the module docstring).
    """
    if reconstruction_loss not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"`reconstruction_loss` must be one of {RECONSTRUCTION_LOSSES}, got {reconstruction_loss!r}.")
    reconstruction, quantizer_loss = model(pixels, return_dict=False)
    reconstruction = reconstruction.float()
    target = pixels.float()
    if reconstruction_loss == "l1":
        rec = F.l1_loss(reconstruction, target)
    else:
        rec = F.mse_loss(reconstruction, target)
    quantizer_loss = quantizer_loss.float().mean()
    return VQLoss(rec + quantizer_loss, rec, quantizer_loss, reconstruction)


def _batches(data: torch.Tensor | Iterable, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of pixel batches from an image tensor (shuffled each epoch) or from an iterable (cycled)."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ValueError(f"An image tensor must have shape (N, C, H, W), got {tuple(data.shape)}.")
        if batch_size > data.shape[0]:
            raise ValueError(f"`batch_size` ({batch_size}) exceeds the number of images ({data.shape[0]}).")
        while True:
            order = torch.randperm(data.shape[0], generator=generator)
            for start in range(0, data.shape[0] - batch_size + 1, batch_size):
                yield data[order[start : start + batch_size]]
    else:
        epoch = 0
        while True:
            empty = True
            dataset = getattr(data, "dataset", None)
            if hasattr(dataset, "set_epoch"):  # per-epoch augmentation seeds (`ImageExamples`)
                dataset.set_epoch(epoch)
            epoch += 1
            for batch in data:
                empty = False
                if isinstance(batch, dict):
                    batch = batch["pixel_values"]
                elif isinstance(batch, (list, tuple)):
                    batch = batch[0]
                yield batch
            if empty:
                raise ValueError("The training data yielded no batch.")


@dataclass
class VQTrainingOutput:
    """What `train_vqmodel` returns.

    Attributes:
        losses: Total loss of every optimizer step run in this call.
        reconstruction_losses: Reconstruction term of every optimizer step run in this call.
        global_step: Optimizer steps done, counting those before a resumed checkpoint.
        start_step: The step training started (or resumed) from.
    """

    losses: list[float] = field(default_factory=list)
    reconstruction_losses: list[float] = field(default_factory=list)
    global_step: int = 0
    start_step: int = 0


def train_vqmodel(
    vqvae: VQModel,
    data: torch.Tensor | Iterable,
    steps: int,
    learning_rate: float = 1e-3,
    *,
    batch_size: int = 64,
    reconstruction_loss: str = "l2",
    commitment_weight: float = 0.25,
    adam_betas: tuple[float, float] = (0.9, 0.99),
    adam_epsilon: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    lr_scheduler: str = "constant_with_warmup",
    lr_warmup_steps: int = 0,
    accelerator=None,
    output_dir: str | None = None,
    checkpointing_steps: int | None = None,
    checkpoints_total_limit: int | None = None,
    resume_from_checkpoint: str | None = None,
    overwrite_output_dir: bool = False,
    seed: int = 0,
    log_every: int = 10,
    progress: bool = True,
    allow_world_size_change: bool = False,
) -> VQTrainingOutput:
    """Train `vqvae` in place with Adam(W) on images in [-1, 1].

    Args:
        vqvae: The `VQModel` to train (created with `lookup_from_codebook=True`, e.g. by `build_vqmodel`).
        data: An image tensor (N, C, H, W), shuffled into batches of `batch_size`, or an iterable of batches
            (a `DataLoader` yielding tensors, `(tensor, ...)` tuples or dicts with "pixel_values"), cycled.
        steps: Total optimizer steps (a resumed run continues up to the same total).
        learning_rate: Peak Adam learning rate.
        batch_size: Batch size when `data` is a tensor.
        reconstruction_loss: "l1" or "l2".
        commitment_weight: Weight of the commitment term (the codebook term has weight 1).
        adam_betas, adam_epsilon, weight_decay: Adam(W) settings.
        max_grad_norm: Gradient clipping norm; None disables clipping.
        lr_scheduler: A `diffusers.optimization.get_scheduler` name.
        lr_warmup_steps: Linear warmup steps.
        accelerator: An `accelerate.Accelerator` (mixed precision, gradient accumulation, logging trackers);
            a default CPU/GPU one is created when None.
        output_dir: Where `checkpoint-<step>` folders go; needed for checkpointing and resuming.
        checkpointing_steps: Save `accelerator.save_state` every this many steps (None: never).
        checkpoints_total_limit: Keep at most this many checkpoints.
        resume_from_checkpoint: "latest" or a checkpoint folder; training continues at its step.
        overwrite_output_dir: Start a new run even though `output_dir` holds another run's checkpoints, deleting
            them (see `checkpointing.prepare_output_dir`).
        seed: Seeds the batch order of a tensor `data` (offset per process).
        log_every: Log (and refresh the progress bar) every this many steps.
        progress: Show a tqdm progress bar.
        allow_world_size_change: Resume a checkpoint saved by another number of processes (the global batch
            changes; see `checkpointing.resume_training_state`).

    Returns:
        A `VQTrainingOutput` with the per-step losses.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    _check_vq_arguments(vqvae, steps, reconstruction_loss, output_dir, checkpointing_steps, resume_from_checkpoint)
    accelerator = accelerator if accelerator is not None else Accelerator()
    optimizer = torch.optim.AdamW(
        vqvae.parameters(), lr=learning_rate, betas=adam_betas, eps=adam_epsilon, weight_decay=weight_decay
    )
    scheduler = get_scheduler(
        lr_scheduler,
        optimizer,
        num_warmup_steps=lr_warmup_steps * accelerator.num_processes,
        num_training_steps=steps * accelerator.num_processes,
    )
    if isinstance(data, torch.Tensor):
        model, optimizer, scheduler = accelerator.prepare(vqvae, optimizer, scheduler)
        per_device_batch = batch_size
    else:
        per_device_batch = getattr(data, "batch_size", None)
        model, optimizer, scheduler, data = accelerator.prepare(vqvae, optimizer, scheduler, data)
    if checkpointing_steps or resume_from_checkpoint:
        prepare_output_dir(accelerator, output_dir, resume_from_checkpoint, overwrite_output_dir)
    output = VQTrainingOutput()
    if resume_from_checkpoint:
        output.start_step = resume_training_state(
            accelerator, output_dir, resume_from_checkpoint, batch_size=per_device_batch,
            allow_world_size_change=allow_world_size_change,
        )  # fmt: skip
    global_step = output.start_step

    quantizer = accelerator.unwrap_model(model).quantize
    saved_quantizer_mode = (quantizer.legacy, quantizer.beta)
    quantizer.legacy, quantizer.beta = False, commitment_weight  # codebook + beta * commitment (fixed weighting)
    # Distinct batch orders per process (and per resume point) when `data` is a tensor.
    generator = torch.Generator().manual_seed(seed + global_step + 1_000_003 * accelerator.process_index)
    batches = _batches(data, batch_size, generator)
    progress_bar = tqdm(
        total=steps, initial=global_step, desc="Training VQModel", disable=not (progress and accelerator.is_main_process)
    )
    model.train()
    try:
        while global_step < steps:
            terms = _vq_micro_step(accelerator, model, optimizer, scheduler, next(batches), reconstruction_loss, max_grad_norm)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            _record_vq_step(accelerator, output, terms, global_step, scheduler, progress_bar, log_every, steps)
            if checkpointing_steps and global_step % checkpointing_steps == 0:
                save_training_state(
                    accelerator, output_dir, global_step, checkpoints_total_limit, batch_size=per_device_batch
                )
    finally:
        quantizer.legacy, quantizer.beta = saved_quantizer_mode
        progress_bar.close()
    model.eval()
    output.global_step = global_step
    return output


def _check_vq_arguments(vqvae, steps, reconstruction_loss, output_dir, checkpointing_steps, resume_from_checkpoint):
    if steps < 1:
        raise ValueError(f"`steps` must be a positive integer, got {steps}.")
    if reconstruction_loss not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"`reconstruction_loss` must be one of {RECONSTRUCTION_LOSSES}, got {reconstruction_loss!r}.")
    if not vqvae.config.lookup_from_codebook:
        raise ValueError("The VQModel must be created with `lookup_from_codebook=True` to decode NAR token ids.")
    if (checkpointing_steps or resume_from_checkpoint) and output_dir is None:
        raise ValueError("`output_dir` is required with `checkpointing_steps` or `resume_from_checkpoint`.")


def _vq_micro_step(accelerator, model, optimizer, scheduler, pixels, reconstruction_loss, max_grad_norm):
    """Forward, backward and (when gradients sync) the optimizer step of one batch; returns its loss terms."""
    with accelerator.accumulate(model):
        terms = vq_loss(model, pixels.to(accelerator.device), reconstruction_loss)
        accelerator.backward(terms.loss)
        if accelerator.sync_gradients and max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return terms


def _record_vq_step(accelerator, output, terms, global_step, scheduler, progress_bar, log_every, steps) -> None:
    """Record the step's losses (refusing a non-finite one) and log them every `log_every` steps."""
    loss, rec = terms.loss.detach().item(), terms.reconstruction_loss.detach().item()
    if not math.isfinite(loss):
        raise RuntimeError(f"VQ training diverged at step {global_step} (loss {loss}); lower the learning rate.")
    output.losses.append(loss)
    output.reconstruction_losses.append(rec)
    progress_bar.update(1)
    if global_step % log_every == 0 or global_step == steps:
        logs = {
            "loss": loss,
            "reconstruction_loss": rec,
            "quantizer_loss": terms.quantizer_loss.detach().item(),
            "lr": scheduler.get_last_lr()[0],
        }
        progress_bar.set_postfix(loss=f"{loss:.4f}", rec=f"{rec:.4f}")
        accelerator.log(logs, step=global_step)


@torch.no_grad()
def reconstruct(vqvae: VQModel, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Round-trip images through token ids (`encode_images_to_tokens` then `decode_tokens_to_images`), clamped to [-1, 1]."""
    outputs = []
    for start in range(0, pixels.shape[0], batch_size):
        tokens = encode_images_to_tokens(vqvae, pixels[start : start + batch_size])
        outputs.append(decode_tokens_to_images(vqvae, tokens).float().clamp(-1, 1).to(pixels.device))
    return torch.cat(outputs)


@torch.no_grad()
def reconstruction_mse(vqvae: VQModel, pixels: torch.Tensor, batch_size: int = 256) -> float:
    """Mean squared error between images in [-1, 1] and their token round trip (same [-1, 1] scale)."""
    return F.mse_loss(reconstruct(vqvae, pixels, batch_size), pixels.float()).item()


@torch.no_grad()
def codebook_usage(vqvae: VQModel, pixels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of the codebook used when encoding `pixels`."""
    used = torch.zeros(vqvae.config.num_vq_embeddings, dtype=torch.bool)
    for start in range(0, pixels.shape[0], batch_size):
        used[encode_images_to_tokens(vqvae, pixels[start : start + batch_size]).flatten().cpu()] = True
    return used.float().mean().item()


@torch.no_grad()
def reconstruction_grid(vqvae: VQModel, pixels: torch.Tensor, columns: int = 8, scale: int = 1) -> Image.Image:
    """A PNG-ready grid: each pair of rows shows originals above their token round trip.

    Args:
        vqvae: The tokenizer.
        pixels: Images (N, C, H, W) in [-1, 1].
        columns: Images per row.
        scale: Integer nearest-neighbour upscaling of the grid (tiny images are easier to inspect).
    """
    if columns < 1 or scale < 1:
        raise ValueError(f"`columns` and `scale` must be positive integers, got {columns} and {scale}.")
    originals = tensor_to_pil(pixels)
    reconstructions = tensor_to_pil(reconstruct(vqvae, pixels))
    blank = Image.new(originals[0].mode, originals[0].size)
    rows: list[Image.Image] = []
    for start in range(0, len(originals), columns):
        fill = [blank] * (columns - len(originals[start : start + columns]))
        rows += originals[start : start + columns] + fill + reconstructions[start : start + columns] + fill
    return image_grid(rows, rows=len(rows) // columns, scale=scale)
