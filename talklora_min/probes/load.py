"""Expert-load metrics over the tokens of a routing record (docs/method.md §4, "Load metrics"; claim C6).

A *load vector* ``L ≥ 0`` has one entry per expert (``n = E`` entries):

* soft load  ``L_e = Σ_t g_e(t)``                       (:func:`soft_load`)
* hard load  ``L_e = #{t : argmax_e' g_e'(t) = e}``     (:func:`hard_load`, ties → lowest index)

Scalar summaries (all return Python floats, computed in float64):

* Gini        ``G = Σ_i Σ_j |L_i − L_j| / (2 n Σ_i L_i)`` ∈ ``[0, 1 − 1/n]``; normalised ``G·n/(n−1)``
  ∈ [0, 1] (``n = 1`` → 0).  Evaluated with the equivalent sorted form
  ``G = Σ_i (2i − n − 1) L_(i) / (n Σ L)`` (``L_(1) ≤ … ≤ L_(n)``), O(n log n), exactly
  permutation invariant.
* normalised entropy ``H(p) / log n`` of the shares ``p = L / Σ L`` (``0 log 0 = 0``; ``n = 1`` → 1).
* coefficient of variation ``std(L) / mean(L)`` (population std).
* max share / mean share ``n · max_e L_e / Σ L``.
* dead experts: indices with share ``< 1e-3 / n``.
* top-1 churn between two records of the same tokens: fraction whose argmax expert differs.

Every function accepts a torch tensor, a numpy array or a (nested) list of numbers; it rejects a
wrong type (``None``, a string, a complex tensor …) with ``TypeError`` and empty, non-finite,
negative or all-zero loads with ``ValueError``, both naming the argument.  Loads near the ends of
the float64 range are rescaled by their maximum first (every metric but the total is scale
invariant), so they give correct values, not NaN/Inf; a total that overflows float64 raises.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

DEAD_SHARE = 1e-3  # an expert is dead when its share is below DEAD_SHARE / n
SAFE_RANGE = (1e-150, 1e150)  # loads with a maximum outside are rescaled (squares stay finite)


def _as_tensor(value, name: str, ndim: int | None = None) -> Tensor:
    """Convert to a float64 CPU tensor and reject empty / non-finite values."""
    accepted = f"{name} must be a tensor, numpy array or list of numbers"
    if value is None or isinstance(value, (str, bytes, dict, set)) or (
            isinstance(value, (Tensor, np.ndarray)) and value.dtype in (torch.complex64, torch.complex128,
                                                                         np.complex64, np.complex128)):
        raise TypeError(f"{accepted}, got {type(value).__name__}"
                        + (f" of dtype {value.dtype}" if hasattr(value, "dtype") else ""))
    try:
        if isinstance(value, Tensor):
            t = value.detach().to("cpu", torch.float64)
        else:
            t = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{accepted}, got {type(value).__name__} ({err})") from None
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); it needs at least one entry")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_load(load, name: str = "load", rescale: bool = True) -> Tensor:
    """A 1-D, non-empty, finite, non-negative load with a positive total; with ``rescale`` a load
    whose maximum lies outside ``SAFE_RANGE`` is divided by that maximum (the metrics are scale
    invariant; this keeps sums and squares finite and away from subnormals)."""
    t = _as_tensor(load, name, ndim=1)
    if (t < 0).any():
        raise ValueError(f"{name} must be non-negative, got minimum {t.min().item():g}")
    top = t.max()
    if top <= 0:
        raise ValueError(f"{name} is all zero: shares (and every load metric) are undefined")
    if rescale and not SAFE_RANGE[0] <= top <= SAFE_RANGE[1]:
        t = t / top
    return t


def _check_gates(gates, name: str = "gates") -> Tensor:
    t = _as_tensor(gates, name)
    if t.ndim < 1:
        raise ValueError(f"{name} must have shape (..., E), got a scalar")
    if (t < 0).any():
        raise ValueError(f"{name} must be non-negative (gate values), got minimum {t.min().item():g}")
    return t.reshape(-1, t.shape[-1])


def soft_load(gates) -> Tensor:
    """Soft load ``L_e = Σ_t g_e(t)`` of gates ``(..., E)`` (all leading axes are tokens); float64 ``(E,)``."""
    load = _check_gates(gates).sum(0)
    if not torch.isfinite(load).all():
        raise ValueError("gates are too large: their sum over tokens overflows float64")
    return load


def hard_load(gates) -> Tensor:
    """Hard (top-1) load ``L_e = #{t : argmax g(t) = e}``; float64 ``(E,)`` of counts."""
    g = _check_gates(gates)
    return torch.bincount(g.argmax(-1), minlength=g.shape[-1]).to(torch.float64)


def gini(load, normalized: bool = False) -> float:
    """Gini coefficient ``G = Σ_i Σ_j |L_i − L_j| / (2 n Σ_i L_i)`` (docs/method.md §4).

    Range ``[0, 1 − 1/n]``: 0 for equal load, ``1 − 1/n`` when one expert takes everything.
    ``normalized=True`` returns ``G · n / (n − 1)`` ∈ [0, 1] (0 when ``n = 1``).
    Invariant under permutations and positive rescaling of ``load``.
    """
    if not isinstance(normalized, (bool, np.bool_)):
        raise TypeError(f"normalized must be a bool, got {normalized!r}")
    L = _check_load(load)
    n = L.numel()
    if n == 1:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    g = float(((2 * ranks - n - 1) * L.sort().values).sum() / (n * L.sum()))
    g = min(max(g, 0.0), 1.0 - 1.0 / n)  # clip rounding outside the exact range
    return g * n / (n - 1) if normalized else g


def load_entropy(load) -> float:
    """Normalised entropy ``−Σ_e p_e log p_e / log n`` of the shares ``p = L / Σ L``, in [0, 1]
    (1 = perfectly balanced, 0 = one expert; ``n = 1`` → 1 by convention)."""
    L = _check_load(load)
    n = L.numel()
    if n == 1:
        return 1.0
    p = L / L.sum()
    h = -torch.xlogy(p, p).sum()
    return float((h / math.log(n)).clamp(0.0, 1.0))


def coefficient_of_variation(load) -> float:
    """``std(L) / mean(L)`` with the population standard deviation (0 for equal load)."""
    L = _check_load(load)
    return float(L.std(unbiased=False) / L.mean())


def max_mean_share(load) -> float:
    """Largest share over mean share ``n · max_e L_e / Σ_e L_e`` ∈ [1, n]."""
    L = _check_load(load)
    return float(L.numel() * L.max() / L.sum())


def dead_experts(load, threshold: float = DEAD_SHARE) -> list[int]:
    """Indices ``e`` whose share ``L_e / Σ L`` is below ``threshold / n`` (default ``1e-3 / n``)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    L = _check_load(load)
    share = L / L.sum()
    return torch.nonzero(share < float(threshold) / L.numel()).flatten().tolist()


def top1_churn(gates_a, gates_b) -> float:
    """Fraction of tokens whose top-1 expert differs between two records of the *same* tokens.

    ``gates_a`` and ``gates_b`` must have the same shape ``(..., E)``; ties → lowest index.
    """
    a, b = _check_gates(gates_a, "gates_a"), _check_gates(gates_b, "gates_b")
    if a.shape != b.shape:
        raise ValueError(f"gates_a and gates_b must describe the same tokens: shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)} differ")
    return float((a.argmax(-1) != b.argmax(-1)).to(torch.float64).mean())


def load_metrics(load) -> dict[str, float]:
    """All scalar load metrics of one load vector, as a flat dict:
    ``n_experts, total, gini, gini_normalized, entropy, cv, max_mean_share, n_dead_experts``."""
    total = float(_check_load(load, rescale=False).sum())
    if not math.isfinite(total):
        raise ValueError("load: its total overflows float64 (the other metrics are defined; call them "
                         "one by one, e.g. gini(load))")
    L = _check_load(load)
    return {"n_experts": L.numel(), "total": total, "gini": gini(L),
            "gini_normalized": gini(L, normalized=True), "entropy": load_entropy(L),
            "cv": coefficient_of_variation(L), "max_mean_share": max_mean_share(L),
            "n_dead_experts": len(dead_experts(L))}
