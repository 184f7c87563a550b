"""Class- and text-to-image generation with a NAR (or raster LlamaGen) transformer and a VQ tokenizer."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import VQModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging

from ..loaders.lora_pipeline import NARLoraLoaderMixin
from ..models.transformer_nar import NARTransformer
from ..models.vq_codec import decode_tokens_to_images, vq_downsample_factor
from ..schedulers.sampling import validate_sampling_args
from ..schedulers.scheduling_autoregressive import AutoregressiveScheduler
from .text_encoding import encode_captions

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class NARPipeline(DiffusionPipeline, NARLoraLoaderMixin):
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
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["tokens"]

    def __init__(
        self,
        transformer: NARTransformer,
        vqvae: VQModel,
        scheduler: AutoregressiveScheduler,
        text_encoder: Any = None,
        tokenizer: Any = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, vqvae=vqvae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vq_scale_factor, do_normalize=True)

    @property
    def vq_scale_factor(self) -> int:
        """Pixels per token along each side (16 for the published VQ-16 tokenizer)."""
        vqvae = getattr(self, "vqvae", None)
        return vq_downsample_factor(vqvae) if vqvae is not None else 16

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    # --- inputs --------------------------------------------------------------------------------------

    def check_inputs(
        self,
        class_labels,
        prompt,
        negative_prompt,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt_embeds,
        height,
        width,
        guidance_scale,
        cfg_interval,
        temperature,
        top_k,
        top_p,
        num_images_per_prompt,
        max_sequence_length,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        config = self.transformer.config
        grid_rank = len(config.grid_size)
        if grid_rank != 2:
            raise ValueError(f"NARPipeline generates images: the transformer's grid_size must be 2-D, got {config.grid_size}.")
        if len(self.scheduler.grid_size) != grid_rank or self.scheduler.num_heads != config.num_decoding_heads:
            raise ValueError(
                f"`scheduler` {type(self.scheduler).__name__} with grid_size {self.scheduler.grid_size} drives "
                f"{self.scheduler.num_heads} decoding head(s) over a {len(self.scheduler.grid_size)}-D grid, but the "
                f"transformer has {config.num_decoding_heads} head(s) over a {grid_rank}-D grid. Use a "
                "NeighborScheduler for NAR transformers and a RasterScheduler for one-head (LlamaGen) transformers."
            )
        if not self.vqvae.config.lookup_from_codebook:
            raise ValueError("`vqvae` must be a VQModel with `lookup_from_codebook=True` to decode token ids.")

        text_args = {"prompt": prompt, "negative_prompt": negative_prompt, "prompt_embeds": prompt_embeds,
                     "negative_prompt_embeds": negative_prompt_embeds}
        if self.transformer.condition_type == "class":
            given = [name for name, value in text_args.items() if value is not None]
            if given:
                raise ValueError(f"This is a class-conditional model: {given} are not accepted; pass `class_labels`.")
            if class_labels is None:
                raise ValueError("This is a class-conditional model: `class_labels` is required.")
            labels = torch.as_tensor(class_labels)
            if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() > 1 or labels.numel() == 0:
                raise ValueError(f"`class_labels` must be an int or a non-empty 1-D sequence of ints, got {class_labels!r}.")
            if bool((labels < 0).any() or (labels >= config.num_classes).any()):
                raise ValueError(
                    f"`class_labels` must be in [0, {config.num_classes - 1}], got {labels.tolist()}."
                )
        else:
            self._check_text_inputs(
                class_labels, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                max_sequence_length,
            )

        factor = self.vq_scale_factor
        for name, value, limit in (("height", height, config.grid_size[0]), ("width", width, config.grid_size[1])):
            if value is None:
                continue
            if not isinstance(value, int) or value <= 0 or value % factor:
                raise ValueError(f"`{name}` must be a positive multiple of the VQ downsample factor {factor}, got {value!r}.")
            if value // factor > limit:
                raise ValueError(
                    f"`{name}` {value} is larger than the model's grid allows: at most {limit * factor} "
                    f"({limit} tokens x {factor} pixels)."
                )
        if not isinstance(guidance_scale, (int, float)) or math.isnan(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0 (> 1 enables guidance), got {guidance_scale!r}.")
        if not isinstance(cfg_interval, int) or cfg_interval < -1:
            raise ValueError(f"`cfg_interval` must be an int >= -1 (-1 = guide every step), got {cfg_interval!r}.")
        validate_sampling_args(temperature, top_k, top_p)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an int >= 1, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}.")

    def _check_text_inputs(
        self, class_labels, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
        max_sequence_length,
    ) -> None:
        num_cond = self.transformer.num_condition_tokens
        if class_labels is not None:
            raise ValueError("This is a text-conditional model: pass `prompt` or `prompt_embeds`, not `class_labels`.")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("A text-conditional model needs exactly one of `prompt` or `prompt_embeds`.")
        if prompt is not None:
            if not isinstance(prompt, str) and not (
                isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
            ):
                raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {type(prompt).__name__}.")
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError(
                    "`prompt` needs the pipeline's `text_encoder` and `tokenizer`; load them or pass `prompt_embeds`."
                )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
        if negative_prompt is not None:
            if prompt is None:
                raise ValueError("`negative_prompt` needs `prompt`; with `prompt_embeds` pass `negative_prompt_embeds`.")
            batch = 1 if isinstance(prompt, str) else len(prompt)
            negative_batch = 1 if isinstance(negative_prompt, str) else len(negative_prompt)
            if negative_batch not in (1, batch):
                raise ValueError(
                    f"`negative_prompt` has {negative_batch} entries but `prompt` has {batch}: give one or as many."
                )
        expected = (num_cond, self.transformer.config.caption_dim)
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (embeds.dim() != 3 or tuple(embeds.shape[1:]) != expected):
                raise ValueError(f"`{name}` must have shape (batch, {expected[0]}, {expected[1]}), got {tuple(embeds.shape)}.")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if negative_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
                raise ValueError("`negative_prompt_embeds` must have the same batch size as `prompt_embeds`.")
        if prompt_attention_mask is not None and (
            prompt_embeds is None or tuple(prompt_attention_mask.shape) != tuple(prompt_embeds.shape[:2])
        ):
            raise ValueError("`prompt_attention_mask` goes with `prompt_embeds` and must have shape (batch, num_tokens).")
        if max_sequence_length is not None and (
            not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= num_cond
        ):
            raise ValueError(f"`max_sequence_length` must be an int in [1, {num_cond}], got {max_sequence_length!r}.")

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
        device = device or self._execution_device
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds, mask = encode_captions(
            self.tokenizer, self.text_encoder, prompt, self.transformer.num_condition_tokens, max_sequence_length,
            truncation, device,
        )
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, mask.repeat_interleave(num_images_per_prompt, dim=0)

    def _prepare_condition(
        self, class_labels, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
        negative_prompt_attention_mask, num_images_per_prompt, max_sequence_length, truncation, device,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """Keyword arguments of `transformer.prefill` for the conditional and the unconditional branch."""
        transformer = self.transformer
        if transformer.condition_type == "class":
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
            labels = labels.repeat_interleave(num_images_per_prompt)
            return {"class_labels": labels}, transformer.null_condition(labels.shape[0], device), labels.shape[0]

        if prompt is not None:
            embeds, mask = self.encode_prompt(prompt, device, num_images_per_prompt, max_sequence_length, truncation)
        else:
            embeds = prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)
            mask = prompt_attention_mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
            mask = mask.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        batch = embeds.shape[0]
        if negative_prompt is not None:
            if not isinstance(negative_prompt, str) and len(negative_prompt) == 1:
                negative_prompt = negative_prompt[0]
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * (1 if isinstance(prompt, str) else len(prompt))
            neg_embeds, neg_mask = self.encode_prompt(
                negative_prompt, device, num_images_per_prompt, max_sequence_length, truncation
            )
        elif negative_prompt_embeds is not None:
            neg_embeds = negative_prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)
            neg_mask = negative_prompt_attention_mask
            neg_mask = torch.ones(neg_embeds.shape[:2], dtype=torch.bool) if neg_mask is None else neg_mask.bool()
            neg_mask = neg_mask.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        else:
            # The published behaviour: the learned unconditional caption, with the prompt's padding mask.
            neg_embeds = transformer.null_condition(batch, device)["encoder_hidden_states"]
            neg_mask = mask
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        uncond = {"encoder_hidden_states": neg_embeds.to(embeds.dtype), "encoder_attention_mask": neg_mask}
        return cond, uncond, batch

    # --- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.LongTensor | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float = 4.0,
        cfg_interval: int = -1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        do_sample: bool = True,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        max_sequence_length: int | None = None,
        truncation: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["tokens"],
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            class_labels: class indices (class-conditional models).
            prompt: text prompt(s) (text-conditional models); or precomputed `prompt_embeds` with
                `prompt_attention_mask` in the layout `encode_prompt` returns.
            negative_prompt / negative_prompt_embeds: replaces the learned unconditional caption in guidance.
            height, width: image size in pixels, multiples of the VQ factor; the token grid must fit the
                transformer's `grid_size`. Default: the scheduler's grid.
            guidance_scale: classifier-free guidance scale; > 1 enables guidance
                (`logits = uncond + scale * (cond - uncond)`).
            cfg_interval: -1 guides every step; otherwise steps that start with more than `cfg_interval`
                tokens already generated use the conditional logits only.
            temperature, top_k, top_p, do_sample: the token draw (`do_sample=False` is greedy argmax).
            num_images_per_prompt: images per class label / prompt.
            generator: a `torch.Generator`, or one per generated image.
            max_sequence_length: prompt tokens kept (default: the model's condition length, 120 published);
                `truncation=False` raises instead of truncating longer prompts.
            output_type: "pil", "np", "pt", or "latent" (the `(batch, h, w)` token grid in raster order).
            callback_on_step_end: called as `callback(pipe, step_index, timestep, callback_kwargs)` after each
                forward pass; `callback_kwargs["tokens"]` is the `(batch, h, w)` grid, -1 where not generated yet.

        Returns:
            [`~diffusers.ImagePipelineOutput`] (or a tuple with the images when `return_dict=False`).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            class_labels, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
            height, width, guidance_scale, cfg_interval, temperature, top_k, top_p, num_images_per_prompt,
            max_sequence_length, output_type, callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        device = self._execution_device

        # 1. Condition (and the unconditional branch for guidance).
        cond, uncond, batch_size = self._prepare_condition(
            class_labels, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
            negative_prompt_attention_mask, num_images_per_prompt, max_sequence_length, truncation, device,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)}, but {batch_size} images are generated.")
        if self.do_classifier_free_guidance:
            cond = {key: torch.cat([cond[key], uncond[key]]) for key in cond}

        # 2. Token grid and order.
        factor = self.vq_scale_factor
        default_grid = self.scheduler.grid_size
        grid = ((height // factor) if height else default_grid[0], (width // factor) if width else default_grid[1])
        self.transformer.check_grid(grid, "grid of (height, width)")
        self.scheduler.set_grid(grid, device=device)
        self._num_timesteps = len(self.scheduler)
        tokens = torch.full((batch_size, *grid), -1, dtype=torch.long, device=device)

        # 3. Prefill, then one forward pass per group of tokens.
        model_batch = batch_size * (2 if self.do_classifier_free_guidance else 1)
        coordinates = self.scheduler.coordinates[: self.scheduler.num_fed_tokens]
        kv_cache = self.transformer.init_kv_cache(model_batch, coordinates, device=device)
        with self.progress_bar(total=len(self.scheduler)) as progress_bar:
            for i, t in enumerate(self.scheduler.timesteps):
                if i == 0:
                    head_logits = self.transformer.prefill(kv_cache, **cond)
                else:
                    fed = self.scheduler.tokens_to_feed(tokens, i)
                    if self.do_classifier_free_guidance:
                        fed = torch.cat([fed, fed])
                    head_logits = self.transformer.decode(kv_cache, fed)
                logits = self.scheduler.mix_head_logits(head_logits, i)
                if self.do_classifier_free_guidance:
                    cond_logits, uncond_logits = logits.chunk(2)
                    if cfg_interval > -1 and self.scheduler.generated_before(i) > cfg_interval:
                        logits = cond_logits
                    else:
                        logits = uncond_logits + (cond_logits - uncond_logits) * guidance_scale
                tokens = self.scheduler.step(
                    logits, t, tokens, temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                    generator=generator,
                ).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    tokens = callback_outputs.pop("tokens", tokens)
                progress_bar.update()

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
        float16 VQ model when its config asks (`force_upcast`)."""
        vqvae = self.vqvae
        upcast = vqvae.dtype == torch.float16 and vqvae.config.force_upcast
        if upcast:
            vqvae.to(torch.float32)
        images = decode_tokens_to_images(vqvae, tokens)
        if upcast:
            vqvae.to(torch.float16)
        return images.float()
