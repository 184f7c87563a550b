#!/usr/bin/env python
"""KV cache bytes and the memory one generation adds, per `kv_cache_dtype` (CPU, random weights).

Usage (the numbers in docs/pipelines.md):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/kv_cache_memory.py --model-size GPT-B --grid 16 16 \
        --batch-size 8 --guidance-scale 2 --kv-cache-dtype float32 bfloat16 float8_e4m3fn --decode eager static

Each (dtype, decode mode) runs in a fresh child process: it builds a random-weights class-conditional NAR
transformer (and a one-block VQ model that is never run: `output_type="latent"`), resets the peak RSS
(`/proc/self/clear_refs`), runs one generation and reports `VmHWM - VmRSS before` (weights already resident), the
bytes of the KV cache the generation allocated (`NARKVCache.nbytes`: buffers and float8 scales), the seconds, and the
time of the prefill. `--per-row-unconditional-prefill` also runs every configuration with the class models' shared
unconditional prefill switched off (`pipe.share_unconditional_prefill = False`). Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="GPT-B", help="A size preset (tiny, small, GPT-B, ...).")
    parser.add_argument("--grid", type=int, nargs=2, default=(16, 16), help="Token grid (height width).")
    parser.add_argument("--batch-size", type=int, default=8, help="Images per generation (class labels 0, 1, ...).")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["float32", "bfloat16", "float8_e4m3fn"])
    parser.add_argument("--decode", nargs="+", choices=("eager", "static"), default=["eager"])
    parser.add_argument("--per-row-unconditional-prefill", action="store_true",
                        help="Also measure with the shared unconditional prefill switched off.")
    parser.add_argument("--json", default=None, help="Write the rows to this file.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def measure(args: argparse.Namespace, kv_cache_dtype: str, decode: str, share: bool) -> dict:
    """One generation in this process (a fresh child)."""
    from diffusers import VQModel

    from nar_diffusers import NARPipeline, NARTransformer, NeighborScheduler
    from nar_diffusers.models.model_sizes import resolve_model_size

    _, size = resolve_model_size(args.model_size)
    torch.manual_seed(0)
    transformer = NARTransformer(
        vocab_size=16384, hidden_size=size.hidden_size, num_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads, ffn_multiple_of=size.ffn_multiple_of, grid_size=tuple(args.grid),
        num_decoding_heads=2, num_classes=1000,
    ).eval()  # fmt: skip
    vqvae = VQModel(
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
        latent_channels=4, norm_num_groups=4, num_vq_embeddings=16384, vq_embed_dim=4, lookup_from_codebook=True,
    ).eval()  # fmt: skip
    pipe = NARPipeline(transformer=transformer, vqvae=vqvae, scheduler=NeighborScheduler(grid_size=tuple(args.grid)))
    pipe.set_progress_bar_config(disable=True)
    pipe.share_unconditional_prefill = share
    if decode == "static":
        pipe.enable_static_decode()
    caches, prefill_seconds = [], []
    init_kv_cache, prefill = transformer.init_kv_cache, transformer.prefill

    def recording_init(*a, **k):
        caches.append(init_kv_cache(*a, **k))
        return caches[-1]

    def timed_prefill(*a, **k):
        start = time.perf_counter()
        out = prefill(*a, **k)
        prefill_seconds.append(time.perf_counter() - start)
        return out

    transformer.init_kv_cache, transformer.prefill = recording_init, timed_prefill
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak RSS (VmHWM) restarts from the current RSS
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    pipe(class_labels=[i % 1000 for i in range(args.batch_size)], guidance_scale=args.guidance_scale,
         output_type="latent", kv_cache_dtype=kv_cache_dtype, generator=torch.Generator().manual_seed(0))  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        "kv_cache_dtype": kv_cache_dtype, "decode": decode, "shared_unconditional_prefill": share,
        "kv_cache_mib": caches[0].nbytes / 2**20, "memory_added_mib": (_status_kb("VmHWM") - before) / 1024,
        "seconds": seconds, "prefill_ms": prefill_seconds[0] * 1e3,
    }  # fmt: skip


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args, *json.loads(args.child))))
        return []
    rows = []
    for decode in args.decode:
        for dtype in args.kv_cache_dtype:
            for share in (True, False) if args.per_row_unconditional_prefill else (True,):
                own_argv = list(argv if argv is not None else sys.argv[1:])
                child = subprocess.run(
                    [sys.executable, __file__, *own_argv, "--child", json.dumps([dtype, decode, share])],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print("| KV cache dtype | decode | shared uncond. prefill | KV cache MiB | memory added MiB | seconds | prefill ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_cache_dtype']} | {r['decode']} | {r['shared_unconditional_prefill']} | {r['kv_cache_mib']:.1f} "
              f"| {r['memory_added_mib']:.0f} | {r['seconds']:.1f} | {r['prefill_ms']:.0f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return rows


if __name__ == "__main__":
    main()
