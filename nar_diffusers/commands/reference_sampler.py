"""`nar-diffusers benchmark --reference-code DIR`: the published NAR sampler's memory beside ours.

DIR is a checkout of the published code (github.com/ThisisBillhe/NAR, its `NAR-images` folder or the repository
root). Its class-conditional `Transformer` is built at the benchmark's size with random weights of the same shapes
as ours (`n_layer` blocks plus the one extra block its second head reads after), and its `generate` runs one
generation in a fresh child process, measured exactly as ours is: peak RSS during the call minus RSS before it
(on CUDA the allocator's peak during the call minus what was allocated before it).

This imports and runs Python code from DIR: pass only a checkout you trust. Nothing here needs it; without the flag
the benchmark never reads DIR.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import torch

from ..utils.memory import MIB, current_rss, file_rss, peak_rss, release_free_memory, reset_peak_rss, run_in_child

_MODULES = (os.path.join("autoregressive", "models", "gpt.py"), os.path.join("autoregressive", "models", "generate.py"))


def find_reference_root(path: str) -> str:
    """The folder holding `autoregressive/models/{gpt,generate}.py`: `path` itself or `path/NAR-images`."""
    for root in (path, os.path.join(path, "NAR-images")):
        if all(os.path.isfile(os.path.join(root, module)) for module in _MODULES):
            return os.path.abspath(root)
    raise ValueError(
        f"--reference-code {path!r}: no autoregressive/models/gpt.py and generate.py in it or in its NAR-images "
        "folder; pass a checkout of github.com/ThisisBillhe/NAR."
    )


def check_reference_supported(transformer_config: dict, grid: tuple[int, ...], orders: list[str]) -> None:
    """The published image sampler generates class-conditional square 2-D grids in NAR order."""
    if "nar" not in orders:
        raise ValueError("--reference-code compares the NAR order: include nar in --orders.")
    if len(grid) != 2 or grid[0] != grid[1]:
        raise ValueError(f"--reference-code needs a square 2-D --grid (the published sampler's), got {list(grid)}.")
    if not transformer_config.get("num_classes"):
        raise ValueError("--reference-code needs a class-conditional model (the published c2i sampler).")


def reference_model_args(transformer_config: dict, grid: tuple[int, ...]) -> dict:
    """The published `ModelArgs` of a model the size and shape of ours."""
    return {
        "dim": transformer_config["hidden_size"], "n_layer": transformer_config["num_layers"],
        "n_head": transformer_config["num_attention_heads"], "n_kv_head": transformer_config.get("num_key_value_heads"),
        "multiple_of": transformer_config.get("ffn_multiple_of", 256),
        "ffn_dim_multiplier": transformer_config.get("ffn_dim_multiplier"), "vocab_size": transformer_config["vocab_size"],
        "num_classes": transformer_config["num_classes"], "block_size": grid[0] * grid[1], "cls_token_num": 1,
        "model_type": "c2i", "medusa_attention_num": 1,
    }  # fmt: skip


def _reference_child(payload: dict) -> dict:
    sys.path.insert(0, payload["root"])
    gpt = importlib.import_module("autoregressive.models.gpt")
    generate = importlib.import_module("autoregressive.models.generate").generate
    if payload["threads"] is not None:
        torch.set_num_threads(payload["threads"])
    torch.manual_seed(payload["seed"])
    dtype, device = payload["dtype"], torch.device(payload["device"])
    model = gpt.Transformer(gpt.ModelArgs(**payload["model_args"])).to(device=device, dtype=dtype).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(payload["seed"])
    labels = torch.randint(0, payload["model_args"]["num_classes"], (payload["batch_size"],), generator=generator)
    labels = labels.to(device)
    sampling = payload["sampling"]
    release_free_memory()
    files = file_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, kind = torch.cuda.memory_allocated(device), "cuda_max_allocated"
    else:
        before, kind = current_rss(), ("child_peak_rss" if reset_peak_rss() else "child_peak_rss_since_start")
    start = time.perf_counter()
    with torch.no_grad():
        generate(model, labels, payload["model_args"]["block_size"], cfg_scale=sampling["guidance_scale"],
                 cfg_interval=sampling["cfg_interval"], temperature=sampling["temperature"], top_k=sampling["top_k"],
                 top_p=sampling["top_p"], sample_logits=sampling["do_sample"])  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    return {
        "memory_kind": kind, "weights_mib": weights / MIB, "memory_before_mib": before / MIB,
        "peak_memory_mib": peak / MIB, "memory_added_mib": (peak - before) / MIB,
        "code_pages_mib": (file_rss() - files) / MIB, "seconds": seconds,
    }  # fmt: skip


def reference_generation_memory(root: str, transformer_config: dict, grid: tuple[int, ...], batch_size: int,
                                dtype: torch.dtype, device: str, sampling: dict, seed: int, threads: int | None
                                ) -> dict:  # fmt: skip
    """One generation of the published sampler in a fresh child: its memory (as `_generation_memory` reports ours)
    and wall seconds (first call: not comparable to the timed medians), or `{"error": ...}`."""
    payload = {
        "root": root, "model_args": reference_model_args(transformer_config, grid), "batch_size": batch_size,
        "dtype": dtype, "device": device, "sampling": sampling, "seed": seed, "threads": threads,
    }  # fmt: skip
    return run_in_child(_reference_child, payload, preload=("nar_diffusers.commands.benchmark",))
