"""What a bulk sampling run generates: the condition and the seed of every sample index, and the shards.

Sample `i` is fully determined by `i`: its condition is `conditions[i % len(conditions)]` (class labels cycle, so
50,000 samples of a 1000-class model are 50 per class; prompts cycle through the prompt file) and its token draws
come from its own generator, seeded with `sample_seed(seed, i)`. Nothing depends on which process draws it or which
other samples share its batch. Shards are fixed index ranges `[k * shard_size, (k + 1) * shard_size)`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

PROMPT_FILE_TYPES = (".txt", ".csv", ".jsonl")
PROMPT_COLUMNS = ("prompt", "caption", "text")
"""Columns / keys tried, in order, when `--prompt-column` is not given."""


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`'s generator: a hash of `(seed, index)` (NumPy's `SeedSequence`), so runs with
    different `seed`s never share streams, unlike `seed + index`."""
    if seed < 0 or index < 0:
        raise ValueError(f"`seed` and `index` must be >= 0, got {seed} and {index}.")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


def sample_generators(seed: int, indices: range | list[int], device: torch.device | str) -> list[torch.Generator]:
    """One `torch.Generator` on `device` per sample index (the pipelines' per-image `generator` list)."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, index)) for index in indices]


def read_prompts(path: str, column: str | None = None) -> list[str]:
    """Prompts from a text file (one per non-empty line), a CSV file with a header, or a JSONL file (one object
    per line). `column` names the CSV column / JSON key; by default the first of "prompt", "caption", "text".

    Raises:
        ValueError: naming `--prompts` or `--prompt-column` and what is allowed.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in PROMPT_FILE_TYPES:
        raise ValueError(f"--prompts {path!r} must be a {', '.join(PROMPT_FILE_TYPES)} file.")
    if not os.path.isfile(path):
        raise ValueError(f"--prompts {path!r} does not exist.")
    if extension == ".txt":
        if column is not None:
            raise ValueError("--prompt-column applies to .csv and .jsonl prompt files, not .txt (one prompt a line).")
        with open(path, encoding="utf-8") as file:
            prompts = [line.strip() for line in file if line.strip()]
    else:
        with open(path, encoding="utf-8", newline="") as file:
            if extension == ".csv":
                rows = list(csv.DictReader(file))
                keys = list(rows[0]) if rows else []
            else:
                rows = []
                for number, line in enumerate(file, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"--prompts {path!r}: line {number} is not JSON ({error}).") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"--prompts {path!r}: line {number} must be a JSON object, got {row!r}.")
                    rows.append(row)
                keys = list(rows[0]) if rows else []
        if column is None:
            column = next((name for name in PROMPT_COLUMNS if name in keys), None)
            if column is None and rows:
                raise ValueError(
                    f"--prompts {path!r} has no column named {' / '.join(PROMPT_COLUMNS)}; pass --prompt-column, one "
                    f"of {keys}."
                )
        missing = [number for number, row in enumerate(rows, 1) if not isinstance(row.get(column), str)]
        if missing:
            raise ValueError(
                f"--prompt-column {column!r}: row {missing[0]} of {path!r} has no text there; the rows have {keys}."
            )
        prompts = [row[column].strip() for row in rows]
    if not prompts or not all(prompts):
        raise ValueError(f"--prompts {path!r} holds {'an empty prompt' if prompts else 'no prompts'}.")
    return prompts


@dataclass(frozen=True)
class SamplePlan:
    """The samples of a run: `num_samples` indices in shards of `shard_size`, each with its condition and seed.

    Attributes:
        num_samples: How many samples.
        shard_size: Samples per shard (the unit of work, resumption and writing).
        seed: The run's seed; sample `i` draws from `sample_seed(seed, i)`.
        class_labels: The labels cycled over (class models), or None.
        prompts: The prompts cycled over (text models), or None.
    """

    num_samples: int
    shard_size: int
    seed: int
    class_labels: tuple[int, ...] | None = None
    prompts: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("num_samples", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)}.")
        if self.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {self.seed}.")
        if (self.class_labels is None) == (self.prompts is None):
            raise ValueError("A sample plan needs either class labels or prompts.")
        if not (self.class_labels or self.prompts):
            raise ValueError("A sample plan needs at least one class label or prompt.")

    @property
    def conditions(self) -> tuple:
        return self.class_labels if self.class_labels is not None else self.prompts

    def condition(self, index: int) -> int | str:
        """The class label or prompt of sample `index`."""
        return self.conditions[index % len(self.conditions)]

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard(self, shard_index: int) -> range:
        """The sample indices of shard `shard_index`."""
        start = shard_index * self.shard_size
        return range(start, min(start + self.shard_size, self.num_samples))
