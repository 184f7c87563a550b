"""Drawing tokens from logits: temperature, top-k, top-p (nucleus), greedy."""

from __future__ import annotations

import math
import numbers

import torch


def is_int(value) -> bool:
    """True for Python and NumPy integers (not bools)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for finite Python and NumPy ints and floats (not bools, not NaN or inf)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def validate_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise a ValueError naming the parameter when a sampling setting is out of range.

    NumPy numbers are accepted like Python ones.
    """
    if not is_real(temperature) or temperature < 0:
        raise ValueError(f"`temperature` must be a finite number >= 0, got {temperature!r}.")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"`top_k` must be an integer >= 0 (0 disables top-k), got {top_k!r}.")
    if not is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"`top_p` must be in (0, 1] (1.0 disables nucleus sampling), got {top_p!r}.")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scale by temperature, then mask everything outside the top-k and the top-p nucleus with -inf.

    The most likely token always survives, whatever `top_p` is.
    """
    temperature, top_k, top_p = float(temperature), int(top_k), float(top_p)
    logits = logits.float() / max(temperature, 1e-5)
    vocab_size = logits.shape[-1]
    if 0 < top_k < vocab_size:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token; a token is dropped once that mass already exceeds top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before > top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, sorted_indices, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.LongTensor:
    """Draw one token per row of `logits` (shape `(batch, n, vocab)` or `(batch, vocab)`).

    `generator` may be one generator for the whole batch or a list with one generator per batch row, which
    makes each row reproducible on its own. A generator on another device than the logits is honoured by
    drawing on the generator's device.

    Non-finite logits (NaN, inf) never make the draw fail: greedy takes whatever `argmax` returns and sampling
    draws such a row uniformly. Detecting them is the caller's job, without a host sync per step:
    `NARPipeline` accumulates `~torch.isfinite(logits).all()` on the device and raises after its loop.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    # torch.multinomial rejects NaN/inf rows (on CUDA with a device-side assert): draw those uniformly.
    finite_rows = torch.isfinite(probs).all(dim=-1, keepdim=True)
    probs = torch.where(finite_rows, probs, torch.ones_like(probs))
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.shape[0]:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but the batch has {probs.shape[0]} rows; "
                "pass one generator or exactly one per generated image."
            )
        return torch.stack([_multinomial(row, gen) for row, gen in zip(probs, generator)])
    return _multinomial(probs, generator)


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.LongTensor:
    flat = probs.reshape(-1, probs.shape[-1])
    if generator is not None and generator.device != flat.device:
        drawn = torch.multinomial(flat.to(generator.device), 1, generator=generator).to(flat.device)
    else:
        drawn = torch.multinomial(flat, 1, generator=generator)
    return drawn.view(probs.shape[:-1])
