"""Sample grids: one row of generated images per class label or prompt, for validation during training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ..pipelines.pipeline_nar import NARPipeline
from ..utils.image_utils import image_grid


def generate_sample_grid(
    pipeline: NARPipeline,
    images_per_condition: int,
    class_labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    prompt_attention_mask: torch.Tensor | None = None,
    seed: int = 0,
    scale: int = 1,
    **call_kwargs,
) -> Image.Image:
    """Generate `images_per_condition` images for every class label / prompt / caption embedding and lay them out
    one row per condition.

    Args:
        pipeline: The pipeline to sample from.
        images_per_condition: Columns of the grid.
        class_labels, prompts, prompt_embeds (+ prompt_attention_mask): the conditions, one row each.
        seed: Seeds a `torch.Generator` on the pipeline's device.
        scale: Nearest-neighbour upscaling of the grid (small images are easier to inspect).
        call_kwargs: Passed to the pipeline (guidance_scale, temperature, top_k, ...).
    """
    device = pipeline._execution_device
    generator = torch.Generator(device=device).manual_seed(seed)
    if class_labels is not None:
        rows, condition = len(class_labels), {"class_labels": list(class_labels)}
    elif prompts is not None:
        rows, condition = len(prompts), {"prompt": list(prompts)}
    elif prompt_embeds is not None:
        rows = prompt_embeds.shape[0]
        condition = {"prompt_embeds": prompt_embeds, "prompt_attention_mask": prompt_attention_mask}
    else:
        raise ValueError("Pass `class_labels`, `prompts` or `prompt_embeds`.")
    images = pipeline(
        **condition, num_images_per_prompt=images_per_condition, generator=generator, output_type="pil", **call_kwargs
    ).images
    return image_grid(images, rows, scale=scale)
