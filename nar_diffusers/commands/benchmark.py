"""`nar-diffusers benchmark`: NAR and raster decoding of the same token grid, measured in one run.

    nar-diffusers benchmark --model-size GPT-B --grid 16 16 --batch-sizes 1 8 --guidance-scale 2 \\
        --decode eager static --repeats 5 --json results.json
    nar-diffusers benchmark --model-size GPT-L --grid 24 24 --device cuda --dtype bfloat16 --batch-sizes 1 64 \\
        --decode eager compiled
    nar-diffusers benchmark --model my-nar-folder --batch-sizes 1 16     # a saved pipeline (+ a raster twin)
    nar-diffusers benchmark --dtype float32 bfloat16 --quantization none int8wo   # one row per variant
    nar-diffusers benchmark --kv-cache-dtype model bfloat16 float8_e4m3fn --reference-code NAR  # + the published sampler
    nar-diffusers benchmark --suite gpu              # the GPU check suite (gpu_suite.py); --dry-run on a CPU

Both orders run the same transformer size with random weights (or, with `--model`, the saved pipeline and a
random-weights twin of the same config with the other number of decoding heads), the same condition, guidance and
sampling settings, and the same grid. Each (variant, decode mode, batch size) is measured with warm-up runs first,
then `--repeats` whole generations per order, the orders interleaved so both see the same machine load; the table
reports the median. Only token generation is timed (`output_type="latent"`: no VQ decoding). A variant is a dtype,
a weight quantization (torchao through diffusers' `quantization_config`) and a KV cache dtype. `--reference-code`
also measures the published sampler's memory on a model of the same size (`reference_sampler.py`).

Reported per order, variant, decode mode and batch size: forward passes, seconds per generation (median, min, max),
CPU seconds, images per second, and the memory of one generation in a fresh state (its first call: the KV cache and
any compiled graph's memory included): on CUDA the allocator's peak during the call (`max_memory_allocated`, reset
per configuration), elsewhere the peak RSS of a child process that builds the model and runs that one generation.
"Adds" is that peak minus the memory before the call (weights already resident), split into the KV cache (computed
from the model config) and activations (the rest). Then, per decode mode and batch size, the NAR/raster wall ratio
(raster seconds / NAR seconds) next to the step ratio (raster passes / NAR passes) and their quotient, the fraction
of the ideal speed-up that is realised.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from diffusers.utils import logging

from ..models.kv_cache import KV_CACHE_DTYPES
from ..models.linear import onednn_linear_active, onednn_linear_available, set_onednn_linear
from ..models.model_sizes import MODEL_PRESETS, ModelSize, resolve_model_size
from ..models.transformer_nar import NARTransformer
from ..pipelines.pipeline_nar import NARPipeline
from ..pipelines.pipeline_nar_video import NARVideoPipeline
from ..schedulers.scheduling_neighbor import NeighborScheduler
from ..schedulers.scheduling_raster import RasterScheduler
from ..utils.atomic_files import write_json_atomically
from ..utils.dtypes import DTYPES, dtype_kwargs
from ..utils.memory import MIB, parameter_bytes, rss_available, run_in_child
from .benchmark_memory import generation_kv_cache_bytes, generation_memory  # noqa: F401
from .benchmark_report import comparisons, format_table  # noqa: F401  (format_table: part of this module's API)
from .generate import resolve_device
from .reference_sampler import check_reference_supported, find_reference_root, reference_generation_memory

logger = logging.get_logger(__name__)

ORDERS = ("nar", "raster")
DECODE_MODES = ("eager", "static", "compiled")
CPU_LINEAR_KERNELS = ("auto", "onednn", "torch")
MEMORY_MODES = ("on", "off")
# --quantization name -> torchao config class, handed to diffusers as `TorchAoConfig(<class>())`.
QUANTIZATION_METHODS = {
    "none": None, "int8wo": "Int8WeightOnlyConfig", "int8dq": "Int8DynamicActivationInt8WeightConfig",
    "int4wo": "Int4WeightOnlyConfig", "float8wo": "Float8WeightOnlyConfig",
}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """What one set of pipelines is built with and generates with; every (decode mode, batch size, order) of it is a
    configuration. `kv_cache_dtype` "model" stores the KV cache in `dtype`."""

    dtype: str
    quantization: str = "none"
    kv_cache_dtype: str = "model"

    def call_kwargs(self) -> dict:
        return {} if self.kv_cache_dtype == "model" else {"kv_cache_dtype": KV_CACHE_DTYPES[self.kv_cache_dtype]}


@dataclass
class Measurement:
    """One configuration (order, variant, decode mode, batch size): timings of whole generations after warm-up, and
    the memory of one generation in a fresh state (`generation_memory`; empty with `--memory off`)."""

    order: str
    decode: str
    batch_size: int
    forward_passes: int
    variant: Variant = Variant("float32")
    weights_mib: float = 0.0
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    memory: dict = field(default_factory=dict)

    def summary(self) -> dict:
        median = statistics.median(self.seconds)
        return {
            "order": self.order,
            "decode": self.decode,
            "batch_size": self.batch_size,
            "dtype": self.variant.dtype,
            "quantization": self.variant.quantization,
            "kv_cache_dtype": self.variant.kv_cache_dtype,
            "forward_passes": self.forward_passes,
            "seconds_median": median,
            "seconds_min": min(self.seconds),
            "seconds_max": max(self.seconds),
            "seconds_all": self.seconds,
            "cpu_seconds_median": statistics.median(self.cpu_seconds),
            "ms_per_image": 1000 * median / self.batch_size,
            "ms_per_forward_pass": 1000 * median / self.forward_passes,
            "images_per_second": self.batch_size / median,
            "weights_mib": self.weights_mib,
            "peak_memory_mib": None,
            "memory_kind": "off",
            **self.memory,
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
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"],
                        help="One or more dtypes: each is a variant (own rows).")
    parser.add_argument("--quantization", nargs="+", choices=list(QUANTIZATION_METHODS), default=["none"],
                        help="Weight quantization variants: none, or torchao through diffusers' quantization_config "
                        "(int8wo, int8dq, int4wo, float8wo; needs torchao).")
    parser.add_argument("--kv-cache-dtype", nargs="+", choices=["model", *KV_CACHE_DTYPES], default=["model"],
                        help="KV cache storage dtypes to run, one row each (model: the --dtype).")
    parser.add_argument("--memory", choices=MEMORY_MODES, default="on",
                        help="on: the memory of one generation per configuration (CUDA: max_memory_allocated; CPU: "
                        "peak RSS of one child process per configuration); off: timings only.")
    parser.add_argument("--reference-code", default=None, metavar="DIR",
                        help="A checkout of the published NAR code (github.com/ThisisBillhe/NAR): also measure its "
                        "sampler's memory on a model of the same size (class-conditional, square grid; runs its code).")
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
    for method in args.quantization:
        if method != "none":
            quantization_config(method)  # torchao missing: a clear error before anything is built
    if args.reference_code is not None:
        find_reference_root(args.reference_code)


def quantization_config(method: str):
    """diffusers' `TorchAoConfig` for a `--quantization` name (not "none")."""
    if method not in QUANTIZATION_METHODS or method == "none":
        raise ValueError(f"--quantization {method!r}: choose one of {[m for m in QUANTIZATION_METHODS if m != 'none']}.")
    try:
        import torchao.quantization
    except ImportError:
        raise ValueError(f"--quantization {method} needs torchao (`pip install torchao`); or use --quantization none.")
    from diffusers import TorchAoConfig

    return TorchAoConfig(getattr(torchao.quantization, QUANTIZATION_METHODS[method])())


def quantize_transformer(transformer: NARTransformer, method: str, dtype: torch.dtype) -> NARTransformer:
    """The same weights reloaded through `NARTransformer.from_pretrained(..., quantization_config=...)`, the way a
    user loads a quantized model (called only for a method other than "none")."""
    with tempfile.TemporaryDirectory() as folder:
        transformer.save_pretrained(folder)
        return NARTransformer.from_pretrained(folder, quantization_config=quantization_config(method),
                                              **dtype_kwargs(dtype))  # fmt: skip


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


def build_pipelines(args: argparse.Namespace, device: str, dtype: torch.dtype, quantization: str = "none"
                    ) -> tuple[dict, dict]:  # fmt: skip
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
        if transformer.dtype != dtype:
            verbosity = logging.get_verbosity()
            logging.set_verbosity_error()  # diffusers warns about casting with `to()`; nothing here needs float32
            try:
                transformer = transformer.to(dtype)
            finally:
                logging.set_verbosity(verbosity)
        if quantization != "none":
            transformer = quantize_transformer(transformer, quantization, dtype)
        transformer = transformer.to(device).eval()
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


def _set_decode(pipe, decode: str, compile_mode: str | None) -> None:
    """A fresh step runner (no buffers or graphs of an earlier configuration)."""
    if decode == "eager":
        pipe.disable_static_decode()
    else:
        pipe.enable_static_decode(compile=decode == "compiled", mode=compile_mode)


def _memory_child(payload: dict) -> dict:
    """In a fresh child: build the one pipeline, then measure one generation (`generation_memory`)."""
    args = argparse.Namespace(**payload["args"])
    args.orders = [payload["order"]]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    set_onednn_linear(payload["onednn"])
    variant = payload["variant"]
    pipelines, _ = build_pipelines(args, "cpu", DTYPES[variant.dtype], variant.quantization)
    pipe = pipelines[payload["order"]]
    _set_decode(pipe, payload["decode"], args.compile_mode)
    condition = _condition(pipe, payload["batch_size"], args.seed, "cpu")
    return generation_memory(pipe, condition, payload["call_kwargs"], payload["decode"], args.guidance_scale, args.seed,
                             torch.device("cpu"))  # fmt: skip


def _measure_memory(args, pipe, order: str, decode: str, batch_size: int, variant: Variant, call_kwargs: dict,
                    device: torch.device) -> dict:  # fmt: skip
    if args.memory == "off":
        return {}
    if device.type == "cuda":
        condition = _condition(pipe, batch_size, args.seed, str(device))
        return generation_memory(pipe, condition, call_kwargs, decode, args.guidance_scale, args.seed, device)
    if device.type != "cpu" or not rss_available():
        return {"memory_kind": "unavailable"}
    payload = {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "order": order, "decode": decode,
        "batch_size": batch_size, "variant": variant, "call_kwargs": call_kwargs, "onednn": onednn_linear_active(),
    }  # fmt: skip
    result = run_in_child(_memory_child, payload, preload=("nar_diffusers.commands.benchmark",))
    if "error" in result:
        logger.warning(f"memory of {order} {decode} batch {batch_size}: {result['error']}")
        return {"memory_kind": "failed", "memory_error": result["error"]}
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(args, pipelines: dict, variant: Variant, call_kwargs: dict, device: torch.device, device_name: str):
    """Per (decode mode, batch size): the memory of one generation per order, then warm-up, then `--repeats` timed
    generations, the orders interleaved."""
    measurements: list[Measurement] = []
    for decode in args.decode:
        for batch_size in args.batch_sizes:
            current = {}
            for order, pipe in pipelines.items():
                _set_decode(pipe, decode, args.compile_mode)
                memory = _measure_memory(args, pipe, order, decode, batch_size, variant, call_kwargs, device)
                condition = _condition(pipe, batch_size, args.seed, device_name)
                for _ in range(args.warmup):
                    pipe(**condition, **call_kwargs)
                weights = parameter_bytes(pipe.transformer) / MIB
                current[order] = Measurement(order, decode, batch_size, len(pipe.scheduler), variant, weights,
                                             memory=memory)  # fmt: skip
            for repeat in range(args.repeats):
                for order, pipe in pipelines.items():
                    condition = _condition(pipe, batch_size, args.seed, device_name)
                    generator = torch.Generator(device_name).manual_seed(args.seed + repeat)
                    _sync(device)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    pipe(**condition, **call_kwargs, generator=generator)
                    _sync(device)
                    current[order].seconds.append(time.perf_counter() - start)
                    current[order].cpu_seconds.append(time.process_time() - cpu_start)
                    logger.info(f"{order} {decode} batch {batch_size}: {current[order].seconds[-1]:.3f} s")
            measurements.extend(current.values())
    return measurements


def _reference_memory(args, description: dict, device: str, call_kwargs: dict) -> list[dict]:
    """The published sampler's memory per (dtype, batch size), each in a fresh child (`reference_sampler`)."""
    root = find_reference_root(args.reference_code)
    grid = tuple(description["grid"])
    rows = []
    for dtype in args.dtype:
        for batch_size in args.batch_sizes:
            result = reference_generation_memory(
                root, description["transformer_config"], grid, batch_size, DTYPES[dtype], device,
                {k: call_kwargs[k] for k in ("guidance_scale", "cfg_interval", "temperature", "top_k", "top_p",
                                              "do_sample")}, args.seed, args.threads,
            )  # fmt: skip
            if "error" in result:
                logger.warning(f"published sampler, batch {batch_size}: {result['error']}")
            rows.append({"dtype": dtype, "batch_size": batch_size, **result})
    return rows


def _variants(args) -> list[Variant]:
    return [
        Variant(dtype, quantization, kv_cache_dtype)
        for dtype in args.dtype for quantization in args.quantization for kv_cache_dtype in args.kv_cache_dtype
    ]  # fmt: skip


def run_benchmark(args: argparse.Namespace) -> dict:
    """Measure every requested (variant, decode mode, batch size, order); return the JSON-ready results."""
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cpu_linear == "onednn" and not onednn_linear_available():
        raise ValueError("--cpu-linear onednn: this PyTorch build has no oneDNN linear kernel; use --cpu-linear torch.")
    device_name = resolve_device(args.device)
    device = torch.device(device_name)
    call_kwargs = dict(
        guidance_scale=args.guidance_scale, cfg_interval=args.cfg_interval, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, do_sample=not args.greedy, output_type="latent",
    )
    # "auto" keeps the library's setting; otherwise it is switched for the run and restored after it.
    previous = None if args.cpu_linear == "auto" else set_onednn_linear(args.cpu_linear == "onednn")
    measurements, description = [], None
    try:
        cpu_linear = "onednn" if onednn_linear_active() else "torch"
        for variant in _variants(args):
            pipelines, built = build_pipelines(args, device_name, DTYPES[variant.dtype], variant.quantization)
            if description is None and args.reference_code:
                check_reference_supported(built["transformer_config"], tuple(built["grid"]), args.orders)
            description = description or built
            grid = tuple(built["grid"])
            size_kwargs = {"height": grid[-2], "width": grid[-1], **({"num_frames": grid[0]} if len(grid) == 3 else {})}
            with torch.no_grad():
                kwargs = {**call_kwargs, **size_kwargs, **variant.call_kwargs()}
                measurements += _measure(args, pipelines, variant, kwargs, device, device_name)
            del pipelines
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if previous is not None:
            set_onednn_linear(previous)
    results = [m.summary() for m in measurements]
    reference = _reference_memory(args, description, device_name, call_kwargs) if args.reference_code else []
    return {
        "command": getattr(args, "_command", None),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "model": description,
        "environment": {
            "device": device_name,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "dtype": ", ".join(args.dtype),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_linear": cpu_linear,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "results": results,
        "reference": reference,
        "comparisons": comparisons(args, results, reference),
    }


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
