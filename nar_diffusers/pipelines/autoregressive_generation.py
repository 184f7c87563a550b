"""What every NAR pipeline does between its checked inputs and its token grid, written once.

`AutoregressiveGenerationMixin` holds the machinery `NARPipeline` (images, and inpainting on top of it) and
`NARVideoPipeline` (videos) share: the checks of the public boundary, turned into value objects (`ConditionInputs`,
`SamplingSettings`, `StepCallback`), encoding the condition (`Condition`), and `generate_tokens`, the ONE decode loop:
prefill, one step per scheduler step, guidance schedule, callbacks, interrupt, progress and the NaN/inf check. What a
step does is the step runner's (`step_runners.py`: eager; `static_decode.py`: static and compiled). A pipeline adds
only what is its own: its sizes, its tokenizer, and its post-processing.

The mixin expects the pipeline's components `transformer` (a `NARTransformer`), `scheduler` (an
`AutoregressiveScheduler`) and, for text models, `text_encoder` and `tokenizer`, plus `DiffusionPipeline`'s
`progress_bar`, `maybe_free_model_hooks` and `_execution_device`, and `NARHubMixin`'s `_resolve_sampling`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..models.kv_cache import resolve_kv_cache_dtype
from ..schedulers.sampling import is_real
from .condition import Condition, ConditionInputs
from .partial_grid import check_known_tokens, prepare_known_tokens
from .sampling_settings import SamplingSettings
from .step_callback import StepCallback
from .step_runners import DecodeJob, EagerStepRunner, prefill_condition
from .text_encoding import encode_captions

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

COMMON_ARGUMENTS_DOC = """\
            class_labels: class indices (class-conditional models): an int, a list of ints, or a 1-D integer
                tensor / NumPy array.
            prompt: text prompt(s) (text-conditional models); or precomputed `prompt_embeds` with
                `prompt_attention_mask` in the layout `encode_prompt` returns.
            negative_prompt / negative_prompt_embeds: replaces the learned unconditional caption in guidance.
            guidance_scale: classifier-free guidance scale; > 1 enables guidance
                (`logits = uncond + scale * (cond - uncond)`).
            cfg_interval: -1 guides every step; otherwise steps that start with more than `cfg_interval`
                tokens already generated use the conditional logits only.
            temperature, top_k, top_p, do_sample: the token draw (`do_sample=False` is greedy argmax).
                `guidance_scale`, `cfg_interval`, `temperature`, `top_k` and `top_p` default to the pipeline's
                `sampling_defaults` (saved with it; built-in: 4.0, -1, 1.0, 0, 1.0).
            generator: a `torch.Generator`, or one per generated output.
            max_sequence_length: prompt tokens kept (default: the model's condition length, 120 published);
                `truncation=False` raises instead of truncating longer prompts.
            attention_kwargs: `{"scale": s}` scales the loaded LoRA adapters for this call (diffusers' convention).
            kv_cache_dtype: how the KV cache stores keys and values: None (the transformer's dtype, the default),
                `torch.float32`, `torch.bfloat16`, `torch.float16`, or `torch.float8_e4m3fn` (a float32 scale per row,
                head and slot; 1/4 of a float32 cache plus 1/16 for the scales at head_dim 64); read back in the
                transformer's dtype. A dtype's name ("bfloat16", ...) works too.
            callback_on_step_end: called as `callback(pipe, step_index, timestep, callback_kwargs)` after each
                forward pass; `callback_kwargs["tokens"]` is that step's own grid (a new tensor every step, safe to
                keep), -1 where not generated yet. It returns a dict; `{"tokens": grid}` replaces the grid (same
                shape, integer ids in [-1, vocab_size - 1], generated cells >= 0).
            return_dict: return the output dataclass (default) or a tuple."""


CONDITION_ARGUMENTS = (
    "class_labels", "prompt", "negative_prompt", "prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
    "negative_prompt_attention_mask", "max_sequence_length", "truncation",
)  # fmt: skip
SAMPLING_ARGUMENTS = ("guidance_scale", "cfg_interval", "temperature", "top_k", "top_p", "do_sample", "generator")


def with_common_arguments(function):
    """Insert `COMMON_ARGUMENTS_DOC` where a pipeline's docstring says `{common_arguments}` (written once)."""
    function.__doc__ = function.__doc__.replace("{common_arguments}", COMMON_ARGUMENTS_DOC.strip())
    return function


class NonFiniteLogitsError(RuntimeError):
    """The transformer produced NaN or inf logits during generation (the message names the likely causes)."""


class AutoregressiveGenerationMixin:
    """The checks of the public boundary, the condition, and the decode loop shared by the NAR pipelines."""

    _callback_tensor_inputs = ["tokens"]
    # Class models with guidance prefill the null class once and copy it into every unconditional row (same tokens).
    share_unconditional_prefill = True

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. from `callback_on_step_end`) to stop after the current step: the grid
        keeps -1 where nothing was generated (decoded images show those cells as token 0)."""
        return getattr(self, "_interrupt", False)

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

    # --- checks of the public boundary (each input once) -------------------------------------------------------

    def _check_token_model(self, grid_rank: int, what: str, other_pipeline: str) -> None:
        """Raise a ValueError unless the transformer has a `grid_rank`-D grid and the scheduler drives its heads."""
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

    def check_condition(self, arguments: dict[str, Any], num_per_prompt_name: str) -> ConditionInputs:
        """The call's condition (`class_labels`, or the text arguments), validated (`ConditionInputs.checked`).

        `arguments` are the call's arguments (`locals()` at its start; the `CONDITION_ARGUMENTS` and the
        `num_per_prompt_name` one are read), so each pipeline hands its condition on as one group."""
        condition = {name: arguments[name] for name in CONDITION_ARGUMENTS}
        num_per_prompt = arguments[num_per_prompt_name]
        inputs = ConditionInputs.checked(self.transformer, num_per_prompt, num_per_prompt_name, **condition)
        if inputs.prompt is not None and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(
                "`prompt` needs the pipeline's `text_encoder` and `tokenizer`; load them or pass `prompt_embeds`."
            )
        return inputs

    def check_sampling(self, arguments: dict[str, Any], condition: ConditionInputs, unit: str) -> SamplingSettings:
        """The call's sampling settings (the `SAMPLING_ARGUMENTS` of `arguments`, as in `check_condition`), those it
        omits (None) taken from the pipeline's `sampling_defaults`; `unit` names an output ("image", "video")."""
        settings = {name: arguments[name] for name in SAMPLING_ARGUMENTS}
        do_sample, generator = settings.pop("do_sample"), settings.pop("generator")
        resolved = self._resolve_sampling(**settings)
        return SamplingSettings.checked(condition.num_outputs, unit, do_sample=do_sample, generator=generator, **resolved)

    def check_partial_grid(self, tokens: Any, grid: tuple[int, ...], condition: ConditionInputs) -> None:
        """Validate a `tokens` partial grid for this call (see `partial_grid.check_known_tokens`)."""
        if tokens is not None:
            vocab_size = self.transformer.config.vocab_size
            check_known_tokens(tokens, grid, condition.num_conditions, condition.num_per_prompt, vocab_size)

    def check_kv_cache_dtype(self, kv_cache_dtype: Any) -> torch.dtype:
        """The KV cache's storage dtype for this call (`resolve_kv_cache_dtype`: None = the transformer's)."""
        return resolve_kv_cache_dtype(kv_cache_dtype, self.transformer.dtype)

    @staticmethod
    def check_output(output_type: Any, callback: Any, callback_tensor_inputs: Any) -> StepCallback | None:
        """Validate `output_type` and the step callback; return the callback checked (or None)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        return StepCallback.checked(callback, callback_tensor_inputs)

    # --- the condition -----------------------------------------------------------------------------------------

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

    def encode_condition(self, inputs: ConditionInputs, device: torch.device) -> Condition:
        """The `prefill` inputs of both branches, one row per output (labels / prompts x `num_per_prompt`)."""
        transformer, repeat = self.transformer, inputs.num_per_prompt
        if transformer.condition_type == "class":
            labels = inputs.class_labels.to(device).repeat_interleave(repeat)
            return Condition({"class_labels": labels}, transformer.null_condition(labels.shape[0], device), labels.shape[0])
        text = inputs.text_arguments()
        if text["prompt"] is not None:
            embeds, mask = self._encode_prompt(text["prompt"], device, repeat, inputs.max_sequence_length,
                                               inputs.truncation)  # fmt: skip
        else:
            embeds, mask = _repeat_embeddings(text["prompt_embeds"], text["prompt_attention_mask"], repeat, device)
        batch = embeds.shape[0]
        negative_prompt = text["negative_prompt"]
        if negative_prompt is not None:
            if not isinstance(negative_prompt, str) and len(negative_prompt) == 1:
                negative_prompt = negative_prompt[0]
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * (1 if isinstance(text["prompt"], str) else len(text["prompt"]))
            neg_embeds, neg_mask = self._encode_prompt(negative_prompt, device, repeat, inputs.max_sequence_length,
                                                       inputs.truncation)  # fmt: skip
        elif text["negative_prompt_embeds"] is not None:
            neg_embeds, neg_mask = _repeat_embeddings(
                text["negative_prompt_embeds"], text["negative_prompt_attention_mask"], repeat, device
            )
        else:
            # The published behaviour: the learned unconditional caption, with the prompt's padding mask.
            neg_embeds, neg_mask = transformer.null_condition(batch, device)["encoder_hidden_states"], mask
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        uncond = {"encoder_hidden_states": neg_embeds.to(embeds.dtype), "encoder_attention_mask": neg_mask}
        return Condition(cond, uncond, batch)

    def prepare_partial_grid(
        self, tokens: Any, grid: tuple[int, ...], condition: ConditionInputs, device: torch.device
    ) -> torch.LongTensor | None:
        """A checked `tokens` partial grid laid out one grid per output on `device`, or None."""
        return prepare_known_tokens(tokens, grid, condition.num_conditions, condition.num_per_prompt, device)

    # --- the decode loop ---------------------------------------------------------------------------------------

    def generate_tokens(
        self,
        condition: Condition,
        settings: SamplingSettings,
        grid: tuple[int, ...],
        known_tokens: torch.LongTensor | None = None,
        callback: StepCallback | None = None,
        grid_name: str = "grid",
        kv_cache_dtype: torch.dtype | None = None,
    ) -> torch.LongTensor:
        """Generate a `(condition.batch_size, *grid)` token grid: prefill the condition, then one forward pass per
        scheduler step, guided while `cfg_interval` allows. The inputs are taken as checked.

        `known_tokens` (`(batch, *grid)` long, -1 = unknown) turns this into generation from a partial grid: when a
        step reaches a known cell, the known token is written and fed instead of the drawn one, whichever step
        runner runs; with every cell known no model runs and the grid is returned as it is (`num_timesteps` 0, no
        callback). `grid_name` names the sizes the grid came from in the error raised when it does not fit.
        `kv_cache_dtype` is the KV cache's storage dtype (checked: `check_kv_cache_dtype`; None = the model's).

        Raises:
            `NonFiniteLogitsError` after the loop when any step's logits held NaN or inf (checked on the device,
            without a host sync per step).
        """
        self._guidance_scale, self._interrupt = settings.guidance_scale, False
        self.transformer.check_grid(grid, grid_name)
        if known_tokens is not None and bool((known_tokens >= 0).all()):  # one check before the loop, not per step
            self._num_timesteps = 0
            return known_tokens.clone()
        device, scheduler, transformer = self._execution_device, self.scheduler, self.transformer
        scheduler.set_grid(grid, device=device)
        self._num_timesteps = len(scheduler)
        job = DecodeJob(
            batch_size=condition.batch_size, grid=tuple(grid), settings=settings, guided=settings.guided_steps(scheduler),
            uniforms=settings.uniforms(condition.batch_size, scheduler.num_tokens, device),
            # Known tokens in generation order: each step reads its own contiguous slice.
            known=None if known_tokens is None else known_tokens.flatten(1)[:, scheduler.generation_order],
            device=device, kv_cache_dtype=kv_cache_dtype,
        )  # fmt: skip
        runner = self.step_runner
        kv_cache = runner.begin(transformer, scheduler, job)
        with self.progress_bar(total=len(scheduler)) as progress_bar:
            for i, t in enumerate(scheduler.timesteps):
                if self.interrupt:
                    break
                if i == 0:
                    share = self.share_unconditional_prefill
                    head_logits = prefill_condition(transformer, kv_cache, condition, job, share)
                    runner.first_step(scheduler.mix_selected_head_logits(head_logits, 0))
                else:
                    runner.run_step(i)
                if callback is not None:
                    new_tokens = callback(self, i, t, runner.grid(), transformer.config.vocab_size)
                    if new_tokens is not None:
                        runner.replace_grid(new_tokens)
                progress_bar.update()
        if bool(runner.nonfinite.any()):
            self.maybe_free_model_hooks()
            raise NonFiniteLogitsError(_nonfinite_message(runner.nonfinite))
        return runner.grid()

    @property
    def step_runner(self):
        """The body of each decode step: the eager reference, or the static runner of `enable_static_decode`."""
        return getattr(self, "_static_runner", None) or EagerStepRunner()

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
        grid and model (`disable_static_decode()` frees them). A call with a callback still runs the static steps.
        """
        from .static_decode import StaticStepRunner

        self._static_runner = StaticStepRunner(compile=compile, mode=mode, backend=backend)

    def disable_static_decode(self) -> None:
        """Back to the eager step loop; frees the static path's buffers (its KV cache and compiled graph)."""
        self._static_runner = None

    @property
    def static_decode_enabled(self) -> bool:
        """Whether `enable_static_decode` is on."""
        return getattr(self, "_static_runner", None) is not None


def _repeat_embeddings(
    embeds: torch.Tensor, mask: torch.Tensor | None, repeat: int, device: torch.device
) -> tuple[torch.Tensor, torch.BoolTensor]:
    """Precomputed caption embeddings and their mask (all valid when None), each row repeated `repeat` times."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    return embeds.to(device).repeat_interleave(repeat, dim=0), mask.to(device).repeat_interleave(repeat, dim=0)


def _nonfinite_message(nonfinite_steps: torch.BoolTensor) -> str:
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
