"""`nar-diffusers demo`: NAR vs raster autoregressive generation of digits, trained from scratch on a CPU in minutes.

The demo trains everything on scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes, no
download), upsampled to 16 px:

1. a small VQ tokenizer (diffusers `VQModel`, 16 px -> 8x8 tokens, 64 codes);
2. a class-conditional NAR transformer (two decoding heads, `NeighborScheduler`: 15 forward passes per image) and
   a raster baseline of the same size on the same tokens (one head, `RasterScheduler`: 64 passes);
3. saves both as pipelines (`save_pretrained`), reloads them (`NARPipeline.from_pretrained`) and generates one row
   per digit class (`samples.png`, `samples_raster.png`) with the same batch and sampling settings;
4. measures recognisability with a logistic-regression digit classifier trained on real digits (accuracy of the
   classifier on the generated samples w.r.t. the requested class, and on held-out real digits for reference),
   and prints forward passes and wall time per image (`results.md`, `results.json`).

The same seed gives the same result on the same machine and device.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import VQModel
from diffusers.utils import logging

from ...models.vq_codec import encode_images_to_tokens
from ...pipelines.pipeline_nar import NARPipeline
from ...training.vq_training import reconstruction_grid, reconstruction_mse
from ...utils.image_utils import image_grid, tensor_to_pil
from .common import (
    NUM_CLASSES,
    DemoRun,
    apply_flags,
    as_gray,
    classifier_accuracy,
    fit_digit_classifier,
    pipeline_results,
    settings_text,
    split_digits,
    train_and_generate,
    train_token_model,
    train_vq_tokenizer,
)

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes, steps and sampling settings of the demo (the defaults were measured to fit in a few CPU minutes)."""

    resolution: int = 16
    vq_steps: int = 300
    vq_batch_size: int = 32
    vq_learning_rate: float = 2e-3
    model_size: str = "small"
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    samples_per_class: int = 16
    guidance_scale: float = 3.0
    temperature: float = 0.8
    top_k: int = 8
    fixed_sampling: bool = False  # True: use the settings above; False: choose around them on held-out samples


QUICK_SETTINGS = DemoSettings(
    vq_steps=20, model_size="tiny", steps=20, warmup_steps=2, samples_per_class=2, learning_rate=3e-3
)
"""A seconds-long run exercising every stage (samples are not recognisable at this size)."""


def settings_from_args(args: argparse.Namespace, defaults=None, quick=None):
    """The quick or default settings (of the image demo unless `defaults` / `quick` are given), with every
    explicitly given flag applied."""
    return apply_flags(args, defaults or DemoSettings(), quick or QUICK_SETTINGS)


def train_tokenizer(images: torch.Tensor, settings: DemoSettings, seed: int, accelerator) -> VQModel:
    """A 2-level VQModel (16 px -> 8x8 tokens, 64 codes) trained on the digits."""
    return train_vq_tokenizer(images, settings, seed, accelerator, (16, 32), 64, settings.resolution)


def save_sample_grid(images: torch.Tensor, samples_per_class: int, path: str) -> None:
    """One row per class, upscaled 4x so that 16 px digits are visible."""
    image_grid(tensor_to_pil(images), rows=images.shape[0] // samples_per_class, scale=4, padding=2).save(path)


def results_markdown(results: dict[str, Any]) -> str:
    """The results table as Markdown."""
    batch = results["batch"]
    rows = [
        f"| model | forward passes / image | wall time / image, batch {batch} (ms) | wall time / image, batch 1 (ms) "
        "| classifier accuracy on requested class |",
        "|---|---|---|---|---|",
    ]
    for name in ("nar", "raster"):
        r = results[name]
        rows.append(
            f"| {r['label']} | {r['forward_passes']} | {r['ms_per_image']:.2f} | {r['latency_ms']:.1f} | "
            f"{r['accuracy'] * 100:.1f}% |"
        )
    rows.append(f"| real held-out digits (reference) | - | - | - | {results['real_heldout_accuracy'] * 100:.1f}% |")
    nar, raster = results["nar"], results["raster"]
    rows += [
        "",
        f"NAR vs raster decoding of the same {results['grid'][0]}x{results['grid'][1]} token grid: "
        f"{raster['ms_per_image'] / max(nar['ms_per_image'], 1e-9):.1f}x faster per image at batch {batch}, "
        f"{raster['latency_ms'] / max(nar['latency_ms'], 1e-9):.1f}x at batch 1 ({results['device']}, "
        f"{results['threads']} threads). Sampling settings, chosen per model on held-out samples and saved with it: "
        f"NAR {settings_text(nar['sampling_defaults'])}, raster {settings_text(raster['sampling_defaults'])}. "
        f"Total demo wall time {results['total_seconds']:.0f} s.",
    ]
    return "\n".join(rows) + "\n"


MODELS = {"nar": ("NAR (neighbor scheduler)", "pipeline", "samples.png"),
          "raster": ("raster AR baseline", "pipeline_raster", "samples_raster.png")}  # fmt: skip
"""architecture -> (label, pipeline folder, sample grid file)."""


def run_demo(output_dir: str, settings: DemoSettings, seed: int = 0, device: str | None = None) -> dict[str, Any]:
    """Run every stage and write the pipelines, sample grids and results into `output_dir`; returns the results."""
    run = DemoRun(output_dir, seed, device)
    data = split_digits(settings.resolution, seed)
    classifier = fit_digit_classifier(data["train_images"], data["train_labels"], seed)
    real_accuracy = classifier_accuracy(classifier, data["test_images"], data["test_labels"])
    run.lap("classifier")

    logger.info("1/4 Training the VQ tokenizer")
    vqvae = train_tokenizer(data["train_images"], settings, seed, run.accelerator())
    reconstruction_grid(vqvae, data["test_images"][:16], columns=8, scale=4).save(run.path("reconstructions.png"))
    mse = reconstruction_mse(vqvae, data["test_images"])
    tokens = encode_images_to_tokens(vqvae, data["train_images"])
    run.lap("vq_training")

    labels = torch.arange(NUM_CLASSES).repeat_interleave(settings.samples_per_class)
    results: dict[str, Any] = {
        "settings": asdict(settings), "seed": seed, "device": run.device, "threads": torch.get_num_threads(),
        "grid": list(tokens.shape[1:]), "vq_reconstruction_mse_heldout": mse,
        "real_heldout_accuracy": real_accuracy, "batch": labels.numel(),
    }  # fmt: skip
    for step, (architecture, (label, folder, samples)) in enumerate(MODELS.items(), start=2):
        logger.info(f"{step}/4 Training the {label} transformer")
        transformer = train_token_model(architecture, tokens, data["train_labels"], settings, seed, run.device)
        run.lap(f"{architecture}_training")
        trained = train_and_generate(
            run, architecture, transformer, vqvae, folder, NARPipeline,
            lambda out: classifier_accuracy(classifier, as_gray(out), labels), labels, settings,
        )  # fmt: skip
        save_sample_grid(trained.generated.images, settings.samples_per_class, run.path(samples))
        results[architecture] = {
            **pipeline_results(label, trained, "image", labels.numel()),
            "accuracy": classifier_accuracy(classifier, trained.generated.images, labels),
            "sampling_defaults": trained.sampling_defaults,
            "sampling_tried_on_heldout_samples": trained.sampling_tried,
            "pipeline": trained.path,
            "samples": run.path(samples),
        }
        run.lap(f"{architecture}_generation")
    return run.write_results(results, results_markdown)


def run_image_demo_command(args: argparse.Namespace) -> int:
    """`nar-diffusers demo` (`--task image`): run the demo and print its results."""
    results = run_demo(args.output_dir, settings_from_args(args), args.seed, args.device)
    print()
    print(results_markdown(results))
    print(f"Samples: {results['nar']['samples']} (NAR), {results['raster']['samples']} (raster).")
    print(f"Pipelines: {results['nar']['pipeline']} and {results['raster']['pipeline']} (NARPipeline.from_pretrained).")
    return 0
