#!/usr/bin/env python
"""Quality of torchao-quantized weights on the digits demo's pipelines, judged by the demo's classifier.

Usage (the numbers in docs/quantization.md):

    nar-diffusers demo --output-dir nar-demo
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/quantized_quality.py nar-demo/pipeline \
        nar-demo/pipeline_raster --quantization none int8wo int8dq --seeds 0 1 2 3 4

Each variant loads the folder with `NARPipeline.from_pretrained(folder, quantization_config=..., dtype=float32)`,
generates `--samples-per-class` images per digit with the saved sampling settings for every seed, and reports the
classifier's accuracy on the requested digit (mean over seeds, the demo's judge: logistic regression on real
digits), and the share of token cells of a greedy generation of every digit equal to the first variant's.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from diffusers.utils import logging

from nar_diffusers import NARPipeline
from nar_diffusers.commands.demo.common import NUM_CLASSES, as_gray, classifier_accuracy, fit_digit_classifier, split_digits
from nar_diffusers.utils.quantization import TORCHAO_QUANT_TYPES, pipeline_quantization_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipelines", nargs="+", help="Saved digits demo pipeline folders.")
    parser.add_argument("--quantization", nargs="+", default=["none", "int8wo"], choices=["none", *TORCHAO_QUANT_TYPES])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--samples-per-class", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=16, help="The demo's image size (its classifier's input).")
    parser.add_argument("--json", default=None, help="Write the results here.")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> list[dict]:
    data = split_digits(args.resolution, 0)
    classifier = fit_digit_classifier(data["train_images"], data["train_labels"], 0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.samples_per_class)
    rows = []
    for folder in args.pipelines:
        reference = None
        for name in args.quantization:
            config = None if name == "none" else pipeline_quantization_config(name)
            pipe = NARPipeline.from_pretrained(folder, quantization_config=config, dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            accuracies = []
            for seed in args.seeds:
                images = pipe(class_labels=labels.tolist(), output_type="pt",
                              generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
                accuracies.append(classifier_accuracy(classifier, as_gray(images), labels))
            greedy = pipe(class_labels=list(range(NUM_CLASSES)), do_sample=False, output_type="latent").images
            reference = greedy if reference is None else reference
            rows.append({
                "pipeline": folder, "quantization": name, "accuracy": sum(accuracies) / len(accuracies),
                "accuracy_per_seed": accuracies, "greedy_cells_equal": (greedy == reference).float().mean().item(),
            })  # fmt: skip
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # diffusers warns that integer quantization prefers bfloat16: float32 is the point
    try:
        rows = measure(args)
    finally:
        logging.set_verbosity(verbosity)
    print(f"| pipeline | weights | classifier accuracy | greedy cells equal to {args.quantization[0]} |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['pipeline']} | {row['quantization']} | {100 * row['accuracy']:.1f}% | "
              f"{100 * row['greedy_cells_equal']:.1f}% |")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
