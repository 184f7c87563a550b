"""Class- and text-to-image generation with a NAR (or raster LlamaGen) transformer and a VQ tokenizer."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import VQModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging

from ..loaders.lora_pipeline import NARLoraLoaderMixin
from ..models.transformer_nar import NARTransformer
from ..models.vq_codec import decode_tokens_to_images, upcast_for_decoding, vq_downsample_factor
from ..schedulers.sampling import is_int
from ..schedulers.scheduling_autoregressive import AutoregressiveScheduler
from .autoregressive_generation import (
    OUTPUT_TYPES,
    AutoregressiveGenerationMixin,
    NonFiniteLogitsError,
    with_common_arguments,
)
from .guarded_loading import GuardedLoadingMixin
from .pipeline_hub import Id2Label, NARHubMixin, SamplingDefaults

logger = logging.get_logger(__name__)

__all__ = ["NARPipeline", "NonFiniteLogitsError", "OUTPUT_TYPES"]


class NARPipeline(
    GuardedLoadingMixin, NARHubMixin, DiffusionPipeline, AutoregressiveGenerationMixin, NARLoraLoaderMixin
):
    r"""Generate images token grid by token grid: prefill the condition, then one forward pass per scheduler step.

    With a `NeighborScheduler` a `H x W` token grid takes `H + W - 1` passes (NAR); with a `RasterScheduler`
    and a one-head transformer it takes `H * W` (vanilla AR, LlamaGen).

    Args:
        transformer ([`NARTransformer`]): the token model (class- or text-conditional).
        vqvae ([`~diffusers.VQModel`]): the VQ tokenizer, with `lookup_from_codebook=True`; decodes token grids.
        scheduler ([`NeighborScheduler`] or [`RasterScheduler`]): the token order and the token draw.
        text_encoder ([`~transformers.T5EncoderModel`], *optional*): text models only.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): text models only.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    _hub_module_name = "pipeline_nar"
    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(
        self,
        transformer: NARTransformer,
        vqvae: VQModel,
        scheduler: AutoregressiveScheduler,
        text_encoder: Any = None,
        tokenizer: Any = None,
        sampling_defaults: SamplingDefaults | None = None,
        id2label: Id2Label | None = None,
        model_card_info: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, vqvae=vqvae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self._register_metadata(sampling_defaults, id2label, model_card_info)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vq_scale_factor, do_normalize=True)

    @property
    def vq_scale_factor(self) -> int:
        """Pixels per token along each side (16 for the published VQ-16 tokenizer)."""
        vqvae = getattr(self, "vqvae", None)
        return vq_downsample_factor(vqvae) if vqvae is not None else 16

    # --- inputs --------------------------------------------------------------------------------------

    def check_image_grid(self, height: Any, width: Any, tokens: Any = None) -> tuple[int, int]:
        """Check the model and the image size; return the `(h, w)` token grid to generate (from `height` / `width`,
        else a `tokens` grid, else the scheduler's grid). A ValueError names the argument and its allowed values."""
        self._check_token_model(2, "images (H, W)", "NARVideoPipeline")
        if not self.vqvae.config.lookup_from_codebook:
            raise ValueError("`vqvae` must be a VQModel with `lookup_from_codebook=True` to decode token ids.")
        config = self.transformer.config
        factor = self.vq_scale_factor
        for name, value, limit in (("height", height, config.grid_size[0]), ("width", width, config.grid_size[1])):
            if value is None:
                continue
            if not is_int(value) or value <= 0 or value % factor:
                raise ValueError(f"`{name}` must be a positive multiple of the VQ downsample factor {factor}, got {value!r}.")
            if value // factor > limit:
                raise ValueError(
                    f"`{name}` {value} is larger than the model's grid allows: at most {limit * factor} "
                    f"({limit} tokens x {factor} pixels)."
                )
        return self._token_grid(height, width, tokens)

    def _token_grid(self, height, width, tokens=None) -> tuple[int, int]:
        """The `(h, w)` token grid of a call: from `height` / `width` (checked multiples of the VQ factor), else
        from a `tokens` grid's last two sizes, else the scheduler's grid; a ValueError when they disagree."""
        factor = self.vq_scale_factor
        default = tuple(self.scheduler.grid_size)
        if isinstance(tokens, (torch.Tensor, np.ndarray)) and tokens.ndim in (2, 3):
            default = tuple(int(size) for size in tokens.shape[-2:])
            for name, value, size in (("height", height, default[0]), ("width", width, default[1])):
                if value is not None and int(value) != size * factor:
                    raise ValueError(
                        f"`{name}` {value} does not match the grid of `tokens` {default}: it must be {size * factor} "
                        f"({size} tokens x {factor} pixels), or None."
                    )
            limit = tuple(self.transformer.config.grid_size)
            if default[0] > limit[0] or default[1] > limit[1]:
                raise ValueError(
                    f"`tokens` has a {default[0]}x{default[1]} grid, larger than the model's grid_size {limit}."
                )
        return (
            int(height) // factor if height is not None else default[0],
            int(width) // factor if width is not None else default[1],
        )
    # --- conditions ----------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        truncation: bool = True,
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """Encode prompts with the T5 encoder into the transformer's left-padded condition layout.

        Returns `(prompt_embeds, prompt_attention_mask)` of shapes `(batch, num_condition_tokens, caption_dim)`
        and `(batch, num_condition_tokens)`: the valid tokens fill the LAST slots, padded rows are zero.
        """
        return self._encode_prompt(prompt, device, num_images_per_prompt, max_sequence_length, truncation)

    # --- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    @with_common_arguments
    def __call__(
        self,
        class_labels: int | list[int] | torch.LongTensor | np.ndarray | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
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
        attention_kwargs: dict[str, Any] | None = None,
        tokens: torch.LongTensor | np.ndarray | None = None,
        kv_cache_dtype: torch.dtype | str | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            {common_arguments}
            height, width: image size in pixels, multiples of the VQ factor; the token grid must fit the
                transformer's `grid_size`. Default: the scheduler's grid.
            num_images_per_prompt: images per class label / prompt.
            output_type: "pil", "np", "pt", or "latent" (the `(batch, h, w)` token grid in raster order).
            tokens: a partial token grid to complete (advanced use; `NARInpaintPipeline` makes one from an image and
                a mask): integer ids, -1 where a token is to be generated, of shape `(h, w)` (every image),
                `(num_labels_or_prompts, h, w)` or `(num_images, h, w)`; its grid sets `height` / `width`. A known
                cell is written and fed when its step comes instead of a drawn token; the plane order is unchanged,
                so a known cell only informs the cells generated after it (quality is best when the known region
                comes first in the order, e.g. the top-left). Every cell known: the grid is decoded as it is, no
                model runs.

        Raises:
            `ValueError` for invalid arguments (before any model runs); `NonFiniteLogitsError` when the transformer
            produced NaN/inf logits (float16 overflow, NaN weights or embeddings).

        Returns:
            [`~diffusers.ImagePipelineOutput`] (or a tuple with the images when `return_dict=False`).
        """
        # 1. Check every input once, before any model runs.
        arguments = locals()
        condition = self.check_condition(arguments, "num_images_per_prompt")
        grid = self.check_image_grid(height, width, tokens)
        self.check_partial_grid(tokens, grid, condition)
        settings = self.check_sampling(arguments, condition, "image")
        callback = self.check_output(output_type, callback_on_step_end, callback_on_step_end_tensor_inputs)
        kv_cache_dtype = self.check_kv_cache_dtype(kv_cache_dtype)
        return self._generate_images(condition, settings, grid, tokens, callback, output_type, return_dict,
                                     attention_kwargs, kv_cache_dtype)  # fmt: skip

    def _generate_images(
        self, condition, settings, grid, tokens, callback, output_type, return_dict, attention_kwargs,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Checked inputs -> images: encode the condition, generate the token grid, decode it."""
        device = self._execution_device
        # 2. The condition (and the unconditional branch for guidance), one row per image.
        encoded = self.encode_condition(condition, device)
        known_tokens = self.prepare_partial_grid(tokens, grid, condition, device)
        # 3. Prefill, then one forward pass per group of tokens.
        with self.lora_scale(attention_kwargs):
            tokens = self.generate_tokens(encoded, settings, grid, known_tokens, callback, "grid of (height, width)",
                                          kv_cache_dtype)  # fmt: skip
        # 4. Tokens -> pixels.
        if output_type == "latent":
            images = tokens
        else:
            images = self.image_processor.postprocess(self.decode_tokens(tokens), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def decode_tokens(self, tokens: torch.LongTensor) -> torch.Tensor:
        """Decode a `(batch, h, w)` token grid with the VQ model into float32 images in [-1, 1], upcasting a
        float16 VQ model when its config asks (`force_upcast`); the VQ model gets its dtype back even on errors."""
        with upcast_for_decoding(self.vqvae):
            images = decode_tokens_to_images(self.vqvae, tokens.clamp(min=0))  # -1 only after an interrupt
        return images.float()
