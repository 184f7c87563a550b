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


MAX_PROMPT_CHARS = 8192
"""Default bound on a prompt's length (`--max-prompt-chars`). A text encoder reads at most its max length in
tokens (`num_condition_tokens`, 120 for the published text models; T5 itself takes 512) and a token spans a few
characters, so a longer prompt is cut anyway; the bound refuses such a line before any work is done on it."""


def _bounded_lines(file, path: str, max_chars: int):
    """The lines of `file`, each read with a bounded `readline`, so a huge line is refused before it is in memory;
    a ValueError names the file for a line too long, a NUL byte (a binary file) or bytes that are not UTF-8."""
    limit = 2 * max_chars + 1024  # room for the other CSV columns / JSON keys and escapes
    number = 0
    while True:
        number += 1
        try:
            line = file.readline(limit)
        except UnicodeDecodeError as error:
            raise ValueError(
                f"--prompts {path!r} is not UTF-8 text (byte {error.object[error.start:error.start + 1]!r} near line "
                f"{number}): give a .txt, .csv or .jsonl text file."
            ) from None
        if not line:
            return
        if len(line) == limit and not line.endswith("\n"):
            raise ValueError(
                f"--prompts {path!r}: line {number} is longer than {limit} characters; prompts are bounded by "
                f"--max-prompt-chars {max_chars} (a text encoder reads a few hundred tokens at most)."
            )
        if "\0" in line:
            raise ValueError(f"--prompts {path!r} holds NUL bytes (line {number}): it is a binary file, not text.")
        yield line


def _check_lengths(prompts: list[str], path: str, max_chars: int) -> None:
    for number, prompt in enumerate(prompts, 1):
        if len(prompt) > max_chars:
            raise ValueError(
                f"--prompts {path!r}: prompt {number} has {len(prompt)} characters, more than --max-prompt-chars "
                f"{max_chars} (a text encoder reads a few hundred tokens at most); shorten it or raise the flag."
            )


def _read_rows(file, path: str, extension: str, max_chars: int) -> list[dict]:
    lines = _bounded_lines(file, path, max_chars)
    if extension == ".csv":
        try:
            return list(csv.DictReader(lines))
        except csv.Error as error:
            raise ValueError(f"--prompts {path!r} is not a readable CSV file ({error}).") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--prompts {path!r}: line {number} is not JSON ({error}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"--prompts {path!r}: line {number} must be a JSON object, got {row!r}.")
        rows.append(row)
    return rows


def read_prompts(path: str, column: str | None = None, max_chars: int = MAX_PROMPT_CHARS) -> list[str]:
    """Prompts from a text file (one per non-empty line), a CSV file with a header, or a JSONL file (one object
    per line). `column` names the CSV column / JSON key; by default the first of "prompt", "caption", "text".
    A prompt may have at most `max_chars` characters.

    Raises:
        ValueError: naming `--prompts` or `--prompt-column` and what is allowed.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in PROMPT_FILE_TYPES:
        raise ValueError(f"--prompts {path!r} must be a {', '.join(PROMPT_FILE_TYPES)} file.")
    if not os.path.isfile(path):
        raise ValueError(f"--prompts {path!r} does not exist.")
    if extension == ".txt" and column is not None:
        raise ValueError("--prompt-column applies to .csv and .jsonl prompt files, not .txt (one prompt a line).")
    with open(path, encoding="utf-8", newline="" if extension == ".csv" else None) as file:
        if extension == ".txt":
            prompts = [line.strip() for line in _bounded_lines(file, path, max_chars) if line.strip()]
            _check_lengths(prompts, path, max_chars)
            rows = None
        else:
            rows = _read_rows(file, path, extension, max_chars)
    if rows is not None:
        prompts = _column_prompts(rows, path, column)
        _check_lengths(prompts, path, max_chars)
    if not prompts or not all(prompts):
        raise ValueError(f"--prompts {path!r} holds {'an empty prompt' if prompts else 'no prompts'}.")
    return prompts


def _column_prompts(rows: list[dict], path: str, column: str | None) -> list[str]:
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
    return [row[column].strip() for row in rows]


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
