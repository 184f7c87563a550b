"""`nn.Linear` whose CPU float32 inference runs through oneDNN.

On CPUs PyTorch runs a float32 `F.linear` through its BLAS (MKL on x86), whose small-batch GEMMs are slow on some
processors, and decoding feeds only 1-32 token rows per pass through every linear layer, so those GEMMs dominate.
oneDNN's linear kernel accumulates in float32 too, so results agree with `F.linear` to float32 rounding. It is on by
default only on x86-64, the platform its speed-up was measured on (docs/performance.md has the benchmark and its
command); elsewhere `set_onednn_linear(True)` turns it on. Training (anything that needs gradients), other dtypes,
other devices and `torch.compile` use `F.linear` unchanged: the oneDNN call is an inference-only fast path, and
inductor picks its own kernels for `F.linear`. So does a quantized weight (a torchao tensor subclass reports the
float32 it stands for as its dtype, but only `F.linear` dispatches to its quantized kernel): the fast path takes
plain tensors only.
"""

from __future__ import annotations

import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_onednn_enabled = platform.machine().lower() in ("x86_64", "amd64")
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)
_PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)  # exact types: any tensor subclass goes through `F.linear`


def set_onednn_linear(enabled: bool) -> bool:
    """Turn the oneDNN CPU inference path of every `Linear` on or off (on by default on x86-64 where PyTorch has
    it); returns the previous setting."""
    global _onednn_enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be True or False, got {enabled!r}.")
    previous, _onednn_enabled = _onednn_enabled, enabled
    return previous


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear kernel."""
    return _ONEDNN_AVAILABLE


def onednn_linear_active() -> bool:
    """Whether CPU float32 inference of `Linear` layers currently runs through oneDNN."""
    return _ONEDNN_AVAILABLE and _onednn_enabled


class Linear(nn.Linear):
    """A drop-in `nn.Linear` (same parameters, state-dict keys and LoRA wrapping) with a faster CPU inference path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            _onednn_enabled
            and _ONEDNN_AVAILABLE
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and type(self.weight) in _PLAIN_TENSOR_TYPES
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not _is_compiling()
        ):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
