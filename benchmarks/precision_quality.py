"""Quality kept by int8 weights and a float8 KV cache, on the demos' pipelines, judged as the demos judge them.

    nar-diffusers demo --output-dir nar-demo                      # the digits pipeline (minutes, CPU)
    nar-diffusers demo --task video --output-dir nar-video-demo   # the moving-digits video pipeline
    python benchmarks/precision_quality.py --image-pipeline nar-demo/pipeline \\
        --video-pipeline nar-video-demo/pipeline --samples-per-class 16 --seeds 0 1 2 --json quality.json

For each variant (float32; int8 weight-only weights through torchao; a float8 KV cache; both) it generates
`--samples-per-class` outputs per class with the pipeline's saved sampling settings for each of `--seeds`, and
reports the demo classifier's mean accuracy (images: the digit requested; videos: frames read as the digit requested) and, for a
greedy generation of the same conditions, the share of token cells equal to float32's (free-running: one differing
token changes what every later step sees) and the share of greedy tokens equal to float32's when each step is fed
float32's tokens so far (each token's own agreement).
"""

from __future__ import annotations

import argparse
import sys

import torch

from nar_diffusers import NARPipeline, NARVideoPipeline
from nar_diffusers.commands.demo.common import NUM_CLASSES, as_gray, classifier_accuracy, fit_digit_classifier, split_digits
from nar_diffusers.commands.demo.video import VideoDemoSettings, clip_scores, prepare_clips
from nar_diffusers.utils.atomic_files import write_json_atomically
from nar_diffusers.utils.dtypes import dtype_kwargs
from nar_diffusers.utils.quantization import pipeline_quantization_config

VARIANTS = {
    "float32": {"quantized": False, "kv_cache_dtype": None},
    "int8 weights": {"quantized": True, "kv_cache_dtype": None},
    "bfloat16 KV cache": {"quantized": False, "kv_cache_dtype": torch.bfloat16},
    "float8 KV cache": {"quantized": False, "kv_cache_dtype": torch.float8_e4m3fn},
    "int8 weights + float8 KV cache": {"quantized": True, "kv_cache_dtype": torch.float8_e4m3fn},
}


def _load(cls, folder: str, quantized: bool):
    config = pipeline_quantization_config("int8wo") if quantized else None
    # float32 named: with a quantization config diffusers would otherwise load the unquantized parts in bfloat16.
    pipe = cls.from_pretrained(folder, quantization_config=config, **dtype_kwargs(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, labels: torch.Tensor, seed: int, kv_cache_dtype, greedy: bool) -> torch.Tensor:
    """Sampled outputs as "pt" (for the judge), or the greedy token grids."""
    return pipe(class_labels=labels.tolist(), generator=torch.Generator().manual_seed(seed),
                kv_cache_dtype=kv_cache_dtype, do_sample=not greedy, output_type="latent" if greedy else "pt",
                return_dict=False)[0]  # fmt: skip


def teacher_forced_agreement(pipe, labels: torch.Tensor, reference: torch.Tensor, kv_cache_dtype) -> float:
    """Share of greedy tokens equal to float32's when every step is conditioned on float32's tokens so far: after
    each step the drawn cells are compared with `reference` and replaced by it (`callback_on_step_end`), so one
    differing token does not carry into the steps after it as it does in a free-running generation."""
    counts = {"equal": 0, "total": 0}

    def force_reference(pipe, step, timestep, tensors):
        drawn = tensors["tokens"] >= 0
        counts["equal"] += int(((tensors["tokens"] == reference) & drawn).sum()) - counts["forced"]
        counts["total"] += int(drawn.sum()) - counts["forced"]
        counts["forced"] = int(drawn.sum())
        return {"tokens": torch.where(drawn, reference, tensors["tokens"])}

    counts["forced"] = 0
    pipe(class_labels=labels.tolist(), kv_cache_dtype=kv_cache_dtype, do_sample=False, output_type="latent",
         callback_on_step_end=force_reference, callback_on_step_end_tensor_inputs=["tokens"])  # fmt: skip
    return counts["equal"] / counts["total"]


def evaluate(folder: str, video: bool, samples_per_class: int, seeds: list[int]) -> dict:
    labels = torch.arange(NUM_CLASSES).repeat_interleave(samples_per_class)
    if video:
        settings = VideoDemoSettings()
        data = prepare_clips(settings, seeds[0])
        def judge(frames):  # noqa: E306
            return clip_scores(data["classifier"], as_gray(frames).transpose(1, 2), labels, settings.speed)["frame_accuracy"]
    else:
        classifiers = {}
        def judge(images):  # noqa: E306  (the judge is fit on real digits at the generated images' resolution)
            resolution = images.shape[-1]
            if resolution not in classifiers:
                digits = split_digits(resolution, seeds[0])
                classifiers[resolution] = fit_digit_classifier(digits["train_images"], digits["train_labels"], seeds[0])
            return classifier_accuracy(classifiers[resolution], as_gray(images), labels)
    cls = NARVideoPipeline if video else NARPipeline
    results, reference_tokens = {}, None
    for name, variant in VARIANTS.items():
        pipe = _load(cls, folder, variant["quantized"])
        accuracies = [judge(_generate(pipe, labels, seed, variant["kv_cache_dtype"], greedy=False)) for seed in seeds]
        greedy = _generate(pipe, labels, seeds[0], variant["kv_cache_dtype"], greedy=True)
        if reference_tokens is None:
            reference_tokens = greedy
        results[name] = {
            "accuracy": sum(accuracies) / len(accuracies), "accuracy_per_seed": accuracies,
            "greedy_cells_equal_to_float32": float((greedy == reference_tokens).float().mean()),
            "greedy_steps_equal_given_float32_prefix": teacher_forced_agreement(
                pipe, labels, reference_tokens, variant["kv_cache_dtype"]),
        }
        print(f"{'video' if video else 'image'} {name}: {results[name]}", file=sys.stderr, flush=True)
    return results


def markdown(report: dict) -> str:
    lines = ["| pipeline | variant | classifier accuracy | greedy cells equal to float32 | greedy tokens equal, "
             "float32 prefix |", "|---|---|---|---|---|"]  # fmt: skip
    for pipeline, results in report.items():
        for name, entry in results.items():
            lines.append(f"| {pipeline} | {name} | {entry['accuracy']:.1%} | {entry['greedy_cells_equal_to_float32']:.1%} "
                         f"| {entry['greedy_steps_equal_given_float32_prefix']:.1%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-pipeline", default=None, help="The digits demo's pipeline folder.")
    parser.add_argument("--video-pipeline", default=None, help="The video demo's pipeline folder.")
    parser.add_argument("--samples-per-class", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="Sampling seeds; the accuracy is their mean (greedy agreement: the first seed).")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.image_pipeline is None and args.video_pipeline is None:
        parser.error("give --image-pipeline and/or --video-pipeline")
    report = {}
    if args.image_pipeline:
        report["digits (image)"] = evaluate(args.image_pipeline, False, args.samples_per_class, args.seeds)
    if args.video_pipeline:
        report["moving digits (video)"] = evaluate(args.video_pipeline, True, args.samples_per_class, args.seeds)
    print(markdown(report))
    if args.json:
        write_json_atomically(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
