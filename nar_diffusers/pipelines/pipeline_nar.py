"""Class- and text-to-image generation with a NAR (or raster LlamaGen) transformer and a VQ tokenizer."""

from __future__ import annotations

import math
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
from ..models.vq_codec import decode_tokens_to_images, vq_downsample_factor
from ..schedulers.sampling import is_int, is_real, validate_sampling_args
from ..schedulers.scheduling_autoregressive import AutoregressiveScheduler
from .text_encoding import encode_captions

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class NonFiniteLogitsError(RuntimeError):
    """The transformer produced NaN or inf logits during generation (the message names the likely causes)."""


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
        negative_prompt_attention_mask,
        height,
        width,
        guidance_scale,
        cfg_interval,
        temperature,
        top_k,
        top_p,
        num_images_per_prompt,
        generator,
        max_sequence_length,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Raise a ValueError naming the argument and its allowed values before any model runs.

        Python and NumPy numbers are accepted alike wherever an int or a float is.
        """
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

        if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an int >= 1, got {num_images_per_prompt!r}.")
        text_args = {"prompt": prompt, "negative_prompt": negative_prompt, "prompt_embeds": prompt_embeds,
                     "prompt_attention_mask": prompt_attention_mask, "negative_prompt_embeds": negative_prompt_embeds,
                     "negative_prompt_attention_mask": negative_prompt_attention_mask}
        if self.transformer.condition_type == "class":
            given = [name for name, value in text_args.items() if value is not None]
            if given:
                raise ValueError(f"This is a class-conditional model: {given} are not accepted; pass `class_labels`.")
            batch_size = self._check_class_labels(class_labels)
        else:
            batch_size = self._check_text_inputs(class_labels, max_sequence_length, **text_args)

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
        if not is_real(guidance_scale) or guidance_scale < 0:
            raise ValueError(
                f"`guidance_scale` must be a finite number >= 0 (> 1 enables guidance), got {guidance_scale!r}."
            )
        if not is_int(cfg_interval) or cfg_interval < -1:
            raise ValueError(f"`cfg_interval` must be an int >= -1 (-1 = guide every step), got {cfg_interval!r}.")
        validate_sampling_args(temperature, top_k, top_p)
        num_images = batch_size * num_images_per_prompt
        if isinstance(generator, (list, tuple)):
            if len(generator) != num_images or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(
                    f"`generator` is a list of {len(generator)} item(s), but {num_images} images are generated: pass "
                    f"one torch.Generator, or a list of exactly {num_images} torch.Generator (one per image)."
                )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                "`generator` must be None, a torch.Generator (e.g. torch.Generator().manual_seed(0)), or a list "
                f"with one torch.Generator per image, got {type(generator).__name__} {generator!r}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(
                "`callback_on_step_end` must be None or a callable `f(pipe, step, timestep, callback_kwargs)` "
                f"returning a dict, got {type(callback_on_step_end).__name__}."
            )
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}.")

    def _check_class_labels(self, class_labels) -> int:
        """Validate `class_labels` for a class-conditional model; return how many labels there are."""
        num_classes = self.transformer.config.num_classes
        allowed = f"an int in [0, {num_classes - 1}], a non-empty list of such ints, or a 1-D integer tensor/array"
        if class_labels is None:
            raise ValueError(f"This is a class-conditional model: `class_labels` is required ({allowed}).")
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            if isinstance(class_labels, np.ndarray):
                integer = np.issubdtype(class_labels.dtype, np.integer)
            else:
                dtype = class_labels.dtype
                integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
            if not integer or class_labels.ndim > 1 or math.prod(class_labels.shape) == 0:
                raise ValueError(
                    f"`class_labels` must be {allowed}, got a {type(class_labels).__name__} of {class_labels.dtype} "
                    f"with shape {tuple(class_labels.shape)}."
                )
            labels = torch.as_tensor(class_labels).reshape(-1)
        elif is_int(class_labels):
            labels = torch.tensor([int(class_labels)])
        elif isinstance(class_labels, (list, tuple)) and class_labels and all(is_int(c) for c in class_labels):
            labels = torch.tensor([int(c) for c in class_labels])
        else:
            raise ValueError(f"`class_labels` must be {allowed}, got {class_labels!r}.")
        if bool((labels < 0).any() or (labels >= num_classes).any()):
            raise ValueError(f"`class_labels` must be in [0, {num_classes - 1}], got {labels.tolist()}.")
        return labels.numel()

    def _check_text_inputs(
        self, class_labels, max_sequence_length, prompt, negative_prompt, prompt_embeds, prompt_attention_mask,
        negative_prompt_embeds, negative_prompt_attention_mask,
    ) -> int:
        """Validate the text condition of a text-conditional model; return the number of prompts."""
        num_cond = self.transformer.num_condition_tokens
        if class_labels is not None:
            raise ValueError("This is a text-conditional model: pass `prompt` or `prompt_embeds`, not `class_labels`.")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("A text-conditional model needs exactly one of `prompt` or `prompt_embeds`.")
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and value and all(isinstance(p, str) for p in value)
            ):
                raise ValueError(f"`{name}` must be a string or a non-empty list of strings, got {value!r}.")
        if prompt is not None and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(
                "`prompt` needs the pipeline's `text_encoder` and `tokenizer`; load them or pass `prompt_embeds`."
            )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
        if negative_prompt is not None and prompt is None:
            raise ValueError("`negative_prompt` needs `prompt`; with `prompt_embeds` pass `negative_prompt_embeds`.")

        expected = (num_cond, self.transformer.config.caption_dim)
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is None:
                continue
            if not isinstance(embeds, torch.Tensor) or not embeds.dtype.is_floating_point:
                raise ValueError(f"`{name}` must be a floating-point torch.Tensor, got {type(embeds).__name__}.")
            if embeds.dim() != 3 or tuple(embeds.shape[1:]) != expected or embeds.shape[0] == 0:
                raise ValueError(
                    f"`{name}` must have shape (batch >= 1, {expected[0]}, {expected[1]}), got {tuple(embeds.shape)}."
                )
            if not bool(torch.isfinite(embeds).all()):
                raise ValueError(f"`{name}` contains NaN or inf values; every entry must be finite.")
        for name, mask, embeds_name, embeds in (
            ("prompt_attention_mask", prompt_attention_mask, "prompt_embeds", prompt_embeds),
            ("negative_prompt_attention_mask", negative_prompt_attention_mask, "negative_prompt_embeds",
             negative_prompt_embeds),
        ):
            if mask is None:
                continue
            if embeds is None:
                raise ValueError(f"`{name}` goes with `{embeds_name}`; pass both or neither.")
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"`{name}` must be a torch.Tensor of shape (batch, num_tokens) = {tuple(embeds.shape[:2])} like "
                    f"`{embeds_name}` (True/1 = valid token), got {shape}."
                )

        if prompt is not None:
            batch, batch_name = (1 if isinstance(prompt, str) else len(prompt)), "`prompt`"
        else:
            batch, batch_name = prompt_embeds.shape[0], "`prompt_embeds`"
        if negative_prompt is not None:
            negative_batch = 1 if isinstance(negative_prompt, str) else len(negative_prompt)
            if negative_batch not in (1, batch):
                raise ValueError(
                    f"`negative_prompt` has {negative_batch} entries but {batch_name} has {batch}: give one or as many."
                )
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != batch:
            raise ValueError(
                f"`negative_prompt_embeds` has batch size {negative_prompt_embeds.shape[0]} but {batch_name} has "
                f"{batch}: they must match."
            )
        if max_sequence_length is not None and (
            not is_int(max_sequence_length) or not 1 <= max_sequence_length <= num_cond
        ):
            raise ValueError(f"`max_sequence_length` must be an int in [1, {num_cond}], got {max_sequence_length!r}.")
        return batch

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
        class_labels: int | list[int] | torch.LongTensor | np.ndarray | None = None,
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
            class_labels: class indices (class-conditional models): an int, a list of ints, or a 1-D integer
                tensor / NumPy array.
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
                forward pass; `callback_kwargs["tokens"]` is that step's own `(batch, h, w)` grid (a new tensor
                every step, safe to keep), -1 where not generated yet. It returns a dict; `{"tokens": grid}`
                replaces the grid (same shape, integer ids in [-1, vocab_size - 1], generated cells >= 0).

        Raises:
            `ValueError` for invalid arguments (before any model runs); `NonFiniteLogitsError` when the transformer
            produced NaN/inf logits (float16 overflow, NaN weights or embeddings).

        Returns:
            [`~diffusers.ImagePipelineOutput`] (or a tuple with the images when `return_dict=False`).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            class_labels=class_labels, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            prompt_attention_mask=prompt_attention_mask, negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_attention_mask=negative_prompt_attention_mask, height=height, width=width,
            guidance_scale=guidance_scale, cfg_interval=cfg_interval, temperature=temperature, top_k=top_k,
            top_p=top_p, num_images_per_prompt=num_images_per_prompt, generator=generator,
            max_sequence_length=max_sequence_length, output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        # NumPy numbers passed the checks like Python ones; use Python ones from here on.
        height, width, max_sequence_length = (
            None if value is None else int(value) for value in (height, width, max_sequence_length)
        )
        cfg_interval, top_k, num_images_per_prompt = int(cfg_interval), int(top_k), int(num_images_per_prompt)
        guidance_scale, temperature, top_p = float(guidance_scale), float(temperature), float(top_p)
        self._guidance_scale = guidance_scale
        device = self._execution_device

        # 1. Condition (and the unconditional branch for guidance).
        cond, uncond, batch_size = self._prepare_condition(
            class_labels, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
            negative_prompt_attention_mask, num_images_per_prompt, max_sequence_length, truncation, device,
        )
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
        # Per step, whether any logit was NaN/inf: filled on the device, read once after the loop (no sync per step).
        nonfinite_steps = torch.zeros(len(self.scheduler), dtype=torch.bool, device=device)
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
                nonfinite_steps[i] = ~torch.isfinite(logits).all()
                # `step` returns a new grid, so a grid handed to a callback keeps -1 where later steps write.
                tokens = self.scheduler.step(
                    logits, t, tokens, temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                    generator=generator,
                ).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    if not isinstance(callback_outputs, dict):
                        raise TypeError(
                            "`callback_on_step_end` must return a dict (`{}`, or `{\"tokens\": grid}` to replace the "
                            f"grid), got {type(callback_outputs).__name__}."
                        )
                    if "tokens" in callback_outputs:
                        tokens = self._check_callback_tokens(callback_outputs.pop("tokens"), tokens, i)
                progress_bar.update()

        if bool(nonfinite_steps.any()):
            self.maybe_free_model_hooks()
            raise NonFiniteLogitsError(self._nonfinite_message(nonfinite_steps))

        # 4. Tokens -> pixels.
        if output_type == "latent":
            images = tokens
        else:
            images = self.image_processor.postprocess(self.decode_tokens(tokens), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _nonfinite_message(self, nonfinite_steps: torch.BoolTensor) -> str:
        steps = nonfinite_steps.nonzero().flatten().tolist()
        shown = ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")
        return (
            f"The transformer produced NaN or inf logits at {len(steps)} of {len(nonfinite_steps)} steps (step "
            f"{shown}), so no valid tokens could be drawn. Likely causes: float16 overflow (load the transformer "
            "in torch.bfloat16 or torch.float32), NaN/inf weights (e.g. a LoRA adapter from a diverged training "
            "run; check `torch.isfinite(p).all()` over `pipe.transformer.parameters()`), NaN/inf in "
            "`prompt_embeds` / `negative_prompt_embeds`, or a `guidance_scale` so large that the guided logits "
            "overflow."
        )

    def _check_callback_tokens(
        self, new_tokens: Any, tokens: torch.LongTensor, step_index: int
    ) -> torch.LongTensor:
        """Validate a grid returned by `callback_on_step_end` at `step_index`; return it as a long tensor."""
        where = f"`callback_on_step_end` returned `tokens` at step {step_index}"
        if not isinstance(new_tokens, torch.Tensor):
            raise TypeError(f"{where} as {type(new_tokens).__name__}; it must be a torch.Tensor.")
        dtype = new_tokens.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(f"{where} of dtype {dtype}; it must be an integer tensor (token ids, -1 = not generated).")
        if new_tokens.shape != tokens.shape:
            raise ValueError(
                f"{where} of shape {tuple(new_tokens.shape)}; it must keep the grid's shape {tuple(tokens.shape)}."
            )
        new_tokens = new_tokens.to(device=tokens.device, dtype=torch.long)
        vocab_size = self.transformer.config.vocab_size
        # `tokens` is the pipeline's own grid: every cell generated so far holds an id >= 0 there.
        out_of_range = (new_tokens < -1) | (new_tokens >= vocab_size) | ((new_tokens < 0) & (tokens >= 0))
        if bool(out_of_range.any()):
            raise ValueError(
                f"{where} with ids outside the allowed range: every cell must be in [-1, {vocab_size - 1}], and the "
                f"cells generated so far (steps 0-{step_index}) in [0, {vocab_size - 1}]; -1 marks cells not "
                "generated yet."
            )
        return new_tokens

    def decode_tokens(self, tokens: torch.LongTensor) -> torch.Tensor:
        """Decode a `(batch, h, w)` token grid with the VQ model into float32 images in [-1, 1], upcasting a
        float16 VQ model when its config asks (`force_upcast`); the VQ model gets its dtype back even on errors."""
        vqvae = self.vqvae
        upcast = vqvae.dtype == torch.float16 and vqvae.config.force_upcast
        if upcast:
            vqvae.to(torch.float32)
        try:
            images = decode_tokens_to_images(vqvae, tokens)
        finally:
            if upcast:
                vqvae.to(torch.float16)
        return images.float()
