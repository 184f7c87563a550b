"""The serving engine's own cost, without HTTP: time per output with every slot busy, beside one pipeline call per
output and one pipeline call per batch of `--max-batch` (the one-at-a-time and static-batching servers' work).

    nar-diffusers demo --output-dir nar-demo
    python benchmarks/serving_in_process.py --model nar-demo/pipeline --threads 1 --requests 64

Each round runs the three one after another (so a busy machine slows them alike); the table gives each one's median
over `--rounds` and the engine's milliseconds per iteration (one forward pass over all slots, plus its share of
decoding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nar_diffusers.commands.generate import load_pipeline
from nar_diffusers.serving import GenerationEngine


def pipeline_seconds_per_output(pipe, batch: int, guidance_scale: float) -> float:
    start = time.perf_counter()
    pipe(class_labels=[i % 10 for i in range(batch)], guidance_scale=guidance_scale,
         generator=torch.Generator().manual_seed(0))  # fmt: skip
    return (time.perf_counter() - start) / batch


def engine_seconds(pipe, max_batch: int, requests: int, guidance_scale: float) -> tuple[float, float]:
    """(seconds per output, seconds per iteration) for `requests` single-output requests queued at once."""
    engine = GenerationEngine(pipe, max_batch=max_batch, max_queue=requests)
    handles = [engine.submit(class_labels=i % 10, guidance_scale=guidance_scale,
                             generator=torch.Generator().manual_seed(i)) for i in range(requests)]  # fmt: skip
    start, iterations = time.perf_counter(), 0
    while engine.queue_depth or engine.active_outputs:
        engine.iterate()
        iterations += 1
    seconds = time.perf_counter() - start
    if not all(handle.result(timeout=0).outputs for handle in handles):
        raise RuntimeError("a request finished without images")
    return seconds / requests, seconds / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A saved class-conditional NARPipeline folder.")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64, help="Requests per engine run.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    args = parser.parse_args()
    for flag, value in (("--max-batch", args.max_batch), ("--requests", args.requests), ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, None, "cpu", torch.float32)
    if pipe.transformer.condition_type != "class":
        parser.error("--model must be a class-conditional pipeline (the digits demo's, or one of class labels)")
    pipe.set_progress_bar_config(disable=True)
    guidance = args.guidance_scale
    pipeline_seconds_per_output(pipe, args.max_batch, guidance)  # warm-up
    engine_seconds(pipe, args.max_batch, args.max_batch, guidance)
    single, batched, engine, iteration = [], [], [], []
    for _ in range(args.rounds):
        single.append(pipeline_seconds_per_output(pipe, 1, guidance))
        batched.append(pipeline_seconds_per_output(pipe, args.max_batch, guidance))
        per_output, per_iteration = engine_seconds(pipe, args.max_batch, args.requests, guidance)
        engine.append(per_output)
        iteration.append(per_iteration)
    single_ms, batched_ms, engine_ms = (1000 * statistics.median(v) for v in (single, batched, engine))
    print(f"threads {torch.get_num_threads()}, guidance {guidance}, {args.rounds} rounds (medians)\n")
    print("| what | ms / output | outputs/s | vs one at a time |")
    print("|---|---|---|---|")
    print(f"| pipeline, one output per call | {single_ms:.1f} | {1000 / single_ms:.1f} | 1.00x |")
    print(f"| pipeline, {args.max_batch} per call | {batched_ms:.1f} | {1000 / batched_ms:.1f} | "
          f"{single_ms / batched_ms:.2f}x |")  # fmt: skip
    print(f"| engine, {args.max_batch} slots busy ({1000 * statistics.median(iteration):.1f} ms / iteration) | "
          f"{engine_ms:.1f} | {1000 / engine_ms:.1f} | {single_ms / engine_ms:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
