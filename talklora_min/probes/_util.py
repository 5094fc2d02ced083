"""Shared helpers of the probes: argument checks and evaluation of a layer's own methods in a chosen
floating dtype (float64 by default).

Argument convention of every probe: a wrong *type* (``None``, a string or list where a tensor or
number belongs) raises ``TypeError``, a wrong *value* (NaN/Inf, out of range, empty) ``ValueError``;
both name the argument.  Python and numpy numbers are accepted alike (``bool`` is not a number).
A result that would overflow the computation dtype raises ``ValueError`` — never a silent NaN/Inf.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..layers import cast_finite

DTYPES = (torch.float32, torch.float64)   # linear algebra (svd, eigvalsh) needs single or double precision


def check_dtype(dtype) -> torch.dtype:
    """``torch.float32`` or ``torch.float64`` (the probes' computation dtype)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, one of {DTYPES}, got {dtype!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (the probes' linear algebra needs single or "
                         f"double precision), got {dtype}")
    return dtype


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """A Python or numpy integer (not ``bool``) in ``[minimum, maximum]``, as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"[{minimum if minimum is not None else '-inf'}, {maximum if maximum is not None else 'inf'}]"
        raise ValueError(f"{name} must be an integer in {bounds}, got {value}")
    return value


def check_seed(value) -> int:
    """A ``torch.Generator`` seed: an integer in ``[0, 2**64)``."""
    return check_int("seed", value, 0, 2**64 - 1)


def check_positive_real(name: str, value) -> float:
    """A positive finite Python or numpy real number (not ``bool``), as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive finite number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def check_router_layer(layer, name: str = "layer") -> nn.Module:
    """A MoE adapter layer (MoELoRALinear / TalkLoRALinear): the probes need its router."""
    if not isinstance(layer, nn.Module) or not hasattr(layer, "gates_from_logits"):
        raise TypeError(f"{name} must be a MoELoRALinear or TalkLoRALinear (an adapter layer with a "
                        f"router), got {type(layer).__name__}")
    if layer.in_features == 0:
        raise ValueError(f"{name} has zero-width input (d_in = 0): its router sees a constant code, "
                         f"there is nothing to probe")
    return layer


def flat_tokens(inputs, d: int, name: str = "inputs", device=None, dtype=torch.float64) -> Tensor:
    """``(..., d)`` finite floating tensor → ``(N, d)`` in ``dtype`` (None: keep) on ``device``;
    values that overflow ``dtype`` are rejected."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., {d}), got {type(inputs).__name__}")
    if inputs.ndim == 0 or inputs.shape[-1] != d:
        raise ValueError(f"{name} must have shape (..., {d}), got {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {inputs.dtype}")
    if inputs.numel() == 0:
        raise ValueError(f"{name} holds no tokens (shape {tuple(inputs.shape)})")
    check_finite(inputs, name)
    out = inputs.detach().reshape(-1, d).to(device=device, dtype=dtype)
    if dtype is not None and torch.finfo(dtype).max < torch.finfo(inputs.dtype).max:   # narrowing cast only
        check_finite(out, name, f"its values (up to {inputs.detach().abs().max().item():.3g}) "
                                f"overflow {dtype}")
    return out


def check_finite(t: Tensor, name: str, detail: str = "the probes need finite inputs") -> None:
    """Raise if ``t`` has NaN/Inf (one cheap reduction; the exact check only if the sum is not finite)."""
    if not torch.isfinite(t.detach().sum()) and not torch.isfinite(t.detach()).all():
        raise ValueError(f"{name} contains NaN or Inf; {detail}")


def check_result(values: dict[str, Tensor], what: str, cause: str = "the inputs or the layer's weights") -> None:
    """Raise ``ValueError`` if a computed quantity overflowed (NaN/Inf): ``cause`` (e.g. the inputs,
    the weights, a perturbation size) lies beyond what the computation dtype can represent."""
    for name, t in values.items():
        t = torch.as_tensor(t)
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}: {name} is not finite (overflow in {t.dtype}); {cause} are too "
                             f"extreme for this dtype: rescale them (or use dtype=torch.float64)")


class _Call(nn.Module):
    """Wrapper so ``functional_call`` can swap a layer's parameters around any method call."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, fn, *args):
        return fn(self.layer, *args)


def dtype_call(layer: nn.Module, fn: Callable, *args, dtype: torch.dtype = torch.float64):
    """``fn(layer, *args)`` with the adapter's parameters (not the frozen base) replaced by detached
    copies in ``dtype`` — the layer's own methods, evaluated in ``dtype``, the layer itself untouched."""
    params = {}
    for n, p in layer.named_parameters():
        if n.startswith("base."):
            continue
        params[f"layer.{n}"] = cast_finite(p, dtype, f"layer weight {n}")
    return functional_call(_Call(layer), params, (fn, *args), strict=False)


def gates_of_code(layer, h: Tensor) -> Tensor:
    """Eval gates as a function of the code ``h`` (code routers): ``gates_from_logits(W_r h~)``."""
    return layer.gates_from_logits(layer.router_logits(None, h))[0]


def gates_of_input(layer, x: Tensor) -> Tensor:
    """Eval gates as a function of the token ``x``."""
    return layer.gates_from_logits(layer.router_logits(x))[0]
