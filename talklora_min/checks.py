"""Argument checks shared by the adapter layers, ``AdapterConfig`` and the probes: each raises a
``ValueError`` / ``TypeError`` naming the argument and the accepted values."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

ROUTER_INPUTS = ("code", "input")
BALANCE_LOSSES = ("switch", "cv", "entropy")


def _is_number(value, integer: bool = False) -> bool:
    """Python or numpy (``np.int64``, ``np.float32`` …) real scalar; bools are not numbers here."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    if integer:
        return isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Real)


def check_positive_int(name: str, value) -> int:
    """``value`` as a Python int ≥ 1 (numpy integers accepted); otherwise ``ValueError`` naming ``name``."""
    if not _is_number(value, integer=True) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_alpha_dropout(alpha, dropout) -> None:
    if alpha is not None and (not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha must be None (scaling s = 1) or a positive number, got {alpha!r}")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def cast_finite(value: Tensor, dtype: torch.dtype, what: str, hint: str = "") -> Tensor:
    """``value`` (detached) cast to ``dtype``; ``ValueError`` naming ``what`` if the result has NaN/Inf
    (saying so when only the cast overflowed)."""
    out = value.detach().to(dtype)
    if not torch.isfinite(out).all():
        overflow = f" after the cast to {dtype} (its values overflow it)" if torch.isfinite(value).all() else ""
        raise ValueError(f"{what} contains NaN or Inf{overflow}{hint}")
    return out


def is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): ``y = x W + b`` with ``weight (d_in, d_out)``.
    Recognised by name and shape so the core does not import transformers."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, Tensor) and w.ndim == 2
            and hasattr(module, "nf") and tuple(w.shape) == (module.nx, module.nf))


def check_base(base) -> None:
    if not (isinstance(base, nn.Linear) or is_conv1d(base)):
        raise TypeError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
    if 0 in base.weight.shape:
        raise ValueError(f"base has a zero-width weight {tuple(base.weight.shape)}: nothing to adapt")


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapter parameters are kept in float32 over float16 / bfloat16 bases (as PEFT does), in the
    base's dtype otherwise."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def check_moe_args(rank, num_experts, router_input="code", top_k=None, balance_loss=None) -> None:
    """Validate the MoE hyper-parameters shared by the layers and ``AdapterConfig``."""
    check_positive_int("rank", rank)
    check_positive_int("num_experts", num_experts)
    if rank % num_experts:
        raise ValueError(
            f"rank ({rank}) must be divisible by num_experts ({num_experts}): each expert "
            f"owns rank/num_experts dimensions of the shared code h = A x")
    if router_input not in ROUTER_INPUTS:
        raise ValueError(f"router_input must be one of {ROUTER_INPUTS}, got {router_input!r}")
    if top_k is not None:
        top_k = check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be at most num_experts ({num_experts}) or None")
    if balance_loss is not None and balance_loss not in BALANCE_LOSSES:
        raise ValueError(f"balance_loss must be None or one of {BALANCE_LOSSES}, got {balance_loss!r}")


def _checked_weight(name: str, value, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``value`` cast to ``dtype`` (detached) after checking type, shape, realness and finiteness."""
    if not isinstance(value, Tensor):
        raise ValueError(f"weight {name} must have shape {shape} (a torch.Tensor), got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"weight {name} must have shape {shape}, got {tuple(value.shape)}")
    if value.is_complex():
        raise ValueError(f"weight {name} must be a real tensor, got dtype {value.dtype}")
    return cast_finite(value, dtype, f"weight {name}", "; set_weights needs finite values")
