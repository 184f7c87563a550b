"""Quality kept by int8 weights and a float8 KV cache, on the demos' pipelines, judged as the demos judge them.

    nar-diffusers demo --output-dir nar-demo                      # the digits pipeline (minutes, CPU)
    nar-diffusers demo --task video --output-dir nar-video-demo   # the moving-digits video pipeline
    python benchmarks/precision_quality.py --image-pipeline nar-demo/pipeline \\
        --video-pipeline nar-video-demo/pipeline --samples-per-class 16 --json quality.json

For each variant (float32; int8 weight-only weights through torchao; a float8 KV cache; both) it generates
`--samples-per-class` outputs per class with the pipeline's saved sampling settings and the same seed, and reports
the demo classifier's accuracy (images: the digit requested; videos: frames read as the digit requested) and, for a
greedy generation of the same conditions, the share of token cells equal to float32's.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from nar_diffusers import NARPipeline, NARVideoPipeline
from nar_diffusers.commands.demo.common import NUM_CLASSES, as_gray, classifier_accuracy, fit_digit_classifier, split_digits
from nar_diffusers.commands.demo.video import VideoDemoSettings, clip_scores, prepare_clips
from nar_diffusers.utils.quantization import pipeline_quantization_config

VARIANTS = {
    "float32": {"quantized": False, "kv_cache_dtype": None},
    "int8 weights": {"quantized": True, "kv_cache_dtype": None},
    "float8 KV cache": {"quantized": False, "kv_cache_dtype": torch.float8_e4m3fn},
    "int8 weights + float8 KV cache": {"quantized": True, "kv_cache_dtype": torch.float8_e4m3fn},
}


def _load(cls, folder: str, quantized: bool):
    config = pipeline_quantization_config("int8wo") if quantized else None
    pipe = cls.from_pretrained(folder, quantization_config=config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, labels: torch.Tensor, seed: int, kv_cache_dtype, greedy: bool) -> torch.Tensor:
    """Sampled outputs as "pt" (for the judge), or the greedy token grids."""
    return pipe(class_labels=labels.tolist(), generator=torch.Generator().manual_seed(seed),
                kv_cache_dtype=kv_cache_dtype, do_sample=not greedy, output_type="latent" if greedy else "pt",
                return_dict=False)[0]  # fmt: skip


def evaluate(folder: str, video: bool, samples_per_class: int, seed: int) -> dict:
    labels = torch.arange(NUM_CLASSES).repeat_interleave(samples_per_class)
    if video:
        settings = VideoDemoSettings()
        data = prepare_clips(settings, seed)
        def judge(frames):  # noqa: E306
            return clip_scores(data["classifier"], as_gray(frames).transpose(1, 2), labels, settings.speed)["frame_accuracy"]
    else:
        digits = split_digits(8, seed)
        classifier = fit_digit_classifier(digits["train_images"], digits["train_labels"], seed)
        def judge(images):  # noqa: E306
            return classifier_accuracy(classifier, as_gray(images), labels)
    cls = NARVideoPipeline if video else NARPipeline
    results, reference_tokens = {}, None
    for name, variant in VARIANTS.items():
        pipe = _load(cls, folder, variant["quantized"])
        sampled = _generate(pipe, labels, seed, variant["kv_cache_dtype"], greedy=False)
        greedy = _generate(pipe, labels, seed, variant["kv_cache_dtype"], greedy=True)
        if reference_tokens is None:
            reference_tokens = greedy
        results[name] = {
            "accuracy": judge(sampled),
            "greedy_cells_equal_to_float32": float((greedy == reference_tokens).float().mean()),
        }
        print(f"{'video' if video else 'image'} {name}: {results[name]}", file=sys.stderr, flush=True)
    return results


def markdown(report: dict) -> str:
    lines = ["| pipeline | variant | classifier accuracy | greedy cells equal to float32 |", "|---|---|---|---|"]
    for pipeline, results in report.items():
        for name, entry in results.items():
            lines.append(f"| {pipeline} | {name} | {entry['accuracy']:.1%} | {entry['greedy_cells_equal_to_float32']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-pipeline", default=None, help="The digits demo's pipeline folder.")
    parser.add_argument("--video-pipeline", default=None, help="The video demo's pipeline folder.")
    parser.add_argument("--samples-per-class", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.image_pipeline is None and args.video_pipeline is None:
        parser.error("give --image-pipeline and/or --video-pipeline")
    report = {}
    if args.image_pipeline:
        report["digits (image)"] = evaluate(args.image_pipeline, False, args.samples_per_class, args.seed)
    if args.video_pipeline:
        report["moving digits (video)"] = evaluate(args.video_pipeline, True, args.samples_per_class, args.seed)
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
