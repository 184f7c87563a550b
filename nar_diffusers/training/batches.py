"""Training examples and batches: dict examples from code shards or images, their collation, and the model inputs.

An *example* is a dict with one token source and at most one condition:
  "input_ids"      LongTensor (h, w)       pre-extracted token grid        | "pixel_values" (C, H, W) in [-1, 1]
                   or (T, h, w) for videos                                   or a clip (C, F, H, W)
  "class_labels"   int                     class models
  "caption"        str                     text models, encoded on the fly
  "caption_embeds" Tensor (length, dim)    text models, pre-extracted valid-token embeddings
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import VQModel
from diffusers.utils import logging
from PIL import Image

from ..models.video_tokenizer import as_video_tokenizer
from ..models.vq_codec import encode_images_to_tokens
from ..pipelines.text_encoding import encode_captions, left_pad_condition
from .code_shards import CodeDataset
from .image_data import describe_image


logger = logging.get_logger(__name__)

UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises for a truncated, corrupt, missing or oversized image file."""


class CodeExamples(torch.utils.data.Dataset):
    """Dict examples over a `CodeDataset` (the output of `training/extract_codes.py`).

    Args:
        codes: The loaded code shards.
        use_caption_embeddings: With caption codes that carry pre-extracted embeddings, yield "caption_embeds"
            (True) or the caption strings (False, to encode them on the fly).
    """

    def __init__(self, codes: CodeDataset, use_caption_embeddings: bool = True):
        self.codes = codes
        self.use_caption_embeddings = use_caption_embeddings and codes.has_caption_embeddings

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        codes, condition = self.codes[index]
        example: dict[str, Any] = {"input_ids": codes}
        if self.codes.condition_column == "label":
            example["class_labels"] = int(condition)
        elif self.codes.condition_column == "caption":
            if self.use_caption_embeddings:
                example["caption_embeds"] = self.codes.caption_embedding(index)
            else:
                example["caption"] = condition
        return example


class ImageExamples(torch.utils.data.Dataset):
    """Dict examples ("pixel_values" + "class_labels" or "caption") over a 🤗 `datasets.Dataset` of images.

    Random augmentation (e.g. an `ImageTransform` with random crops or flips) draws from a generator seeded by
    `(seed, epoch, index)`, never from the global RNG: an example looks the same however the data is split over
    workers, and a resumed run sees exactly the batches an uninterrupted one would. The training loop calls
    `set_epoch` at the start of every epoch.

    An image that cannot be read stops training with an error naming its file; with `skip_corrupt_images` the next
    readable image takes its place (logged once per file).

    Args:
        dataset: The images (and labels or captions).
        transform: `f(image, generator=...) -> (C, H, W)` tensor in [-1, 1].
        image_column: Column of the images.
        label_column / caption_column: At most one condition column.
        seed: Seeds the augmentation.
        skip_corrupt_images: Replace unreadable images instead of raising (`--skip_corrupt_images`).
    """

    def __init__(
        self,
        dataset,
        transform: Callable[..., torch.Tensor],
        image_column: str,
        label_column: str | None = None,
        caption_column: str | None = None,
        seed: int = 0,
        skip_corrupt_images: bool = False,
    ):
        if label_column is not None and caption_column is not None:
            raise ValueError("Pass at most one of `label_column` and `caption_column`.")
        self.dataset = dataset
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.caption_column = caption_column
        self.seed = seed
        self.skip_corrupt_images = skip_corrupt_images
        self.epoch = 0
        self._unreadable: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, index: int) -> tuple[dict[str, Any], torch.Tensor]:
        row = self.dataset[index]
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        return row, self.transform(row[self.image_column], generator=torch.Generator().manual_seed(int(seed)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        candidate = int(index)
        for _ in range(len(self.dataset)):
            if candidate not in self._unreadable:
                try:
                    row, pixels = self._read(candidate)
                    break
                except UNREADABLE_IMAGE_ERRORS as error:
                    source = describe_image(self.dataset, self.image_column, candidate)
                    if not self.skip_corrupt_images:
                        raise ValueError(
                            f"Cannot read the image of {source}: {error}. Replace or remove the file, or pass "
                            "--skip_corrupt_images to train on the next readable image instead."
                        ) from error
                    self._unreadable.add(candidate)
                    logger.warning(f"--skip_corrupt_images: skipping the unreadable image of {source} ({error}).")
            candidate = (candidate + 1) % len(self.dataset)
        else:
            raise ValueError(f"None of the {len(self.dataset)} images can be read (--skip_corrupt_images).")
        example: dict[str, Any] = {"pixel_values": pixels}
        if self.label_column is not None:
            example["class_labels"] = int(row[self.label_column])
        if self.caption_column is not None:
            example["caption"] = str(row[self.caption_column])
        return example


class TokenBatchCollator:
    """Collate dict examples into a batch.

    Output keys: "input_ids" (B, h, w) or "pixel_values" (B, C, H, W); "class_labels" (B,); "captions" (list of
    str); or, from "caption_embeds", "encoder_hidden_states" (B, num_condition_tokens, dim) float32 and
    "encoder_attention_mask" (B, num_condition_tokens) bool, left-padded with `left_pad_condition` (valid tokens in
    the last slots, padded rows zero), the layout the transformer and the pipeline use.

    Args:
        num_condition_tokens: Caption slots of the text model (needed for "caption_embeds").
    """

    def __init__(self, num_condition_tokens: int | None = None):
        self.num_condition_tokens = num_condition_tokens

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        first = examples[0]
        batch: dict[str, Any] = {}
        for key in ("input_ids", "pixel_values"):
            if key in first:
                batch[key] = torch.stack([torch.as_tensor(e[key]) for e in examples])
        if "input_ids" in batch:
            batch["input_ids"] = batch["input_ids"].long()
        if not batch:
            raise ValueError("Examples need 'input_ids' (token grids) or 'pixel_values' (images).")
        if "class_labels" in first:
            batch["class_labels"] = torch.tensor([int(e["class_labels"]) for e in examples], dtype=torch.long)
        elif "caption_embeds" in first:
            batch["encoder_hidden_states"], batch["encoder_attention_mask"] = self._pad_captions(
                [e["caption_embeds"] for e in examples]
            )
        elif "caption" in first:
            batch["captions"] = [str(e["caption"]) for e in examples]
        return batch

    def _pad_captions(self, embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.BoolTensor]:
        if self.num_condition_tokens is None:
            raise ValueError("`TokenBatchCollator(num_condition_tokens=...)` is needed to collate caption embeddings.")
        longest = max(e.shape[0] for e in embeds)
        if longest > self.num_condition_tokens:
            raise ValueError(
                f"A stored caption has {longest} tokens, more than the model's {self.num_condition_tokens} condition "
                "slots; re-extract with a smaller --max_sequence_length or train with a larger one."
            )
        padded = torch.zeros(len(embeds), longest, embeds[0].shape[-1], dtype=torch.float32)
        mask = torch.zeros(len(embeds), longest, dtype=torch.bool)
        for row, embedding in enumerate(embeds):
            padded[row, : embedding.shape[0]] = embedding.float()
            mask[row, : embedding.shape[0]] = True
        return left_pad_condition(padded, mask, self.num_condition_tokens)


class TrainingBatchEncoder:
    """Turn a collated batch into the transformer's keyword arguments on `device`.

    Pixels are encoded with the frozen VQ model (clips `(B, C, F, H, W)` with the video tokenizer behind it, a
    `VQModel` frame by frame), captions with the frozen T5 encoder (left-padded to the model's condition slots);
    pre-extracted tokens and embeddings pass through.

    Args:
        vqvae: Needed for batches with "pixel_values": a `VQModel`, or a video tokenizer model for clips.
        text_encoder, tokenizer: Needed for batches with "captions".
        num_condition_tokens: The text model's caption slots.
        max_sequence_length: Caption tokens kept (default `num_condition_tokens`).
    """

    def __init__(
        self,
        vqvae: VQModel | None = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        num_condition_tokens: int | None = None,
        max_sequence_length: int | None = None,
    ):
        self.vqvae = vqvae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.num_condition_tokens = num_condition_tokens
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
        if "input_ids" in batch:
            input_ids = batch["input_ids"].to(device)
        else:
            if self.vqvae is None:
                raise ValueError("Image batches need the VQ model (`--vq_model_path`) to become tokens.")
            pixels = batch["pixel_values"].to(device)
            if pixels.ndim == 5:
                input_ids = as_video_tokenizer(self.vqvae, "vqvae").encode_video(pixels)
            else:
                input_ids = encode_images_to_tokens(self.vqvae, pixels)
        inputs = {"input_ids": input_ids}
        if "class_labels" in batch:
            inputs["class_labels"] = batch["class_labels"].to(device)
        elif "encoder_hidden_states" in batch:
            inputs["encoder_hidden_states"] = batch["encoder_hidden_states"].to(device)
            inputs["encoder_attention_mask"] = batch["encoder_attention_mask"].to(device)
        elif "captions" in batch:
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError("Caption batches need a text encoder (`--text_encoder_path`) or pre-extracted embeddings.")
            embeds, mask = encode_captions(
                self.tokenizer, self.text_encoder, batch["captions"], self.num_condition_tokens,
                self.max_sequence_length, truncation=True, device=device,
            )  # fmt: skip
            inputs["encoder_hidden_states"], inputs["encoder_attention_mask"] = embeds.float(), mask
        return inputs


def nar_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training objective: the model's own teacher-forced mean cross-entropy over every grid token (the
    logits of each token mixed over its parents' heads, as in the NAR paper). Condition dropout for guidance
    happens inside the model in train mode."""
    return model(**inputs, labels=inputs["input_ids"]).loss
