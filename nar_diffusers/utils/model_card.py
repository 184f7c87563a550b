"""Model cards (README.md with Hub metadata) for saved, converted and trained NAR pipelines."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

MODEL_CARD_NAME = "README.md"

CITATIONS = """```bibtex
@article{he2025nar,
  title   = {Neighboring Autoregressive Modeling for Efficient Visual Generation},
  author  = {He, Yefei and He, Yuanyu and He, Shaoxuan and Chen, Feng and Zhou, Hong and Zhang, Kaipeng and Zhuang, Bohan},
  journal = {arXiv preprint arXiv:2503.10696},
  year    = {2025}
}
@article{sun2024llamagen,
  title   = {Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation},
  author  = {Sun, Peize and Jiang, Yi and Chen, Shoufa and Zhang, Shilong and Peng, Bingyue and Luo, Ping and Yuan, Zehuan},
  journal = {arXiv preprint arXiv:2406.06525},
  year    = {2024}
}
```"""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id_or_none(name: str | None) -> str | None:
    """`name` when it reads as a Hub model id ("owner/name" or "name") and is not a local folder, else None: the
    card's `base_model` metadata only takes Hub ids (the text of the card still names local bases)."""
    if not name or os.path.exists(name) or not _HUB_ID.match(str(name)):
        return None
    return str(name)


def _usage(pipeline_class: str, repo: str, condition: str, class_names: Sequence[str] | None) -> str:
    if condition == "text":
        call = 'pipe(prompt="a red fox in the snow")'
    elif class_names:
        call = f"pipe(class_labels=pipe.get_label_ids([{class_names[0]!r}]))"
    else:
        call = "pipe(class_labels=[0])"
    output = ".frames[0]" if "Video" in pipeline_class else ".images[0]"
    edit = ""
    if "Inpaint" in pipeline_class:  # image + mask (white = regenerate), sides multiples of the VQ factor
        call = call.replace("pipe(", "pipe(image=image, mask_image=mask_image, ", 1)
        edit = "# image: a PIL image (sides multiples of the VQ factor); mask_image: white = regenerate\n"
    return (
        "```python\n"
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{repo}", trust_remote_code=True)\n'
        f"{edit}result = {call}{output}  # sampling defaults below are used when omitted\n"
        "```\n\n"
        f"Or, with `pip install nar-diffusers`: `from nar_diffusers import {pipeline_class}` and "
        f'`{pipeline_class}.from_pretrained("{repo}")`.'
    )


def build_model_card(
    pipeline_class: str,
    *,
    summary: str,
    condition: str,
    grid_size: Sequence[int],
    num_decoding_heads: int,
    num_forward_passes: int,
    sampling_defaults: Mapping[str, Any],
    repo: str = "path/to/this/folder",
    base_model: str | None = None,
    converted_from: str | None = None,
    training: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """A model card for a NAR pipeline: what it is, where it came from, how to sample it (with its saved sampling
    defaults), the license and the citations."""
    video = "Video" in pipeline_class
    tags = ["nar-diffusers", "autoregressive", "video-generation" if video else "image-generation"]
    pipeline_tag = ("text-to-video" if video else "text-to-image") if condition == "text" else None
    data = ModelCardData(
        license=license, library_name="diffusers", tags=tags, base_model=hub_id_or_none(base_model),
        pipeline_tag=pipeline_tag,
    )  # fmt: skip
    if num_decoding_heads == 1:
        order = "raster order, one token per forward pass"
    else:
        order = (
            "neighboring autoregressive order: all tokens at the same Manhattan distance from the origin in one "
            f"forward pass, {num_decoding_heads} dimension-oriented heads"
        )
    lines = [
        f"# {pipeline_class}",
        "",
        summary,
        "",
        f"- Token grid: {' x '.join(map(str, grid_size))}, {order} ({num_forward_passes} forward passes per sample).",
        f"- Conditioning: {'text prompts' if condition == 'text' else 'class labels'}"
        + (f" ({len(class_names)} named classes: `pipe.get_label_ids([...])`)" if class_names else "")
        + ".",
    ]
    if base_model:
        lines.append(f"- Fine-tuned from: `{base_model}`.")
    if converted_from:
        lines.append(f"- Converted from the published checkpoint `{converted_from}`.")
    if training:
        lines.append("- Training: " + ", ".join(f"{k} = {v}" for k, v in training.items()) + ".")
    lines += [
        "",
        "## Sampling defaults",
        "",
        "Used whenever a call omits them; an argument passed explicitly always wins.",
        "",
        "| argument | value |",
        "|---|---|",
        *(f"| `{k}` | {v} |" for k, v in sampling_defaults.items()),
        "",
        "## Usage",
        "",
        _usage(pipeline_class, repo, condition, class_names),
        "",
        "## License",
        "",
        f"{license}; converted or fine-tuned weights keep the license of the weights they come from.",
        "",
        "## Citation",
        "",
        CITATIONS,
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines))


def _card(data: ModelCardData, lines: Sequence[str], license: str) -> ModelCard:
    lines = [*lines, "", "## License", "", f"{license}.", "", "## Citation", "", CITATIONS, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines))


def _details(base_model: str | None, converted_from: str | None, training: Mapping[str, Any] | None) -> list[str]:
    lines = []
    if base_model:
        lines.append(f"- Fine-tuned from: `{base_model}`.")
    if converted_from:
        lines.append(f"- Converted from the published checkpoint `{converted_from}`.")
    if training:
        lines.append("- Training: " + ", ".join(f"{k} = {v}" for k, v in training.items()) + ".")
    return lines


def build_vq_model_card(
    *,
    summary: str,
    num_vq_embeddings: int,
    vq_embed_dim: int,
    downsample_factor: int,
    in_channels: int = 3,
    repo: str = "path/to/this/folder",
    base_model: str | None = None,
    converted_from: str | None = None,
    training: Mapping[str, Any] | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """A model card for a VQ image tokenizer (a diffusers `VQModel`) that NAR models generate the tokens of."""
    data = ModelCardData(
        license=license, library_name="diffusers", base_model=hub_id_or_none(base_model),
        tags=["nar-diffusers", "vq-vae", "image-tokenizer"],
    )  # fmt: skip
    channels = {1: "grayscale", 3: "RGB"}.get(in_channels, f"{in_channels}-channel")
    lines = [
        "# VQModel (image tokenizer)",
        "",
        summary,
        "",
        f"- {channels} images of side s -> a grid of s/{downsample_factor} x s/{downsample_factor} token ids from a "
        f"codebook of {num_vq_embeddings} entries ({vq_embed_dim}-dimensional), and back.",
        *_details(base_model, converted_from, training),
        "",
        "## Usage",
        "",
        "```python",
        "from diffusers import VQModel",
        "",
        f'vqvae = VQModel.from_pretrained("{repo}")',
        "```",
        "",
        "Encode a dataset for NAR training with `python training/extract_codes.py --vq_model_path <this model> ...` "
        "and train with `training/train_nar.py --vq_model_path <this model>` (nar-diffusers).",
    ]
    return _card(data, lines, license)


def build_lora_model_card(
    *,
    base_model: str,
    summary: str,
    rank: int,
    target_modules: Sequence[str],
    repo: str = "path/to/this/folder",
    video: bool = False,
    validation_prompts: Sequence[str] | None = None,
    sampling: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    license: str = "other",
) -> ModelCard:
    """A model card for LoRA weights of a text-conditional NAR pipeline: the base model and how to load them."""
    data = ModelCardData(
        license=license, library_name="diffusers", base_model=hub_id_or_none(base_model),
        tags=["nar-diffusers", "lora", "autoregressive", "text-to-video" if video else "text-to-image"],
        pipeline_tag="text-to-video" if video else "text-to-image",
    )  # fmt: skip
    prompt = (validation_prompts or ["a photo of sks dog"])[0]
    call_args = ", ".join(f"{k}={v!r}" for k, v in (sampling or {}).items())
    output = ".frames[0]" if video else ".images[0]"
    lines = [
        "# LoRA weights for a NAR pipeline",
        "",
        summary,
        "",
        f"- Base model: `{base_model}` (load it first; these weights only hold the LoRA layers).",
        f"- LoRA rank {rank} on the transformer's `{', '.join(target_modules)}` layers.",
        *_details(None, None, training),
    ]
    if validation_prompts:
        prompts = "; ".join(f"`{p}`" for p in validation_prompts)
        lines.append(f"- Validated on: {prompts}" + (f" with {call_args}." if call_args else "."))
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{base_model}", trust_remote_code=True)',
        f'pipe.load_lora_weights("{repo}")',
        f"result = pipe(prompt={prompt!r}{', ' + call_args if call_args else ''}){output}",
        "```",
        "",
        "`pipe.set_adapters([...], adapter_weights=[...])` combines several LoRAs, `pipe.fuse_lora()` merges them "
        "into the weights.",
    ]
    return _card(data, lines, f"{license}; LoRA weights keep the license of the base model")


def save_model_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    """Write `card` to `folder/README.md` atomically (a temporary file renamed into place)."""
    path = Path(folder) / MODEL_CARD_NAME
    tmp = path.with_name(f".{MODEL_CARD_NAME}.tmp")
    tmp.write_text(str(card), encoding="utf-8")
    os.replace(tmp, path)
    return path
