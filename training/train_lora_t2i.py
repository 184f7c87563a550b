#!/usr/bin/env python
"""Fine-tune a text-to-image NAR pipeline with LoRA (peft) on captioned images.

    accelerate launch training/train_lora_t2i.py \
        --pretrained_model_name_or_path nar-t2i-xl \
        --train_data_dir my_images \
        --resolution 256 --rank 16 --learning_rate 1e-4 --max_train_steps 2000 \
        --validation_prompt "a photo of sks dog" --validation_steps 250 \
        --output_dir nar-lora

`--train_data_dir` is a diffusers-style imagefolder: images plus a `metadata.jsonl` with one
`{"file_name": ..., "text": ...}` line per image (or use `--dataset_name`). The transformer's weights stay
frozen; only the LoRA layers train. The result, `pytorch_lora_weights.safetensors` in the diffusers layout with a
model card (README.md: the base model and how to load the LoRA), loads with `pipe.load_lora_weights(output_dir)`;
`--push_to_hub` uploads both. Validation images are saved under `validation/` and logged to the trackers.

Text-to-video: a `NARVideoPipeline` and a captioned video folder (video files plus the same `metadata.jsonl`), with
`--video_column video` and the clip flags; validation writes GIFs:

    accelerate launch training/train_lora_t2i.py --pretrained_model_name_or_path nar-t2v \
        --train_data_dir my_videos --video_column video --num_frames 16 --frame_stride 2 --resolution 128 \
        --rank 16 --max_train_steps 2000 --validation_prompt "a dog running on the beach" --output_dir nar-lora
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from nar_diffusers import NARPipeline, NARVideoPipeline
from nar_diffusers.models.video_tokenizer import tokenizer_num_channels
from nar_diffusers.models.vq_codec import vq_downsample_factor
from nar_diffusers.pipelines.pipeline_loading import nar_pipeline_class
from nar_diffusers.training.arguments import (
    add_crop_arguments,
    add_hub_arguments,
    add_pretrained_arguments,
    add_resume_arguments,
    add_tracking_arguments,
    add_training_arguments,
    add_validation_arguments,
    apply_allow_tf32,
    check_script_arguments,
    pretrained_kwargs,
    steps_for_epochs,
    validation_sampling,
)
from nar_diffusers.training.batches import ImageExamples, TokenBatchCollator, TrainingBatchEncoder
from nar_diffusers.training.checkpointing import prepare_output_dir, save_training_state
from nar_diffusers.training.image_data import add_image_dataset_arguments, load_image_dataset_from_args, resolve_column
from nar_diffusers.training.image_transforms import ImageTransform
from nar_diffusers.training.lora import ATTENTION_MODULES, add_lora, lora_state_dict, register_lora_checkpoint_hooks
from nar_diffusers.training.nar_training import (
    NARTrainingConfig,
    NARTrainingOutput,
    create_accelerator,
    create_dataloader,
    train_nar_transformer,
)
from nar_diffusers.training.hub import create_hub_repo, push_output_dir
from nar_diffusers.training.optimization import add_optimizer_arguments, check_optimizer_arguments
from nar_diffusers.training.tracking import init_trackers, log_images
from nar_diffusers.training.video_data import (
    VideoClipTransform,
    VideoExamples,
    add_video_arguments,
    check_video_arguments,
    load_video_dataset,
)
from nar_diffusers.utils.model_card import build_lora_model_card, save_model_card
from nar_diffusers.utils.video_utils import video_strip, write_video
from nar_diffusers.utils.distributed import distributed_session

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    add_pretrained_arguments(
        model, required=True, help="A text-to-image NARPipeline (or text-to-video NARVideoPipeline) folder or Hub id."
    )
    model.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    model.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    model.add_argument("--lora_dropout", type=float, default=0.0)
    model.add_argument(
        "--target_modules", default=",".join(ATTENTION_MODULES),
        help="Comma-separated Linear layers to adapt: attention 'qkv,out_proj' (default); add 'w1,w2,w3' for the "
        "feed-forward layers.",
    )
    data = parser.add_argument_group("data")
    add_image_dataset_arguments(data, skip_corrupt_images=True)
    data.add_argument("--caption_column", default="text")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--resolution", type=int, default=256, help="Training image size; a multiple of the VQ factor.")
    add_crop_arguments(data, center_crop=False)
    data.add_argument("--random_flip", action="store_true")
    data.add_argument("--caption_dropout_prob", type=float, default=0.1, help="Train the unconditional branch too.")
    data.add_argument("--max_sequence_length", type=int, default=None, help="Caption tokens kept (default: model's).")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    add_video_arguments(parser.add_argument_group("videos"))
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="nar-lora")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=4)
    train.add_argument("--max_train_steps", type=int, default=1000)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    add_training_arguments(train)
    train.add_argument("--gradient_checkpointing", action="store_true")
    add_optimizer_arguments(train, lr_scheduler="constant", adam_weight_decay=0.0)
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=None)
    add_resume_arguments(train)
    add_tracking_arguments(train, tracker_project_name="nar-lora-t2i")
    train.add_argument("--logging_steps", type=int, default=10, help="Log every N steps.")
    val = parser.add_argument_group("validation")
    val.add_argument("--validation_steps", type=int, default=250)
    val.add_argument("--num_validation_images", type=int, default=2)
    add_validation_arguments(val, guidance_scale=4.0)  # --validation_prompt (repeat it, or several after one flag)
    add_hub_arguments(parser.add_argument_group("hub"))
    args = parser.parse_args(argv)

    for name in ("rank", "train_batch_size", "max_train_steps", "gradient_accumulation_steps", "resolution",
                 "checkpointing_steps", "validation_steps", "num_validation_images", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    if not 0.0 <= args.caption_dropout_prob <= 1.0:
        raise ValueError(f"`--caption_dropout_prob` must be in [0, 1], got {args.caption_dropout_prob}.")
    check_optimizer_arguments(args)
    check_script_arguments(args)
    if args.video_column is not None:
        check_video_arguments(args)
    args.target_modules = [name.strip() for name in args.target_modules.split(",") if name.strip()]
    return args


def setup_run(args: argparse.Namespace) -> tuple[Accelerator, str | None]:
    """The accelerator, the checked output folder, seeds, and the Hub repository when pushing (main process)."""
    accelerator = create_accelerator(
        args.output_dir, args.mixed_precision, args.gradient_accumulation_steps, args.report_to, args.logging_dir,
        args.seed,
    )  # fmt: skip
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    prepare_output_dir(accelerator, args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    set_seed(args.seed)
    apply_allow_tf32(args)
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        repo_id = create_hub_repo(args)
    return accelerator, repo_id


def load_text_pipeline(args: argparse.Namespace) -> NARPipeline | NARVideoPipeline:
    """The text-to-image (or text-to-video) pipeline to adapt; its token grid must fit the requested size."""
    revision = {"revision": args.revision} if args.revision else {}
    pipeline_class = nar_pipeline_class(args.pretrained_model_name_or_path, **revision)
    pipe = pipeline_class.from_pretrained(args.pretrained_model_name_or_path, **pretrained_kwargs(args))
    is_video = isinstance(pipe, NARVideoPipeline)
    if pipe.transformer.condition_type != "text" or pipe.text_encoder is None or pipe.tokenizer is None:
        raise ValueError(
            "`--pretrained_model_name_or_path` must be a text-to-image NARPipeline (or text-to-video "
            "NARVideoPipeline) with a text_encoder and tokenizer."
        )
    if is_video != (args.video_column is not None):
        raise ValueError(
            f"`--pretrained_model_name_or_path` is a {type(pipe).__name__}: "
            + ("pass `--video_column` (and the clip flags) with a video dataset." if is_video else
               "`--video_column` is for NARVideoPipeline models.")
        )  # fmt: skip
    if is_video:
        grid = pipe.video_tokenizer.token_grid(args.num_frames, args.height, args.width)  # names the flag that fails
        pipe.transformer.check_grid(grid, "grid of --num_frames, --height, --width")
    else:
        factor = vq_downsample_factor(pipe.vqvae)
        if args.resolution % factor:
            raise ValueError(
                f"`--resolution` {args.resolution} must be a multiple of the VQ downsample factor {factor}."
            )
        pipe.transformer.check_grid((args.resolution // factor,) * 2, "grid of --resolution")
    return pipe


def prepare_lora_model(args: argparse.Namespace, accelerator: Accelerator, pipe: NARPipeline | NARVideoPipeline):
    """Freeze everything and put it on the device; add the LoRA layers (float32, trainable) to the transformer and
    make accelerate's checkpoints save them. Returns the peft `LoraConfig`."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe.vqvae.requires_grad_(False).to(accelerator.device, dtype=weight_dtype).eval()
    pipe.text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype).eval()
    transformer = pipe.transformer.to(accelerator.device, dtype=weight_dtype)
    lora_config = add_lora(transformer, args.rank, args.lora_alpha, args.lora_dropout, args.target_modules)
    transformer.register_to_config(class_dropout_prob=args.caption_dropout_prob)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    register_lora_checkpoint_hooks(accelerator, lora_config)
    return lora_config


def load_training_examples(args: argparse.Namespace, pipe: NARPipeline | NARVideoPipeline):
    """Captioned images or clips, transformed per example; the loop VQ-encodes the pixels and T5-encodes the
    captions per batch."""
    if isinstance(pipe, NARVideoPipeline):
        dataset = load_video_dataset(
            args.dataset_name, args.train_data_dir, args.dataset_config_name, args.split, args.cache_dir,
            args.max_train_samples, args.video_column,
        )  # fmt: skip
        caption_column = resolve_column(dataset, args.caption_column, "--caption_column")
        transform = VideoClipTransform(
            args.num_frames, args.frame_stride, args.height, args.width, args.clip_position,
            random_crop=not args.center_crop, random_flip=args.random_flip,
            num_channels=tokenizer_num_channels(pipe.video_tokenizer), pixel_range=pipe.video_tokenizer.pixel_range,
        )  # fmt: skip
        return VideoExamples(dataset, transform, args.video_column, caption_column=caption_column, seed=args.seed)
    dataset, image_column = load_image_dataset_from_args(args, args.max_train_samples)
    caption_column = resolve_column(dataset, args.caption_column, "--caption_column")
    transform = ImageTransform(
        args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
        num_channels=pipe.vqvae.config.in_channels,
    )  # fmt: skip
    return ImageExamples(
        dataset, transform, image_column, caption_column=caption_column, seed=args.seed,
        skip_corrupt_images=args.skip_corrupt_images,
    )  # fmt: skip


def log_run_plan(args: argparse.Namespace, pipe: NARPipeline | NARVideoPipeline, num_examples: int) -> None:
    """Log the data, the step count and what the LoRA trains."""
    num_trainable = sum(p.numel() for p in pipe.transformer.parameters() if p.requires_grad)
    kind = "videos" if isinstance(pipe, NARVideoPipeline) else "images"
    logger.info(
        f"{num_examples} {kind}, {args.max_train_steps} steps, LoRA rank {args.rank} on {args.target_modules}, "
        f"{num_trainable:,} trainable parameters."
    )


def finish_run(args, accelerator: Accelerator, pipe, result: NARTrainingOutput, lora_config, repo_id, validate) -> None:
    """Checkpoint and validate the last step even off the regular intervals, then save the LoRA (`save_lora_output`)."""
    if result.global_step > result.start_step and result.global_step % args.checkpointing_steps:
        save_training_state(accelerator, args.output_dir, result.global_step, args.checkpoints_total_limit)
    if result.global_step > result.start_step and result.global_step % args.validation_steps:
        validate(result.global_step, None)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora_output(args, accelerator, pipe, result, lora_config, repo_id)
    accelerator.wait_for_everyone()  # no process tears the group down while the main one still writes


def save_lora_output(args, accelerator: Accelerator, pipe, result: NARTrainingOutput, lora_config, repo_id) -> None:
    """Write `pytorch_lora_weights.safetensors` and the model card; push them when asked (main process)."""
    is_video = isinstance(pipe, NARVideoPipeline)
    NARPipeline.save_lora_weights(
        args.output_dir,
        transformer_lora_layers=lora_state_dict(accelerator.unwrap_model(result.model)),
        transformer_lora_adapter_metadata=lora_config.to_dict(),
    )
    save_model_card(lora_model_card(args, is_video, result.global_step), args.output_dir)
    logger.info(f"Saved {os.path.join(args.output_dir, 'pytorch_lora_weights.safetensors')} and its model card")
    if repo_id is not None:
        card = lambda repo: lora_model_card(args, is_video, result.global_step, repo)  # noqa: E731
        push_output_dir(args, repo_id, model_card=card)
        logger.info(f"Uploaded {args.output_dir} to the Hub repository {repo_id}")


def main(argv: list[str] | None = None) -> NARTrainingOutput:
    """Run the fine-tuning; returns the loop's output (per-step losses, step counters)."""
    args = parse_args(argv)
    accelerator, repo_id = setup_run(args)
    pipe = load_text_pipeline(args)
    lora_config = prepare_lora_model(args, accelerator, pipe)
    examples = load_training_examples(args, pipe)
    dataloader = create_dataloader(
        examples, args.train_batch_size, TokenBatchCollator(), args.dataloader_num_workers, seed=args.seed
    )
    batch_encoder = TrainingBatchEncoder(
        pipe.vqvae, pipe.text_encoder, pipe.tokenizer, pipe.transformer.config.num_condition_tokens,
        args.max_sequence_length,
    )  # fmt: skip
    args.max_train_steps = steps_for_epochs(args, len(dataloader), accelerator.num_processes)
    init_trackers(accelerator, args)
    log_run_plan(args, pipe, len(examples))

    def validate(step: int, _sampler) -> None:
        if args.validation_prompt:
            render_validation(accelerator, pipe, args, step)

    config = NARTrainingConfig.from_args(args)
    result = train_nar_transformer(
        pipe.transformer, dataloader, config, accelerator, batch_encoder, on_validation=validate
    )
    finish_run(args, accelerator, pipe, result, lora_config, repo_id, validate)
    accelerator.end_training()
    return result


def lora_model_card(args: argparse.Namespace, is_video: bool, global_step: int, repo: str = "path/to/this/folder"):
    """The LoRA's model card: the base pipeline, how to load the LoRA, and the settings it was validated with."""
    source = args.dataset_name or Path(args.train_data_dir).name
    return build_lora_model_card(
        base_model=args.pretrained_model_name_or_path,
        summary=f"LoRA weights for `{args.pretrained_model_name_or_path}`, fine-tuned with nar-diffusers' "
        f"training/train_lora_t2i.py on `{source}`.",
        rank=args.rank, target_modules=args.target_modules, repo=repo, video=is_video,
        validation_prompts=args.validation_prompt, sampling=validation_sampling(args),
        training={"steps": global_step, "learning rate": args.learning_rate, "resolution": args.resolution},
    )  # fmt: skip


def render_validation(
    accelerator: Accelerator, pipe: NARPipeline | NARVideoPipeline, args: argparse.Namespace, step: int
) -> None:
    """Generate `--num_validation_images` per validation prompt with the current LoRA; save PNGs (GIFs for videos)
    and log them (videos as strips of their frames)."""
    if not accelerator.is_main_process:
        return
    transformer = accelerator.unwrap_model(pipe.transformer)
    transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    folder = os.path.join(args.output_dir, "validation", f"step-{step}")
    os.makedirs(folder, exist_ok=True)
    images = []
    for index, prompt in enumerate(args.validation_prompt):
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
        if isinstance(pipe, NARVideoPipeline):
            videos = pipe(
                prompt=prompt, num_videos_per_prompt=args.num_validation_images, num_frames=args.num_frames,
                height=args.height, width=args.width, generator=generator, **validation_sampling(args),
            ).frames
            for number, video in enumerate(videos):
                write_video(video, os.path.join(folder, f"prompt{index}-{number}.gif"), fps=4)
            images.extend(video_strip([video], rows=1, padding=0) for video in videos)
            continue
        result = pipe(
            prompt=prompt, num_images_per_prompt=args.num_validation_images, generator=generator,
            **validation_sampling(args),
        ).images
        for number, image in enumerate(result):
            image.save(os.path.join(folder, f"prompt{index}-{number}.png"))
        images.extend(result)
    log_images(accelerator, "validation", images, step)
    transformer.train()


if __name__ == "__main__":
    with distributed_session():
        main()
