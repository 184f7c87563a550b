"""Sample grids: one row of generated images (or clips) per class label or prompt, for validation during training.

Images become one PNG grid; videos become an animated GIF of the clips tiled the same way, plus a PNG strip that
shows every clip's frames left to right.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ..pipelines.pipeline_nar import NARPipeline
from ..pipelines.pipeline_nar_video import NARVideoPipeline
from ..utils.image_utils import image_grid
from ..utils.video_utils import video_grid, video_strip, write_video


def _sample_conditions(
    class_labels: Sequence[int] | None,
    prompts: Sequence[str] | None,
    prompt_embeds: torch.Tensor | None,
    prompt_attention_mask: torch.Tensor | None,
) -> tuple[int, dict[str, Any]]:
    """`(rows, pipeline keyword arguments)` of the conditions, one row each."""
    if class_labels is not None:
        return len(class_labels), {"class_labels": list(class_labels)}
    if prompts is not None:
        return len(prompts), {"prompt": list(prompts)}
    if prompt_embeds is not None:
        return prompt_embeds.shape[0], {"prompt_embeds": prompt_embeds, "prompt_attention_mask": prompt_attention_mask}
    raise ValueError("Pass `class_labels`, `prompts` or `prompt_embeds`.")


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
    rows, condition = _sample_conditions(class_labels, prompts, prompt_embeds, prompt_attention_mask)
    images = pipeline(
        **condition, num_images_per_prompt=images_per_condition, generator=generator, output_type="pil", **call_kwargs
    ).images
    return image_grid(images, rows, scale=scale)


def generate_sample_videos(
    pipeline: NARVideoPipeline,
    videos_per_condition: int,
    class_labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    prompt_attention_mask: torch.Tensor | None = None,
    seed: int = 0,
    **call_kwargs,
) -> tuple[list[list[Image.Image]], int]:
    """Generate `videos_per_condition` clips for every condition; returns `(clips, rows)`, clips condition-major."""
    device = pipeline._execution_device
    generator = torch.Generator(device=device).manual_seed(seed)
    rows, condition = _sample_conditions(class_labels, prompts, prompt_embeds, prompt_attention_mask)
    videos = pipeline(
        **condition, num_videos_per_prompt=videos_per_condition, generator=generator, output_type="pil", **call_kwargs
    ).frames
    return videos, rows


def save_sample_videos(
    videos: Sequence[Sequence[Image.Image]], rows: int, path_stem: str, scale: int = 1, fps: float = 4
) -> tuple[str, str]:
    """Write `<path_stem>.gif` (the clips tiled, one row per condition, animated) and `<path_stem>.png` (every clip's
    frames left to right, the clips of one condition after each other); returns both paths."""
    gif = write_video(video_grid(videos, rows, scale=scale, padding=2), f"{path_stem}.gif", fps=fps)
    png = f"{path_stem}.png"
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    tmp = f"{png}.tmp.png"
    video_strip(videos, rows, scale=scale).save(tmp)
    os.replace(tmp, png)
    return gif, png
