"""The static decode path: every decode step of a generation has the same shapes, so one graph serves them all.

The eager step runner feeds each step exactly its group of tokens, so the shapes change from step to step (1, 2, ...,
16, ..., 1 tokens for a 16x16 NAR grid). `StaticStepRunner` instead runs every step on the same shapes, built from the
token order's `StaticDecodeTables`:

- the fed group is padded to the largest group G (padding reads the origin's token);
- the KV cache has G spare slots after the real ones; a step writes its keys/values with `index_copy_` at slots
  from the tables (padding writes into the spare slots) and every query reads the whole cache through a key mask
  `slot < num_condition_tokens + tokens fed so far` computed on the device (spare slots are never valid);
- rotary tables / learned positions are gathered by slot from the cache's tables, built once per generation;
- each head is evaluated at the fed tokens the tables name, guided (a per-step device flag keeps `cfg_interval`
  exact) and mixed by the parents rule, and every target is drawn in one vectorised call from the generation's
  pre-drawn uniforms; padded targets write into dummy cells that are dropped;
- known cells (generation from a partial grid) take their known token right after the draw, before they are fed,
  through the same `keep_known_tokens` rule as the eager loop (a buffer of -1 when nothing is known);
- the step index is a device tensor and the NaN/inf check a device flag: no host sync inside the loop.

With `compile=True` the step runs through `torch.compile(fullgraph=True)`: on CUDA "reduce-overhead" mode captures
it as a CUDA graph. The buffers (KV cache, token and uniform buffers, tables) persist between generations of the
same batch and grid so the graph is replayed on the same addresses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..models.kv_cache import NARKVCache
from ..schedulers.sampling import keep_known_tokens, sample_tokens
from ..schedulers.token_order import StaticDecodeTables, mix_logits
from .step_runners import DecodeJob

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class StaticStepSettings:
    """The Python constants of a static step (a compiled graph is specialised on them)."""

    num_condition_tokens: int
    guidance: bool
    guidance_scale: float
    temperature: float
    top_k: int
    top_p: float
    do_sample: bool


@dataclass
class StaticDecodeState:
    """Device buffers of the static path, kept between generations of the same shapes.

    Args:
        kv_cache: the cache, with `group_size` spare slots.
        tables: the scheduler's per-step tables for the grid.
        step: `(1,)` long tensor, the step being run.
        tokens: `(batch, num_tokens + G)` drawn tokens in generation order, -1 where not drawn yet; the last G
            columns are the dummy cells padded targets write to.
        uniforms: `(batch, num_tokens + G)` the generation's uniforms (dummy columns last).
        known: `(batch, num_tokens + G)` known token ids in generation order, -1 where a token is drawn (all -1
            without a partial grid; dummy columns -1).
        guided: `(steps,)` whether each step is guided.
        nonfinite: `(steps,)` whether a step's logits held NaN/inf.
        slot_ids: `(cache capacity,)` `arange`, compared with the filled length to build the key mask.
        condition_key_mask: `(model batch, 1, 1, capacity)` valid condition keys of padded captions, or None.
    """

    kv_cache: NARKVCache
    tables: StaticDecodeTables
    step: torch.LongTensor
    tokens: torch.LongTensor
    uniforms: torch.Tensor
    known: torch.LongTensor
    guided: torch.BoolTensor
    nonfinite: torch.BoolTensor
    slot_ids: torch.LongTensor
    condition_key_mask: torch.BoolTensor | None = None


def static_decode_step(transformer, state: StaticDecodeState, settings: StaticStepSettings) -> None:
    """Run decode step `state.step` in place: feed, guide, mix, draw, keep known cells and write the tokens; flag
    NaN/inf logits.

    Every per-step quantity is read from the tables with `index_select` at the `(1,)` step tensor (indexing with a
    tensor as a Python index would sync), so the shapes and the code are the same at every step.
    """
    tables, step = state.tables, state.step
    num_cond = settings.num_condition_tokens
    fed = state.tokens.index_select(1, _at(tables.fed_positions, step))
    if settings.guidance:
        fed = torch.cat([fed, fed])
    key_mask = (state.slot_ids < _at(tables.fed_end, step) + num_cond)[None, None, None, :]
    if state.condition_key_mask is not None:
        key_mask = key_mask & state.condition_key_mask
    slots = _at(tables.write_positions, step) + num_cond
    head_positions = _at(tables.head_positions, step)
    guidance = {}
    if settings.guidance:
        guidance = {"guidance_scale": settings.guidance_scale, "guided": _at(state.guided, step)}
    head_logits = transformer.decode_static(state.kv_cache, fed, slots, key_mask, head_positions, **guidance)
    logits = mix_logits(
        head_logits, _at(tables.head_index, step), _at(tables.parent_mask, step), _at(tables.parent_count, step)
    )
    valid = _at(tables.target_valid, step)
    state.nonfinite.index_copy_(0, step, (~(torch.isfinite(logits) | ~valid[None, :, None]).all()).view(1))
    targets = _at(tables.target_positions, step)
    uniforms = state.uniforms.index_select(1, targets) if settings.do_sample else None
    tokens = sample_tokens(
        logits, settings.temperature, settings.top_k, settings.top_p, settings.do_sample, uniforms=uniforms
    )
    tokens = keep_known_tokens(tokens, state.known.index_select(1, targets))
    state.tokens.index_copy_(1, targets, tokens)


def _at(table: torch.Tensor, step: torch.LongTensor) -> torch.Tensor:
    """Row `step` (a `(1,)` device tensor) of `table`, without a host sync."""
    return table.index_select(0, step).squeeze(0)


class StaticStepRunner:
    """The static step body (`pipe.enable_static_decode()`): one shape for every decode step of a generation.

    Args:
        compile: run each step through `torch.compile(fullgraph=True, dynamic=False)`.
        mode: the `torch.compile` mode (None: "reduce-overhead" on CUDA, "default" elsewhere).
        backend: the `torch.compile` backend ("inductor"; "eager" only traces, e.g. to check for graph breaks).
    """

    def __init__(self, compile: bool = False, mode: str | None = None, backend: str = "inductor"):
        if not isinstance(compile, bool):
            raise ValueError(f"`compile` must be True or False, got {compile!r}.")
        if mode not in COMPILE_MODES:
            raise ValueError(f"`mode` must be one of {list(COMPILE_MODES)}, got {mode!r}.")
        if not compile and (mode is not None or backend != "inductor"):
            raise ValueError("`mode` and `backend` are torch.compile settings: pass them with `compile=True`.")
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"`backend` must be a torch.compile backend name such as 'inductor', got {backend!r}.")
        self.compile = compile
        self.mode = mode
        self.backend = backend
        self._compiled: dict[str | None, Callable] = {}
        self.state: StaticDecodeState | None = None
        self._state_key: tuple | None = None

    # --- the step-runner interface (see `step_runners.py`) ---------------------------------------------------

    def begin(self, transformer, scheduler, job: DecodeJob) -> NARKVCache:
        self.transformer, self.scheduler, self.job = transformer, scheduler, job
        state = self._prepare_state(
            transformer, scheduler, job.model_batch, job.batch_size, job.device, job.kv_cache_dtype
        )
        num_tokens = scheduler.num_tokens
        state.guided.copy_(torch.tensor(job.guided, dtype=torch.bool))
        state.nonfinite.zero_()
        state.tokens.fill_(-1)
        if job.uniforms is not None:
            state.uniforms[:, :num_tokens].copy_(job.uniforms)
        state.known.fill_(-1)
        if job.known is not None:
            state.known[:, :num_tokens].copy_(job.known)
        settings = job.settings
        self._settings = StaticStepSettings(
            num_condition_tokens=transformer.num_condition_tokens, guidance=settings.guidance,
            guidance_scale=settings.guidance_scale, temperature=settings.temperature, top_k=settings.top_k,
            top_p=settings.top_p, do_sample=settings.do_sample,
        )
        self._step_function = self._compiled_step(torch.device(job.device))
        return state.kv_cache

    def first_step(self, logits: torch.Tensor) -> None:
        state = self.state
        state.condition_key_mask = state.kv_cache.key_mask
        state.nonfinite[0] = ~torch.isfinite(logits).all()
        uniforms = None if self.job.uniforms is None else state.uniforms[:, :1]
        drawn = sample_tokens(logits, **self.job.settings.draw, uniforms=uniforms)
        state.tokens[:, :1] = keep_known_tokens(drawn, state.known[:, :1])

    def run_step(self, step: int) -> None:
        self.state.step.fill_(step)
        self._step_function(self.transformer, self.state, self._settings)

    @property
    def nonfinite(self) -> torch.BoolTensor:
        return self.state.nonfinite

    def grid(self) -> torch.LongTensor:
        """The drawn tokens as a new `(batch, *grid)` raster grid, -1 where not drawn yet."""
        scheduler = self.scheduler
        tokens = self.state.tokens[:, : scheduler.num_tokens].index_select(1, scheduler.inverse_generation_order)
        return tokens.view(tokens.shape[0], *self.job.grid)

    def replace_grid(self, tokens: torch.LongTensor) -> None:
        scheduler = self.scheduler
        self.state.tokens[:, : scheduler.num_tokens] = tokens.flatten(1)[:, scheduler.generation_order]

    # --- buffers and graphs -------------------------------------------------------------------------------------

    def _compiled_step(self, device: torch.device) -> Callable:
        if not self.compile:
            return static_decode_step
        mode = self.mode or ("reduce-overhead" if device.type == "cuda" else "default")
        if self.backend != "inductor":
            mode = None  # modes are inductor's
        if mode not in self._compiled:
            self._compiled[mode] = torch.compile(
                static_decode_step, mode=mode, backend=self.backend, fullgraph=True, dynamic=False
            )
        return self._compiled[mode]

    def _prepare_state(
        self, transformer, scheduler, model_batch: int, batch_size: int, device, kv_cache_dtype: torch.dtype | None
    ) -> StaticDecodeState:
        """The buffers for this generation: reused when batch, grid, model and device match the last one."""
        key = (
            id(transformer), transformer.dtype, type(scheduler), scheduler.grid_shape, model_batch, batch_size,
            torch.device(device), torch.is_inference_mode_enabled(), kv_cache_dtype,
        )
        if self.state is not None and self._state_key == key:
            self.state.kv_cache.zero_()  # stale NaN/inf in a masked slot would still reach attention
            self.state.kv_cache.length = 0
            self.state.kv_cache.key_mask = None
            return self.state
        self.state = None  # free the previous buffers first
        tables = scheduler.static_decode_tables()
        coordinates = scheduler.coordinates[: scheduler.num_fed_tokens]
        kv_cache = transformer.init_kv_cache(
            model_batch, coordinates, kv_cache_dtype, device=device, num_spare_slots=tables.group_size
        )
        num_steps, width = len(scheduler), scheduler.num_tokens + tables.group_size
        state = StaticDecodeState(
            kv_cache=kv_cache,
            tables=tables,
            step=torch.zeros(1, dtype=torch.long, device=device),
            tokens=torch.full((batch_size, width), -1, dtype=torch.long, device=device),
            uniforms=torch.zeros(batch_size, width, device=device),
            known=torch.full((batch_size, width), -1, dtype=torch.long, device=device),
            guided=torch.zeros(num_steps, dtype=torch.bool, device=device),
            nonfinite=torch.zeros(num_steps, dtype=torch.bool, device=device),
            slot_ids=torch.arange(kv_cache.capacity, device=device),
        )
        if self.compile:
            _mark_static_addresses(state)
        self.state, self._state_key = state, key
        return state


def _mark_static_addresses(state: StaticDecodeState) -> None:
    """Fixed addresses let CUDA graphs replay on these buffers, mutations included."""
    kv_cache, tables = state.kv_cache, state.tables
    buffers = kv_cache.buffers()
    buffers += [t for t in (kv_cache.rope or ()) + (kv_cache.position_ids,) if t is not None]
    buffers += [state.step, state.tokens, state.uniforms, state.known, state.guided, state.nonfinite, state.slot_ids]
    buffers += [t for t in vars(tables).values() if isinstance(t, torch.Tensor)]
    for tensor in buffers:
        torch._dynamo.mark_static_address(tensor)
