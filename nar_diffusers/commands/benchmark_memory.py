"""The memory of one generation: the allocator's peak on CUDA, the process's peak RSS elsewhere, split into the KV
cache (from the model config), library code first paged in, and activations."""

from __future__ import annotations

import torch

from ..utils.memory import MIB, current_rss, file_rss, kv_cache_bytes, peak_rss, release_free_memory, reset_peak_rss


def generation_kv_cache_bytes(pipe, batch_size: int, guidance_scale: float, decode: str,
                              kv_cache_dtype: torch.dtype | None = None) -> int:  # fmt: skip
    """The KV cache one generation allocates, from the model config: both halves with guidance, the static paths'
    spare slots (the largest group) included, and a float8 cache's scales."""
    transformer, scheduler = pipe.transformer, pipe.scheduler
    spare = 0 if decode == "eager" else scheduler.static_decode_tables().group_size
    storage = kv_cache_dtype or transformer.dtype
    return kv_cache_bytes(
        num_blocks=len(transformer.blocks), model_rows=batch_size * (2 if guidance_scale > 1 else 1),
        num_kv_heads=transformer.num_kv_heads, head_dim=transformer.head_dim,
        num_condition_tokens=transformer.num_condition_tokens, num_fed_tokens=scheduler.num_fed_tokens,
        num_spare_slots=spare, element_size=storage.itemsize, scale_size=4 if storage.itemsize == 1 else 0,
    )  # fmt: skip


def generation_memory(pipe, condition: dict, call_kwargs: dict, decode: str, guidance_scale: float, seed: int,
                      device: torch.device) -> dict:  # fmt: skip
    """Run one generation and report its memory: the peak during the call, what it adds over the memory before it
    (weights resident), and that split into the KV cache, the library code first paged in (CPU: file-backed RSS)
    and activations (the rest). In-process on CUDA; on a CPU in a child that has done nothing else."""
    files = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, kind = torch.cuda.memory_allocated(device), "cuda_max_allocated"
    else:
        release_free_memory()
        files = file_rss()
        before, kind = current_rss(), ("child_peak_rss" if reset_peak_rss() else "child_peak_rss_since_start")
    generator = torch.Generator(str(device)).manual_seed(seed)
    with torch.no_grad():
        pipe(**condition, **call_kwargs, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    files = 0 if device.type == "cuda" else file_rss() - files
    batch_size = len(next(iter(condition.values())))
    kv = generation_kv_cache_bytes(pipe, batch_size, guidance_scale, decode, call_kwargs.get("kv_cache_dtype"))
    return {
        "memory_kind": kind, "memory_before_mib": before / MIB, "peak_memory_mib": peak / MIB,
        "memory_added_mib": (peak - before) / MIB, "kv_cache_mib": kv / MIB, "code_pages_mib": files / MIB,
        "activations_mib": (peak - before - kv - files) / MIB,
    }  # fmt: skip
