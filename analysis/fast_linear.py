"""Frozen ``nn.Linear`` layers through oneDNN's packed fp32 GEMM: a speed path for the experiments.

The experiments spend most of their time in the *frozen* linear layers of the pretrained models
(MiniLM's attention output / FFN, SmolLM2's projections and its 49,152-way LM head), forward and,
for the input gradient, backward.  PyTorch's CPU ``F.linear`` calls MKL's sgemm, which on some
x86 CPUs (measured here: an AMD EPYC with AVX-512) runs its AVX2 kernels only, while oneDNN
(``torch.ops.mkldnn._linear_pointwise`` with a weight packed once, the kernel inductor uses for
frozen weights) runs AVX-512 kernels: 2.0–2.3x the throughput on these shapes.

The math is unchanged — ``y = x Wᵀ + b`` and ``∂L/∂x = (∂L/∂y) W`` in float32, both through the same
GEMM library, no gradient for ``W`` or ``b`` (they are frozen) — only the summation order of the
float32 GEMM differs from MKL's (relative differences ~1e-6, tested).  Every method of a seed runs the
same path, so paired comparisons (common random numbers) are unaffected.

:func:`use_onednn_for_frozen_linears` switches every frozen plain ``nn.Linear`` of a model to
:class:`FrozenLinear` in place (same parameters, hooks and state dict).  A layer falls back to
``F.linear`` whenever the fast path does not apply: a parameter that requires grad, a non-CPU
device, a dtype other than float32, or a torch build without oneDNN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def onednn_available() -> bool:
    """Whether this torch build can run the packed oneDNN linear on the CPU."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _onednn_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class _FrozenLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` packed for the forward and ``Wᵀ`` packed for ``∂L/∂x = (∂L/∂y) W``."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, packed_t: Tensor, bias: Tensor | None) -> Tensor:
        ctx.packed_t = packed_t
        return _onednn_linear(x, packed, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x = _onednn_linear(grad, ctx.packed_t, None) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class FrozenLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight runs through oneDNN (see the module docstring).  Made by
    :func:`use_onednn_for_frozen_linears` (class swap; no new parameters or buffers).  The packed copies
    of ``W`` and ``Wᵀ`` are built on first use and rebuilt if the weight changes in place."""

    def _packed(self) -> tuple[Tensor, Tensor]:
        key = (self.weight.data_ptr(), self.weight._version, tuple(self.weight.shape))
        cache = self.__dict__.get("_onednn_cache")
        if cache is None or cache[0] != key:
            w = self.weight.detach()
            cache = (key, torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None),
                     torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), None))
            self.__dict__["_onednn_cache"] = cache
        return cache[1], cache[2]

    def fast_path(self, x: Tensor) -> bool:
        w, b = self.weight, self.bias
        return (not w.requires_grad and (b is None or not b.requires_grad) and x.device.type == "cpu"
                and w.device.type == "cpu" and x.dtype == w.dtype == torch.float32
                and onednn_available())

    def forward(self, x: Tensor) -> Tensor:
        if not self.fast_path(x):
            return F.linear(x, self.weight, self.bias)
        packed, packed_t = self._packed()
        bias = None if self.bias is None else self.bias.detach()
        return _FrozenLinearFunction.apply(x, packed, packed_t, bias)

    def __getstate__(self):                 # deepcopy / pickle: the packed copies are rebuilt on use
        state = super().__getstate__()
        state.pop("_onednn_cache", None)
        return state


def use_onednn_for_frozen_linears(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` whose weight is frozen (``requires_grad=False``) to
    :class:`FrozenLinear`, in place; returns how many were switched.  Nothing is switched when this
    torch build has no oneDNN.  Adapter layers keep their own (trainable) tensors; their frozen
    ``base`` is a plain ``nn.Linear`` and is switched."""
    if not onednn_available():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and not module.weight.requires_grad:
            module.__class__ = FrozenLinear
            n += 1
    return n
