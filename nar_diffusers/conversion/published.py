"""What the published image checkpoints do not store but their users need: the sampling settings of the published
sampling scripts, the ImageNet class names and the model card text, per checkpoint family.

Sampling settings (the argparse defaults of each repository's sampling scripts):

==========================  ==========  ==========  ============  ==========  =======================================
family                      guidance    top-k       temperature   top-p       source
==========================  ==========  ==========  ============  ==========  =======================================
NAR class-to-image          4.0         2000        1.0           1.0         NAR-images/autoregressive/sample/sample_c2i.py
NAR text-to-image           7.5         0 (off)     1.0           1.0         NAR-images/autoregressive/sample/sample_t2i.py
LlamaGen class-to-image     4.0         2000        1.0           1.0         autoregressive/sample/sample_c2i.py
LlamaGen text-to-image      7.5         1000        1.0           1.0         autoregressive/sample/sample_t2i.py
==========================  ==========  ==========  ============  ==========  =======================================

The FID runs of the class-to-image models sample differently (`sample_c2i_ddp.py`: top-k 0, and the guidance scale
their launch commands pass): NAR uses 2.0; LlamaGen 2.0 for B and L, 1.75 for XL and XXL, 1.65 for 3B. The model
cards state them; the saved defaults are the sample scripts' (what a user looking at images wants).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")

# (architecture, condition) -> the sampling settings of the family's published sampling script.
PUBLISHED_SAMPLING: dict[tuple[str, str], dict[str, float | int]] = {
    ("nar", "class"): {"guidance_scale": 4.0, "cfg_interval": -1, "temperature": 1.0, "top_k": 2000, "top_p": 1.0},
    ("nar", "text"): {"guidance_scale": 7.5, "cfg_interval": -1, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    ("raster", "class"): {"guidance_scale": 4.0, "cfg_interval": -1, "temperature": 1.0, "top_k": 2000, "top_p": 1.0},
    ("raster", "text"): {"guidance_scale": 7.5, "cfg_interval": -1, "temperature": 1.0, "top_k": 1000, "top_p": 1.0},
}
# Guidance scale of the published FID runs (with top-k 0), by family and model size.
NAR_FID_GUIDANCE = 2.0
LLAMAGEN_FID_GUIDANCE: dict[str, float] = {"GPT-B": 2.0, "GPT-L": 2.0, "GPT-XL": 1.75, "GPT-XXL": 1.75, "GPT-3B": 1.65}
FAMILY_NAMES = {"nar": "NAR", "raster": "LlamaGen"}
PAPERS = {"nar": "arXiv 2503.10696", "raster": "arXiv 2406.06525"}


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-id order (synonyms comma-separated), read from the package's
    `imagenet_classes.txt` (see its header for the source)."""
    lines = IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    names = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    if len(names) != 1000:
        raise RuntimeError(f"{IMAGENET_CLASSES_FILE} holds {len(names)} class names, expected 1000.")
    return names


def published_pipeline_metadata(
    architecture: str,
    condition: str,
    *,
    num_classes: int | None = None,
    model_size: str | None = None,
    image_size: int | None = None,
    converted_from: str | None = None,
) -> dict[str, Any]:
    """`sampling_defaults`, `id2label` and `model_card_info` for a pipeline converted from a published NAR
    (`architecture="nar"`) or LlamaGen (`"raster"`) checkpoint; keyword arguments of the pipeline constructor.

    Class-to-image models with 1000 classes (the ImageNet models) get the ImageNet class names.
    """
    if (architecture, condition) not in PUBLISHED_SAMPLING:
        raise ValueError(
            f"No published sampling settings for architecture {architecture!r} with {condition!r} conditioning; "
            f"known: {sorted(PUBLISHED_SAMPLING)}."
        )
    sampling = dict(PUBLISHED_SAMPLING[(architecture, condition)])
    family = FAMILY_NAMES[architecture]
    size = f" {model_size}" if model_size else ""
    pixels = f" at {image_size} x {image_size} px" if image_size else ""
    imagenet = condition == "class" and num_classes == 1000
    if condition == "class":
        data = "ImageNet class-to-image" if imagenet else "class-to-image"
        fid = NAR_FID_GUIDANCE if architecture == "nar" else LLAMAGEN_FID_GUIDANCE.get(model_size or "")
        fid_note = (
            f" The published FID evaluation sampled with guidance {fid} and top-k 0 (pass `guidance_scale={fid}, "
            "top_k=0` to reproduce it)."
            if fid is not None
            else " The published FID evaluation sampled with top-k 0 and a lower guidance scale (1.65 to 2.0 by size)."
        )
    else:
        data, fid_note = "text-to-image", ""
    summary = (
        f"The published {family}{size} {data} model ({PAPERS[architecture]}){pixels}, converted to diffusers with "
        f"nar-diffusers. Its sampling defaults are those of {family}'s published sampling script "
        f"(guidance {sampling['guidance_scale']}, top-k {sampling['top_k'] or 'off'}).{fid_note} License: that of "
        "the published weights."
    )
    info: dict[str, Any] = {"summary": summary, "license": "other"}
    if converted_from:
        info["converted_from"] = converted_from
    return {
        "sampling_defaults": sampling,
        "id2label": dict(enumerate(imagenet_class_names())) if imagenet else None,
        "model_card_info": info,
    }
