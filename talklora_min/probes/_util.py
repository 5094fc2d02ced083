"""Shared helpers of the probes: argument checks and float64 evaluation of a layer's own methods."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call


def check_router_layer(layer, name: str = "layer") -> nn.Module:
    """A MoE adapter layer (MoELoRALinear / TalkLoRALinear): the probes need its router."""
    if not isinstance(layer, nn.Module) or not hasattr(layer, "gates_from_logits"):
        raise TypeError(f"{name} must be a MoELoRALinear or TalkLoRALinear (an adapter layer with a "
                        f"router), got {type(layer).__name__}")
    return layer


def flat_tokens(inputs, d: int, name: str = "inputs", device=None, dtype=torch.float64) -> Tensor:
    """``(..., d)`` finite floating tensor → ``(N, d)`` in ``dtype`` (None: keep) on ``device``."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., {d}), got {type(inputs).__name__}")
    if inputs.ndim == 0 or inputs.shape[-1] != d:
        raise ValueError(f"{name} must have shape (..., {d}), got {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {inputs.dtype}")
    if inputs.numel() == 0:
        raise ValueError(f"{name} holds no tokens (shape {tuple(inputs.shape)})")
    check_finite(inputs, name)
    return inputs.detach().reshape(-1, d).to(device=device, dtype=dtype)


def check_finite(t: Tensor, name: str) -> None:
    """Raise if ``t`` has NaN/Inf (one cheap reduction; the exact check only if the sum is not finite)."""
    if not torch.isfinite(t.detach().sum()) and not torch.isfinite(t.detach()).all():
        raise ValueError(f"{name} contains NaN or Inf; the probes need finite inputs")


class _Call(nn.Module):
    """Wrapper so ``functional_call`` can swap a layer's parameters around any method call."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, fn, *args):
        return fn(self.layer, *args)


def float64_call(layer: nn.Module, fn: Callable, *args):
    """``fn(layer, *args)`` with the adapter's parameters (not the frozen base) replaced by detached
    float64 copies — the layer's own methods, evaluated in float64, the layer itself untouched."""
    params = {f"layer.{n}": p.detach().to(torch.float64) for n, p in layer.named_parameters()
              if not n.startswith("base.")}
    for n, p in params.items():
        if not torch.isfinite(p).all():
            raise ValueError(f"layer weight {n[len('layer.'):]} contains NaN or Inf")
    return functional_call(_Call(layer), params, (fn, *args), strict=False)


def gates_of_code(layer, h: Tensor) -> Tensor:
    """Eval gates as a function of the code ``h`` (code routers): ``gates_from_logits(W_r h~)``."""
    return layer.gates_from_logits(layer.router_logits(None, h))[0]


def gates_of_input(layer, x: Tensor) -> Tensor:
    """Eval gates as a function of the token ``x``."""
    return layer.gates_from_logits(layer.router_logits(x))[0]
