"""`nar-diffusers benchmark`: NAR and raster decoding of the same token grid, measured in one run.

    nar-diffusers benchmark --model-size GPT-B --grid 16 16 --batch-sizes 1 8 --guidance-scale 2 \\
        --decode eager static --repeats 5 --json results.json
    nar-diffusers benchmark --model-size GPT-L --grid 24 24 --device cuda --dtype bfloat16 --batch-sizes 1 64 \\
        --decode eager compiled
    nar-diffusers benchmark --model my-nar-folder --batch-sizes 1 16     # a saved pipeline (+ a raster twin)

Both orders run the same transformer size with random weights (or, with `--model`, the saved pipeline and a
random-weights twin of the same config with the other number of decoding heads), the same condition, guidance and
sampling settings, and the same grid. Each (decode mode, batch size) is measured with warm-up runs first, then
`--repeats` whole generations per order, the orders interleaved so both see the same machine load; the table
reports the median. Only token generation is timed (`output_type="latent"`: no VQ decoding).

Reported per order, decode mode and batch size: forward passes, seconds per generation (median, min, max), CPU
seconds, images per second, and the peak memory (the CUDA allocator's peak on CUDA, the process's peak resident
set size elsewhere: a high-water mark of the whole process so far, not of one configuration). Then, per decode
mode and batch size, the NAR/raster wall ratio (raster seconds / NAR seconds) next to the step ratio (raster
passes / NAR passes) and their quotient, the fraction of the ideal speed-up that is realised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from diffusers.utils import logging

from ..models.linear import onednn_linear_active, onednn_linear_available, set_onednn_linear
from ..models.model_sizes import MODEL_PRESETS, ModelSize, resolve_model_size
from ..models.transformer_nar import NARTransformer
from ..pipelines.pipeline_nar import NARPipeline
from ..pipelines.pipeline_nar_video import NARVideoPipeline
from ..schedulers.scheduling_neighbor import NeighborScheduler
from ..schedulers.scheduling_raster import RasterScheduler
from ..utils.atomic_files import write_json_atomically
from ..utils.dtypes import DTYPES, dtype_kwargs
from .generate import resolve_device

logger = logging.get_logger(__name__)

ORDERS = ("nar", "raster")
DECODE_MODES = ("eager", "static", "compiled")
CPU_LINEAR_KERNELS = ("auto", "onednn", "torch")


@dataclass
class Measurement:
    """One (order, decode mode, batch size): timings of whole generations after warm-up."""

    order: str
    decode: str
    batch_size: int
    forward_passes: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_memory_mib: float | None = None
    memory_kind: str = ""

    def summary(self) -> dict:
        median = statistics.median(self.seconds)
        return {
            "order": self.order,
            "decode": self.decode,
            "batch_size": self.batch_size,
            "forward_passes": self.forward_passes,
            "seconds_median": median,
            "seconds_min": min(self.seconds),
            "seconds_max": max(self.seconds),
            "seconds_all": self.seconds,
            "cpu_seconds_median": statistics.median(self.cpu_seconds),
            "ms_per_image": 1000 * median / self.batch_size,
            "ms_per_forward_pass": 1000 * median / self.forward_passes,
            "images_per_second": self.batch_size / median,
            "peak_memory_mib": self.peak_memory_mib,
            "memory_kind": self.memory_kind,
        }


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model-size", default="GPT-B",
        help=f"Random weights of a size preset ({', '.join(MODEL_PRESETS)}) or LAYERS/HEADS/WIDTH, e.g. 2/4/64.",
    )  # fmt: skip
    source.add_argument("--model", default=None, help="A saved NARPipeline / NARVideoPipeline folder instead.")
    parser.add_argument("--grid", type=int, nargs="+", default=None,
                        help="Token grid, (H W) or (T H W) for video; default 16 16 (a saved model: its scheduler's).")
    parser.add_argument("--vocab-size", type=int, default=16384, help="Codebook size (random weights).")
    parser.add_argument("--num-classes", type=int, default=1000, help="Classes (random weights).")
    parser.add_argument("--num-key-value-heads", type=int, default=None, help="Grouped-query KV heads (random weights).")
    parser.add_argument("--position-embedding", choices=("rope", "learned"), default="rope",
                        help="rope (images) or learned (the published video model); random weights.")
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS), help="Token orders to run.")
    parser.add_argument("--decode", nargs="+", choices=DECODE_MODES, default=["eager"],
                        help="eager (reference loop), static (one shape per step), compiled (static + torch.compile).")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for --decode compiled (default: reduce-overhead on CUDA).")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="Images per generation.")
    parser.add_argument("--guidance-scale", type=float, default=2.0, help="> 1 enables classifier-free guidance.")
    parser.add_argument("--cfg-interval", type=int, default=-1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="Argmax instead of sampling.")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed generations per configuration first.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed generations per configuration (median).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--cpu-linear", choices=CPU_LINEAR_KERNELS, default="auto",
                        help="CPU float32 linear layers: auto (the library's default: onednn on x86-64), onednn, or "
                        "torch (F.linear, MKL on x86).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the results as JSON to this file ('-': stdout).")
    return parser


def _parse_size(text: str) -> tuple[str, ModelSize]:
    if text.count("/") == 2:
        try:
            layers, heads, width = (int(v) for v in text.split("/"))
        except ValueError:
            raise ValueError(f"--model-size {text!r}: LAYERS/HEADS/WIDTH must be three integers, e.g. 2/4/64.") from None
        multiple = 16 if width < 256 else 256
        return resolve_model_size(ModelSize(layers, heads, width, multiple), flag="--model-size")
    return resolve_model_size(text, flag="--model-size")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_sizes",):
        values = getattr(args, name)
        if not values or any(v < 1 for v in values):
            raise ValueError(f"--batch-sizes must be integers >= 1, got {values}.")
    if args.grid is not None and (not 2 <= len(args.grid) <= 3 or any(g < 1 for g in args.grid)):
        raise ValueError(f"--grid must be 2 (H W) or 3 (T H W) positive integers, got {args.grid}.")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}.")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "transformer", "config.json")):
        raise ValueError(f"--model {args.model!r} is not a saved pipeline folder (no transformer/config.json).")


def _tiny_vqmodel(vocab_size: int):
    """A one-level VQ model (1 pixel per token): only its codebook size matters, nothing is decoded."""
    from diffusers import VQModel

    return VQModel(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, num_vq_embeddings=vocab_size, vq_embed_dim=4,
        lookup_from_codebook=True,
    )


def _pipeline(transformer, vqvae, grid: tuple[int, ...], order: str):
    scheduler = (NeighborScheduler if order == "nar" else RasterScheduler)(grid_size=grid)
    cls = NARPipeline if len(grid) == 2 else NARVideoPipeline
    pipe = cls(transformer=transformer, vqvae=vqvae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipelines(args: argparse.Namespace, device: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """`({order: pipeline}, description)` for the requested orders, same size, grid, condition and device."""
    heads_for = {"raster": 1}
    if args.model is not None:
        with open(os.path.join(args.model, "transformer", "config.json")) as f:
            config = json.load(f)
        rank = len(config["grid_size"])
        loaded = (NARPipeline if rank == 2 else NARVideoPipeline).from_pretrained(args.model, **dtype_kwargs(dtype))
        grid = tuple(args.grid or loaded.scheduler.config.grid_size)
        heads_for["nar"] = rank
        base = loaded.transformer
        description = {"model": args.model, "transformer_config": dict(base.config)}
    else:
        name, size = _parse_size(args.model_size)
        grid = tuple(args.grid or (16, 16))
        heads_for["nar"] = len(grid)
        config = dict(
            vocab_size=args.vocab_size, hidden_size=size.hidden_size, num_layers=size.num_layers,
            num_attention_heads=size.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
            ffn_multiple_of=size.ffn_multiple_of, grid_size=grid, num_classes=args.num_classes,
            position_embedding_type=args.position_embedding,
        )
        base, loaded = None, None
        description = {"model_size": name, "transformer_config": config}
    pipelines = {}
    for order in args.orders:
        if base is not None and base.config.num_decoding_heads == heads_for[order]:
            transformer = base
        else:
            source = dict(base.config) if base is not None else config
            source = {k: v for k, v in source.items() if not k.startswith("_")}
            torch.manual_seed(args.seed)
            transformer = NARTransformer(**{**source, "num_decoding_heads": heads_for[order]})
        transformer = transformer.to(device).eval()
        if transformer.dtype != dtype:
            verbosity = logging.get_verbosity()
            logging.set_verbosity_error()  # diffusers warns about casting with `to()`; nothing here needs float32
            try:
                transformer = transformer.to(dtype)
            finally:
                logging.set_verbosity(verbosity)
        vqvae = loaded.vqvae if loaded is not None else _tiny_vqmodel(transformer.config.vocab_size)
        pipelines[order] = _pipeline(transformer, vqvae, grid, order).to(device)
        description[f"{order}_parameters"] = sum(p.numel() for p in transformer.parameters())
    description["grid"] = list(grid)
    return pipelines, description


def _condition(pipe, batch_size: int, seed: int, device: str) -> dict:
    transformer = pipe.transformer
    generator = torch.Generator().manual_seed(seed)
    if transformer.condition_type == "class":
        labels = torch.randint(0, transformer.config.num_classes, (batch_size,), generator=generator)
        return {"class_labels": labels}
    shape = (batch_size, transformer.num_condition_tokens, transformer.config.caption_dim)
    embeds = torch.randn(shape, generator=generator).to(device=device, dtype=transformer.dtype)
    return {"prompt_embeds": embeds, "prompt_attention_mask": torch.ones(shape[:2], dtype=torch.bool, device=device)}


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"
    except ImportError:  # not on Unix
        return float("nan"), "unavailable"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(args, pipelines: dict, settings: dict, size_kwargs: dict, device: torch.device, device_name: str):
    """Warm up, then time `--repeats` generations per (decode mode, batch size), the orders interleaved."""
    measurements: list[Measurement] = []
    for decode in args.decode:
        for pipe in pipelines.values():
            if decode == "eager":
                pipe.disable_static_decode()
            else:
                pipe.enable_static_decode(compile=decode == "compiled", mode=args.compile_mode)
        for batch_size in args.batch_sizes:
            current = {}
            for order, pipe in pipelines.items():
                condition = _condition(pipe, batch_size, args.seed, device_name)
                for _ in range(args.warmup):
                    pipe(**condition, **settings, **size_kwargs)
                current[order] = Measurement(order, decode, batch_size, len(pipe.scheduler))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for repeat in range(args.repeats):
                for order, pipe in pipelines.items():
                    condition = _condition(pipe, batch_size, args.seed, device_name)
                    generator = torch.Generator(device_name).manual_seed(args.seed + repeat)
                    _sync(device)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    pipe(**condition, **settings, **size_kwargs, generator=generator)
                    _sync(device)
                    current[order].seconds.append(time.perf_counter() - start)
                    current[order].cpu_seconds.append(time.process_time() - cpu_start)
                    logger.info(f"{order} {decode} batch {batch_size}: {current[order].seconds[-1]:.3f} s")
            for measurement in current.values():
                measurement.peak_memory_mib, measurement.memory_kind = _peak_memory(device)
            measurements.extend(current.values())
    return measurements


def run_benchmark(args: argparse.Namespace) -> dict:
    """Measure every requested (decode mode, batch size, order); return the JSON-ready results."""
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cpu_linear == "onednn" and not onednn_linear_available():
        raise ValueError("--cpu-linear onednn: this PyTorch build has no oneDNN linear kernel; use --cpu-linear torch.")
    device_name = resolve_device(args.device)
    device = torch.device(device_name)
    dtype = DTYPES[args.dtype]
    pipelines, description = build_pipelines(args, device_name, dtype)
    settings = dict(
        guidance_scale=args.guidance_scale, cfg_interval=args.cfg_interval, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, do_sample=not args.greedy, output_type="latent",
    )
    grid = tuple(description["grid"])
    size_kwargs = {"height": grid[-2], "width": grid[-1]}
    if len(grid) == 3:
        size_kwargs["num_frames"] = grid[0]

    # "auto" keeps the library's setting; otherwise it is switched for the run and restored after it.
    previous = None if args.cpu_linear == "auto" else set_onednn_linear(args.cpu_linear == "onednn")
    try:
        cpu_linear = "onednn" if onednn_linear_active() else "torch"
        with torch.no_grad():
            measurements = _measure(args, pipelines, settings, size_kwargs, device, device_name)
    finally:
        if previous is not None:
            set_onednn_linear(previous)

    results = [m.summary() for m in measurements]
    comparisons = []
    by_key = {(r["order"], r["decode"], r["batch_size"]): r for r in results}
    for decode in args.decode:
        for batch_size in args.batch_sizes:
            nar, raster = by_key.get(("nar", decode, batch_size)), by_key.get(("raster", decode, batch_size))
            if nar is None or raster is None:
                continue
            wall = raster["seconds_median"] / nar["seconds_median"]
            steps = raster["forward_passes"] / nar["forward_passes"]
            comparisons.append({
                "decode": decode, "batch_size": batch_size, "nar_seconds": nar["seconds_median"],
                "raster_seconds": raster["seconds_median"], "wall_ratio": wall, "step_ratio": steps,
                "fraction_of_step_ratio": wall / steps,
                "cpu_ratio": raster["cpu_seconds_median"] / nar["cpu_seconds_median"],
            })  # fmt: skip
    for order in args.orders:
        for batch_size in args.batch_sizes:
            eager = by_key.get((order, "eager", batch_size))
            for decode in ("static", "compiled"):
                other = by_key.get((order, decode, batch_size))
                if eager is not None and other is not None:
                    comparisons.append({
                        "order": order, "batch_size": batch_size, "decode": decode,
                        "speedup_over_eager": eager["seconds_median"] / other["seconds_median"],
                    })  # fmt: skip
    return {
        "command": getattr(args, "_command", None),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "model": description,
        "environment": {
            "device": device_name,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "dtype": args.dtype,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_linear": cpu_linear,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "results": results,
        "comparisons": comparisons,
    }


def format_table(report: dict) -> str:
    """The results as Markdown tables: one row per measurement, then the NAR vs raster comparison."""
    env = report["environment"]
    kernels = f", {env['cpu_linear']} linear layers" if env["device"] == "cpu" else ""
    lines = [
        f"device {env['device']} ({env['device_name']}), {env['dtype']}, torch {env['torch']}, "
        f"{env['threads']} threads{kernels}; grid {tuple(report['model']['grid'])}; "
        f"{report['model'].get('model_size') or report['model'].get('model')}; medians of "
        f"{report['settings']['repeats']} runs",
        "",
        "| order | decode | batch | passes | s / generation (min-max) | ms / image | ms / pass | images/s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        memory = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        lines.append(
            f"| {r['order']} | {r['decode']} | {r['batch_size']} | {r['forward_passes']} | "
            f"{r['seconds_median']:.3f} ({r['seconds_min']:.3f}-{r['seconds_max']:.3f}) | {r['ms_per_image']:.1f} | "
            f"{r['ms_per_forward_pass']:.1f} | {r['images_per_second']:.2f} | {memory} |"
        )
    ratios = [c for c in report["comparisons"] if "wall_ratio" in c]
    if ratios:
        lines += [
            "",
            "| decode | batch | NAR s | raster s | NAR/raster wall ratio | step ratio | fraction of step ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in ratios:
            lines.append(
                f"| {c['decode']} | {c['batch_size']} | {c['nar_seconds']:.3f} | {c['raster_seconds']:.3f} | "
                f"{c['wall_ratio']:.2f}x | {c['step_ratio']:.2f}x | {c['fraction_of_step_ratio']:.2f} |"
            )
    speedups = [c for c in report["comparisons"] if "speedup_over_eager" in c]
    if speedups:
        lines += ["", "| order | batch | decode | speed-up over eager |", "|---|---|---|---|"]
        for c in speedups:
            lines.append(f"| {c['order']} | {c['batch_size']} | {c['decode']} | {c['speedup_over_eager']:.2f}x |")
    if report["results"] and report["results"][0]["memory_kind"] == "process_peak_rss":
        lines += ["", "peak MiB: the process's peak resident set size so far (a high-water mark, not per row)."]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        report = run_benchmark(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        write_json_atomically(args.json, report)
    return 0

