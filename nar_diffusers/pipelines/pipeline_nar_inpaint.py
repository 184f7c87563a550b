"""Inpainting and outpainting with a NAR image model: keep the tokens of an image outside a mask, generate the rest.

The image is tokenized with the pipeline's VQ model, the tokens under the mask are marked unknown (-1), and
`NARPipeline`'s step loop completes the grid (`tokens=`): when a step reaches a known cell, the known token is written
and fed instead of a drawn one. The plane order and the KV cache stay as they are, so any mask works, but a known cell
only informs the cells generated AFTER it: NAR grows the image from the top-left corner outward, one anti-diagonal
(Manhattan plane) per forward pass, and never looks ahead. Context below or to the right of a masked region is
therefore not used to fill it; results are best when the kept region comes first (the top-left, the top rows or the
left columns), e.g. completing the bottom half of an image, or outpainting to the right and below.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import logging

from ..models.vq_codec import encode_images_to_tokens
from ..schedulers.sampling import is_int
from ..utils.image_utils import images_to_tensor
from .pipeline_nar import NARPipeline

logger = logging.get_logger(__name__)

__all__ = ["NARInpaintPipeline"]


def mask_to_tensor(mask_image: Any) -> torch.BoolTensor:
    """A mask input as a `(B, H, W)` bool tensor, True = regenerate (white).

    Accepted: a PIL image (any mode, converted to grayscale) or a list of them; a NumPy array or torch tensor
    `(H, W)`, `(B, H, W)`, `(B, H, W, 1)` (NumPy) or `(B, 1, H, W)` (torch) of bools, uint8 (0-255) or floats in
    [0, 1]. A value >= 0.5 (128 for 8 bits) is white, as diffusers binarizes masks.
    """
    if isinstance(mask_image, (PIL.Image.Image, list, tuple)):
        return images_to_tensor(mask_image, 1, "mask_image")[:, 0] >= 0.5
    if not isinstance(mask_image, (np.ndarray, torch.Tensor)):
        raise ValueError(
            "`mask_image` must be a PIL image, a list of PIL images, a NumPy array or a torch tensor (white / 1 = "
            f"regenerate), got {type(mask_image).__name__}."
        )
    mask = torch.from_numpy(np.ascontiguousarray(mask_image)) if isinstance(mask_image, np.ndarray) else mask_image
    mask = mask.detach().cpu()
    if mask.ndim == 4 and isinstance(mask_image, np.ndarray) and mask.shape[-1] == 1:
        mask = mask[..., 0]
    elif mask.ndim == 4 and isinstance(mask_image, torch.Tensor) and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[0] == 0:
        raise ValueError(
            f"`mask_image` must have one channel: (H, W), (B, H, W), or (B, H, W, 1) for NumPy / (B, 1, H, W) for "
            f"torch, got shape {tuple(mask_image.shape)}."
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype == torch.uint8:
        return mask >= 128
    if mask.dtype.is_floating_point and bool(torch.isfinite(mask).all()):
        if 0 <= float(mask.min()) and float(mask.max()) <= 1:
            return mask >= 0.5
    raise ValueError(f"`mask_image` must hold bools, uint8 (0-255) or floats in [0, 1], got {mask.dtype} values.")


def snap_mask_to_tokens(mask: torch.BoolTensor, image_size: tuple[int, int], factor: int) -> torch.BoolTensor:
    """The rule from a mask to the token grid: `(B, H, W)` -> `(B, H / factor, W / factor)`, True = regenerate.

    A pixel mask (the image's size) regenerates a token when ANY pixel of its `factor x factor` patch is masked, so a
    kept token never shows masked pixels; a token-grid mask (`(H / factor, W / factor)`) is used as it is. Any other
    size is a ValueError.
    """
    height, width = image_size
    grid = (height // factor, width // factor)
    size = tuple(mask.shape[-2:])
    if size == (height, width):
        return F.max_pool2d(mask[:, None].float(), factor)[:, 0] > 0
    if size == grid:
        return mask.clone()
    raise ValueError(
        f"`mask_image` is {size[0]}x{size[1]} (height x width): it must be the image's size {height}x{width} (pixels; "
        f"a token is regenerated when any pixel of its {factor}x{factor} patch is white) or the token grid's "
        f"{grid[0]}x{grid[1]} (one value per token)."
    )


class NARInpaintPipeline(NARPipeline):
    r"""Inpainting and outpainting: keep an image's tokens outside `mask_image`, generate the tokens under it.

    Same components, saving, loading, conditions and sampling arguments as [`NARPipeline`] (it is one, with
    `image` and `mask_image` added). Following diffusers' inpainting convention, white (>= 0.5) in `mask_image` means
    "regenerate" and black means "keep".

    How a mask becomes tokens: the image is encoded with the VQ model into a `(H / f, W / f)` grid (f = the VQ
    factor, `vq_scale_factor`); a token is regenerated when ANY pixel of its `f x f` patch is white (a pixel mask is
    snapped outward to whole tokens, so a kept token never contains masked pixels), or `mask_image` may be given
    directly at the token grid's size. Nothing is resized: the image's sides must be multiples of f, and the mask
    must have the image's size or the grid's, otherwise a ValueError says which.

    What the model sees: NAR generates the grid from the top-left corner outward, one anti-diagonal per forward pass.
    A kept token is written and fed when its step comes, so it informs every token generated after it, but never a
    token generated before it: context below or to the right of a masked region is not used to fill it. Keep the
    known region first (top-left / top rows / left columns) for the best results; outpainting to the right and below
    an image placed at the top-left is the natural use (`outpaint_canvas`).

    Outpainting recipe:

    ```py
    canvas, mask = NARInpaintPipeline.outpaint_canvas(image, canvas_size=(256, 384), position=(0, 0))
    wider = pipe(image=canvas, mask_image=mask, class_labels=[207]).images[0]
    ```
    """

    _hub_module_name = "pipeline_nar_inpaint"

    # --- images and masks ----------------------------------------------------------------------------

    @staticmethod
    def outpaint_canvas(
        image: PIL.Image.Image,
        canvas_size: tuple[int, int],
        position: tuple[int, int] = (0, 0),
        fill: int | tuple[int, ...] = 128,
    ) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        """A larger canvas with `image` placed in it, and the mask that regenerates everything else (outpainting).

        Args:
            image: the source (PIL), kept as its tokens.
            canvas_size: `(height, width)` of the result in pixels, multiples of the VQ factor.
            position: `(top, left)` of the image in the canvas; the default, the top-left corner, is where NAR starts
                and gives the best results (everything generated then sees the source). Multiples of the VQ factor
                keep every token of the source; otherwise the tokens it covers only partly are regenerated.
            fill: the colour of the empty canvas (it is masked, so it only shows in the mask preview).

        Returns:
            `(canvas, mask_image)`: the canvas in `image`'s mode and an "L" mask, white (255) outside the source.
        """
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"`image` must be a PIL image, got {type(image).__name__}.")
        for name, value in (("canvas_size", canvas_size), ("position", position)):
            if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(is_int(v) for v in value):
                raise ValueError(f"`{name}` must be a pair of ints (height, width) / (top, left), got {value!r}.")
        (height, width), (top, left) = (int(v) for v in canvas_size), (int(v) for v in position)
        if top < 0 or left < 0 or top + image.height > height or left + image.width > width:
            raise ValueError(
                f"The {image.height}x{image.width} `image` at `position` ({top}, {left}) does not fit inside the "
                f"{height}x{width} `canvas_size`: it needs 0 <= top <= {height - image.height} and 0 <= left <= "
                f"{width - image.width}."
            )
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        if image.mode == "RGB" and isinstance(fill, int):
            fill = (fill,) * 3
        canvas = PIL.Image.new(image.mode, (width, height), fill)
        canvas.paste(image, (left, top))
        mask = PIL.Image.new("L", (width, height), 255)
        mask.paste(0, (left, top, left + image.width, top + image.height))
        return canvas, mask

    def prepare_known_tokens(self, image: Any, mask_image: Any) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Tokenize `image` and apply `mask_image` (the rule in the class docstring).

        Returns:
            `(tokens, token_mask)`: the `(B, h, w)` token grid with -1 where `token_mask` (`(B, h, w)`, True =
            regenerate) is set, on the pipeline's device; B is the larger of the image and mask batches (one of them
            may hold a single item, used for all).
        """
        return self._encode_known_tokens(*self._check_image_and_mask(image, mask_image))

    def _encode_known_tokens(
        self, pixels: torch.Tensor, token_mask: torch.BoolTensor
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        device = self._execution_device
        tokens = encode_images_to_tokens(self.vqvae, pixels.to(device) * 2 - 1)
        token_mask = token_mask.to(device)
        batch = max(tokens.shape[0], token_mask.shape[0])
        tokens, token_mask = tokens.expand(batch, -1, -1), token_mask.expand(batch, -1, -1)
        return torch.where(token_mask, -1, tokens), token_mask.clone()

    def _check_image_and_mask(self, image: Any, mask_image: Any) -> tuple[torch.Tensor, torch.BoolTensor]:
        """`image` as `(B, C, H, W)` in [0, 1] and the snapped token mask `(B', h, w)`; ValueErrors name the
        argument (format, sizes not multiples of the VQ factor, a mask of another size, batch sizes)."""
        if image is None or mask_image is None:
            missing = [name for name, value in (("image", image), ("mask_image", mask_image)) if value is None]
            raise ValueError(
                f"{NARInpaintPipeline.__name__} needs `image` and `mask_image` (white = regenerate); missing: "
                f"{', '.join(missing)}. (To complete a token grid directly, pass `tokens` instead.)"
            )
        pixels = images_to_tensor(image, self.vqvae.config.in_channels, "image")
        height, width = pixels.shape[-2:]
        factor = self.vq_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"`image` is {height}x{width} pixels (height x width): both must be multiples of the VQ factor "
                f"{factor}, since every token covers {factor}x{factor} pixels. Resize or crop it first (nothing is "
                "resized here), e.g. to "
                f"{max(factor, height // factor * factor)}x{max(factor, width // factor * factor)}."
            )
        limit = tuple(self.transformer.config.grid_size)
        if height // factor > limit[0] or width // factor > limit[1]:
            raise ValueError(
                f"`image` is {height}x{width} pixels, larger than the model generates: at most "
                f"{limit[0] * factor}x{limit[1] * factor} ({limit[0]}x{limit[1]} tokens of {factor} pixels)."
            )
        token_mask = snap_mask_to_tokens(mask_to_tensor(mask_image), (height, width), factor)
        if token_mask.shape[0] not in (1, pixels.shape[0]) and pixels.shape[0] != 1:
            raise ValueError(
                f"`mask_image` holds {token_mask.shape[0]} masks for {pixels.shape[0]} images: give one mask for all "
                "of them or one per image."
            )
        return pixels, token_mask

    # --- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: Any = None,
        mask_image: Any = None,
        class_labels: int | list[int] | torch.LongTensor | np.ndarray | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        cfg_interval: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool = True,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        max_sequence_length: int | None = None,
        truncation: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["tokens"],
        tokens: torch.LongTensor | np.ndarray | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        kv_cache_dtype: torch.dtype | str | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Regenerate the masked part of an image (inpainting; outpainting with `outpaint_canvas`).

        Args:
            image: the image(s) to edit: a PIL image or a list of them, a NumPy array `(H, W, C)` / `(B, H, W, C)` or
                a torch tensor `(C, H, W)` / `(B, C, H, W)` in [0, 1]; H and W multiples of the VQ factor (16 for
                VQ-16), at most the model's grid; converted to the VQ model's channels. One image (edited for every
                output), one per class label / prompt, or one per output. The output has the image's size.
            mask_image: white / >= 0.5 = regenerate, black = keep; a PIL image (any mode) or list of them, or a
                one-channel array / tensor `(H, W)` / `(B, H, W)`; the image's size (a token is regenerated when any
                pixel of its patch is white) or the token grid's size (one value per token). One mask for every
                image or one per image.
            class_labels, prompt, ..., callback_on_step_end_tensor_inputs, kv_cache_dtype: as in
                [`NARPipeline.__call__`]; sampling settings the call omits come from the pipeline's `sampling_defaults`.
            tokens: instead of `image` and `mask_image`, a partial token grid (-1 = generate), as `NARPipeline` takes.

        Returns:
            [`~diffusers.ImagePipelineOutput`] (or a tuple with the images when `return_dict=False`); the kept
            tokens are exactly the image's tokens (their pixels are the VQ model's reconstruction of the image).
        """
        if tokens is not None and (image is not None or mask_image is not None):
            raise ValueError("Pass either `image` and `mask_image`, or `tokens` (a partial token grid), not both.")
        # 1. Check every input once, before the VQ encoder or any model runs.
        arguments = locals()
        condition = self.check_condition(arguments, "num_images_per_prompt")
        if tokens is None:
            pixels, token_mask = self._check_image_and_mask(image, mask_image)
            self._check_edit_batch(max(pixels.shape[0], token_mask.shape[0]), condition)
            grid = self.check_image_grid(*pixels.shape[-2:])
        else:
            grid = self.check_image_grid(None, None, tokens)
            self.check_partial_grid(tokens, grid, condition)
        settings = self.check_sampling(arguments, condition, "image")
        callback = self.check_output(output_type, callback_on_step_end, callback_on_step_end_tensor_inputs)
        kv_cache_dtype = self.check_kv_cache_dtype(kv_cache_dtype)

        # 2. Image -> tokens; the masked ones become unknown (-1). Then NARPipeline completes the grid.
        if tokens is None:
            known, _ = self._encode_known_tokens(pixels, token_mask)
            tokens = known[0] if known.shape[0] == 1 else known
        return self._generate_images(condition, settings, grid, tokens, callback, output_type, return_dict,
                                     attention_kwargs, kv_cache_dtype)  # fmt: skip

    @staticmethod
    def _check_edit_batch(batch: int, condition) -> None:
        total = condition.num_outputs
        if batch not in (1, condition.num_conditions, total):
            raise ValueError(
                f"`image` / `mask_image` hold {batch} images / masks: give 1 (edited for every output), "
                f"{condition.num_conditions} (one per class label / prompt) or {total} (one per output)."
            )
