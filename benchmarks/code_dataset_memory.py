#!/usr/bin/env python
"""Process memory of reading a code directory: memory-mapped (`load_code_dataset`) vs read into RAM.

    python benchmarks/code_dataset_memory.py --work-dir /tmp/codes-bench --rows 200000

Writes a synthetic class-conditional code directory in the `extract_codes.py` format (24x24 grids, 16384 codes),
then, each in a fresh subprocess: opens it and reads every row (1) the first time, when 🤗 datasets converts the
parquet shards into Arrow files of its cache (`<work-dir>/hf-cache/parquet`, removed before every run so this is a
real first open), (2) again, from the memory-mapped Arrow files, (3) read into RAM the way `load_code_dataset` did
before it memory-mapped (every shard into one uint16 array, the labels into a list). Prints, per mode, the peak
growth of RssAnon (the process's private memory, what a loader holding the data grows) and the growth of RssFile
(mapped file pages: the page cache, shared by every process of the node and reclaimable). Linux only (reads
/proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

GRID, VOCAB = (24, 24), 16384


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def write_codes(path: str, rows: int, rows_per_shard: int) -> None:
    import numpy as np
    import torch

    from nar_diffusers.training.code_shards import (
        CODES_FORMAT_VERSION, code_shard_name, write_code_metadata, write_code_shard,
    )  # fmt: skip

    os.makedirs(path, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, rows, rows_per_shard)):
        count = min(rows_per_shard, rows - start)
        codes = torch.randint(0, VOCAB, (count, *GRID), generator=torch.Generator().manual_seed(index), dtype=torch.int32)
        write_code_shard(os.path.join(path, code_shard_name(index)), codes, ((np.arange(count) + start) % 1000).tolist(), "label")
        shards.append({"file": code_shard_name(index), "num_rows": count})
    write_code_metadata(path, {
        "format_version": CODES_FORMAT_VERSION, "complete": True, "grid": list(GRID), "vocab_size": VOCAB,
        "num_shards": len(shards), "shards": shards, "columns": ["codes", "height", "width", "label"],
        "condition_column": "label",
    })  # fmt: skip


def load_into_ram(path: str):
    """The loader before memory mapping: every shard read into one (rows, tokens) uint16 array and a label list."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from nar_diffusers.training.code_shards import load_code_metadata

    metadata = load_code_metadata(path)
    grid, num_tokens = tuple(metadata["grid"]), int(np.prod(metadata["grid"]))
    codes = np.empty((sum(s["num_rows"] for s in metadata["shards"]), num_tokens), dtype=np.uint16)
    labels, row = [], 0
    for shard in metadata["shards"]:
        table = pq.read_table(os.path.join(path, shard["file"]), columns=["codes", "label"])
        codes[row : row + table.num_rows] = table.column("codes").combine_chunks().flatten().to_numpy().reshape(-1, num_tokens)
        labels.extend(table.column("label").to_pylist())
        row += table.num_rows

    class InRam:
        def __len__(self):
            return len(labels)

        def __getitem__(self, index):
            return torch.from_numpy(codes[index].astype(np.int64)).view(*grid), labels[index]

    return InRam()


def measure(path: str, cache_dir: str, in_ram: bool) -> dict:
    """Open the codes and read every row, sampling RssAnon every few milliseconds."""
    import datasets  # noqa: F401  (imported before the baseline, like the loader's other dependencies)
    import pyarrow  # noqa: F401

    from nar_diffusers.training.code_shards import load_code_dataset

    base_anon, base_file = _status("RssAnon"), _status("RssFile")
    peak, stop = [base_anon], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _status("RssAnon"))
            time.sleep(0.003)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    dataset = load_into_ram(path) if in_ram else load_code_dataset(path, progress=False, cache_dir=cache_dir)
    opened = time.perf_counter()
    checksum = 0
    for index in range(len(dataset)):
        codes, label = dataset[index]
        checksum += int(codes[0, 0]) + label
    finished = time.perf_counter()
    stop.set()
    thread.join()
    mib = 1 << 20
    return {
        "rows": len(dataset), "open_s": round(opened - started, 2), "read_s": round(finished - opened, 2),
        "rows_per_s": round(len(dataset) / (finished - opened)),
        "rss_anon_peak_growth_mib": round((max(peak[0], _status("RssAnon")) - base_anon) / mib, 1),
        "rss_file_growth_mib": round((_status("RssFile") - base_file) / mib, 1), "checksum": checksum,
    }  # fmt: skip


def reset_parquet_cache(cache_dir: str) -> None:
    """Remove what 🤗 datasets cached for `load_dataset("parquet", ..., cache_dir=cache_dir)`: the Arrow files of
    its `parquet/` builder folder and the builder's lock files beside it. Other entries of `cache_dir` are kept."""
    import shutil

    shutil.rmtree(os.path.join(cache_dir, "parquet"), ignore_errors=True)
    for name in os.listdir(cache_dir) if os.path.isdir(cache_dir) else []:
        if name.endswith(".lock") and "_parquet_" in name:
            os.remove(os.path.join(cache_dir, name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, help="Folder for the synthetic codes and the datasets cache.")
    parser.add_argument("--rows", type=int, default=200_000, help="Token grids (24x24) in the code directory.")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--mode", choices=["first", "again", "in_ram"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    codes, cache = os.path.join(args.work_dir, "codes"), os.path.join(args.work_dir, "hf-cache")
    if args.mode == "first" and os.path.isdir(os.path.join(cache, "parquet")):
        raise RuntimeError(f"{cache}/parquet exists: this would measure a later open, not the first one.")
    if args.mode is not None:  # one measurement, in this fresh process
        print(json.dumps(measure(codes, cache, in_ram=args.mode == "in_ram")))
        return
    if not os.path.isfile(os.path.join(codes, "metadata.json")):
        write_codes(codes, args.rows, args.rows_per_shard)
    reset_parquet_cache(cache)  # so the "first open" row converts the shards, every time the benchmark runs
    size = args.rows * GRID[0] * GRID[1] * 2 / (1 << 20)
    print(f"{args.rows} grids of {GRID[0]}x{GRID[1]} tokens: {size:.0f} MiB of codes as uint16")
    print("| mode | open (s) | read every row (s) | rows/s | peak RssAnon growth (MiB) | RssFile growth (MiB) |")
    print("|---|---|---|---|---|---|")
    for mode, label in (("first", "memory-mapped, first open (converts the shards)"),
                        ("again", "memory-mapped, any later open"),
                        ("in_ram", "read into RAM (the loader before memory mapping)")):  # fmt: skip
        output = subprocess.run(
            [sys.executable, __file__, "--work-dir", args.work_dir, "--mode", mode],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        r = json.loads(output.strip().splitlines()[-1])
        print(f"| {label} | {r['open_s']} | {r['read_s']} | {r['rows_per_s']} | {r['rss_anon_peak_growth_mib']} | "
              f"{r['rss_file_growth_mib']} |")  # fmt: skip


if __name__ == "__main__":
    main()
