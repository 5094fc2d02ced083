"""Frozen ``nn.Linear`` layers through oneDNN's packed fp32 GEMM: a speed path for the experiments,
on only where it checks out in this process.

The experiments spend most of their time in the *frozen* linear layers of the pretrained models
(MiniLM's attention output / FFN, SmolLM2's projections and its 49,152-way LM head), forward and,
for the input gradient, backward.  PyTorch's CPU ``F.linear`` calls MKL's sgemm, which on some
x86 CPUs runs its AVX2 kernels only, while oneDNN (``torch.ops.mkldnn._linear_pointwise`` with a
weight packed once by ``_reorder_linear_weight``, the kernels inductor uses for frozen weights) runs
AVX-512 kernels.  How much that gains depends on the CPU (2.0–2.3x on one AMD EPYC, 0.95–1.17x on
another of the same kind), and the ops are private (their signature may change in any release).

So the path is opt-in and *on only where a one-time self-check in this process passes*
(:func:`fast_path_status`, cached per process; environment variable ``TALKLORA_FAST_LINEAR``: ``off``,
the default, ``auto`` runs the self-check, ``on`` skips its speed criterion).  Off by default because
the speed criterion depends on the machine's load: a run whose processes decide differently sums
its GEMMs in another order, and although the difference is ~1e-6, a near-tie between two learning
rates of the tuning grid can then go the other way — results would not reproduce run to run:

1. on a probe shape (:data:`PROBE`, MiniLM's FFN at a training step's size) the outputs and input
   gradients of the oneDNN path equal ``F.linear``'s within :data:`TOLERANCE` relative, and
2. it is at least :data:`REQUIRED_SPEEDUP` times faster there (forward + input gradient, medians
   of interleaved repeats; the whole check takes ~0.1–0.3 s).

Any exception from the private ops — in the self-check, when packing a weight, or in a forward or
backward call — switches the path off for the rest of the process, with the reason recorded, and
that call is computed by ``F.linear`` instead.  Every cell records the status of the process that
ran it and ``meta.json`` lists them (:mod:`analysis.results`).

The math is unchanged — ``y = x Wᵀ + b`` and ``∂L/∂x = (∂L/∂y) W`` in float32, no gradient for the
frozen ``W`` or ``b`` — only the summation order of the float32 GEMM differs (relative differences
~1e-6); every method of a seed runs the same path, so paired comparisons are unaffected.
:func:`use_onednn_for_frozen_linears` switches every frozen plain ``nn.Linear`` of a model to
:class:`FrozenLinear` in place (same parameters, hooks and state dict), and only when the path is on.
A switched layer uses ``F.linear`` whenever the path does not apply: a parameter that requires grad,
a non-CPU device, a dtype other than float32, an input of the wrong width, or the path switched off.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODE_ENV = "TALKLORA_FAST_LINEAR"
MODES = ("auto", "on", "off")
REQUIRED_SPEEDUP = 1.2          # below this the gain does not pay for running private ops
TOLERANCE = 1e-5                # max |fast - F.linear| / max |F.linear|, outputs and input gradients
PROBE = (256, 384, 1536)        # tokens, d_in, d_out
PROBE_REPEATS = 5


@dataclasses.dataclass(frozen=True)
class FastPathStatus:
    """Whether this process runs frozen linears through oneDNN, and why."""

    enabled: bool
    reason: str
    speedup: float | None = None          # F.linear time / oneDNN time on the probe
    max_rel_diff: float | None = None     # on the probe, outputs and input gradients
    mode: str = "auto"
    threads: int = dataclasses.field(default_factory=torch.get_num_threads)   # when it was decided

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "required_speedup": REQUIRED_SPEEDUP, "probe": list(PROBE),
                "torch": torch.__version__}


_status: FastPathStatus | None = None


def mode() -> str:
    value = os.environ.get(MODE_ENV, "off").strip().lower() or "off"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {list(MODES)}, got {value!r}")
    return value


def onednn_available() -> bool:
    """Whether this torch build has the packed oneDNN linear ops at all (the self-check then tries them)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def fast_path_enabled() -> bool:
    """Whether frozen linears run through oneDNN in this process (runs the self-check once)."""
    global _status
    if _status is None:
        try:
            how = mode()
        except ValueError as err:                           # a typo must not stop a run
            _status = FastPathStatus(False, f"switched off: {err}", mode="off")
        else:
            _status = _self_check(how)
    return _status.enabled


def fast_path_status(check: bool = True) -> dict | None:
    """This process's status as a dict (``enabled``, ``reason``, ``speedup``, ``max_rel_diff``, ``mode``,
    ``required_speedup``, ``probe``, ``threads``, ``torch``); with ``check=False`` None when the
    self-check has not run (nothing in this process asked for the path)."""
    if _status is None and not check:
        return None
    fast_path_enabled()
    return _status.to_dict()


def reset() -> None:
    """Forget the status: the next use re-reads ``TALKLORA_FAST_LINEAR`` and re-runs the self-check."""
    global _status
    _status = None


def _fall_back(err: BaseException, where: str) -> None:
    """Switch the path off for the rest of the process after an exception from the private ops."""
    global _status
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    old = _status or FastPathStatus(False, "", mode=mode())
    _status = dataclasses.replace(old, enabled=False, reason=f"fell back to F.linear after an error {where}: "
                                                             f"{type(err).__name__}: {first_line}")


# ----------------------------------------------------------------------------- the oneDNN path
def _onednn_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _pack(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``W`` and ``Wᵀ`` packed for oneDNN (forward and input gradient)."""
    w = weight.detach()
    return (torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None),
            torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), None))


class _FrozenLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` packed for the forward and ``Wᵀ`` packed for ``∂L/∂x = (∂L/∂y) W``.
    ``weight`` (the plain ``W``) is the backward's fallback; None makes errors propagate (self-check)."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, packed_t: Tensor, bias: Tensor | None,
                weight: Tensor | None) -> Tensor:
        ctx.packed_t, ctx.weight = packed_t, weight
        return _onednn_linear(x, packed, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if ctx.weight is None:
            return _onednn_linear(grad, ctx.packed_t, None), None, None, None, None
        try:
            grad_x = _onednn_linear(grad, ctx.packed_t, None)
        except Exception as err:                            # noqa: BLE001 - any failure of a private op
            _fall_back(err, "in a backward call")
            grad_x = grad @ ctx.weight
        return grad_x, None, None, None, None


# ----------------------------------------------------------------------------- self-check
def _relative_difference(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _forward_backward(fn, x: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    xi = x.detach().requires_grad_(True)
    y = fn(xi)
    (gx,) = torch.autograd.grad(y, xi, grad)
    return y.detach(), gx


def _self_check(how: str) -> FastPathStatus:
    """Decide the path for this process (see the module docstring)."""
    if how == "off":
        return FastPathStatus(False, f"switched off ({MODE_ENV}=off)", mode=how)
    if not onednn_available():
        return FastPathStatus(False, f"torch {torch.__version__} has no packed oneDNN linear ops", mode=how)
    tokens, d_in, d_out = PROBE
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b, x, grad = torch.randn(d_out, generator=g), torch.randn(tokens, d_in, generator=g), torch.randn(tokens, d_out, generator=g)
    try:
        packed, packed_t = _pack(w)

        def fast(xi):
            return _FrozenLinearFunction.apply(xi, packed, packed_t, b, None)

        def reference(xi):
            return F.linear(xi, w, b)

        (y, gx), (y_ref, gx_ref) = _forward_backward(fast, x, grad), _forward_backward(reference, x, grad)
        if y.shape != y_ref.shape or gx.shape != gx_ref.shape:
            return FastPathStatus(False, f"the oneDNN path gave shapes {tuple(y.shape)} / {tuple(gx.shape)}, "
                                         f"F.linear {tuple(y_ref.shape)} / {tuple(gx_ref.shape)}", mode=how)
        diff = max(_relative_difference(y, y_ref), _relative_difference(gx, gx_ref))
        if not diff <= TOLERANCE:                           # NaN fails too
            return FastPathStatus(False, f"the oneDNN path differs from F.linear by {diff:.1e} relative on the "
                                         f"probe (> {TOLERANCE:g})", max_rel_diff=diff, mode=how)
        times = {reference: [], fast: []}
        for _ in range(PROBE_REPEATS + 1):                  # interleaved; the first round warms up
            for fn in (reference, fast):
                start = time.perf_counter()
                _forward_backward(fn, x, grad)
                times[fn].append(time.perf_counter() - start)
        speedup = statistics.median(times[reference][1:]) / statistics.median(times[fast][1:])
    except Exception as err:                                # noqa: BLE001 - a changed or broken private op
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        return FastPathStatus(False, f"the oneDNN ops failed the self-check: {type(err).__name__}: {first_line}",
                              mode=how)
    measured = f"{speedup:.2f}x F.linear's speed on the probe {PROBE}"
    if how == "on":
        return FastPathStatus(True, f"forced on ({MODE_ENV}=on; {measured})", speedup, diff, how)
    if speedup < REQUIRED_SPEEDUP:
        return FastPathStatus(False, f"only {measured} (< {REQUIRED_SPEEDUP}x required)", speedup, diff, how)
    return FastPathStatus(True, f"self-check passed: {measured}, max relative difference {diff:.1e}",
                          speedup, diff, how)


# ----------------------------------------------------------------------------- layers
class FrozenLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight runs through oneDNN while the path is on (see the module
    docstring).  Made by :func:`use_onednn_for_frozen_linears` (class swap; no new parameters or
    buffers).  The packed copies of ``W`` and ``Wᵀ`` are built on first use and rebuilt if the
    weight changes in place."""

    def _packed(self) -> tuple[Tensor, Tensor]:
        key = (self.weight.data_ptr(), self.weight._version, tuple(self.weight.shape))
        cache = self.__dict__.get("_onednn_cache")
        if cache is None or cache[0] != key:
            cache = (key, *_pack(self.weight))
            self.__dict__["_onednn_cache"] = cache
        return cache[1], cache[2]

    def fast_path(self, x: Tensor) -> bool:
        w, b = self.weight, self.bias
        return (not w.requires_grad and (b is None or not b.requires_grad) and x.device.type == "cpu"
                and w.device.type == "cpu" and x.dtype == w.dtype == torch.float32
                and x.shape[-1:] == w.shape[1:] and fast_path_enabled())

    def forward(self, x: Tensor) -> Tensor:
        if self.fast_path(x):
            try:
                packed, packed_t = self._packed()
                bias = None if self.bias is None else self.bias.detach()
                return _FrozenLinearFunction.apply(x, packed, packed_t, bias, self.weight.detach())
            except Exception as err:                        # noqa: BLE001 - any failure of a private op
                _fall_back(err, "in a forward call")
        return F.linear(x, self.weight, self.bias)

    def __getstate__(self):                 # deepcopy / pickle: the packed copies are rebuilt on use
        state = super().__getstate__()
        state.pop("_onednn_cache", None)
        return state


def use_onednn_for_frozen_linears(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` of ``model`` whose weight is frozen (``requires_grad=False``) to
    :class:`FrozenLinear`, in place; returns how many were switched.  Nothing is switched when the
    path is off in this process (:func:`fast_path_enabled`).  Adapter layers keep their own
    (trainable) tensors; their frozen ``base`` is a plain ``nn.Linear`` and is switched."""
    if not fast_path_enabled():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and not module.weight.requires_grad:
            module.__class__ = FrozenLinear
            n += 1
    return n
