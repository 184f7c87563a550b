"""`nar-diffusers demo`: NAR vs raster autoregressive generation, trained from scratch on a CPU in minutes.

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

The same seed gives the same result on the same machine and device. `--task video` runs the video demo instead
(moving digits, `nar_diffusers.demo_video`).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, replace
from collections.abc import Callable
from typing import Any

import torch
from diffusers import VQModel
from diffusers.utils import logging

from .models.model_sizes import MODEL_PRESETS
from .models.transformer_nar import NARTransformer
from .models.vq_codec import encode_images_to_tokens
from .pipelines.pipeline_nar import NARPipeline
from .training.batches import TokenBatchCollator
from .training.factory import build_pipeline, build_transformer
from .training.image_data import load_digits_images
from .training.nar_training import NARTrainingConfig, create_accelerator, create_dataloader, train_nar_transformer
from .training.vq_training import build_vqmodel, reconstruction_grid, reconstruction_mse, train_vqmodel
from .utils.atomic_files import write_json_atomically, write_text_atomically
from .utils.image_utils import image_grid, tensor_to_pil


logger = logging.get_logger(__name__)

NUM_CLASSES = 10
DIGIT_NAMES = {i: f"{i}, {name}" for i, name in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
)}  # fmt: skip
"""Class names the demo pipelines carry (`pipe.get_label_ids(["three"])`)."""
HELDOUT_SEED_OFFSET = 10_000
"""Sampling settings are chosen on samples seeded `seed + HELDOUT_SEED_OFFSET`; reported samples use `seed`."""
NUM_HELD_OUT = 297  # digits kept out of every training stage: 1797 = 1500 + 297


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


TASKS = ("image", "video")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = DemoSettings()
    parser.add_argument(
        "--task", default="image", choices=list(TASKS),
        help="image: digits, NAR vs raster on 8x8 token grids; video: moving digits (4 frames of 16 x 32 px), NAR vs "
        "raster on 4x4x8 token grids. The step and size defaults below are the image demo's; the video demo has its "
        "own (see nar_diffusers/demo_video.py).",
    )  # fmt: skip
    parser.add_argument("--output-dir", default="nar-demo", help="Where pipelines, samples and results go.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds every stage; the same seed gives the same result.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and a few steps (seconds; for testing).")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--vq-steps", type=int, default=None, help=f"VQ training steps ({defaults.vq_steps}).")
    parser.add_argument("--steps", type=int, default=None, help=f"Transformer training steps ({defaults.steps}).")
    parser.add_argument("--batch-size", type=int, default=None, help=f"Transformer batch size ({defaults.batch_size}).")
    parser.add_argument(
        "--model-size", default=None, choices=list(MODEL_PRESETS), help=f"Transformer preset ({defaults.model_size})."
    )
    parser.add_argument("--learning-rate", type=float, default=None, help=f"({defaults.learning_rate}).")
    parser.add_argument(
        "--samples-per-class", type=int, default=None, help=f"Samples per digit ({defaults.samples_per_class})."
    )
    parser.add_argument("--guidance-scale", type=float, default=None, help=f"({defaults.guidance_scale}).")
    parser.add_argument("--temperature", type=float, default=None, help=f"({defaults.temperature}).")
    parser.add_argument("--top-k", type=int, default=None, help=f"({defaults.top_k}; 0 disables).")
    return parser


def settings_from_args(args: argparse.Namespace, defaults=None, quick=None):
    """The quick or default settings (of the image demo unless `defaults` / `quick` are given), with every
    explicitly given flag applied."""
    settings = (quick or QUICK_SETTINGS) if args.quick else (defaults or DemoSettings())
    overrides = {
        "vq_steps": args.vq_steps, "steps": args.steps, "batch_size": args.batch_size, "model_size": args.model_size,
        "learning_rate": args.learning_rate, "samples_per_class": args.samples_per_class,
        "guidance_scale": args.guidance_scale, "temperature": args.temperature, "top_k": args.top_k,
    }  # fmt: skip
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if any(getattr(args, name) is not None for name in ("guidance_scale", "temperature", "top_k")):
        settings = replace(settings, fixed_sampling=True)  # the user chose: no search
    for name in ("vq_steps", "steps", "batch_size", "samples_per_class"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(settings, name)}.")
    return settings


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------


def split_digits(resolution: int, seed: int) -> dict[str, torch.Tensor]:
    """The digits as 1-channel images in [-1, 1], split into a training set and `NUM_HELD_OUT` held-out images."""
    images, labels = load_digits_images(resolution, num_channels=1)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    train, test = order[NUM_HELD_OUT:], order[:NUM_HELD_OUT]
    return {"train_images": images[train], "train_labels": labels[train], "test_images": images[test],
            "test_labels": labels[test]}  # fmt: skip


def train_tokenizer(images: torch.Tensor, settings: DemoSettings, seed: int, accelerator) -> VQModel:
    """A 2-level VQModel (16 px -> 8x8 tokens, 64 codes) trained on the digits."""
    torch.manual_seed(seed)
    vqvae = build_vqmodel(
        (16, 32), layers_per_block=1, latent_channels=16, num_vq_embeddings=64, norm_num_groups=8, in_channels=1,
        sample_size=settings.resolution, mid_block_add_attention=False,
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
    settings: DemoSettings,
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


def fit_digit_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int):
    """Logistic regression on the raw pixels of real digits; the demo's recognisability judge."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=2000, random_state=seed)
    return classifier.fit(images.flatten(1).numpy(), labels.numpy())


def classifier_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` (N, 1, H, W) in [-1, 1] the classifier assigns to `labels`."""
    return float((classifier.predict(images.flatten(1).float().numpy()) == labels.numpy()).mean())


@dataclass
class GenerationResult:
    """Samples and timings of one pipeline."""

    images: torch.Tensor  # (N, 1, H, W) in [-1, 1]; clips (N, F, 1, H, W)
    forward_passes: int  # per image (every image of a batch goes through each pass)
    seconds: float  # the whole batch
    latency_seconds: float  # mean time of one image generated alone (batch 1)


def _timed_call(pipeline: NARPipeline, labels: list[int], seed: int, kwargs: dict) -> tuple[torch.Tensor, int, float]:
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


def as_gray(output: torch.Tensor) -> torch.Tensor:
    """A "pt" pipeline output in [0, 1] (any channels) as one channel in [-1, 1]."""
    return output.float().cpu().mean(dim=-3, keepdim=True) * 2 - 1


def timed_generation(pipeline: NARPipeline, labels: torch.Tensor, seed: int) -> GenerationResult:
    """Generate one image (or clip, with a video pipeline) per label in one batch with the pipeline's saved sampling
    defaults, counting forward passes, then one per class alone (batch 1 latency); timed after a one-sample
    warm-up. Images come back as (N, 1, H, W), clips as (N, F, 1, H, W), in [-1, 1]."""
    _timed_call(pipeline, [0], seed, {})
    images, passes, seconds = _timed_call(pipeline, labels.tolist(), seed, {})
    latencies = [_timed_call(pipeline, [label], seed, {})[2] for label in range(NUM_CLASSES)]
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


def save_sample_grid(images: torch.Tensor, samples_per_class: int, path: str) -> None:
    """One row per class, upscaled 4x so that 16 px digits are visible."""
    image_grid(tensor_to_pil(images), rows=images.shape[0] // samples_per_class, scale=4, padding=2).save(path)


def _settings_text(settings: dict[str, Any]) -> str:
    return f"guidance {settings['guidance_scale']}, temperature {settings['temperature']}, top-k {settings['top_k']}"


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
        f"NAR {_settings_text(nar['sampling_defaults'])}, raster {_settings_text(raster['sampling_defaults'])}. "
        f"Total demo wall time {results['total_seconds']:.0f} s.",
    ]
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def write_results(output_dir: str, results: dict, timings: dict, start: float, markdown) -> dict[str, Any]:
    """Add the timings to `results` and write them (atomically) as `results.json` and, through `markdown`,
    `results.md`."""
    logger.info("4/4 Writing the results")
    results["timings_s"] = timings
    results["total_seconds"] = time.perf_counter() - start
    write_json_atomically(os.path.join(output_dir, "results.json"), results)
    write_text_atomically(os.path.join(output_dir, "results.md"), markdown(results))
    return results


def run_demo(output_dir: str, settings: DemoSettings, seed: int = 0, device: str | None = None) -> dict[str, Any]:
    """Run every stage and write the pipelines, sample grids and results into `output_dir`; returns the results."""
    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(output_dir, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 2)
        return time.perf_counter()

    t = time.perf_counter()
    data = split_digits(settings.resolution, seed)
    classifier = fit_digit_classifier(data["train_images"], data["train_labels"], seed)
    real_accuracy = classifier_accuracy(classifier, data["test_images"], data["test_labels"])
    t = lap("classifier", t)

    logger.info("1/4 Training the VQ tokenizer")
    vqvae = train_tokenizer(data["train_images"], settings, seed, create_accelerator(seed=seed, cpu=device == "cpu"))
    reconstruction_grid(vqvae, data["test_images"][:16], columns=8, scale=4).save(
        os.path.join(output_dir, "reconstructions.png")
    )
    mse = reconstruction_mse(vqvae, data["test_images"])
    tokens = encode_images_to_tokens(vqvae, data["train_images"])
    t = lap("vq_training", t)

    results: dict[str, Any] = {
        "settings": asdict(settings), "seed": seed, "device": device, "threads": torch.get_num_threads(),
        "grid": list(tokens.shape[1:]), "vq_reconstruction_mse_heldout": mse,
        "real_heldout_accuracy": real_accuracy,
    }  # fmt: skip
    labels = torch.arange(NUM_CLASSES).repeat_interleave(settings.samples_per_class)
    results["batch"] = labels.numel()
    names = {"nar": ("NAR (neighbor scheduler)", "pipeline", "samples.png"),
             "raster": ("raster AR baseline", "pipeline_raster", "samples_raster.png")}  # fmt: skip
    for step, (architecture, (label, folder, samples)) in enumerate(names.items(), start=2):
        logger.info(f"{step}/4 Training the {label} transformer")
        transformer = train_token_model(architecture, tokens, data["train_labels"], settings, seed, device)
        t = lap(f"{architecture}_training", t)
        path = os.path.join(output_dir, folder)
        pipeline = build_pipeline(transformer, vqvae).to(device)
        pipeline.set_progress_bar_config(disable=True)
        chosen, tried = choose_sampling_defaults(
            pipeline, lambda out: classifier_accuracy(classifier, as_gray(out), labels), labels,
            sampling_candidates(settings), seed,
        )  # fmt: skip
        pipeline.set_sampling_defaults(**chosen)
        pipeline.register_to_config(id2label=DIGIT_NAMES)
        pipeline.save_pretrained(path, safe_serialization=True)
        pipeline = NARPipeline.from_pretrained(path).to(device)
        pipeline.set_progress_bar_config(desc=f"Generating ({architecture})", leave=False)
        generated = timed_generation(pipeline, labels, seed)
        save_sample_grid(generated.images, settings.samples_per_class, os.path.join(output_dir, samples))
        results[architecture] = {
            "label": label,
            "forward_passes": generated.forward_passes,
            "ms_per_image": 1000 * generated.seconds / labels.numel(),
            "latency_ms": 1000 * generated.latency_seconds,
            "seconds": generated.seconds,
            "accuracy": classifier_accuracy(classifier, generated.images, labels),
            "sampling_defaults": chosen,
            "sampling_tried_on_heldout_samples": tried,
            "pipeline": path,
            "samples": os.path.join(output_dir, samples),
        }
        t = lap(f"{architecture}_generation", t)

    return write_results(output_dir, results, timings, start, results_markdown)


def run(args: argparse.Namespace) -> int:
    if args.task == "video":
        from .demo_video import run as run_video

        return run_video(args)
    settings = settings_from_args(args)
    results = run_demo(args.output_dir, settings, args.seed, args.device)
    print()
    print(results_markdown(results))
    print(f"Samples: {results['nar']['samples']} (NAR), {results['raster']['samples']} (raster).")
    print(f"Pipelines: {results['nar']['pipeline']} and {results['raster']['pipeline']} (NARPipeline.from_pretrained).")
    return 0
