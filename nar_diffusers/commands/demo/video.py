"""`nar-diffusers demo --task video`: NAR vs raster video generation on "moving digits", trained on a CPU in minutes.

Every clip is 4 frames of 16 x 32 px (height x width) in which one of scikit-learn's digits (preprocessed like the
image demo's: 8 px upsampled to 16 px, white on black) slides horizontally at a constant 4 px per frame, to the
left or to the right, from a random start; its class label is the digit. Nothing is downloaded. The demo

1. trains a small frame tokenizer (a diffusers `VQModel`, 16 x 32 px -> 4 x 8 tokens per frame, applied frame by
   frame: a clip is a 4 x 4 x 8 token grid);
2. trains a class-conditional NAR transformer (three heads, `NeighborScheduler`: 4 + 4 + 8 - 2 = 14 forward passes
   per clip) and a raster baseline of the same size on the same tokens (one head, `RasterScheduler`: 128 passes);
3. saves both as `NARVideoPipeline`s (`save_pretrained` into `pipeline/` and `pipeline_raster/`), reloads them with
   `NARVideoPipeline.from_pretrained` and generates `samples_per_class` clips per digit with the same settings;
4. writes a GIF per digit (`samples/nar/digit_<d>.gif`, `samples/raster/...`), one PNG strip of all digits
   (`samples_strip.png`, `samples_strip_raster.png`) and an animated grid of every digit (`samples.gif`);
5. measures: forward passes and wall time per clip (a large batch, and batch 1), how often a digit classifier
   trained on real frames reads the requested digit in every generated frame, and the motion of each clip (the
   horizontal centre of mass of the digit, frame to frame), next to the same numbers for real held-out clips.

The same seed gives the same result on the same machine and device.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import VQModel
from diffusers.utils import logging

from ...models.video_tokenizer import FrameVQTokenizer
from ...pipelines.pipeline_nar_video import NARVideoPipeline
from ...training.vq_training import reconstruction_grid, reconstruction_mse
from ...utils.image_utils import tensor_to_pil
from ...utils.video_utils import video_grid, video_strip, write_video
from .common import (
    NUM_CLASSES,
    DemoRun,
    apply_flags,
    as_gray,
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
class VideoDemoSettings:
    """Clip, model, training and sampling settings of the video demo (the defaults fit in minutes on 2 CPU cores)."""

    num_frames: int = 4
    height: int = 16
    width: int = 32
    speed: int = 4  # pixels per frame
    clips_per_digit: int = 4  # moving clips made from every training digit (random start and direction each)
    num_vq_embeddings: int = 64
    vq_steps: int = 400
    vq_batch_size: int = 32  # frames
    vq_learning_rate: float = 2e-3
    model_size: str = "tiny"
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    samples_per_class: int = 16
    guidance_scale: float = 2.0
    temperature: float = 0.6
    top_k: int = 8
    fixed_sampling: bool = False  # True: use the settings above; False: choose around them on held-out samples
    fps: float = 4.0


QUICK_VIDEO_SETTINGS = VideoDemoSettings(
    clips_per_digit=1, vq_steps=10, steps=10, batch_size=32, warmup_steps=2, samples_per_class=2
)
"""A seconds-long run exercising every stage (the clips are not recognisable at this size)."""


# ----------------------------------------------------------------------------------------------------------------
# Data and measurements
# ----------------------------------------------------------------------------------------------------------------


def moving_digit_clips(
    digits: torch.Tensor, labels: torch.Tensor, settings: VideoDemoSettings, clips_per_digit: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips `(N * clips_per_digit, 1, F, H, W)` in [-1, 1] of each `(1, s, s)` digit sliding horizontally at
    `settings.speed` px per frame, direction and start drawn per clip (the digit stays inside the frame)."""
    count, _, size, _ = digits.shape
    travel = settings.speed * (settings.num_frames - 1)
    room = settings.width - size - travel
    if room < 0 or size > settings.height:
        raise ValueError(
            f"A {size} px digit moving {travel} px does not fit in {settings.height} x {settings.width} px frames."
        )
    generator = torch.Generator().manual_seed(seed)
    index = torch.arange(count).repeat_interleave(clips_per_digit)
    direction = torch.randint(0, 2, (index.numel(),), generator=generator) * 2 - 1  # -1 left, +1 right
    offset = torch.randint(0, room + 1, (index.numel(),), generator=generator)
    start = torch.where(direction > 0, offset, offset + travel)
    clips = torch.full((index.numel(), 1, settings.num_frames, settings.height, settings.width), -1.0)
    top = (settings.height - size) // 2
    for row, (digit, first, step) in enumerate(zip(index.tolist(), start.tolist(), direction.tolist())):
        for frame in range(settings.num_frames):
            left = first + step * settings.speed * frame
            clips[row, 0, frame, top : top + size, left : left + size] = digits[digit, 0]
    return clips, labels[index]


def centre_of_mass_x(frames: torch.Tensor) -> torch.Tensor:
    """Horizontal centre of mass (px) of frames `(..., H, W)` in [-1, 1] (ink = brightness above black)."""
    ink = ((frames.float() + 1) / 2).clamp(0, 1).sum(dim=-2)  # (..., W)
    columns = torch.arange(frames.shape[-1], dtype=torch.float32)
    return (ink * columns).sum(-1) / ink.sum(-1).clamp(min=1e-6)


def digit_crops(frames: torch.Tensor, size: int = 16) -> torch.Tensor:
    """`(N, 1, H, size)` windows of frames `(N, 1, H, W)` centred on each frame's horizontal centre of mass: the
    classifier reads the digit wherever it is."""
    left = (centre_of_mass_x(frames[:, 0]) - (size - 1) / 2).round().long().clamp(0, frames.shape[-1] - size)
    columns = left[:, None] + torch.arange(size)[None]  # (N, size)
    index = columns[:, None, None, :].expand(-1, 1, frames.shape[-2], -1)
    return frames.gather(-1, index)


def fit_frame_classifier(clips: torch.Tensor, labels: torch.Tensor, seed: int):
    """The judge: a logistic regression (the image demo's) on centre-of-mass crops of real training frames."""
    frames = clips.transpose(1, 2).flatten(0, 1)  # (N * F, 1, H, W)
    return fit_digit_classifier(digit_crops(frames), labels.repeat_interleave(clips.shape[2]), seed)


def clip_scores(classifier, clips: torch.Tensor, labels: torch.Tensor, speed: int) -> dict[str, float]:
    """Recognisability and motion of clips `(N, 1, F, H, W)` in [-1, 1] generated for `labels`.

    - frame_accuracy: frames the classifier reads as the requested digit;
    - clip_accuracy: clips whose every frame is read as the requested digit;
    - mean_speed: mean |shift| of the centre of mass between consecutive frames (px per frame);
    - speed_std: mean over clips of the standard deviation of the signed shifts (0 = perfectly constant speed);
    - smooth: clips moving one way at a constant speed within 1 px of `speed` every frame.
    """
    frames = clips.transpose(1, 2).flatten(0, 1)
    per_frame = torch.from_numpy(classifier.predict(digit_crops(frames).flatten(1).numpy())).view(clips.shape[0], -1)
    correct = per_frame == labels[:, None]
    shifts = centre_of_mass_x(clips[:, 0]).diff(dim=1)  # (N, F - 1)
    same_direction = (torch.sign(shifts) == torch.sign(shifts[:, :1])).all(dim=1)
    near_speed = ((shifts.abs() - speed).abs() <= 1.0).all(dim=1)
    return {
        "frame_accuracy": correct.float().mean().item(),
        "clip_accuracy": correct.all(dim=1).float().mean().item(),
        "mean_speed": shifts.abs().mean().item(),
        "speed_std": shifts.std(dim=1).mean().item() if shifts.shape[1] > 1 else 0.0,
        "smooth": (same_direction & near_speed).float().mean().item(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------


def train_frame_tokenizer(frames: torch.Tensor, settings: VideoDemoSettings, seed: int, accelerator) -> VQModel:
    """A 3-level VQModel (16 x 32 px frames -> 4 x 8 tokens) trained on single frames; used frame by frame."""
    return train_vq_tokenizer(frames, settings, seed, accelerator, (16, 32, 32), settings.num_vq_embeddings,
                              settings.height)  # fmt: skip


def write_samples(clips: torch.Tensor, samples_per_class: int, folder: str, strip_path: str, fps: float,
                  grid_path: str | None = None) -> list[str]:  # fmt: skip
    """A GIF per digit (its clips side by side), a PNG strip of every digit (one row per digit: the frames of its
    first two clips) and, with `grid_path`, an animated grid of every digit; upscaled 3x. Returns the GIF paths."""
    videos = [tensor_to_pil(clip[:, 0, None]) for clip in clips.transpose(1, 2)]  # per clip, F images (1, H, W)
    columns = min(samples_per_class, 8)
    gifs = []
    for digit in range(NUM_CLASSES):
        chosen = videos[digit * samples_per_class : digit * samples_per_class + columns]
        path = os.path.join(folder, f"digit_{digit}.gif")
        gifs.append(write_video(video_grid(chosen, rows=1, scale=3, padding=2), path, fps=fps))
    shown = min(samples_per_class, 2)
    strip = [videos[d * samples_per_class + i] for d in range(NUM_CLASSES) for i in range(shown)]
    tmp = f"{strip_path}.tmp.png"
    video_strip(strip, rows=NUM_CLASSES, scale=3, padding=2).save(tmp)
    os.replace(tmp, strip_path)
    if grid_path is not None:
        grid = [videos[d * samples_per_class + i] for d in range(NUM_CLASSES) for i in range(min(samples_per_class, 4))]
        write_video(video_grid(grid, rows=NUM_CLASSES // 2, scale=2, padding=2), grid_path, fps=fps)
    return gifs


def results_markdown(results: dict[str, Any]) -> str:
    """The results table as Markdown."""
    batch = results["batch"]
    rows = [
        f"| model | forward passes / clip | wall time / clip, batch {batch} (ms) | wall time / clip, batch 1 (ms) "
        "| frames read as the requested digit | clips with every frame right | motion (px / frame) "
        "| clips moving smoothly |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("nar", "raster", "tokenized_real", "real"):
        r = results[name]
        timing = (
            f"{r['forward_passes']} | {r['ms_per_clip']:.1f} | {r['latency_ms']:.1f}" if "forward_passes" in r else "- | - | -"
        )
        rows.append(
            f"| {r['label']} | {timing} | {r['frame_accuracy'] * 100:.1f}% | {r['clip_accuracy'] * 100:.1f}% | "
            f"{r['mean_speed']:.2f} ± {r['speed_std']:.2f} | {r['smooth'] * 100:.1f}% |"
        )
    nar, raster, s = results["nar"], results["raster"], results["settings"]
    grid = "x".join(map(str, results["grid"]))
    rows += [
        "",
        f"NAR vs raster decoding of the same {grid} token grid: "
        f"{raster['ms_per_clip'] / max(nar['ms_per_clip'], 1e-9):.1f}x faster per clip at batch {batch}, "
        f"{raster['latency_ms'] / max(nar['latency_ms'], 1e-9):.1f}x at batch 1 ({results['device']}, "
        f"{results['threads']} threads; sampling chosen per model on held-out samples and saved with it: NAR "
        f"{settings_text(nar['sampling_defaults'])}, raster {settings_text(raster['sampling_defaults'])}). "
        f"Motion: mean |shift| of the digit's centre of mass between frames ± its spread within a clip; smooth = "
        f"one direction at {s['speed']} ± 1 px every frame. Total demo wall time {results['total_seconds']:.0f} s.",
    ]
    return "\n".join(rows) + "\n"


def video_settings_from_args(args: argparse.Namespace) -> VideoDemoSettings:
    """The video demo's quick or default settings with every explicitly given flag applied."""
    return apply_flags(args, VideoDemoSettings(), QUICK_VIDEO_SETTINGS)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

MODELS = {"nar": ("NAR (neighbor scheduler)", "pipeline", "nar", "samples_strip.png"),
          "raster": ("raster AR baseline", "pipeline_raster", "raster", "samples_strip_raster.png")}  # fmt: skip
"""architecture -> (label, pipeline folder, GIF folder under samples/, strip file)."""


def prepare_clips(settings: VideoDemoSettings, seed: int) -> dict[str, Any]:
    """Training and held-out clips of the digits, the judge (a frame classifier) and the scores of real clips."""
    digits = split_digits(16, seed)
    train_clips, train_labels = moving_digit_clips(
        digits["train_images"], digits["train_labels"], settings, settings.clips_per_digit, seed
    )
    test_clips, test_labels = moving_digit_clips(digits["test_images"], digits["test_labels"], settings, 1, seed + 1)
    # The judge sees one clip of every training digit (other starts and directions than the training clips).
    classifier = fit_frame_classifier(
        *moving_digit_clips(digits["train_images"], digits["train_labels"], settings, 1, seed + 2), seed
    )
    real = clip_scores(classifier, test_clips, test_labels, settings.speed)
    return {"train_clips": train_clips, "train_labels": train_labels, "test_clips": test_clips,
            "test_labels": test_labels, "classifier": classifier, "real": real}  # fmt: skip


def tokenize_clips(
    run: DemoRun, data: dict[str, Any], settings: VideoDemoSettings
) -> tuple[VQModel, torch.Tensor, dict[str, Any]]:
    """Train the frame tokenizer; return it, the training clips' tokens and the partial results (the real clips'
    scores, with and without a pass through the tokenizer)."""
    logger.info("1/4 Training the frame tokenizer")
    train_frames = data["train_clips"].transpose(1, 2).flatten(0, 1)  # (N * F, 1, H, W)
    vqvae = train_frame_tokenizer(train_frames, settings, run.seed, run.accelerator())
    test_frames = data["test_clips"].transpose(1, 2).flatten(0, 1)
    reconstruction_grid(vqvae, test_frames[:16], columns=8, scale=3).save(run.path("reconstructions.png"))
    mse = reconstruction_mse(vqvae, test_frames)
    tokenizer = FrameVQTokenizer(vqvae)
    tokens = torch.cat([tokenizer.encode_video(chunk) for chunk in data["train_clips"].split(256)])
    reconstructed = tokenizer.decode_video(tokenizer.encode_video(data["test_clips"])).clamp(-1, 1)
    run.lap("tokenizer_training")

    real = {**data["real"], "label": "real held-out clips (reference)"}
    tokenized = clip_scores(data["classifier"], reconstructed, data["test_labels"], settings.speed)
    results: dict[str, Any] = {
        "settings": asdict(settings), "seed": run.seed, "device": run.device, "threads": torch.get_num_threads(),
        "grid": list(tokens.shape[1:]), "vq_reconstruction_mse_heldout": mse, "real": real,
        "tokenized_real": {"label": "real held-out clips through the tokenizer", **tokenized},
    }  # fmt: skip
    return vqvae, tokens, results


def run_video_demo(
    output_dir: str, settings: VideoDemoSettings, seed: int = 0, device: str | None = None
) -> dict[str, Any]:
    """Run every stage and write the pipelines, sample clips and results into `output_dir`; returns the results."""
    run = DemoRun(output_dir, seed, device)
    data = prepare_clips(settings, seed)
    classifier = data["classifier"]
    run.lap("data_and_classifier")
    vqvae, tokens, results = tokenize_clips(run, data, settings)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(settings.samples_per_class)
    results["batch"] = labels.numel()

    def heldout_frame_accuracy(frames: torch.Tensor) -> float:  # "pt" frames (N, F, C, H, W) in [0, 1]
        return clip_scores(classifier, as_gray(frames).transpose(1, 2), labels, settings.speed)["frame_accuracy"]

    for step, (architecture, (label, folder, samples, strip)) in enumerate(MODELS.items(), start=2):
        logger.info(f"{step}/4 Training the {label} transformer")
        transformer = train_token_model(
            architecture, tokens, data["train_labels"], settings, seed, run.device,
            vocab_size=settings.num_vq_embeddings,
        )  # fmt: skip
        run.lap(f"{architecture}_training")
        trained = train_and_generate(
            run, architecture, transformer, vqvae, folder, NARVideoPipeline, heldout_frame_accuracy, labels, settings
        )
        clips = trained.generated.images.transpose(1, 2)  # (N, F, 1, H, W) -> (N, 1, F, H, W)
        gifs = write_samples(
            clips, settings.samples_per_class, run.path("samples", samples), run.path(strip), settings.fps,
            run.path("samples.gif") if architecture == "nar" else None,
        )  # fmt: skip
        results[architecture] = {
            **pipeline_results(label, trained, "clip", labels.numel()),
            **clip_scores(classifier, clips, labels, settings.speed),
            "sampling_defaults": trained.sampling_defaults,
            "sampling_tried_on_heldout_samples": trained.sampling_tried,
            "pipeline": trained.path,
            "samples": run.path(strip),
            "gifs": gifs,
        }
        run.lap(f"{architecture}_generation")
    return run.write_results(results, results_markdown)


def run_video_demo_command(args: argparse.Namespace) -> int:
    """`nar-diffusers demo --task video`: run the video demo and print its results."""
    results = run_video_demo(args.output_dir, video_settings_from_args(args), args.seed, args.device)
    print()
    print(results_markdown(results))
    print(
        f"Samples: {results['nar']['samples']} (NAR, one row per digit), {results['raster']['samples']} (raster), "
        f"a GIF per digit in {os.path.join(args.output_dir, 'samples')}, all digits in "
        f"{os.path.join(args.output_dir, 'samples.gif')}."
    )
    print(
        f"Pipelines: {results['nar']['pipeline']} and {results['raster']['pipeline']} "
        "(NARVideoPipeline.from_pretrained)."
    )
    return 0
