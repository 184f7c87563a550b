#!/usr/bin/env python
"""Decoding speed of float32 vs torchao-quantized weights (loaded through diffusers' `quantization_config`).

Usage (the numbers in docs/quantization.md):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/quantized_speed.py --model-size GPT-B --grid 16 16 \
        --batch-size 1 --guidance-scale 2 --quantization none int8wo int8dq --decode eager static --repeats 5

One random-weights class-conditional NAR transformer is built, saved once, and reloaded per variant with
`NARTransformer.from_pretrained(folder, quantization_config=torchao_config(name), dtype=torch.float32)`. Each
(variant, decode mode) runs `--warmup` untimed generations, then `--repeats` timed rounds that visit every variant
once each (interleaved, so all see the same machine load); the median seconds per generation are reported, with
the bytes the transformer's weights hold (a quantized weight by its int8 data and scales). Only token generation is
timed (`output_type="latent"`). `--json` writes every timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
from diffusers import VQModel
from diffusers.utils import logging

from nar_diffusers import NARPipeline, NARTransformer, NeighborScheduler
from nar_diffusers.models.model_sizes import resolve_model_size
from nar_diffusers.utils.quantization import TORCHAO_QUANT_TYPES, quantized_linear_layers, torchao_config, weight_bytes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="GPT-B", help="A size preset (tiny, small, GPT-B, ...).")
    parser.add_argument("--grid", type=int, nargs=2, default=(16, 16), help="Token grid (height width).")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--quantization", nargs="+", default=["none", "int8wo"],
                        choices=["none", *TORCHAO_QUANT_TYPES])  # fmt: skip
    parser.add_argument("--decode", nargs="+", default=["eager"], choices=["eager", "static"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Write the results here.")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be >= 1, --warmup >= 0.")
    return args


def build_pipelines(args: argparse.Namespace) -> dict[str, NARPipeline]:
    """`{variant: pipeline}`: the same saved weights, reloaded plain ("none") or quantized."""
    _, size = resolve_model_size(args.model_size, "--model-size")
    torch.manual_seed(args.seed)
    base = NARTransformer(
        vocab_size=args.vocab_size, hidden_size=size.hidden_size, num_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads, ffn_multiple_of=size.ffn_multiple_of,
        grid_size=tuple(args.grid), num_decoding_heads=2, num_classes=args.num_classes,
    )  # fmt: skip
    vqvae = VQModel(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, num_vq_embeddings=args.vocab_size, vq_embed_dim=4,
        lookup_from_codebook=True,
    )  # fmt: skip
    pipelines = {}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # diffusers warns that integer quantization prefers bfloat16: float32 is the point
    try:
        with tempfile.TemporaryDirectory() as folder:
            base.save_pretrained(folder)
            for name in args.quantization:
                config = None if name == "none" else torchao_config(name)
                transformer = NARTransformer.from_pretrained(folder, quantization_config=config, dtype=torch.float32)
                if name != "none" and not quantized_linear_layers(transformer):
                    raise RuntimeError(f"{name}: no linear layer was quantized.")
                pipe = NARPipeline(transformer=transformer.eval(), vqvae=vqvae,
                                   scheduler=NeighborScheduler(grid_size=tuple(args.grid)))  # fmt: skip
                pipe.set_progress_bar_config(disable=True)
                pipelines[name] = pipe
    finally:
        logging.set_verbosity(verbosity)
    return pipelines


def generate(pipe: NARPipeline, args: argparse.Namespace) -> float:
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    pipe(class_labels=labels, guidance_scale=args.guidance_scale, output_type="latent",
         generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    pipelines = build_pipelines(args)
    results = {"args": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": [],
               "transformer_mb": {name: weight_bytes(pipe.transformer) / 2**20 for name, pipe in pipelines.items()}}
    for decode in args.decode:
        for pipe in pipelines.values():
            pipe.disable_static_decode() if decode == "eager" else pipe.enable_static_decode()
            for _ in range(args.warmup):
                generate(pipe, args)
        times: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(args.repeats):
            for name, pipe in pipelines.items():
                times[name].append(generate(pipe, args))
        reference = statistics.median(times[args.quantization[0]])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            results["rows"].append({
                "decode": decode, "quantization": name, "median_s": median, "min_s": min(seconds),
                "max_s": max(seconds), f"vs_{args.quantization[0]}": median / reference, "seconds": seconds,
            })  # fmt: skip
    return results


def markdown(results: dict) -> str:
    first = results["args"]["quantization"][0]
    lines = [f"| decode | weights | transformer MB | median s / generation | min | max | time vs {first} |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        megabytes = results["transformer_mb"][row["quantization"]]
        lines.append(f"| {row['decode']} | {row['quantization']} | {megabytes:.0f} | {row['median_s']:.3f} | "
                     f"{row['min_s']:.3f} | {row['max_s']:.3f} | {row[f'vs_{first}']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(markdown(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
