"""What every NAR pipeline does between its inputs and its token grid, written once.

`AutoregressiveGenerationMixin` holds the machinery `NARPipeline` (images) and `NARVideoPipeline` (videos) share:
checking the condition and the sampling settings, encoding the condition (class labels, prompts or prompt
embeddings, and the unconditional branch for guidance), and `generate_tokens`: the prefill, one forward pass per
scheduler step with classifier-free guidance and `cfg_interval`, the token draw, callbacks, the progress bar, and
the NaN/inf check. A pipeline adds only what is its own: its sizes, its tokenizer, and its post-processing.

The mixin expects the pipeline's components `transformer` (a `NARTransformer`), `scheduler` (an
`AutoregressiveScheduler`) and, for text models, `text_encoder` and `tokenizer`, plus `DiffusionPipeline`'s
`progress_bar` and `maybe_free_model_hooks`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import numpy as np
import torch

from ..schedulers.sampling import draw_uniforms, is_int, is_real, validate_sampling_args
from .text_encoding import encode_captions

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class NonFiniteLogitsError(RuntimeError):
    """The transformer produced NaN or inf logits during generation (the message names the likely causes)."""


class AutoregressiveGenerationMixin:
    """Condition checks and encoding, and the guided step loop, shared by the NAR image and video pipelines."""

    _callback_tensor_inputs = ["tokens"]

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @contextlib.contextmanager
    def lora_scale(self, attention_kwargs: dict[str, Any] | None):
        """Scale the transformer's LoRA layers by `attention_kwargs["scale"]` for the duration of a call."""
        attention_kwargs = attention_kwargs or {}
        unknown = sorted(set(attention_kwargs) - {"scale"})
        if unknown:
            raise ValueError(f"Unknown `attention_kwargs` {unknown}; NAR pipelines take `{{'scale': float}}` (LoRA scale).")
        scale = attention_kwargs.get("scale")
        if scale is None or not getattr(self.transformer, "peft_config", None):
            yield
            return
        if not is_real(scale):
            raise ValueError(f"`attention_kwargs['scale']` must be a finite number, got {scale!r}.")
        from diffusers.utils import scale_lora_layers, unscale_lora_layers

        scale_lora_layers(self.transformer, float(scale))
        try:
            yield
        finally:
            unscale_lora_layers(self.transformer, float(scale))

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. from `callback_on_step_end`) to stop after the current step: the grid
        keeps -1 where nothing was generated (decoded images show those cells as token 0)."""
        return getattr(self, "_interrupt", False)

    # --- checks --------------------------------------------------------------------------------------

    def _check_token_model(self, grid_rank: int, what: str, other_pipeline: str) -> None:
        """Raise a ValueError unless the transformer has a `grid_rank`-D grid and the scheduler drives its heads.

        Args:
            grid_rank: 2 for images, 3 for videos.
            what: what this pipeline generates, e.g. "images (H, W)".
            other_pipeline: the pipeline to use for the other rank, named in the message.
        """
        config = self.transformer.config
        rank = len(config.grid_size)
        if rank != grid_rank:
            raise ValueError(
                f"{type(self).__name__} generates {what}: the `transformer`'s grid_size must be {grid_rank}-D, got "
                f"{tuple(config.grid_size)}. Use {other_pipeline} for a {rank}-D transformer."
            )
        if len(self.scheduler.grid_size) != rank or self.scheduler.num_heads != config.num_decoding_heads:
            raise ValueError(
                f"`scheduler` {type(self.scheduler).__name__} with grid_size {self.scheduler.grid_size} drives "
                f"{self.scheduler.num_heads} decoding head(s) over a {len(self.scheduler.grid_size)}-D grid, but the "
                f"transformer has {config.num_decoding_heads} head(s) over a {rank}-D grid. Use a "
                "NeighborScheduler for NAR transformers and a RasterScheduler for one-head (LlamaGen) transformers."
            )

    def _check_condition_inputs(
        self,
        class_labels,
        prompt,
        negative_prompt,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        max_sequence_length,
        num_per_prompt,
        num_per_prompt_name: str,
    ) -> int:
        """Validate `num_per_prompt` and the condition (class labels or text); return the number of conditions."""
        if not is_int(num_per_prompt) or num_per_prompt < 1:
            raise ValueError(f"`{num_per_prompt_name}` must be an int >= 1, got {num_per_prompt!r}.")
        text_args = {"prompt": prompt, "negative_prompt": negative_prompt, "prompt_embeds": prompt_embeds,
                     "prompt_attention_mask": prompt_attention_mask, "negative_prompt_embeds": negative_prompt_embeds,
                     "negative_prompt_attention_mask": negative_prompt_attention_mask}  # fmt: skip
        if self.transformer.condition_type == "class":
            given = [name for name, value in text_args.items() if value is not None]
            if given:
                raise ValueError(f"This is a class-conditional model: {given} are not accepted; pass `class_labels`.")
            return self._check_class_labels(class_labels)
        return self._check_text_inputs(class_labels, max_sequence_length, **text_args)

    def _check_generation_settings(
        self,
        guidance_scale,
        cfg_interval,
        temperature,
        top_k,
        top_p,
        num_outputs: int,
        unit: str,
        generator,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Validate guidance, sampling, `generator` (one, or one per output), `output_type` and the callback.

        `num_outputs` is the number of images / videos generated, `unit` their name ("image", "video").
        """
        if not is_real(guidance_scale) or guidance_scale < 0:
            raise ValueError(
                f"`guidance_scale` must be a finite number >= 0 (> 1 enables guidance), got {guidance_scale!r}."
            )
        if not is_int(cfg_interval) or cfg_interval < -1:
            raise ValueError(f"`cfg_interval` must be an int >= -1 (-1 = guide every step), got {cfg_interval!r}.")
        validate_sampling_args(temperature, top_k, top_p)
        if isinstance(generator, (list, tuple)):
            if len(generator) != num_outputs or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(
                    f"`generator` is a list of {len(generator)} item(s), but {num_outputs} {unit}s are generated: "
                    f"pass one torch.Generator, or a list of exactly {num_outputs} torch.Generator (one per {unit})."
                )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                "`generator` must be None, a torch.Generator (e.g. torch.Generator().manual_seed(0)), or a list "
                f"with one torch.Generator per {unit}, got {type(generator).__name__} {generator!r}."
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

    def _check_known_tokens(
        self, tokens: Any, grid: tuple[int, ...], num_conditions: int, num_per_prompt: int, name: str = "tokens"
    ) -> None:
        """Validate a partial token grid (generation from known tokens); raise a ValueError naming `name`.

        Allowed: an integer `torch.Tensor` or NumPy array of token ids in [-1, vocab_size - 1] (-1 = unknown, to
        be generated) of shape `grid` (the same grid for every output), `(num_conditions, *grid)` (one per class
        label / prompt, repeated `num_per_prompt` times) or `(num_conditions * num_per_prompt, *grid)` (one per
        output).
        """
        if not isinstance(tokens, (torch.Tensor, np.ndarray)):
            raise ValueError(
                f"`{name}` must be a torch.Tensor or NumPy array of token ids (-1 = unknown cell, generated), got "
                f"{type(tokens).__name__}."
            )
        if isinstance(tokens, np.ndarray):
            integer = np.issubdtype(tokens.dtype, np.integer)
        else:
            integer = not (tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool)
        if not integer:
            raise ValueError(f"`{name}` must hold integer token ids (-1 = unknown cell), got dtype {tokens.dtype}.")
        grid = tuple(grid)
        total = num_conditions * num_per_prompt
        allowed = [grid, (num_conditions, *grid), (total, *grid)]
        if tuple(tokens.shape) not in allowed:
            shapes = " or ".join(dict.fromkeys(str(shape) for shape in allowed))
            raise ValueError(
                f"`{name}` must have the token grid's shape: {shapes} (the same grid for every output, one per class "
                f"label / prompt, or one per output), got {tuple(tokens.shape)}."
            )
        vocab_size = self.transformer.config.vocab_size
        values = torch.as_tensor(np.ascontiguousarray(tokens) if isinstance(tokens, np.ndarray) else tokens)
        low, high = int(values.min()), int(values.max())
        if low < -1 or high >= vocab_size:
            raise ValueError(
                f"`{name}` ids must be in [-1, {vocab_size - 1}] (-1 = unknown cell, generated; the model has "
                f"{vocab_size} token ids), got values in [{low}, {high}]."
            )

    @staticmethod
    def _prepare_known_tokens(
        tokens: torch.Tensor | np.ndarray | None, grid: tuple[int, ...], num_conditions: int, num_per_prompt: int,
        device: torch.device,
    ) -> torch.LongTensor | None:
        """A checked partial grid (`_check_known_tokens`) as a `(num_conditions * num_per_prompt, *grid)` long
        tensor on `device` (one grid per output), or None."""
        if tokens is None:
            return None
        if isinstance(tokens, np.ndarray):
            tokens = torch.from_numpy(np.ascontiguousarray(tokens))
        tokens = tokens.to(device=device, dtype=torch.long)
        total = num_conditions * num_per_prompt
        if tokens.dim() == len(grid):
            return tokens.expand(total, *grid).clone()
        if tokens.shape[0] != total:
            tokens = tokens.repeat_interleave(num_per_prompt, dim=0)
        return tokens.clone()

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

    def _encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None,
        num_per_prompt: int,
        max_sequence_length: int | None,
        truncation: bool,
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """T5-encode prompts into the transformer's left-padded condition layout, each repeated `num_per_prompt`
        times (the pipelines' `encode_prompt`)."""
        device = device or self._execution_device
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds, mask = encode_captions(
            self.tokenizer, self.text_encoder, prompt, self.transformer.num_condition_tokens, max_sequence_length,
            truncation, device,
        )
        embeds = embeds.repeat_interleave(num_per_prompt, dim=0)
        return embeds, mask.repeat_interleave(num_per_prompt, dim=0)

    def _prepare_condition(
        self, class_labels, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
        negative_prompt_attention_mask, num_per_prompt, max_sequence_length, truncation, device,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """Keyword arguments of `transformer.prefill` for the conditional and the unconditional branch, and the
        number of outputs (conditions x `num_per_prompt`)."""
        transformer = self.transformer
        if transformer.condition_type == "class":
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
            labels = labels.repeat_interleave(num_per_prompt)
            return {"class_labels": labels}, transformer.null_condition(labels.shape[0], device), labels.shape[0]

        if prompt is not None:
            embeds, mask = self._encode_prompt(prompt, device, num_per_prompt, max_sequence_length, truncation)
        else:
            embeds = prompt_embeds.to(device).repeat_interleave(num_per_prompt, dim=0)
            mask = prompt_attention_mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
            mask = mask.to(device).repeat_interleave(num_per_prompt, dim=0)
        batch = embeds.shape[0]
        if negative_prompt is not None:
            if not isinstance(negative_prompt, str) and len(negative_prompt) == 1:
                negative_prompt = negative_prompt[0]
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * (1 if isinstance(prompt, str) else len(prompt))
            neg_embeds, neg_mask = self._encode_prompt(
                negative_prompt, device, num_per_prompt, max_sequence_length, truncation
            )
        elif negative_prompt_embeds is not None:
            neg_embeds = negative_prompt_embeds.to(device).repeat_interleave(num_per_prompt, dim=0)
            neg_mask = negative_prompt_attention_mask
            neg_mask = torch.ones(neg_embeds.shape[:2], dtype=torch.bool) if neg_mask is None else neg_mask.bool()
            neg_mask = neg_mask.to(device).repeat_interleave(num_per_prompt, dim=0)
        else:
            # The published behaviour: the learned unconditional caption, with the prompt's padding mask.
            neg_embeds = transformer.null_condition(batch, device)["encoder_hidden_states"]
            neg_mask = mask
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        uncond = {"encoder_hidden_states": neg_embeds.to(embeds.dtype), "encoder_attention_mask": neg_mask}
        return cond, uncond, batch

    # --- the step loop -------------------------------------------------------------------------------

    def generate_tokens(
        self,
        cond: dict[str, torch.Tensor],
        uncond: dict[str, torch.Tensor],
        batch_size: int,
        grid: tuple[int, ...],
        grid_name: str,
        guidance_scale: float,
        cfg_interval: int,
        temperature: float,
        top_k: int,
        top_p: float,
        do_sample: bool,
        generator: torch.Generator | list[torch.Generator] | None,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: list[str],
        device: torch.device,
        known_tokens: torch.LongTensor | None = None,
    ) -> torch.LongTensor:
        """Generate a `(batch_size, *grid)` token grid: prefill the condition, then one forward pass per scheduler
        step, guided (`uncond + scale * (cond - uncond)` on the mixed logits) while `cfg_interval` allows.

        `cond` / `uncond` are `transformer.prefill` keyword arguments (`_prepare_condition`); `grid_name` names the
        sizes the grid came from in the error raised when it does not fit the transformer.

        `known_tokens` (`(batch_size, *grid)` long, -1 = unknown; `_prepare_known_tokens` makes it) turns this into
        generation from a partial grid: when a step reaches a known cell, the known token is written and fed instead
        of the drawn one (`keep_known_tokens`), on the eager and the static path alike; the step order and the KV
        cache are unchanged, so a known cell is only seen by the steps after it. With every cell known no model runs
        and no token is drawn: the grid is returned as it is (`num_timesteps` is 0, no callback is called).

        Raises:
            `NonFiniteLogitsError` after the loop when any step's logits held NaN or inf (checked on the device,
            without a host sync per step).
        """
        self._guidance_scale = guidance_scale
        self._interrupt = False
        if self.do_classifier_free_guidance:
            cond = {key: torch.cat([cond[key], uncond[key]]) for key in cond}

        self.transformer.check_grid(grid, grid_name)
        if known_tokens is not None and bool((known_tokens >= 0).all()):  # one check before the loop, not per step
            self._num_timesteps = 0
            return known_tokens.clone()
        self.scheduler.set_grid(grid, device=device)
        self._num_timesteps = len(self.scheduler)
        # Known tokens in generation order: each step reads its own contiguous slice.
        known = None if known_tokens is None else known_tokens.flatten(1)[:, self.scheduler.generation_order]
        # All the randomness up front, one uniform per token in generation order: the draws do not depend on how
        # the steps are run (eager or static), and a per-image generator makes an image independent of the batch.
        uniforms = draw_uniforms(batch_size, self.scheduler.num_tokens, generator, device) if do_sample else None
        # Per step, whether it is guided (`cfg_interval`: steps starting with more tokens than it use `cond` only).
        guided = [
            self.do_classifier_free_guidance
            and (cfg_interval == -1 or self.scheduler.generated_before(i) <= cfg_interval)
            for i in range(len(self.scheduler))
        ]
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "do_sample": do_sample}
        # Per step, whether any logit was NaN/inf: filled on the device, read once after the loop (no sync per step).
        nonfinite_steps = torch.zeros(len(self.scheduler), dtype=torch.bool, device=device)
        with self.progress_bar(total=len(self.scheduler)) as progress_bar:
            static_decoder = getattr(self, "_static_decoder", None)
            if static_decoder is not None:
                tokens = static_decoder.generate(
                    self, cond, batch_size, grid, guided, uniforms, sampling, nonfinite_steps, callback_on_step_end,
                    callback_on_step_end_tensor_inputs, progress_bar, device, known=known,
                )
            else:
                tokens = self._decode_eager(
                    cond, batch_size, grid, guided, uniforms, sampling, nonfinite_steps, callback_on_step_end,
                    callback_on_step_end_tensor_inputs, progress_bar, device, known=known,
                )

        if bool(nonfinite_steps.any()):
            self.maybe_free_model_hooks()
            raise NonFiniteLogitsError(self._nonfinite_message(nonfinite_steps))
        return tokens

    def _decode_eager(
        self, cond, batch_size, grid, guided, uniforms, sampling, nonfinite_steps, callback_on_step_end,
        callback_on_step_end_tensor_inputs, progress_bar, device, known=None,
    ) -> torch.LongTensor:
        """The reference step loop: one forward pass per scheduler step over exactly that step's tokens.

        `known`: `(batch, num_tokens)` known token ids in generation order (-1 = draw), or None."""
        tokens = torch.full((batch_size, *grid), -1, dtype=torch.long, device=device)
        model_batch = batch_size * (2 if self.do_classifier_free_guidance else 1)
        coordinates = self.scheduler.coordinates[: self.scheduler.num_fed_tokens]
        kv_cache = self.transformer.init_kv_cache(model_batch, coordinates, device=device)
        # Guidance is applied inside the heads, before their (linear) projections: see `NARTransformer._head_logits`.
        guidance = {"guidance_scale": self.guidance_scale} if self.do_classifier_free_guidance else {}
        for i, t in enumerate(self.scheduler.timesteps):
            if self.interrupt:
                break
            if i == 0:
                head_logits = self.transformer.prefill(kv_cache, **cond, **guidance, guided=guided[i])
            else:
                fed = self.scheduler.tokens_to_feed(tokens, i)
                if self.do_classifier_free_guidance:
                    fed = torch.cat([fed, fed])
                # Logits only where a target of this step reads them.
                positions = self.scheduler.head_positions(i)
                head_logits = self.transformer.decode(kv_cache, fed, positions, **guidance, guided=guided[i])
            logits = self.scheduler.mix_selected_head_logits(head_logits, i)
            nonfinite_steps[i] = ~torch.isfinite(logits).all()
            # `step` returns a new grid, so a grid handed to a callback keeps -1 where later steps write.
            group = self.scheduler.group_slice(i)
            step_uniforms = None if uniforms is None else uniforms[:, group]
            step_known = None if known is None else known[:, group]
            tokens = self.scheduler.step(
                logits, t, tokens, **sampling, uniforms=step_uniforms, known_tokens=step_known
            ).prev_sample

            if callback_on_step_end is not None:
                new_tokens = self._call_step_callback(
                    callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, tokens
                )
                tokens = tokens if new_tokens is None else new_tokens
            progress_bar.update()
        return tokens

    def _call_step_callback(
        self, callback_on_step_end: Callable, tensor_inputs: list[str], step_index: int, timestep, tokens
    ) -> torch.LongTensor | None:
        """Run `callback_on_step_end` on this step's grid; return the grid it hands back (checked), or None."""
        step_tensors = {"tokens": tokens}
        callback_kwargs = {k: step_tensors[k] for k in tensor_inputs}
        callback_outputs = callback_on_step_end(self, step_index, timestep, callback_kwargs)
        if not isinstance(callback_outputs, dict):
            raise TypeError(
                "`callback_on_step_end` must return a dict (`{}`, or `{\"tokens\": grid}` to replace the "
                f"grid), got {type(callback_outputs).__name__}."
            )
        if "tokens" in callback_outputs:
            return self._check_callback_tokens(callback_outputs.pop("tokens"), tokens, step_index)
        return None

    # --- the static decode path ---------------------------------------------------------------------

    def enable_static_decode(self, compile: bool = False, mode: str | None = None, backend: str = "inductor") -> None:
        """Decode with the same shapes at every step (opt-in; the eager loop is the default and the reference).

        Every step feeds the largest group's worth of tokens (padding masked), writes the KV cache through index
        tensors, attends over the whole fixed-length cache with a key-validity mask, reads positions and the
        parents rule from tables built once per grid, and draws every target of the step in one vectorised call,
        with no host sync inside the loop. The tokens are exactly the eager loop's, greedy or sampled (the same
        seeded uniforms are consumed either way).

        Args:
            compile: run each step through `torch.compile(fullgraph=True)`: one graph serves a whole generation
                (and every later one of the same batch, grid and settings).
            mode: the `torch.compile` mode: None picks "reduce-overhead" (CUDA graphs) on CUDA and "default"
                elsewhere; or one of "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs".
            backend: the `torch.compile` backend, "inductor" (default); "eager" only traces the step (a quick check
                that it compiles into one graph without breaks).

        The compiled graph, the KV cache and the token buffers are kept between calls with the same batch size,
        grid and model (`disable_static_decode()` frees them). A call with a callback still runs the static steps
        (the callback sees and may edit the grid after each step, as in the eager loop).
        """
        from .static_decode import StaticDecoder

        self._static_decoder = StaticDecoder(compile=compile, mode=mode, backend=backend)

    def disable_static_decode(self) -> None:
        """Back to the eager step loop; frees the static path's buffers (its KV cache and compiled graph)."""
        self._static_decoder = None

    @property
    def static_decode_enabled(self) -> bool:
        """Whether `enable_static_decode` is on."""
        return getattr(self, "_static_decoder", None) is not None

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
