"""What one decode step does, behind one small interface: the body the decode loop runs at every step.

The loop (`AutoregressiveGenerationMixin.generate_tokens`) owns everything a generation does once: the prefill, the
guidance schedule, callbacks, interrupt, progress and the NaN/inf check. A step runner supplies the rest:

- `begin(transformer, scheduler, job)`: allocate (or reuse) this generation's buffers; return the KV cache the
  prefill writes into (`prefill_condition`, here, runs that prefill for the loop);
- `first_step(logits)`: draw the origin from the prefill's mixed logits;
- `run_step(step)`: steps >= 1: feed the previous group, run the model, mix, guide, draw, write;
- `grid()` / `replace_grid(tokens)`: the `(batch, *grid)` raster grid (a new tensor), and a grid a callback handed
  back; `nonfinite`: per step, whether its logits held NaN/inf (filled on the device).

`EagerStepRunner` (here) feeds each step exactly its group, the reference every other runner equals token for token;
`StaticStepRunner` (`static_decode.py`) gives every step the same shapes, optionally through `torch.compile`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.decoding_head import RowGuidance
from ..models.kv_cache import NARKVCache
from .sampling_settings import SamplingSettings


@dataclass
class DecodeJob:
    """One generation, as a step runner sees it.

    Args:
        batch_size: outputs generated (rows of the grid).
        grid: the token grid's shape.
        settings: the checked sampling settings.
        guided: per step, whether it is guided (`SamplingSettings.guided_steps`).
        uniforms: `(batch_size, num_tokens)` the draws' uniforms in generation order, or None (greedy).
        known: `(batch_size, num_tokens)` known token ids in generation order (-1 = draw), or None.
        device: where the generation runs.
        kv_cache_dtype: the KV cache's storage dtype (None: the model dtype; see `resolve_kv_cache_dtype`).
    """

    batch_size: int
    grid: tuple[int, ...]
    settings: SamplingSettings
    guided: list[bool]
    uniforms: torch.Tensor | None
    known: torch.LongTensor | None
    device: torch.device
    kv_cache_dtype: torch.dtype | None = None

    @property
    def model_batch(self) -> int:
        """Rows the model runs: the conditional ones, and as many unconditional ones with guidance."""
        return self.batch_size * (2 if self.settings.guidance else 1)

    def guidance_arguments(self, step: int) -> dict:
        """Keyword arguments of `prefill` / `decode` at `step`: guidance is applied inside the heads, before their
        linear projections (`NARTransformer._head_logits`)."""
        if not self.settings.guidance:
            return {}
        return {"guidance_scale": self.settings.guidance_scale, "guided": self.guided[step]}


def prefill_condition(transformer, kv_cache: NARKVCache, condition, job: DecodeJob, share: bool = True) -> torch.Tensor:
    """Prefill `condition` (a `Condition`) into the empty `kv_cache`; returns `prefill`'s head logits.

    With guidance, a class model's unconditional rows all hold the same null class: with `share`, it is prefilled
    ONCE (the batch `[conditional rows; one null row]`, each conditional row guided by that row through
    `RowGuidance`, the same arithmetic as the paired prefill) and its condition slot is copied into the other
    unconditional rows. Text models keep one unconditional row each (negative prompts and masks may differ).
    """
    guidance, batch = job.settings.guidance, condition.batch_size
    shareable = share and guidance and batch > 1 and transformer.condition_type == "class"
    if shareable:
        null = condition.uncond["class_labels"]
        shareable = bool((null == null[0]).all())  # one host sync per generation, before the loop
    if not shareable:
        return transformer.prefill(kv_cache, **condition.prefill_inputs(guidance), **job.guidance_arguments(0))
    device = null.device
    cond_rows = torch.arange(batch, device=device)
    row_guidance = RowGuidance(
        cond_rows=cond_rows, uncond_rows=torch.full_like(cond_rows, batch),
        # Through float64: a scale beyond float32 becomes inf (then NaN logits, reported) as in the paired prefill.
        scale=torch.full((batch,), job.settings.guidance_scale, dtype=torch.float64, device=device).float(),
        guided=torch.full((batch,), job.guided[0], dtype=torch.bool, device=device),
    )  # fmt: skip
    shared = kv_cache.rows(0, batch + 1)
    labels = torch.cat([condition.cond["class_labels"], null[:1]])
    logits = transformer.prefill(shared, class_labels=labels, row_guidance=row_guidance)
    kv_cache.copy_row_prefix(batch, batch + 1, 2 * batch, shared.length)
    kv_cache.length = shared.length
    return logits


class EagerStepRunner:
    """The reference step body: one forward pass per step over exactly that step's tokens, drawn by
    `scheduler.step` into a new raster grid (so a grid handed to a callback keeps -1 where later steps write)."""

    def begin(self, transformer, scheduler, job: DecodeJob) -> NARKVCache:
        self.transformer, self.scheduler, self.job = transformer, scheduler, job
        self.tokens = torch.full((job.batch_size, *job.grid), -1, dtype=torch.long, device=job.device)
        self.nonfinite = torch.zeros(len(scheduler), dtype=torch.bool, device=job.device)
        coordinates = scheduler.coordinates[: scheduler.num_fed_tokens]
        self.kv_cache = transformer.init_kv_cache(job.model_batch, coordinates, job.kv_cache_dtype, job.device)
        return self.kv_cache

    def first_step(self, logits: torch.Tensor) -> None:
        self._draw(0, logits)

    def run_step(self, step: int) -> None:
        fed = self.scheduler.tokens_to_feed(self.tokens, step)
        if self.job.settings.guidance:
            fed = torch.cat([fed, fed])
        # Logits only where a target of this step reads them.
        positions = self.scheduler.head_positions(step)
        head_logits = self.transformer.decode(self.kv_cache, fed, positions, **self.job.guidance_arguments(step))
        self._draw(step, self.scheduler.mix_selected_head_logits(head_logits, step))

    def _draw(self, step: int, logits: torch.Tensor) -> None:
        self.nonfinite[step] = ~torch.isfinite(logits).all()
        group = self.scheduler.group_slice(step)
        job = self.job
        uniforms = None if job.uniforms is None else job.uniforms[:, group]
        known = None if job.known is None else job.known[:, group]
        self.tokens = self.scheduler.step(
            logits, step, self.tokens, **job.settings.draw, uniforms=uniforms, known_tokens=known
        ).prev_sample

    def grid(self) -> torch.LongTensor:
        return self.tokens

    def replace_grid(self, tokens: torch.LongTensor) -> None:
        self.tokens = tokens
