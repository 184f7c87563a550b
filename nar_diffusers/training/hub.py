"""`--push_to_hub` of the training scripts, as diffusers' examples do it: the repository is created when training
starts (a bad token or name fails then, not after hours), and the output folder is uploaded at the end with its
model card, without the training checkpoints."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
from huggingface_hub import ModelCard

from ..utils.model_card import save_model_card

UPLOAD_IGNORE_PATTERNS: tuple[str, ...] = ("checkpoint-*", ".checkpoint-*", ".*.tmp", "*.tmp")
"""Training state (resumable checkpoints, temporary files) stays local."""


def create_hub_repo(args: argparse.Namespace) -> str | None:
    """With `--push_to_hub`, create (or reuse) the repository `--hub_model_id` (default: the `--output_dir` name)
    and return its id; None without `--push_to_hub`. Call it on the main process only."""
    if not args.push_to_hub:
        return None
    name = args.hub_model_id or Path(args.output_dir).resolve().name
    return huggingface_hub.create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id


def push_output_dir(
    args: argparse.Namespace,
    repo_id: str,
    model_card: Callable[[str], ModelCard] | None = None,
    commit_message: str = "End of training",
):
    """Upload `--output_dir` to `repo_id` without its checkpoints; `model_card(repo_id)` is written as README.md
    first, so its usage snippet names the repository."""
    if model_card is not None:
        save_model_card(model_card(repo_id), args.output_dir)
    return huggingface_hub.upload_folder(
        repo_id=repo_id, folder_path=os.fspath(args.output_dir), commit_message=commit_message,
        ignore_patterns=list(UPLOAD_IGNORE_PATTERNS), token=args.hub_token,
    )  # fmt: skip
