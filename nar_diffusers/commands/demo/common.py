"""What the image and the video demo share: the digits, training a token model, the judge, sampling choice,
timed generation, and one run's timings and results.

Every stage is seeded, so the same seed gives the same result on the same machine and device.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers import VQModel
from diffusers.utils import logging

from ...models.transformer_nar import NARTransformer
from ...training.batches import TokenBatchCollator
from ...training.factory import build_pipeline, build_transformer
from ...training.image_data import load_digits_images
from ...training.nar_training import NARTrainingConfig, create_accelerator, create_dataloader, train_nar_transformer
from ...training.vq_training import build_vqmodel, train_vqmodel
from ...utils.atomic_files import write_json_atomically, write_text_atomically

logger = logging.get_logger(__name__)

NUM_CLASSES = 10
DIGIT_NAMES = {i: f"{i}, {name}" for i, name in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
)}  # fmt: skip
"""Class names the demo pipelines carry (`pipe.get_label_ids(["three"])`)."""
HELDOUT_SEED_OFFSET = 10_000
"""Sampling settings are chosen on samples seeded `seed + HELDOUT_SEED_OFFSET`; reported samples use `seed`."""
NUM_HELD_OUT = 297  # digits kept out of every training stage: 1797 = 1500 + 297

SAMPLING_FLAGS = ("guidance_scale", "temperature", "top_k")
SIZE_FLAGS = ("vq_steps", "steps", "batch_size", "samples_per_class")


def apply_flags(args: argparse.Namespace, defaults, quick):
    """`quick` with `--quick`, else `defaults` (a demo's settings dataclass), with every explicitly given flag
    applied; a sampling flag fixes the sampling settings (no choice on held-out samples)."""
    settings = quick if args.quick else defaults
    names = ("model_size", "learning_rate", *SIZE_FLAGS, *SAMPLING_FLAGS)
    settings = replace(settings, **{name: getattr(args, name) for name in names if getattr(args, name) is not None})
    if any(getattr(args, name) is not None for name in SAMPLING_FLAGS):
        settings = replace(settings, fixed_sampling=True)  # the user chose: no search
    for name in SIZE_FLAGS:
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(settings, name)}.")
    return settings


@dataclass
class DemoRun:
    """One run of a demo: where it writes, its seed and device, and the wall time of each stage."""

    output_dir: str
    seed: int = 0
    device: str | None = None
    start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        os.makedirs(self.output_dir, exist_ok=True)
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap (or the start) as stage `name`."""
        now = time.perf_counter()
        self.timings[name] = round(now - self._last, 2)
        self._last = time.perf_counter()

    def path(self, *parts: str) -> str:
        return os.path.join(self.output_dir, *parts)

    def accelerator(self):
        return create_accelerator(seed=self.seed, cpu=self.device == "cpu")

    def write_results(self, results: dict, markdown: Callable[[dict], str]) -> dict[str, Any]:
        """`write_results` of this run's folder, timings and start."""
        return write_results(self.output_dir, results, self.timings, self.start, markdown)


def write_results(output_dir: str, results: dict, timings: dict, start: float, markdown) -> dict[str, Any]:
    """Add the timings to `results` and write them (atomically) as `results.json` and, through `markdown`,
    `results.md`."""
    logger.info("4/4 Writing the results")
    results["timings_s"] = timings
    results["total_seconds"] = time.perf_counter() - start
    write_json_atomically(os.path.join(output_dir, "results.json"), results)
    write_text_atomically(os.path.join(output_dir, "results.md"), markdown(results))
    return results


# --- data and the judge -------------------------------------------------------------------------------------------


def split_digits(resolution: int, seed: int) -> dict[str, torch.Tensor]:
    """The digits as 1-channel images in [-1, 1], split into a training set and `NUM_HELD_OUT` held-out images."""
    images, labels = load_digits_images(resolution, num_channels=1)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    train, test = order[NUM_HELD_OUT:], order[:NUM_HELD_OUT]
    return {"train_images": images[train], "train_labels": labels[train], "test_images": images[test],
            "test_labels": labels[test]}  # fmt: skip


def fit_digit_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int):
    """Logistic regression on the raw pixels of real digits; the demo's recognisability judge."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=2000, random_state=seed)
    return classifier.fit(images.flatten(1).numpy(), labels.numpy())


def classifier_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` (N, 1, H, W) in [-1, 1] the classifier assigns to `labels`."""
    return float((classifier.predict(images.flatten(1).float().numpy()) == labels.numpy()).mean())


def as_gray(output: torch.Tensor) -> torch.Tensor:
    """A "pt" pipeline output in [0, 1] (any channels) as one channel in [-1, 1]."""
    return output.float().cpu().mean(dim=-3, keepdim=True) * 2 - 1


# --- training -----------------------------------------------------------------------------------------------------


def train_vq_tokenizer(
    images: torch.Tensor, settings, seed: int, accelerator, block_out_channels: tuple[int, ...],
    num_vq_embeddings: int, sample_size: int,
) -> VQModel:  # fmt: skip
    """A small 1-channel VQModel (one level per entry of `block_out_channels`, each halving the size but the first)
    trained on `images` (N, 1, H, W) in [-1, 1] with the demo's VQ steps, batch and learning rate."""
    torch.manual_seed(seed)
    vqvae = build_vqmodel(
        block_out_channels, layers_per_block=1, latent_channels=16, num_vq_embeddings=num_vq_embeddings,
        norm_num_groups=8, in_channels=1, sample_size=sample_size, mid_block_add_attention=False,
    )  # fmt: skip
    train_vqmodel(
        vqvae, images, settings.vq_steps, settings.vq_learning_rate, batch_size=settings.vq_batch_size,
        lr_warmup_steps=min(20, settings.vq_steps // 10), accelerator=accelerator, seed=seed,
    )  # fmt: skip
    return vqvae.to("cpu").eval()


def train_token_model(
    architecture: str,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    settings,
    seed: int,
    device: str,
    vocab_size: int = 64,
) -> NARTransformer:
    """A class-conditional transformer ("nar" or "raster") trained on the token grids (2-D images or 3-D clips)."""
    transformer = build_transformer(
        settings.model_size, architecture, tokens.shape[1:], vocab_size, num_classes=NUM_CLASSES, dropout=0.0,
        seed=seed,
    )
    examples = [{"input_ids": t, "class_labels": int(label)} for t, label in zip(tokens, labels)]
    dataloader = create_dataloader(examples, settings.batch_size, TokenBatchCollator(), seed=seed)
    config = NARTrainingConfig(
        max_train_steps=settings.steps,
        learning_rate=settings.learning_rate,
        lr_scheduler="cosine",
        lr_warmup_steps=settings.warmup_steps,
        log_every=20,
    )
    accelerator = create_accelerator(seed=seed, cpu=device == "cpu")
    torch.manual_seed(seed)
    train_nar_transformer(transformer, dataloader, config, accelerator)
    return transformer.to("cpu").eval()


# --- sampling and timing ------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """Samples and timings of one pipeline."""

    images: torch.Tensor  # (N, 1, H, W) in [-1, 1]; clips (N, F, 1, H, W)
    forward_passes: int  # per image (every image of a batch goes through each pass)
    seconds: float  # the whole batch
    latency_seconds: float  # mean time of one image generated alone (batch 1)


def timed_call(pipeline, labels: list[int], seed: int, kwargs: dict) -> tuple[torch.Tensor, int, float]:
    """`(output, forward passes, seconds)` of one "pt" call (images, or frames of a video pipeline)."""
    passes = []

    def count(pipe, step, timestep, callback_kwargs) -> dict:
        passes.append(step)
        return {}

    device = pipeline._execution_device
    start = time.perf_counter()
    images = pipeline(
        class_labels=labels, output_type="pt", generator=torch.Generator(device).manual_seed(seed),
        callback_on_step_end=count, return_dict=False, **kwargs,
    )[0]  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, len(passes), time.perf_counter() - start


def timed_generation(pipeline, labels: torch.Tensor, seed: int) -> GenerationResult:
    """Generate one image (or clip, with a video pipeline) per label in one batch with the pipeline's saved sampling
    defaults, counting forward passes, then one per class alone (batch 1 latency); timed after a one-sample
    warm-up. Images come back as (N, 1, H, W), clips as (N, F, 1, H, W), in [-1, 1]."""
    timed_call(pipeline, [0], seed, {})
    images, passes, seconds = timed_call(pipeline, labels.tolist(), seed, {})
    latencies = [timed_call(pipeline, [label], seed, {})[2] for label in range(NUM_CLASSES)]
    return GenerationResult(as_gray(images), passes, seconds, sum(latencies) / len(latencies))


def sampling_candidates(settings) -> list[dict[str, Any]]:
    """The sampling settings a demo chooses from: its own first, then a few around them (the given settings alone
    when any was set on the command line)."""
    base = {"guidance_scale": settings.guidance_scale, "temperature": settings.temperature, "top_k": settings.top_k}
    if settings.fixed_sampling:
        return [base]
    candidates = [
        base,
        {**base, "guidance_scale": base["guidance_scale"] + 1.0},
        {**base, "guidance_scale": max(1.0, base["guidance_scale"] - 1.0)},
        {**base, "temperature": 1.0, "top_k": 0},
    ]
    return [dict(c) for i, c in enumerate(candidates) if c not in candidates[:i]]


def choose_sampling_defaults(
    pipeline, score: Callable[[torch.Tensor], float], labels: torch.Tensor, candidates: list[dict], seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The candidate whose samples score best, and every candidate's score. The samples are drawn with a seed the
    reported samples never use (held out), so the reported numbers are not the ones the choice was made on."""
    tried = []
    for kwargs in candidates:
        generator = torch.Generator(pipeline._execution_device).manual_seed(seed + HELDOUT_SEED_OFFSET)
        output = pipeline(class_labels=labels.tolist(), output_type="pt", generator=generator, **kwargs)
        samples = output.frames if hasattr(output, "frames") else output.images
        tried.append({**kwargs, "heldout_score": score(samples)})
    best = max(tried, key=lambda entry: entry["heldout_score"])
    return {k: v for k, v in best.items() if k != "heldout_score"}, tried


@dataclass
class TrainedPipeline:
    """A demo pipeline after training, sampling choice, saving and reloading: where it is and what it generated."""

    path: str
    generated: GenerationResult
    sampling_defaults: dict[str, Any]
    sampling_tried: list[dict[str, Any]]


def train_and_generate(
    run: DemoRun, architecture: str, transformer: NARTransformer, vqvae, folder: str, pipeline_class,
    score: Callable[[torch.Tensor], float], labels: torch.Tensor, settings,
) -> TrainedPipeline:  # fmt: skip
    """Build the pipeline of a trained transformer, choose its sampling defaults on held-out samples (`score`),
    save it with the digit names into `folder`, reload it with `pipeline_class` and generate `labels`, timed."""
    pipeline = build_pipeline(transformer, vqvae).to(run.device)
    pipeline.set_progress_bar_config(disable=True)
    chosen, tried = choose_sampling_defaults(pipeline, score, labels, sampling_candidates(settings), run.seed)
    pipeline.set_sampling_defaults(**chosen)
    pipeline.register_to_config(id2label=DIGIT_NAMES)
    path = run.path(folder)
    pipeline.save_pretrained(path, safe_serialization=True)
    pipeline = pipeline_class.from_pretrained(path).to(run.device)
    pipeline.set_progress_bar_config(desc=f"Generating ({architecture})", leave=False)
    return TrainedPipeline(path, timed_generation(pipeline, labels, run.seed), chosen, tried)


def pipeline_results(label: str, trained: TrainedPipeline, per: str, num_samples: int) -> dict[str, Any]:
    """The results entry of one pipeline; `per` names the unit of the per-sample time ("image" or "clip")."""
    generated = trained.generated
    return {
        "label": label,
        "forward_passes": generated.forward_passes,
        f"ms_per_{per}": 1000 * generated.seconds / num_samples,
        "latency_ms": 1000 * generated.latency_seconds,
        "seconds": generated.seconds,
    }


def settings_text(settings: dict[str, Any]) -> str:
    """Sampling settings in a sentence ("guidance 3.0, temperature 0.8, top-k 8")."""
    return f"guidance {settings['guidance_scale']}, temperature {settings['temperature']}, top-k {settings['top_k']}"
