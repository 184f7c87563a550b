"""The `nar-diffusers benchmark` report: the comparisons derived from its rows, and its Markdown tables."""

from __future__ import annotations


def comparisons(args, results: list[dict], reference: list[dict] = ()) -> list[dict]:
    """NAR vs raster per (variant, decode, batch), static / compiled vs eager per (variant, order, batch), and the
    memory one NAR generation adds against the published sampler's at the same dtype and batch."""
    found = []
    published = {(r["dtype"], r["batch_size"]): r for r in reference if r.get("memory_added_mib") is not None}
    for r in results:
        other = published.get((r["dtype"], r["batch_size"]))
        if r["order"] == "nar" and other is not None and r.get("memory_added_mib") is not None:
            found.append({
                "decode": r["decode"], "batch_size": r["batch_size"], "dtype": r["dtype"],
                "quantization": r["quantization"], "kv_cache_dtype": _variant(r)[2],
                "memory_added_mib": r["memory_added_mib"], "reference_memory_added_mib": other["memory_added_mib"],
                "memory_vs_reference": r["memory_added_mib"] / other["memory_added_mib"],
            })  # fmt: skip
    by_key = {(*_variant(r), r["order"], r["decode"], r["batch_size"]): r for r in results}
    kv_cache_dtypes = getattr(args, "kv_cache_dtype", ["model"])
    for variant in ((d, q, k) for d in args.dtype for q in args.quantization for k in kv_cache_dtypes):
        tag = {"dtype": variant[0], "quantization": variant[1], "kv_cache_dtype": variant[2]}
        for decode in args.decode:
            for batch_size in args.batch_sizes:
                nar = by_key.get((*variant, "nar", decode, batch_size))
                raster = by_key.get((*variant, "raster", decode, batch_size))
                if nar is None or raster is None:
                    continue
                wall = raster["seconds_median"] / nar["seconds_median"]
                steps = raster["forward_passes"] / nar["forward_passes"]
                found.append({
                    "decode": decode, "batch_size": batch_size, **tag, "nar_seconds": nar["seconds_median"],
                    "raster_seconds": raster["seconds_median"], "wall_ratio": wall, "step_ratio": steps,
                    "fraction_of_step_ratio": wall / steps,
                    "cpu_ratio": raster["cpu_seconds_median"] / nar["cpu_seconds_median"],
                })  # fmt: skip
        for order in args.orders:
            for batch_size in args.batch_sizes:
                eager = by_key.get((*variant, order, "eager", batch_size))
                for decode in ("static", "compiled"):
                    other = by_key.get((*variant, order, decode, batch_size))
                    if eager is not None and other is not None:
                        found.append({
                            "order": order, "batch_size": batch_size, "decode": decode, **tag,
                            "speedup_over_eager": eager["seconds_median"] / other["seconds_median"],
                        })  # fmt: skip
    return found


def _variant(row: dict) -> tuple[str, str, str]:
    return row["dtype"], row["quantization"], row.get("kv_cache_dtype", "model")


def _mib(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 1 else f"{value:.3f}"


def format_table(report: dict) -> str:
    """The results as Markdown tables: timings per configuration, memory per configuration, then the NAR vs
    raster and the static / compiled vs eager comparisons."""
    env = report["environment"]
    kernels = f", {env['cpu_linear']} linear layers" if env["device"] == "cpu" else ""
    lines = [
        f"device {env['device']} ({env['device_name']}), {env['dtype']}, torch {env['torch']}, "
        f"{env['threads']} threads{kernels}; grid {tuple(report['model']['grid'])}; "
        f"{report['model'].get('model_size') or report['model'].get('model')}; medians of "
        f"{report['settings']['repeats']} runs",
        "",
        "| order | decode | dtype | quantization | KV cache | batch | passes | s / generation (min-max) | ms / image | ms / pass "
        "| images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['order']} | {r['decode']} | {r['dtype']} | {r['quantization']} | {_variant(r)[2]} | {r['batch_size']} | "
            f"{r['forward_passes']} | {r['seconds_median']:.3f} ({r['seconds_min']:.3f}-{r['seconds_max']:.3f}) | "
            f"{r['ms_per_image']:.1f} | {r['ms_per_forward_pass']:.1f} | {r['images_per_second']:.2f} |"
        )
    measured = [r for r in report["results"] if r.get("memory_added_mib") is not None]
    if measured:
        lines += [
            "", "| order | decode | dtype | quantization | KV cache | batch | weights MiB | before MiB | peak MiB | one generation "
            "adds MiB | KV cache MiB | code paged in MiB | activations MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in measured:
            lines.append(
                f"| {r['order']} | {r['decode']} | {r['dtype']} | {r['quantization']} | {_variant(r)[2]} | {r['batch_size']} | "
                f"{_mib(r['weights_mib'])} | {_mib(r['memory_before_mib'])} | {_mib(r['peak_memory_mib'])} | "
                f"{_mib(r['memory_added_mib'])} | {_mib(r['kv_cache_mib'])} | {_mib(r['code_pages_mib'])} | "
                f"{_mib(r['activations_mib'])} |"
            )
        kind = measured[0]["memory_kind"]
        where = ("the CUDA allocator's peak during one generation (max_memory_allocated), every resident "
                 "tensor included" if kind == "cuda_max_allocated" else
                 "the peak RSS of a child process that built the model and ran one generation")  # fmt: skip
        lines += ["", f"memory: {where}; adds = peak - before (the first call of each configuration: the cache and "
                  "any compiled graph included); KV cache from the model config; code paged in = growth of the "
                  "file-backed RSS (library code run for the first time); activations = the rest."]  # fmt: skip
    failed = [r for r in report["results"] if r.get("memory_error")]
    for r in failed:
        lines.append(f"memory of {r['order']} {r['decode']} batch {r['batch_size']} failed: {r['memory_error']}")
    lines += _reference_lines(report)
    ratios = [c for c in report["comparisons"] if "wall_ratio" in c]
    if ratios:
        lines += [
            "",
            "| decode | dtype | quantization | KV cache | batch | NAR s | raster s | NAR/raster wall ratio | step ratio | "
            "fraction of step ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in ratios:
            lines.append(
                f"| {c['decode']} | {c['dtype']} | {c['quantization']} | {c['kv_cache_dtype']} | {c['batch_size']} | {c['nar_seconds']:.3f} "
                f"| {c['raster_seconds']:.3f} | {c['wall_ratio']:.2f}x | {c['step_ratio']:.2f}x | "
                f"{c['fraction_of_step_ratio']:.2f} |"
            )
    speedups = [c for c in report["comparisons"] if "speedup_over_eager" in c]
    if speedups:
        lines += ["", "| order | dtype | quantization | KV cache | batch | decode | speed-up over eager |",
                  "|---|---|---|---|---|---|---|"]
        for c in speedups:
            lines.append(f"| {c['order']} | {c['dtype']} | {c['quantization']} | {c['kv_cache_dtype']} | {c['batch_size']} | {c['decode']} | "
                         f"{c['speedup_over_eager']:.2f}x |")  # fmt: skip
    return "\n".join(lines)



def _reference_lines(report: dict) -> list[str]:
    """The published sampler's rows (`--reference-code`) and ours against them."""
    reference = report.get("reference") or []
    if not reference:
        return []
    lines = ["", "| published sampler | dtype | batch | weights MiB | before MiB | peak MiB | one generation adds MiB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in reference:
        if "error" in r:
            lines.append(f"| failed | {r['dtype']} | {r['batch_size']} | {r['error']} | | | |")
            continue
        lines.append(f"| {report['settings']['reference_code']} | {r['dtype']} | {r['batch_size']} | "
                     f"{_mib(r['weights_mib'])} | {_mib(r['memory_before_mib'])} | {_mib(r['peak_memory_mib'])} | "
                     f"{_mib(r['memory_added_mib'])} |")  # fmt: skip
    against = [c for c in report["comparisons"] if "memory_vs_reference" in c]
    if against:
        lines += ["", "| decode | dtype | quantization | KV cache | batch | ours adds MiB | published adds MiB | "
                  "ours / published |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in against:
            lines.append(f"| {c['decode']} | {c['dtype']} | {c['quantization']} | {c['kv_cache_dtype']} | "
                         f"{c['batch_size']} | {_mib(c['memory_added_mib'])} | "
                         f"{_mib(c['reference_memory_added_mib'])} | {c['memory_vs_reference']:.2f}x |")  # fmt: skip
    return lines
