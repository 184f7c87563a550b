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
"""Train a NAR (or raster AR baseline) transformer on VQ tokens and export a NARPipeline folder.

    # class-to-image from codes written by training/extract_codes.py
    accelerate launch training/train_nar.py --codes_dir codes/ --vq_model_path my-vq \
        --model_size GPT-B --architecture nar --train_batch_size 32 --max_train_steps 100000 \
        --checkpointing_steps 5000 --output_dir nar-b

    # images encoded on the fly (class sub-folders give labels)
    accelerate launch training/train_nar.py --train_data_dir images/ --vq_model_path my-vq --resolution 256 ...

    # text-to-image: captions from a column, T5 on the fly or pre-extracted by extract_codes.py
    accelerate launch training/train_nar.py --train_data_dir captioned/ --caption_column text \
        --text_encoder_path ./flan-t5-xl --vq_model_path my-vq --resolution 256 ...

    # class-to-video: codes of clips from extract_codes.py --video_column (3-D grids: three heads), or a video
    # folder (video files + metadata.jsonl) tokenized on the fly
    accelerate launch training/train_nar.py --train_data_dir my_videos --video_column video --num_frames 16 \
        --frame_stride 2 --resolution 128 --vq_model_path my-vq ...

The output folder holds `checkpoint-<step>` training states (`--resume_from_checkpoint latest` continues at the same
step with the same optimizer state and data order), `samples/` grids (videos: a GIF and a PNG strip per step; also
logged to the trackers), tracker logs, `train_summary.json` and, at the end, the pipeline
(`NARPipeline.from_pretrained(output_dir)`) with its model card. The pipeline keeps the validation sampling settings
(`--validation_guidance_scale`, `--validation_temperature`, `--validation_top_k`, `--validation_top_p`) as its
sampling defaults and the data's class names as `id2label`; `--push_to_hub` uploads it. Runs single-process or on
many processes through `accelerate launch` with the configs of training/configs/ (DDP, FSDP, DeepSpeed ZeRO-2/3;
docs/training.md says which are tested where):

    accelerate launch --config_file training/configs/ddp.yaml training/train_nar.py --codes_dir codes/ ...

`--codes_dir` data is memory-mapped (`load_code_dataset`): 🤗 datasets converts the shards once into Arrow files of
its cache (`--cache_dir`) on the main process, then every process maps them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from accelerate.logging import get_logger
from accelerate.utils import set_seed
from PIL import Image

from nar_diffusers.models.model_sizes import MODEL_PRESETS
from nar_diffusers.models.transformer_nar import NARTransformer
from nar_diffusers.schedulers.scheduler_selection import ARCHITECTURES, architecture_of_heads
from nar_diffusers.training.batches import TokenBatchCollator, TrainingBatchEncoder
from nar_diffusers.training.checkpointing import prepare_output_dir
from nar_diffusers.training.data_sources import (
    TrainingData,
    attach_text_encoder,
    load_code_source,
    load_image_source,
    load_video_source,
)
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
from nar_diffusers.training.factory import build_pipeline, build_transformer
from nar_diffusers.training.hub import create_hub_repo, push_output_dir
from nar_diffusers.training.image_data import add_image_dataset_arguments
from nar_diffusers.training.nar_training import (
    NARTrainingConfig,
    create_accelerator,
    create_dataloader,
    create_ema,
    sampling_transformer,
    train_nar_transformer,
)
from nar_diffusers.training.optimization import add_optimizer_arguments, check_optimizer_arguments
from nar_diffusers.training.sample_grids import generate_sample_grid, generate_sample_videos, save_sample_videos
from nar_diffusers.training.tracking import init_trackers, log_images
from nar_diffusers.training.video_data import add_video_arguments, check_video_arguments
from nar_diffusers.utils.atomic_files import write_json_atomically
from nar_diffusers.utils.distributed import distributed_session


logger = get_logger(__name__)

PUBLISHED_CAPTION_LENGTH = 120


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--codes_dir", type=str, default=None, help="Token shards written by extract_codes.py.")
    add_image_dataset_arguments(data, skip_corrupt_images=True)
    data.add_argument("--label_column", type=str, default="label", help="Column of integer class labels.")
    data.add_argument("--caption_column", type=str, default=None, help="Column of captions (text-to-image).")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N images.")
    data.add_argument("--resolution", type=int, default=None, help="Square image side (default 256; codes: theirs).")
    add_crop_arguments(data, center_crop=True)
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips (image datasets).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    add_video_arguments(parser.add_argument_group("videos"))
    data.add_argument("--vq_model_path", type=str, default=None, help="Folder of the diffusers VQModel tokenizer.")
    data.add_argument(
        "--text_encoder_path",
        type=str,
        default=None,
        help="Local T5 folder (encoder + tokenizer), e.g. flan-t5-xl: encodes captions on the fly and is exported.",
    )
    data.add_argument(
        "--max_sequence_length",
        type=int,
        default=PUBLISHED_CAPTION_LENGTH,
        help="Caption tokens = the text model's condition slots (published: 120).",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--architecture", type=str, default=None, choices=list(ARCHITECTURES), help="Default nar.")
    model.add_argument("--model_size", type=str, default="GPT-B", help=f"One of {list(MODEL_PRESETS)} (or B, L, ...).")
    add_pretrained_arguments(
        model, "--pretrained_model_path", help="Start from this transformer or pipeline (a folder or Hub model id)."
    )
    model.add_argument("--num_classes", type=int, default=None, help="Class count (default: from the data).")
    model.add_argument("--class_dropout_prob", type=float, default=0.1, help="Condition dropout for guidance.")
    model.add_argument("--dropout", type=float, default=None, help="Token/residual/ffn dropout (GPT presets 0.1).")
    model.add_argument(
        "--position_embedding_type", type=str, default="rope", choices=["rope", "learned"],
        help="rope: N-D rotary (the image models); learned: an absolute table (the published video models).",
    )
    model.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=32, help="Batch size per device.")
    optim.add_argument("--max_train_steps", type=int, default=10000, help="Total optimizer steps.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    add_optimizer_arguments(optim)
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    add_training_arguments(optim)
    optim.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights; it is exported.")
    optim.add_argument("--ema_decay", type=float, default=0.9999)
    optim.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("checkpoints, logs and samples")
    out.add_argument("--output_dir", type=str, required=True)
    out.add_argument("--checkpointing_steps", type=int, default=1000, help="Save the training state every N steps.")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    add_resume_arguments(out)
    add_tracking_arguments(out, tracker_project_name="train_nar")
    out.add_argument("--logging_steps", type=int, default=10, help="Log every N steps.")
    out.add_argument("--validation_steps", type=int, default=1000, help="Write a sample grid every N steps.")
    out.add_argument("--validation_class_labels", type=int, nargs="+", default=None, help="Rows of the sample grid.")
    out.add_argument("--num_validation_images", type=int, default=4, help="Images per row of the sample grid.")
    add_validation_arguments(out, guidance_scale=4.0)  # --validation_prompt (rows of text models) and sampling
    add_hub_arguments(parser.add_argument_group("hub"))
    args = parser.parse_args(input_args)

    positive = ["train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                "validation_steps", "logging_steps", "num_validation_images", "max_sequence_length"]  # fmt: skip
    for name in positive + ["resolution", "max_train_samples", "num_classes"]:
        value = getattr(args, name)
        if (name in positive or value is not None) and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}.")
    if args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    check_optimizer_arguments(args)
    check_script_arguments(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot work, naming the flags (before anything is loaded)."""
    sources = [name for name in ("codes_dir", "dataset_name", "train_data_dir") if getattr(args, name) is not None]
    if len(sources) != 1:
        raise ValueError(
            "Pass exactly one data source: --codes_dir (tokens from extract_codes.py), --dataset_name or "
            f"--train_data_dir (images); got {['--' + s for s in sources] or 'none'}."
        )
    if args.codes_dir is None and args.vq_model_path is None:
        raise ValueError("An image dataset (--dataset_name / --train_data_dir) needs --vq_model_path to tokenize it.")
    if args.codes_dir is not None and args.caption_column is not None:
        raise ValueError("--caption_column applies to image datasets; code shards already say whether they hold captions.")
    if args.codes_dir is None and args.caption_column is not None and args.text_encoder_path is None:
        raise ValueError(
            f"--caption_column {args.caption_column!r} needs --text_encoder_path (a local T5 folder) to encode the "
            "captions, or pre-extracted embeddings: run extract_codes.py --text_encoder_path and train on --codes_dir."
        )
    if args.validation_prompt and args.text_encoder_path is None:
        raise ValueError("--validation_prompt needs --text_encoder_path to encode the prompts.")
    if args.pretrained_model_name_or_path is not None and args.dropout is not None:
        raise ValueError("--dropout sets up a new model; it cannot be combined with --pretrained_model_name_or_path.")
    if args.codes_dir is not None and args.video_column is not None:
        raise ValueError("--video_column applies to video datasets; code shards already say whether they hold clips.")
    if args.codes_dir is None and args.resolution is None:
        args.resolution = 256
    if args.video_column is not None:
        check_video_arguments(args)
    for name in ("class_dropout_prob", "dropout"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"--{name} must be in [0, 1), got {value}.")


def build_model(args: argparse.Namespace, data: TrainingData) -> NARTransformer:
    num_condition_tokens = args.max_sequence_length if data.caption_dim is not None else None
    if args.pretrained_model_name_or_path is None:
        return build_transformer(
            args.model_size, args.architecture or "nar", data.grid, data.vocab_size,
            num_classes=data.num_classes, caption_dim=data.caption_dim, num_condition_tokens=num_condition_tokens,
            class_dropout_prob=args.class_dropout_prob, dropout=args.dropout,
            position_embedding_type=args.position_embedding_type,
        )  # fmt: skip
    transformer = load_pretrained_transformer(args)
    config = transformer.config
    flag = "--pretrained_model_name_or_path"
    architecture = architecture_of_heads(config.num_decoding_heads)
    if args.architecture is not None and args.architecture != architecture:
        raise ValueError(f"--architecture {args.architecture} but {flag} is a {architecture} model.")
    if config.vocab_size != data.vocab_size:
        raise ValueError(f"{flag} has vocab {config.vocab_size}; the tokenizer has {data.vocab_size}.")
    if any(g > m for g, m in zip(data.grid, config.grid_size)) or len(data.grid) != len(config.grid_size):
        raise ValueError(
            f"The token grid {data.grid} (from --resolution / the codes) is larger than {flag} allows: its grid_size "
            f"is {tuple(config.grid_size)}."
        )
    if (config.num_classes is None) != (data.num_classes is None):
        raise ValueError(f"{flag} and the data disagree on class vs text conditioning.")
    if data.num_classes is not None and data.num_classes > config.num_classes:
        raise ValueError(f"The data has {data.num_classes} classes; {flag} serves {config.num_classes}.")
    if data.caption_dim is not None and (
        config.caption_dim != data.caption_dim or config.num_condition_tokens != num_condition_tokens
    ):
        raise ValueError(
            f"{flag} expects captions {config.num_condition_tokens} x {config.caption_dim}; the text encoder / "
            f"--max_sequence_length give {num_condition_tokens} x {data.caption_dim}."
        )
    transformer.register_to_config(class_dropout_prob=args.class_dropout_prob)
    return transformer


def load_pretrained_transformer(args: argparse.Namespace) -> NARTransformer:
    """The transformer of --pretrained_model_name_or_path: a pipeline folder or repository (its `transformer/`), or a
    transformer's own folder or repository."""
    path = args.pretrained_model_name_or_path
    kwargs = pretrained_kwargs(args)
    if os.path.isdir(path):
        subfolder = "transformer" if os.path.isfile(os.path.join(path, "model_index.json")) else None
        return NARTransformer.from_pretrained(path, subfolder=subfolder, **kwargs)
    try:  # a Hub repository: a pipeline first, then a bare transformer
        return NARTransformer.from_pretrained(path, subfolder="transformer", **kwargs)
    except OSError:
        return NARTransformer.from_pretrained(path, **kwargs)


def pretrained_license(args: argparse.Namespace) -> str | None:
    """The license the card of a local pretrained pipeline states (fine-tunes keep it), else None."""
    index = os.path.join(args.pretrained_model_name_or_path or "", "model_index.json")
    try:
        with open(index, encoding="utf-8") as file:
            return (json.load(file).get("model_card_info") or {}).get("license")
    except (OSError, ValueError, AttributeError):
        return None


def pipeline_metadata(args: argparse.Namespace, data: TrainingData, architecture: str, global_step: int) -> dict:
    """What the saved pipeline keeps beyond its weights: the validation sampling settings as its sampling defaults,
    the class names, and the model card's description of the run."""
    source = args.dataset_name or args.train_data_dir or args.codes_dir
    source = os.path.basename(os.path.normpath(source)) if os.path.isdir(source) else source
    kind = "video" if len(data.grid) == 3 else "image"
    condition = "class-conditional" if data.num_classes is not None else "text-conditional"
    start = f"fine-tuned from `{args.pretrained_model_name_or_path}`" if args.pretrained_model_name_or_path else "trained"
    info: dict[str, Any] = {
        "summary": f"A {condition} {kind} generator ({architecture} order) {start} with nar-diffusers' "
        f"training/train_nar.py on `{source}`.",
        "training": {
            "steps": global_step, "batch size": f"{args.train_batch_size} x {args.gradient_accumulation_steps} accumulation",
            "learning rate": args.learning_rate, "token grid": "x".join(map(str, data.grid)),
            **({"EMA decay": args.ema_decay} if args.use_ema else {}),
        },
    }  # fmt: skip
    if args.pretrained_model_name_or_path:
        info["base_model"] = args.pretrained_model_name_or_path
        if pretrained_license(args):
            info["license"] = pretrained_license(args)
    names = data.label_names
    id2label = dict(enumerate(names)) if names and data.num_classes and len(names) <= data.num_classes else None
    return {"sampling_defaults": validation_sampling(args), "id2label": id2label, "model_card_info": info}


def validation_conditions(args: argparse.Namespace, data: TrainingData, collate: TokenBatchCollator) -> dict:
    """Keyword arguments of `generate_sample_grid` naming the rows of the sample grids."""
    if data.num_classes is not None:
        labels = args.validation_class_labels or list(range(min(data.num_classes, 8)))
        bad = [label for label in labels if not 0 <= label < data.num_classes]
        if bad:
            raise ValueError(f"--validation_class_labels {bad} are outside [0, {data.num_classes - 1}].")
        return {"class_labels": labels}
    if args.validation_prompt:
        return {"prompts": args.validation_prompt}
    captions = data.validation_captions
    if "caption_embeds" in captions[0]:
        batch = collate(captions)
        return {"prompt_embeds": batch["encoder_hidden_states"], "prompt_attention_mask": batch["encoder_attention_mask"]}
    return {"prompts": [c["caption"] for c in captions]}


def setup_run(args: argparse.Namespace):
    """The run's accelerator, after checking `--output_dir`; seeds and TF32 set; the Hub repo id (main process)."""
    accelerator = create_accelerator(
        args.output_dir, args.mixed_precision, args.gradient_accumulation_steps, args.report_to, args.logging_dir,
        args.seed,
    )  # fmt: skip
    prepare_output_dir(accelerator, args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    set_seed(args.seed)
    apply_allow_tf32(args)
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        repo_id = create_hub_repo(args)
    return accelerator, repo_id


def load_training_data(args: argparse.Namespace, accelerator) -> TrainingData:
    """Codes (`--codes_dir`), videos (`--video_column`) or images, with the tokenizer and text encoder on device."""
    if args.codes_dir is not None:
        data = load_code_source(args, accelerator)
    elif args.video_column is not None:
        data = load_video_source(args, accelerator)
    else:
        data = load_image_source(args, accelerator)
    data.vqvae.to(accelerator.device)
    attach_text_encoder(args, data, accelerator.device)
    return data


class SampleWriter:
    """Writes validation samples of a model into `<output_dir>/samples` and logs them: a PNG grid for images, an
    animated GIF and a PNG strip of frames for videos."""

    def __init__(self, args: argparse.Namespace, accelerator, data: TrainingData, conditions: dict):
        self.args, self.accelerator, self.data, self.conditions = args, accelerator, data, conditions
        self.sampling = validation_sampling(args)
        self.samples_dir = os.path.join(args.output_dir, "samples")

    def __call__(self, step: int | str, sampler: NARTransformer, log_step: int | None = None) -> None:
        args, data = self.args, self.data
        pipeline = build_pipeline(sampler, data.vqvae, data.text_encoder, data.tokenizer, data.grid)
        pipeline.set_progress_bar_config(disable=True)
        os.makedirs(self.samples_dir, exist_ok=True)
        name = f"step-{step:07d}" if isinstance(step, int) else str(step)
        settings = {"seed": args.seed, **self.sampling, **self.conditions}
        if len(data.grid) == 3:
            videos, rows = generate_sample_videos(pipeline, args.num_validation_images, **settings)
            paths = save_sample_videos(videos, rows, os.path.join(self.samples_dir, name))
            logger.info(f"Wrote {paths[0]} and {paths[1]}")
            with Image.open(paths[1]) as strip:
                image = strip.convert("RGB")
        else:
            image = generate_sample_grid(pipeline, args.num_validation_images, **settings)
            path = os.path.join(self.samples_dir, f"{name}.png")
            image.save(path)
            logger.info(f"Wrote {path}")
        log_images(self.accelerator, "samples", [image], step if log_step is None else log_step)


def log_run_plan(args: argparse.Namespace, accelerator, data: TrainingData, transformer: NARTransformer) -> None:
    """Log the data, the model and the batch layout; warn when accelerate ignores an FSDP / DeepSpeed config."""
    num_parameters = sum(p.numel() for p in transformer.parameters())
    logger.info(
        f"{len(data.examples)} samples, grid {'x'.join(map(str, data.grid))}, vocab {data.vocab_size}; "
        f"{architecture_of_heads(transformer.config.num_decoding_heads)} transformer with "
        f"{num_parameters / 1e6:.2f}M parameters; batch {args.train_batch_size} x {accelerator.num_processes} "
        f"processes x {args.gradient_accumulation_steps} accumulation, {args.max_train_steps} steps; "
        f"{accelerator.distributed_type.value} on {accelerator.device}"
    )
    for variable, wanted in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(variable, "false").lower() == "true" and accelerator.distributed_type.value != wanted:
            logger.warning(
                f"The accelerate config asks for {wanted}, but accelerate runs this as "
                f"{accelerator.distributed_type.value} (it enables {wanted} on GPUs / accelerators only)."
            )


def export_pipeline(args, accelerator, data, result, ema, write_samples, summary: dict, repo_id) -> None:
    """Save the trained pipeline (EMA weights when kept), final samples and the summary; push when asked."""
    with sampling_transformer(accelerator, result.model, ema) as final:
        if final is not None:
            metadata = pipeline_metadata(args, data, summary["architecture"], result.global_step)
            pipeline = build_pipeline(final, data.vqvae, data.text_encoder, data.tokenizer, data.grid, **metadata)
            pipeline.save_pretrained(args.output_dir, safe_serialization=True)  # with README.md, the model card
            logger.info(f"Saved the pipeline to {args.output_dir}")
            write_samples("final", final, log_step=result.global_step)
            write_json_atomically(os.path.join(args.output_dir, "train_summary.json"), summary)
            if repo_id is not None:
                push_output_dir(args, repo_id, model_card=lambda repo: pipeline.model_card(repo=repo))
                logger.info(f"Uploaded {args.output_dir} to the Hub repository {repo_id}")
    accelerator.wait_for_everyone()


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    check_args(args)
    accelerator, repo_id = setup_run(args)
    data = load_training_data(args, accelerator)
    transformer = build_model(args, data)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    ema = create_ema(transformer, args.ema_decay) if args.use_ema else None
    collate = TokenBatchCollator(transformer.num_condition_tokens if data.caption_dim else None)
    dataloader = create_dataloader(
        data.examples, args.train_batch_size, collate, args.dataloader_num_workers, seed=args.seed
    )
    args.max_train_steps = steps_for_epochs(args, len(dataloader), accelerator.num_processes)
    batch_encoder = TrainingBatchEncoder(
        data.vqvae, data.text_encoder, data.tokenizer, transformer.num_condition_tokens, args.max_sequence_length
    )
    write_samples = SampleWriter(args, accelerator, data, validation_conditions(args, data, collate))
    init_trackers(accelerator, args)
    log_run_plan(args, accelerator, data, transformer)
    result = train_nar_transformer(
        transformer, dataloader, NARTrainingConfig.from_args(args), accelerator, batch_encoder, ema,
        on_validation=write_samples,
    )  # fmt: skip
    summary = {
        "global_step": result.global_step,
        "start_step": result.start_step,
        "architecture": architecture_of_heads(transformer.config.num_decoding_heads),
        "grid": list(data.grid),
        "num_parameters": sum(p.numel() for p in transformer.parameters()),
    }
    if result.losses:
        summary["final_loss"] = result.losses[-1]
    export_pipeline(args, accelerator, data, result, ema, write_samples, summary, repo_id)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    from accelerate import PartialState

    with distributed_session():
        summary = main(parse_args())
        if PartialState().is_main_process:
            print(f"Trained to step {summary['global_step']} (from {summary['start_step']}); pipeline in the output dir.")
