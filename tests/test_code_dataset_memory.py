"""`load_code_dataset` memory-maps the codes: reading a dataset larger than a small memory budget keeps the process's
own (anonymous) memory flat; the pages of the Arrow files 🤗 datasets converts the shards into are the operating
system's, shared between processes."""

import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from nar_diffusers.training.batches import CodeExamples, TokenBatchCollator
from nar_diffusers.training.code_shards import (
    CODES_FORMAT_VERSION,
    code_shard_name,
    load_code_dataset,
    write_code_metadata,
    write_code_shard,
)
from nar_diffusers.training.nar_training import create_dataloader

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc (Linux)")

GRID, VOCAB, NUM_CLASSES = (24, 24), 16384, 1000
NUM_SHARDS, ROWS_PER_SHARD = 16, 14000  # 224,000 grids of 576 tokens: 246 MiB as uint16 (the old in-RAM loader)
MiB = 1 << 20


def _anonymous_rss() -> int:
    """The process's private memory (RssAnon): what an in-RAM loader grows, unlike mapped file pages (RssFile)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakGrowth:
    """Peak growth of RssAnon over the `with` block, sampled every few milliseconds."""

    def __enter__(self):
        self.base = self.peak = _anonymous_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _anonymous_rss())
            time.sleep(0.003)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anonymous_rss())
        self.growth = self.peak - self.base


def _shard_codes(index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(index)
    return torch.randint(0, VOCAB, (ROWS_PER_SHARD, *GRID), generator=generator, dtype=torch.int32)


@pytest.fixture(scope="module")
def large_codes(tmp_path_factory):
    """A synthetic class-conditional code directory in the extract_codes.py format, written shard by shard."""
    path = tmp_path_factory.mktemp("large_codes")
    shards = []
    for index in range(NUM_SHARDS):
        labels = ((np.arange(ROWS_PER_SHARD) + index * ROWS_PER_SHARD) % NUM_CLASSES).tolist()
        write_code_shard(str(path / code_shard_name(index)), _shard_codes(index), labels, "label")
        shards.append({"file": code_shard_name(index), "num_rows": ROWS_PER_SHARD})
    write_code_metadata(str(path), {
        "format_version": CODES_FORMAT_VERSION, "complete": True, "grid": list(GRID), "vocab_size": VOCAB,
        "num_shards": NUM_SHARDS, "shards": shards, "columns": ["codes", "height", "width", "label"],
        "condition_column": "label",
    })  # fmt: skip
    return path


def _read_all(dataset) -> int:
    checksum = 0
    for index in range(len(dataset)):
        codes, label = dataset[index]
        checksum += int(codes[0, 0]) + label
    return checksum


def test_reading_a_large_code_set_keeps_process_memory_flat(large_codes, tmp_path):
    dataset_bytes = NUM_SHARDS * ROWS_PER_SHARD * int(np.prod(GRID)) * 2
    assert dataset_bytes > 240 * MiB

    # First open: datasets converts the checked shards into Arrow files, one small batch at a time.
    with PeakGrowth() as first:
        dataset = load_code_dataset(str(large_codes), progress=False, cache_dir=str(tmp_path))
        first_sum = _read_all(dataset)
    assert len(dataset) == NUM_SHARDS * ROWS_PER_SHARD
    assert first.growth < 96 * MiB < dataset_bytes / 2.5, f"peak RssAnon growth {first.growth / MiB:.0f} MiB"
    del dataset

    # Any later open (another process, the next run) maps the file: nothing is read into the process's memory.
    with PeakGrowth() as later:
        dataset = load_code_dataset(str(large_codes), progress=False, cache_dir=str(tmp_path))
        assert _read_all(dataset) == first_sum
    assert later.growth < 16 * MiB, f"peak RssAnon growth {later.growth / MiB:.0f} MiB"
    print(f"RssAnon growth: first open {first.growth / MiB:.0f} MiB, later open {later.growth / MiB:.0f} MiB")

    # The rows are the written ones; the dataset pickles by file path (DataLoader workers map the file again).
    for index in (0, ROWS_PER_SHARD - 1, ROWS_PER_SHARD, len(dataset) - 1):
        shard, row = divmod(index, ROWS_PER_SHARD)
        codes, label = dataset[index]
        assert torch.equal(codes, _shard_codes(shard)[row].long()) and label == index % NUM_CLASSES
    assert len(pickle.dumps(dataset)) < MiB
    assert dataset.label_range() == (0, NUM_CLASSES - 1)


def test_shuffled_batches_are_deterministic_and_a_rewritten_shard_is_read_anew(large_codes, tmp_path):
    dataset = load_code_dataset(str(large_codes), progress=False, cache_dir=str(tmp_path))
    examples = CodeExamples(dataset)

    def first_batches(seed: int) -> list[torch.Tensor]:
        loader = create_dataloader(examples, 64, TokenBatchCollator(), seed=seed)
        return [batch["input_ids"] for _, batch in zip(range(3), loader)]

    assert all(torch.equal(a, b) for a, b in zip(first_batches(0), first_batches(0)))
    assert not torch.equal(first_batches(0)[0], first_batches(1)[0])

    # A rewritten shard (a new modification time) is converted again: its new rows are read, not the old ones.
    shard = large_codes / code_shard_name(0)
    original = shard.read_bytes()
    try:
        codes = _shard_codes(0)
        codes[0] = (codes[0] + 1) % VOCAB
        labels = (np.arange(ROWS_PER_SHARD) % NUM_CLASSES).tolist()
        write_code_shard(str(shard), codes, labels, "label")
        reread = load_code_dataset(str(large_codes), progress=False, cache_dir=str(tmp_path))
        assert torch.equal(reread[0][0], codes[0].long()) and torch.equal(reread[1][0], dataset[1][0])
    finally:
        shard.write_bytes(original)
