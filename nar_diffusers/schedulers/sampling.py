"""Drawing tokens from logits: temperature, top-k, top-p (nucleus), greedy; known cells of a partial grid."""

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


def draw_uniforms(
    batch_size: int,
    num_tokens: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """All the randomness of one generation: `(batch_size, num_tokens)` float32 uniforms in [0, 1).

    Entry `[b, j]` draws the `j`-th token of image `b` in generation order (`sample_tokens` turns it into a token
    by inverse CDF). Drawing them up front makes the draws independent of how the steps are batched or padded:
    the eager loop and the static decode path consume exactly the same numbers. With a list of generators, row
    `b` comes from `generator[b]` alone, so an image does not depend on the rest of the batch. Each generator
    draws on its own device; the result is moved to `device` once.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but the batch has {batch_size} rows; "
                "pass one generator or exactly one per generated image."
            )
        rows = [torch.rand(num_tokens, generator=g, device=g.device).to(device) for g in generator]
        return torch.stack(rows) if rows else torch.empty(0, num_tokens, device=device)
    if generator is None:
        return torch.rand(batch_size, num_tokens, device=device)
    return torch.rand(batch_size, num_tokens, generator=generator, device=generator.device).to(device)


def candidate_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.LongTensor | None]:
    """The tokens a draw chooses from and their float32 logits, temperature-scaled, -inf outside the nucleus.

    Returns `(candidates, ids)`: with top-k, the `top_k` largest logits in descending order (`torch.topk`, no sort
    of the vocabulary) and their token ids; with top-p alone, the whole vocabulary sorted in descending order; with
    neither, the logits as they are and `ids=None` (candidate `i` is token `i`). Top-p then masks every candidate
    once the probability mass before it exceeds `top_p`; the most likely token always survives.
    """
    temperature, top_k, top_p = float(temperature), int(top_k), float(top_p)
    candidates = logits.float() / max(temperature, 1e-5)
    ids = None
    if 0 < top_k < candidates.shape[-1]:
        candidates, ids = torch.topk(candidates, top_k, dim=-1)
    if top_p < 1.0:
        if ids is None:
            candidates, ids = torch.sort(candidates, dim=-1, descending=True)
        probs = candidates.softmax(dim=-1)
        # Mass strictly before each candidate; a candidate is dropped once that mass already exceeds top_p.
        drop = probs.cumsum(dim=-1) - probs > top_p
        drop[..., 0] = False
        candidates = candidates.masked_fill(drop, float("-inf"))
    return candidates, ids


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.LongTensor:
    """Index drawn from each row of `probs` (`(..., n)`, non-negative, not necessarily normalised) by inverse CDF:
    the number of cumulative sums below `uniforms * total` (`uniforms` of shape `(...)` in [0, 1)).

    A candidate of probability zero is never drawn (except index 0 when a uniform is exactly 0).
    """
    cdf = probs.cumsum(dim=-1)
    threshold = uniforms.to(cdf.dtype)[..., None] * cdf[..., -1:]
    return (cdf < threshold).sum(dim=-1).clamp(max=probs.shape[-1] - 1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generator: torch.Generator | list[torch.Generator] | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Draw one token per row of `logits` (shape `(batch, n, vocab)` or `(batch, vocab)`).

    Sampling is vectorised over every row: temperature, top-k (`torch.topk`), top-p, softmax, then the inverse
    CDF at one uniform per row. `uniforms` (shape `logits.shape[:-1]`, in [0, 1)) are those numbers; without
    them they are drawn here from `generator` (one generator, or a list with one per batch row, each row
    reproducible on its own; a generator on another device draws there). Greedy (`do_sample=False`) is the argmax.

    Non-finite logits (NaN, inf) never make the draw fail: greedy takes whatever `argmax` returns and sampling
    draws such a row uniformly among its candidates. Detecting them is the caller's job, without a host sync per
    step: the pipelines accumulate `~torch.isfinite(logits).all()` on the device and raise after their loop.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    if uniforms is None:
        batch = logits.shape[0]
        shape = logits.shape[1:-1]
        uniforms = draw_uniforms(batch, math.prod(shape), generator, logits.device).view(batch, *shape)
    elif uniforms.shape != logits.shape[:-1]:
        raise ValueError(
            f"`uniforms` must have shape {tuple(logits.shape[:-1])} (one per drawn token), got {tuple(uniforms.shape)}."
        )
    candidates, ids = candidate_logits(logits, temperature, top_k, top_p)
    probs = candidates.softmax(dim=-1)
    del candidates  # the vocabulary-sized temporaries of a draw are freed as soon as they are used
    # A row with NaN/inf logits has no valid distribution: draw it uniformly among its candidates.
    probs.masked_fill_(~torch.isfinite(probs).all(dim=-1, keepdim=True), 1.0)
    index = inverse_cdf(probs, uniforms.to(probs.device))
    if ids is None:
        return index
    return ids.gather(-1, index[..., None]).squeeze(-1)


def keep_known_tokens(drawn: torch.LongTensor, known: torch.LongTensor | None) -> torch.LongTensor:
    """The tokens of a step once its known cells are applied: `known` where it is >= 0, the drawn token elsewhere.

    Generation from a partial grid (inpainting, outpainting, video continuation) is this one rule, applied after every
    draw and before the tokens are fed back, whichever step runner runs the step: the order of the steps and the KV
    cache stay as they are, a known cell only decides which token is written and fed. `drawn` and `known` have the
    same shape; `known` None keeps every draw. No host sync.
    """
    if known is None:
        return drawn
    return torch.where(known >= 0, known.to(drawn.dtype), drawn)
