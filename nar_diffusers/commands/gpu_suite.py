"""`nar-diffusers benchmark --suite gpu`: what only a GPU can check, in one go, into one JSON and one Markdown table.

    nar-diffusers benchmark --suite gpu --output-dir gpu-suite          # on a CUDA machine
    nar-diffusers benchmark --suite gpu --dry-run --device cpu          # the same code at toy sizes, any machine

1. Decode equality: eager vs static vs compiled (`reduce-overhead`: CUDA graphs) tokens in bfloat16, greedy and
   seeded sampling, NAR and raster order. The static paths are built to give exactly the eager tokens.
2. Attention backends through diffusers' dispatcher (`transformer.set_attention_backend`): native, PyTorch's
   flash / efficient / cuDNN SDPA kernels, flash-attn and xFormers when installed; tokens against plain SDPA.
3. Throughput and memory (`run_benchmark`): GPT-B / GPT-L / GPT-XL at 16x16 and 24x24, batch 1 and 64, guidance 2,
   NAR and raster, bfloat16, unquantized and each `--suite-quantization` method when torchao is installed, each
   with the model-dtype and the float8 KV cache (`--suite-kv-cache-dtype`).

Every check runs on its own: one that fails is recorded (status "error" with the message) and the suite goes on.
The dry run (toy model, 4x4 grid, batch 1 and 2; compiled decoding traced with the "eager" backend instead of
inductor so it is quick) is run by the test suite, so the code of this command cannot rot on machines without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import platform
import sys
import time
import traceback

import torch
from diffusers.utils import logging

from ..utils.atomic_files import write_json_atomically
from . import benchmark
from ..models.kv_cache import KV_CACHE_DTYPES
from .benchmark import DECODE_MODES, QUANTIZATION_METHODS
from .generate import resolve_device

SUITES = ("gpu",)
FULL = {"sizes": ["GPT-B", "GPT-L", "GPT-XL"], "grids": [16, 24], "batch_sizes": [1, 64], "equality_size": "GPT-B",
        "equality_grid": 16, "equality_batch": 4, "vocab_size": 16384, "num_classes": 1000}  # fmt: skip
DRY_RUN = {"sizes": ["2/4/32"], "grids": [4], "batch_sizes": [1, 2], "equality_size": "2/4/32", "equality_grid": 4,
           "equality_batch": 2, "vocab_size": 32, "num_classes": 4}  # fmt: skip
BACKENDS = ("native", "_native_flash", "_native_efficient", "_native_cudnn", "flash", "xformers")
FAILED = ("error", "mismatch")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's flags plus the suite's."""
    benchmark.add_arguments(parser)
    group = parser.add_argument_group("GPU check suite (--suite gpu)")
    group.add_argument("--suite", choices=SUITES, default=None,
                       help="gpu: decode equality, attention backends, throughput and memory, in one go (module "
                       "nar_diffusers.commands.gpu_suite); writes gpu_suite.json and gpu_suite.md to --output-dir.")
    group.add_argument("--dry-run", action="store_true", help="The suite at toy sizes (any device, e.g. a CPU).")
    group.add_argument("--output-dir", default="gpu-suite", help="Where the suite writes its JSON and Markdown.")
    group.add_argument("--suite-sizes", nargs="+", default=None, help="Throughput sizes (default GPT-B GPT-L GPT-XL).")
    group.add_argument("--suite-grids", type=int, nargs="+", default=None, help="Square grids (default 16 24).")
    group.add_argument("--suite-batch-sizes", type=int, nargs="+", default=None, help="Default 1 64.")
    group.add_argument("--suite-decode", nargs="+", choices=DECODE_MODES, default=None,
                       help="Throughput decode modes (default compiled; static in a dry run).")
    group.add_argument("--suite-quantization", nargs="+", choices=[m for m in QUANTIZATION_METHODS if m != "none"],
                       default=["int8wo"], help="Quantized variants, run next to the float ones when torchao is "
                       "installed.")  # fmt: skip
    group.add_argument("--suite-kv-cache-dtype", nargs="+", choices=["model", *KV_CACHE_DTYPES], default=None,
                       help="KV cache dtypes of the throughput runs (default: model float8_e4m3fn).")
    group.add_argument("--time-budget", type=float, default=None,
                       help="Seconds; throughput runs not started when it is spent are recorded as skipped.")
    return parser


def run(args: argparse.Namespace) -> int:
    """`nar-diffusers benchmark`: the suite with `--suite`, else one benchmark run."""
    if args.suite is None:
        if args.dry_run or args.suite_sizes or args.suite_grids or args.suite_batch_sizes or args.suite_decode:
            print("error: --dry-run and --suite-* flags need --suite gpu.", file=sys.stderr)
            return 2
        return benchmark.run(args)
    try:
        report = run_suite(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = [c for c in report["checks"] if c["status"] in FAILED]
    print(f"wrote {report['files']['json']} and {report['files']['markdown']}: {len(report['checks'])} checks, "
          f"{len(failed)} failed")  # fmt: skip
    return 1 if failed else 0


def _sub_args(args: argparse.Namespace, sizes: dict, **overrides) -> argparse.Namespace:
    """Benchmark arguments for one run of the suite: the parser's defaults, the suite's settings, `overrides`."""
    parser = benchmark.add_arguments(argparse.ArgumentParser())
    sub = parser.parse_args([])
    sub.device, sub.seed, sub.threads, sub.compile_mode = args.device, args.seed, args.threads, args.compile_mode
    sub.vocab_size, sub.num_classes, sub.guidance_scale = sizes["vocab_size"], sizes["num_classes"], 2.0
    sub.memory, sub.cpu_linear = args.memory, args.cpu_linear
    sub.warmup, sub.repeats = args.warmup, args.repeats
    for key, value in overrides.items():
        setattr(sub, key, value)
    return sub


def _error(error: BaseException) -> dict:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # after an out-of-memory error the next check still has the whole card
    return {"status": "error", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)}


def _tokens(pipe, batch_size: int, seed: int, device: str, sampled: bool) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(seed)
    condition = benchmark._condition(pipe, batch_size, seed, device)
    grid = pipe.scheduler.config.grid_size
    with torch.no_grad():
        tokens = pipe(**condition, height=grid[-2], width=grid[-1], guidance_scale=2.0, do_sample=sampled,
                      generator=generator, output_type="latent", return_dict=False)[0]  # fmt: skip
    return tokens.cpu()


def _enable(pipe, decode: str, dry_run: bool, compile_mode: str | None) -> None:
    if decode == "compiled" and dry_run:
        pipe.enable_static_decode(compile=True, backend="eager")  # traces the step, no inductor build
    else:
        benchmark._set_decode(pipe, decode, compile_mode)


def _pipeline(args, sizes: dict, order: str, device: str, dtype: torch.dtype):
    sub = _sub_args(args, sizes, model_size=sizes["equality_size"], grid=[sizes["equality_grid"]] * 2, orders=[order])
    pipelines, _ = benchmark.build_pipelines(sub, device, dtype)
    return pipelines[order]


def check_decode_equality(args, sizes: dict, device: str, dtype: torch.dtype) -> list[dict]:
    """Static and compiled tokens against the eager ones, per order and sampling mode."""
    checks = []
    batch = sizes["equality_batch"]
    for order in benchmark.ORDERS:
        try:
            pipe = _pipeline(args, sizes, order, device, dtype)
        except Exception as error:
            checks.append({"check": "decode_equality", "order": order, **_error(error)})
            continue
        for sampled in (False, True):
            pipe.disable_static_decode()
            reference = _tokens(pipe, batch, args.seed, device, sampled)
            # A dry run traces the compiled step once per order (greedy): tracing is most of its time.
            for decode in ("static",) if sampled and args.dry_run else ("static", "compiled"):
                row = {"check": "decode_equality", "order": order, "sampling": "seeded" if sampled else "greedy",
                       "decode": decode, "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
                try:
                    _enable(pipe, decode, args.dry_run, args.compile_mode)
                    start = time.perf_counter()
                    tokens = _tokens(pipe, batch, args.seed, device, sampled)
                    agreement = (tokens == reference).float().mean().item()
                    row.update(status="ok" if agreement == 1.0 else "mismatch", agreement=agreement,
                               seconds_first_call=time.perf_counter() - start)  # fmt: skip
                except Exception as error:
                    row.update(_error(error))
                checks.append(row)
        pipe.disable_static_decode()
    return checks


def check_attention_backends(args, sizes: dict, device: str, dtype: torch.dtype) -> list[dict]:
    """Greedy NAR tokens through each diffusers attention backend against plain SDPA."""
    try:
        pipe = _pipeline(args, sizes, "nar", device, dtype)
        reference = _tokens(pipe, sizes["equality_batch"], args.seed, device, False)
    except Exception as error:
        return [{"check": "attention_backend", **_error(error)}]
    checks = []
    for backend in BACKENDS:
        row = {"check": "attention_backend", "backend": backend, "dtype": str(dtype).removeprefix("torch.")}
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # diffusers warns that backends are experimental at every switch
        try:
            pipe.transformer.set_attention_backend(backend)
        except Exception as error:  # not installed: diffusers' own requirement checks
            row.update(status="unavailable", reason=f"{type(error).__name__}: {error}")
            checks.append(row)
            logging.set_verbosity(verbosity)
            continue
        try:
            start = time.perf_counter()
            tokens = _tokens(pipe, sizes["equality_batch"], args.seed, device, False)
            agreement = (tokens == reference).float().mean().item()
            # Other kernels round differently; a greedy token flip then changes what follows, so this is reported.
            row.update(status="ok" if agreement == 1.0 else "differs", agreement=agreement,
                       seconds=time.perf_counter() - start)  # fmt: skip
        except Exception as error:
            row.update(_error(error))
            if torch.device(device).type != "cuda" and backend != "native":  # CUDA kernels, not on this device
                row.update(status="unavailable", reason=f"on {device}: {row.pop('error')}")
        finally:
            pipe.transformer.reset_attention_backend()
            logging.set_verbosity(verbosity)
        checks.append(row)
    return checks


def _quantization_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def check_throughput(args, sizes: dict, device: str, started: float) -> tuple[list[dict], list[dict]]:
    """`run_benchmark` per (size, grid, quantization): its rows tagged with size and grid, and one check each."""
    checks, rows = [], []
    methods = ["none", *args.suite_quantization]
    decode = args.suite_decode or (["static"] if args.dry_run else ["compiled"])
    grids = args.suite_grids or sizes["grids"]
    for size, grid, method in itertools.product(args.suite_sizes or sizes["sizes"], grids, methods):
        row = {"check": "throughput", "model_size": size, "grid": [grid, grid], "quantization": method}
        if method != "none" and not _quantization_available():
            checks.append({**row, "status": "skipped", "reason": "torchao is not installed"})
            continue
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            checks.append({**row, "status": "skipped", "reason": f"--time-budget {args.time_budget} s spent"})
            continue
        sub = _sub_args(args, sizes, model_size=size, grid=[grid, grid], dtype=["bfloat16"], quantization=[method],
                        batch_sizes=args.suite_batch_sizes or sizes["batch_sizes"], decode=decode,
                        kv_cache_dtype=args.suite_kv_cache_dtype or ["model", "float8_e4m3fn"])  # fmt: skip
        try:
            torch._dynamo.reset()  # one size's graphs never count against the next one's recompile limit
            report = benchmark.run_benchmark(sub)
        except Exception as error:
            checks.append({**row, **_error(error)})
            continue
        failed = [r for r in report["results"] if r.get("memory_error")]
        checks.append({**row, "status": "error" if failed else "ok", "rows": len(report["results"]),
                       **({"error": failed[0]["memory_error"]} if failed else {})})  # fmt: skip
        rows += [{"model_size": size, "grid": [grid, grid], **r} for r in report["results"]]
    return checks, rows


def run_suite(args: argparse.Namespace) -> dict:
    """Run every check (each on its own), write `gpu_suite.json` and `gpu_suite.md`; return the report."""
    device = resolve_device(args.device)
    if torch.device(device).type != "cuda" and not args.dry_run:
        raise ValueError(f"--suite gpu needs a CUDA device (--device is {device}); --dry-run runs it at toy sizes.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = DRY_RUN if args.dry_run else FULL
    started = time.perf_counter()
    checks, rows = [], []
    for name, section in (("decode_equality", check_decode_equality), ("attention_backend", check_attention_backends),
                          ("throughput", check_throughput)):  # fmt: skip
        try:
            if section is check_throughput:
                found, rows = section(args, sizes, device, started)
            else:
                found = section(args, sizes, device, torch.bfloat16)
        except Exception as error:  # a bug in one section: recorded, and the next one still runs
            found = [{"check": name, **_error(error)}]
        checks += found
    os.makedirs(args.output_dir, exist_ok=True)
    files = {"json": os.path.join(args.output_dir, "gpu_suite.json"),
             "markdown": os.path.join(args.output_dir, "gpu_suite.md")}  # fmt: skip
    report = {
        "suite": args.suite, "dry_run": args.dry_run, "command": getattr(args, "_command", None),
        "environment": {
            "device": device, "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else
            platform.processor() or platform.machine(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "xformers": importlib.util.find_spec("xformers") is not None,
            "flash_attn": importlib.util.find_spec("flash_attn") is not None, "torchao": _quantization_available(),
        },
        "seconds": time.perf_counter() - started, "checks": checks, "throughput": rows, "files": files,
    }  # fmt: skip
    write_json_atomically(files["json"], report)
    with open(files["markdown"], "w") as f:
        f.write(format_suite(report) + "\n")
    return report


def format_suite(report: dict) -> str:
    """The suite as Markdown: the checks, then throughput and memory per configuration."""
    env = report["environment"]
    lines = [f"GPU suite{' (dry run, toy sizes)' if report['dry_run'] else ''}: {env['device']} ({env['device_name']})"
             f", torch {env['torch']}, CUDA {env['cuda']}; {report['seconds']:.0f} s", "",
             "| check | what | status | agreement | note |", "|---|---|---|---|---|"]  # fmt: skip
    for c in report["checks"]:
        what = " ".join(str(c[k]) for k in ("order", "sampling", "decode", "backend", "model_size") if k in c)
        if "grid" in c:
            what += f" {c['grid'][0]}x{c['grid'][1]} {c['quantization']}"
        agreement = f"{c['agreement']:.4f}" if "agreement" in c else "-"
        note = (c.get("error") or c.get("reason") or "").replace("|", "/").splitlines()
        lines.append(f"| {c['check']} | {what} | {c['status']} | {agreement} | {note[0][:120] if note else ''} |")
    if report["throughput"]:
        lines += ["", "| size | grid | order | decode | dtype | quant. | KV cache | batch | s / generation | images/s | "
                  "peak MiB | one generation adds MiB | KV cache MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["throughput"]:
            memory = [r.get(k) for k in ("peak_memory_mib", "memory_added_mib", "kv_cache_mib")]
            memory = ["-" if m is None else f"{m:.0f}" if m >= 10 else f"{m:.2f}" for m in memory]
            lines.append(f"| {r['model_size']} | {r['grid'][0]}x{r['grid'][1]} | {r['order']} | {r['decode']} | "
                         f"{r['dtype']} | {r['quantization']} | {r.get('kv_cache_dtype', 'model')} | {r['batch_size']} | "
                         f"{r['seconds_median']:.3f} | "
                         f"{r['images_per_second']:.1f} | {' | '.join(memory)} |")  # fmt: skip
    return "\n".join(lines)
