"""Which token order drives a transformer: one decision, from its number of decoding heads.

A NAR model has one decoding head per grid axis and is generated plane by plane (`NeighborScheduler`); a model
with one head is a vanilla raster-order AR model (LlamaGen) and is generated token by token (`RasterScheduler`).
"""

from __future__ import annotations

from .scheduling_autoregressive import AutoregressiveScheduler
from .scheduling_neighbor import NeighborScheduler
from .scheduling_raster import RasterScheduler
from .token_order import num_heads_for_order, order_kind_for_heads

ARCHITECTURES: tuple[str, ...] = ("nar", "raster")
"""The two model families: "nar" (one decoding head per grid axis) and "raster" (one head, LlamaGen)."""


def scheduler_class_for_heads(num_decoding_heads: int) -> type[AutoregressiveScheduler]:
    """`RasterScheduler` for a one-head transformer, `NeighborScheduler` for one head per grid axis."""
    return RasterScheduler if order_kind_for_heads(num_decoding_heads) == "raster" else NeighborScheduler


def architecture_of_heads(num_decoding_heads: int) -> str:
    """ "raster" for a one-head transformer, "nar" otherwise."""
    return "raster" if order_kind_for_heads(num_decoding_heads) == "raster" else "nar"


def num_decoding_heads_for(architecture: str, grid_rank: int, flag: str = "architecture") -> int:
    """Decoding heads of an `architecture` over a grid of `grid_rank` axes: one per axis for "nar", one for
    "raster". `flag` names the argument in the error message."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown `{flag}` {architecture!r}; choose one of {list(ARCHITECTURES)}.")
    return num_heads_for_order("neighbor" if architecture == "nar" else "raster", grid_rank)
