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
"""The NAR training loop: accelerator, dataloader, EMA, and `train_nar_transformer` with exact resumption.

`create_accelerator(...)` + `create_dataloader(...)` + `train_nar_transformer(...)`: AdamW (see `optimization.py`),
a `diffusers.optimization` LR schedule, gradient accumulation and clipping, optional EMA, checkpoints that resume
at the same batch (see `checkpointing.py`), and periodic validation callbacks. The model, its inputs and the loss
come from `factory.py` and `batches.py`; LoRA fine-tuning runs the same loop (`lora.py`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import logging

from ..models.transformer_nar import NARTransformer
from ..schedulers.scheduler_selection import architecture_of_heads
from .batches import TrainingBatchEncoder, nar_loss
from .checkpointing import (
    prepare_output_dir,
    register_checkpoint_state,
    resume_training_state,
    save_training_state,
)
from .optimization import build_optimizer, optimizer_settings


logger = logging.get_logger(__name__)


def create_accelerator(
    output_dir: str | None = None,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int = 1,
    report_to: str | None = None,
    logging_dir: str = "logs",
    seed: int = 0,
    cpu: bool = False,
):
    """An `accelerate.Accelerator` set up for exact resumption: shuffling uses a seedable sampler whose order
    depends only on `seed` and the epoch, so a resumed run sees the same batches as an uninterrupted one."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    from ..utils.distributed import use_cpu_backend

    project_config = None
    if output_dir is not None:
        project_config = ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, logging_dir))
    return Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=report_to if report_to not in (None, "none") else None,
        project_config=project_config,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        cpu=use_cpu_backend(cpu),  # CPU-only multi-process launches: one gloo group, not n lone processes
    )


def create_dataloader(
    examples: torch.utils.data.Dataset,
    batch_size: int,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A shuffling DataLoader for `train_nar_transformer`. Its own seeded generator keeps the global RNG (dropout,
    condition dropout), which checkpoints save, independent of how often the data is iterated, so a resumed run
    continues exactly like an uninterrupted one."""
    return torch.utils.data.DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )


def create_ema(transformer: NARTransformer, decay: float = 0.9999, warmup: bool = False) -> EMAModel:
    """An exponential moving average of `transformer`'s trainable parameters (diffusers' `EMAModel`)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"`--ema_decay` must be in (0, 1), got {decay}.")
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    return EMAModel(
        parameters, decay=decay, use_ema_warmup=warmup, model_cls=NARTransformer, model_config=transformer.config
    )


class DataPosition:
    """Where the loop is in the data (epoch, micro-batches consumed in it); checkpointed with the training state so
    that a resumed run skips exactly the batches already seen."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


@dataclass
class NARTrainingConfig:
    """Optimisation and bookkeeping settings of `train_nar_transformer` (the flags of `training/train_nar.py`).

    Attributes:
        max_train_steps: Total optimizer steps (a resumed run continues up to the same total).
        learning_rate, adam_betas, adam_epsilon, weight_decay: AdamW (decay on parameters of 2+ dims).
        max_grad_norm: Gradient clipping norm; None disables clipping.
        lr_scheduler: A `diffusers.optimization.get_scheduler` name ("cosine", "constant", "constant_with_warmup",
            "linear", ...).
        lr_warmup_steps: Linear warmup steps.
        output_dir: Where `checkpoint-<step>` folders go.
        checkpointing_steps: Save the training state every this many steps (None: never).
        checkpoints_total_limit: Keep at most this many checkpoints.
        resume_from_checkpoint: "latest" or a checkpoint folder to continue from.
        overwrite_output_dir: Start a new run even though `output_dir` holds another run's checkpoints, deleting
            them (see `checkpointing.prepare_output_dir`).
        validation_steps: Call the validation callback every this many steps (None: never).
        log_every: Log to the trackers and refresh the progress bar every this many steps.
        allow_world_size_change: Resume a checkpoint saved by another number of processes (the global batch
            changes; see `checkpointing.resume_training_state`).
    """

    max_train_steps: int
    learning_rate: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.05
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    output_dir: str | None = None
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False
    validation_steps: int | None = None
    log_every: int = 10
    allow_world_size_change: bool = False

    @classmethod
    def from_args(cls, args) -> NARTrainingConfig:
        """The settings of a training script's flags: the optimizer flags (`add_optimizer_arguments`) and
        `--max_train_steps`, `--output_dir`, `--checkpointing_steps`, `--checkpoints_total_limit`,
        `--resume_from_checkpoint`, `--overwrite_output_dir` and `--allow_world_size_change` (when the script has
        them), `--validation_steps`, `--logging_steps`."""
        return cls(
            max_train_steps=args.max_train_steps,
            **optimizer_settings(args),
            output_dir=args.output_dir,
            checkpointing_steps=args.checkpointing_steps,
            checkpoints_total_limit=args.checkpoints_total_limit,
            resume_from_checkpoint=args.resume_from_checkpoint,
            overwrite_output_dir=getattr(args, "overwrite_output_dir", False),
            validation_steps=args.validation_steps,
            log_every=args.logging_steps,
            allow_world_size_change=getattr(args, "allow_world_size_change", False),
        )


@dataclass
class NARTrainingOutput:
    """What `train_nar_transformer` returns.

    Attributes:
        losses: The loss of every optimizer step run in this call (averaged over accumulation micro-batches).
        global_step: Optimizer steps done, counting those before a resumed checkpoint.
        start_step: The step training started (or resumed) from.
        model: The model as prepared by accelerate (wrapped for DDP / FSDP); `sampling_transformer` takes it.
        optimizer: The prepared optimizer, for inspection.
    """

    losses: list[float] = field(default_factory=list)
    global_step: int = 0
    start_step: int = 0
    model: Any = None
    optimizer: Any = None


def _batches_from(accelerator, dataloader, position: DataPosition) -> Iterator[Any]:
    """Endless micro-batches, continuing from `position` and advancing it; the order depends only on the epoch."""
    if len(dataloader) == 0:
        raise ValueError("The training data yields no batch (is the dataset empty, or smaller than a dropped batch?).")
    while True:
        if position.batches < len(dataloader):
            dataloader.set_epoch(position.epoch)
            if hasattr(dataloader.dataset, "set_epoch"):  # per-epoch augmentation seeds (`ImageExamples`)
                dataloader.dataset.set_epoch(position.epoch)
            skip = position.batches
            for batch in accelerator.skip_first_batches(dataloader, skip) if skip else dataloader:
                position.batches += 1
                yield batch
        position.epoch += 1
        position.batches = 0


def shards_parameters(accelerator) -> bool:
    """Whether each process holds only a shard of the parameters: FSDP, or DeepSpeed ZeRO stage 3."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


@contextlib.contextmanager
def sampling_transformer(accelerator, model: torch.nn.Module, ema: EMAModel | None = None):
    """Yield, on the main process, a plain `NARTransformer` with the current weights (the EMA weights when `ema` is
    given) in eval mode; other processes get None. Enter it on every process: with FSDP or DeepSpeed ZeRO-3 the
    full weights are gathered (a collective). Afterwards the model gets its own weights and train / eval mode back."""
    unwrapped = accelerator.unwrap_model(model)
    if shards_parameters(accelerator):
        state_dict = accelerator.get_state_dict(model)
        copy = None
        if accelerator.is_main_process:
            copy = NARTransformer.from_config(unwrapped.config)
            copy.load_state_dict(state_dict)
            copy.to(accelerator.device).eval()
        yield copy
        return
    parameters = [p for p in unwrapped.parameters() if p.requires_grad]
    was_training = unwrapped.training
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
    unwrapped.eval()
    try:
        yield unwrapped if accelerator.is_main_process else None
    finally:
        unwrapped.train(was_training)
        if ema is not None:
            ema.restore(parameters)


def _check_config(config: NARTrainingConfig) -> None:
    if config.max_train_steps < 1:
        raise ValueError(f"`--max_train_steps` must be a positive integer, got {config.max_train_steps}.")
    if (config.checkpointing_steps or config.resume_from_checkpoint) and config.output_dir is None:
        raise ValueError("`output_dir` is required with `checkpointing_steps` or `resume_from_checkpoint`.")


@dataclass
class _Run:
    """The prepared objects of one training run and its counters."""

    accelerator: Any
    model: Any
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    position: DataPosition
    ema: EMAModel | None
    batch_size: int | None
    global_step: int = 0
    grad_norm: Any = None


def _prepare_run(transformer, dataloader, config: NARTrainingConfig, accelerator, ema) -> _Run:
    """Optimizer, LR schedule, `accelerator.prepare`, checkpointed states, and the resumed step."""
    optimizer = build_optimizer(
        transformer, config.learning_rate, config.adam_betas, config.weight_decay, config.adam_epsilon
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    batch_size = dataloader.batch_size
    model, optimizer, lr_scheduler, dataloader = accelerator.prepare(transformer, optimizer, lr_scheduler, dataloader)
    if config.checkpointing_steps or config.resume_from_checkpoint:
        prepare_output_dir(accelerator, config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir)
    run = _Run(accelerator, model, optimizer, lr_scheduler, dataloader, DataPosition(), ema, batch_size)
    register_checkpoint_state(accelerator, "data_position", run.position)  # JSON, never pickle
    if ema is not None:
        ema.to(accelerator.device)
        register_checkpoint_state(accelerator, "ema", ema)  # ema.json + ema.safetensors
    run.global_step = resume_training_state(
        accelerator, config.output_dir, config.resume_from_checkpoint, batch_size=batch_size,
        allow_world_size_change=config.allow_world_size_change,
    )  # fmt: skip
    return run


def _micro_step(run: _Run, batch, batch_encoder: TrainingBatchEncoder, max_grad_norm: float | None) -> torch.Tensor:
    """Forward, backward and (when gradients sync) the optimizer step of one micro-batch; returns its loss."""
    accelerator, model = run.accelerator, run.model
    with accelerator.accumulate(model):
        loss = nar_loss(model, batch_encoder(batch, accelerator.device))
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm is not None:
            run.grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach().float()


def _log_step(run: _Run, config: NARTrainingConfig, step_loss: float, progress_bar) -> None:
    progress_bar.update(1)
    if run.global_step % config.log_every == 0 or run.global_step == config.max_train_steps:
        logs = {"loss": step_loss, "lr": run.lr_scheduler.get_last_lr()[0]}
        if run.grad_norm is not None:
            logs["grad_norm"] = float(run.grad_norm)
        progress_bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}")
        run.accelerator.log(logs, step=run.global_step)


def _checkpoint_and_validate(run: _Run, config: NARTrainingConfig, on_validation) -> None:
    step, accelerator = run.global_step, run.accelerator
    if config.checkpointing_steps and step % config.checkpointing_steps == 0:
        save_training_state(
            accelerator, config.output_dir, step, config.checkpoints_total_limit, batch_size=run.batch_size
        )
    if on_validation is not None and config.validation_steps and step % config.validation_steps == 0:
        with sampling_transformer(accelerator, run.model, run.ema) as sampler:
            if sampler is not None:
                on_validation(step, sampler)
        accelerator.wait_for_everyone()


def train_nar_transformer(
    transformer: NARTransformer,
    dataloader: torch.utils.data.DataLoader,
    config: NARTrainingConfig,
    accelerator=None,
    batch_encoder: TrainingBatchEncoder | None = None,
    ema: EMAModel | None = None,
    on_validation: Callable[[int, NARTransformer], None] | None = None,
    progress: bool = True,
) -> NARTrainingOutput:
    """Train `transformer` in place.

    Args:
        transformer: The model (fresh from `build_transformer`, or pretrained).
        dataloader: Yields batches from `TokenBatchCollator`; create it with `create_dataloader` (with the
            accelerator of `create_accelerator` the order is reproducible and resumable).
        config: Optimisation and checkpoint settings.
        accelerator: An `accelerate.Accelerator` (default: `create_accelerator()`); mixed precision, gradient
            accumulation, multi-GPU / FSDP and trackers come from it.
        batch_encoder: Turns batches into model inputs (default: a `TrainingBatchEncoder()` for pre-extracted codes).
        ema: An EMA of the weights (`create_ema`), updated after every optimizer step and checkpointed.
        on_validation: `f(global_step, transformer)` called on the main process every `config.validation_steps`
            with an eval-mode model holding the current (EMA, when given) weights.
        progress: Show a tqdm progress bar.

    Returns:
        A `NARTrainingOutput` with the per-step losses and the step counters.
    """
    from tqdm.auto import tqdm

    _check_config(config)
    accelerator = accelerator if accelerator is not None else create_accelerator()
    if ema is not None and shards_parameters(accelerator):
        raise ValueError(
            "`--use_ema` is not supported with FSDP or DeepSpeed ZeRO-3 (the EMA would hold sharded parameters)."
        )
    batch_encoder = batch_encoder or TrainingBatchEncoder()
    run = _prepare_run(transformer, dataloader, config, accelerator, ema)
    output = NARTrainingOutput(model=run.model, optimizer=run.optimizer, start_step=run.global_step)
    unwrapped = accelerator.unwrap_model(run.model)
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]
    progress_bar = tqdm(
        total=config.max_train_steps,
        initial=run.global_step,
        desc=f"Training NAR transformer ({architecture_of_heads(unwrapped.config.num_decoding_heads)})",
        disable=not (progress and accelerator.is_local_main_process),
    )
    batches = _batches_from(accelerator, run.dataloader, run.position)
    run.model.train()
    loss_sum, micro_batches = torch.zeros((), device=accelerator.device), 0
    try:
        while run.global_step < config.max_train_steps:
            loss_sum += _micro_step(run, next(batches), batch_encoder, config.max_grad_norm)
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            run.global_step += 1
            if ema is not None:
                ema.step(trainable)
            step_loss = (loss_sum / micro_batches).item()
            loss_sum.zero_()
            micro_batches = 0
            if not math.isfinite(step_loss):
                raise RuntimeError(
                    f"Training diverged at step {run.global_step} (loss {step_loss}); lower the learning rate."
                )
            output.losses.append(step_loss)
            _log_step(run, config, step_loss, progress_bar)
            _checkpoint_and_validate(run, config, on_validation)
    finally:
        progress_bar.close()
    run.model.eval()
    output.global_step = run.global_step
    return output
