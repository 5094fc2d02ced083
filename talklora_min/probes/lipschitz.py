"""Router Lipschitz constants in ℓ2 (docs/method.md §4 "Router Lipschitz constant"; claim C4).

The router is ``g(z) = softmax(M z)`` with a linear map ``M`` from the perturbed variable ``z``
to the logits (docs/method.md §3, talk absorption):

=================  ==========  ============================  =========================
layer              ``wrt``      ``z``                          ``M``
=================  ==========  ============================  =========================
TalkLoRA           ``"code"``   ``h = A x``                    ``W_eff = W_r (T ⊗ I_m)``
TalkLoRA           ``"input"``  ``x``                          ``W_eff A``
MoELoRA-code       ``"code"``   ``h``                          ``W_r``
MoELoRA-code       ``"input"``  ``x``                          ``W_r A``
MoELoRA-input      ``"input"``  ``x``                          ``W_g``
=================  ==========  ============================  =========================

(MoELoRA-input's router never reads the code, so ``wrt="code"`` is rejected for it.)

* softmax Jacobian ``J_s(p) = diag(p) − p pᵀ``; ``‖J_s(p)‖₂ ≤ ½`` (equality iff two gates are
  ½), ``= 1/E`` at uniform ``p``.
* certified (global) bound ``L_cert = ½ ‖M‖₂``  (``‖J_s M‖₂ ≤ ‖J_s‖₂ ‖M‖₂``).
* local constant at a token ``L_loc(z) = ‖J_s(g(z)) M‖₂``, closed form and batched: with the thin
  SVD ``M = U Σ Vᵀ`` (rank ≤ E), ``‖J_s M‖₂ = ‖J_s U Σ‖₂`` — one ``(E × E)`` matrix per token.
* empirical lower bound: projected gradient ascent of the difference quotient
  ``‖g(z+δ) − g(z)‖ / ‖δ‖`` on the sphere ``‖δ‖ = ρ`` around each given token, batched over
  tokens, started along ``±`` the top right-singular vector of the local Jacobian (the best
  first-order direction); each step is a normalised gradient step followed by the projection back
  onto the sphere.  ``ρ = radius / ‖M‖₂`` so that no logit moves by more than ``radius``.  Only the
  row space of ``M`` reaches the router (``δ = cᵀ Vh`` moves the logits by ``U Σ c``, with
  ``‖δ‖ = ‖c‖``), so the ascent runs on ``c`` (k ≤ E numbers per token); the reported quotient is
  then evaluated with the layer's own router at the full-space ``δ``.  Any difference quotient is
  a true lower bound of the global constant, so ``empirical ≤ certified`` holds exactly;
  numerically we state ``ORDER_RTOL`` (relative).  The search starts at the given tokens, so it
  approaches ``local_max`` from the first order and may exceed it by ``O(radius)`` (docs/method.md §4).

Top-k routing (``top_k < E``): the gate map jumps where the k-th and (k+1)-th logits tie, so no
finite global constant exists — ``certified`` is ``math.inf`` and ``certified_exists`` is False.
Away from ties the gates are the softmax renormalised over the selected set ``S`` and their
Jacobian is ``diag(g) − g gᵀ`` with ``g`` the (zero outside ``S``) top-k gates, so the closed form
above applies unchanged to the top-k gates.  A quotient across a tie can be arbitrarily large.

All computations run in ``dtype`` (float64 by default, float32 allowed) on the layer's device; the
gates come from the layer's own methods (``router_logits`` / ``gates_from_logits``) evaluated with
copies of its weights in ``dtype``, ``M`` from ``layer.effective_router()``.  Inputs or weights so
large that the logits or ``‖M‖₂`` overflow ``dtype`` raise ``ValueError`` (never a NaN result).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._util import (check_dtype, check_int, check_positive_real, check_result, check_router_layer,
                    check_seed, dtype_call, flat_tokens, gates_of_code, gates_of_input)

WRT = ("code", "input")
ORDER_RTOL = 1e-6       # stated tolerance of the ordering local_max, empirical ≤ certified
DEFAULT_RADIUS = 1e-3   # empirical search radius in logit units (ρ = radius / ‖M‖₂)


def softmax_jacobian(p) -> Tensor:
    """``J_s(p) = diag(p) − p pᵀ`` for probability vectors ``p (..., E)`` → ``(..., E, E)``."""
    if isinstance(p, (str, bytes)) or p is None:
        raise TypeError(f"p must be a tensor or array of probabilities (..., E), got {type(p).__name__}")
    try:
        p = torch.as_tensor(p)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"p must be a tensor or array of probabilities (..., E), got {type(p).__name__} "
                        f"({err})") from None
    if p.ndim == 0 or not p.is_floating_point():
        raise ValueError(f"p must be a floating tensor of shape (..., E), got {p.dtype} {tuple(p.shape)}")
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


@dataclass(frozen=True, eq=False)
class LipschitzResult:
    """Lipschitz sandwich of one router.  Required: ``local_max ≤ certified`` and
    ``empirical ≤ certified`` up to ``ORDER_RTOL`` (see :meth:`ordered`)."""

    certified: float             # ½‖M‖₂, or math.inf for top-k (< E) routing
    local_max: float             # max_t ‖J_s(g(z_t)) M‖₂
    empirical: float             # max_t of the best difference quotient found around z_t
    local: Tensor                # (N,) per-token local constants (in the probe's dtype)
    empirical_per_token: Tensor  # (N,) per-token best quotients (in the probe's dtype)
    argmax_index: int            # token index of local_max
    argmax_input: Tensor         # the given input row x_t (d_in,) at that token
    wrt: str
    radius: float                # search radius ρ in z units
    certified_exists: bool       # False for top-k routers (no global bound across ties)

    def ordered(self, rtol: float = ORDER_RTOL) -> bool:
        """``local_max ≤ certified`` and ``empirical ≤ certified`` within relative ``rtol``."""
        bound = self.certified * (1 + rtol) + 1e-300
        return self.local_max <= bound and self.empirical <= bound


def _check_wrt(layer, wrt) -> str:
    if not isinstance(wrt, str):
        raise TypeError(f"wrt must be one of {WRT}, got {wrt!r} ({type(wrt).__name__})")
    if wrt not in WRT:
        raise ValueError(f"wrt must be one of {WRT}, got {wrt!r}")
    if layer.router_input == "input" and wrt == "code":
        raise ValueError("wrt='code' is undefined for a MoELoRA layer with router_input='input': its "
                         "router reads the token x, not the code h; accepted values for this layer: "
                         "('input',)")
    return wrt


def _router_map(layer, wrt: str, dtype: torch.dtype = torch.float64) -> Tensor:
    """``M`` in ``dtype``: the linear map from ``z`` (h or x) to the logits (overflow rejected)."""
    if wrt == "code" or layer.router_input == "input":
        M = dtype_call(layer, lambda L: L.effective_router(), dtype=dtype)
    else:
        M = dtype_call(layer, lambda L: L.effective_router() @ L.A, dtype=dtype)
    check_result({"the router map M": M}, "router map")
    return M


def _norm2(M: Tensor) -> float:
    """``‖M‖₂``, rejecting an overflow."""
    norm = torch.linalg.matrix_norm(M, ord=2)
    check_result({"‖M‖₂": norm}, "router map")
    return float(norm)


def _is_topk(layer) -> bool:
    return layer.top_k is not None and layer.top_k < layer.num_experts


def certified_lipschitz(layer, wrt: str = "code", *, dtype: torch.dtype = torch.float64) -> float:
    """``½ ‖M‖₂`` (see the module table), computed in ``dtype``; ``math.inf`` for top-k routing
    with ``k < E`` (no finite global bound exists)."""
    check_router_layer(layer)
    wrt = _check_wrt(layer, wrt)
    dtype = check_dtype(dtype)
    if _is_topk(layer):
        return math.inf
    return 0.5 * _norm2(_router_map(layer, wrt, dtype))


def _points_and_logits(layer, x: Tensor, wrt: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``z`` (h or x) and the router logits at ``z`` for tokens ``x (N, d_in)`` in ``dtype``."""
    def run(L):
        z = L.code(x) if wrt == "code" else x
        return z, (L.router_logits(None, z) if wrt == "code" else L.router_logits(z))
    z, logits = dtype_call(layer, run, dtype=dtype)
    check_result({"the code h = A x": z, "the router logits": logits}, "router_lipschitz")
    return z, logits


def reduced_map(M: Tensor) -> tuple[Tensor, Tensor]:
    """Thin SVD ``M = U Σ Vh`` (rank ≤ E) as ``(U Σ (E, k), Vh (k, D))``: a perturbation
    ``δ = cᵀ Vh`` moves the logits by ``U Σ c`` and has ``‖δ‖ = ‖c‖`` (the rest of z-space does not
    reach the router)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U * S, Vh


def local_svd(gates: Tensor, US: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token ``‖J_s(g_t) M‖₂ = ‖J_s(g_t) U Σ‖₂`` ``(N,)`` and the top right-singular vector
    in reduced coordinates ``(N, k)``."""
    _, s, vh = torch.linalg.svd(softmax_jacobian(gates) @ US, full_matrices=False)
    return s[:, 0], vh[:, 0, :]


def ascend_logits(gates_from_logits: Callable, logits0: Tensor, US: Tensor, starts: Tensor,
                  rho: Tensor, steps: int, step_size: float, sphere: bool) -> tuple[Tensor, Tensor]:
    """Maximise ``‖g(l + U Σ c) − g(l)‖`` per token over ``‖c‖ = ρ`` (``sphere``) or ``‖c‖ ≤ ρ``.

    ``logits0 (N, E)``; ``starts (R, *batch, N, k)`` unit directions (R restarts, any extra batch
    axes, e.g. one per ε, all ascended together); ``rho (*batch, N)``.  Normalised gradient steps
    of size ``step_size · ρ / (1 + i)``, each followed by the projection.  Returns the best ``c``
    ``(*batch, N, k)`` seen over all steps and restarts and its objective ``(*batch, N)``."""
    g0 = gates_from_logits(logits0)[0]
    rho = rho.unsqueeze(-1)
    tiny = torch.finfo(logits0.dtype).tiny
    c = starts * rho
    best_obj = torch.full(starts.shape[:-1], -1.0, dtype=c.dtype, device=c.device)
    best_c = c.clone()
    for i in range(steps + 1):
        c = c.detach().requires_grad_(i < steps)
        with torch.set_grad_enabled(i < steps):
            obj = (gates_from_logits(logits0 + c @ US.T)[0] - g0).norm(dim=-1)        # (R, N)
        better = obj.detach() > best_obj
        best_obj = torch.where(better, obj.detach(), best_obj)
        best_c = torch.where(better.unsqueeze(-1), c.detach(), best_c)
        if i == steps:
            break
        (grad,) = torch.autograd.grad(obj.sum(), c)
        c = c.detach() + (step_size / (1 + i)) * rho * grad / grad.norm(dim=-1, keepdim=True).clamp_min(tiny)
        norm = c.norm(dim=-1, keepdim=True).clamp_min(tiny)
        c = c * (rho / norm if sphere else (rho / norm).clamp(max=1.0))
    pick = best_obj.argmax(0, keepdim=True)
    return best_c.take_along_dim(pick.unsqueeze(-1), 0)[0], best_obj.take_along_dim(pick, 0)[0]


def local_lipschitz(layer, inputs: Tensor, wrt: str = "code", *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Closed-form local constants ``‖J_s(g(z_t)) M‖₂`` for every token of ``inputs (..., d_in)``
    (shape ``(N,)`` in ``dtype``, tokens flattened in row-major order).

    The fast path: logits ``x (W_eff A)ᵀ`` (or ``x W_gᵀ``), then
    ``‖J_s M‖₂² = λ_max(J_s (M Mᵀ) J_s)`` — one batched ``(E × E)`` eigenvalue problem per token,
    everything in ``dtype``.
    """
    check_router_layer(layer)
    wrt = _check_wrt(layer, wrt)
    dtype = check_dtype(dtype)
    x = flat_tokens(inputs, layer.in_features, device=layer.A.device, dtype=dtype)
    M = _router_map(layer, wrt, dtype)
    M_x = M if wrt == "input" or layer.router_input == "input" else _router_map(layer, "input", dtype)
    logits = x @ M_x.T
    check_result({"the router logits": logits}, "local_lipschitz")
    J = softmax_jacobian(layer.gates_from_logits(logits)[0])
    MM = M @ M.T
    check_result({"M Mᵀ": MM}, "local_lipschitz")
    local = torch.linalg.eigvalsh(J @ MM @ J)[:, -1].clamp_min(0.0).sqrt()
    check_result({"the local constants": local}, "local_lipschitz")
    return local


def local_lipschitz_generic(router_fn: Callable[[Tensor], Tensor], points: Tensor, *,
                            chunk_size: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``‖∂g/∂z (z_t)‖₂`` for ANY differentiable router ``g = router_fn(z)`` (one point ``(D,)`` →
    gates ``(E,)``), via ``torch.func.vmap(torch.func.jacrev(router_fn))`` over ``points (..., D)``.

    Returns ``(N,)``.  Agrees with :func:`local_lipschitz` for the linear routers of docs/method.md §1 and
    also handles nonlinear ones (e.g. a ``tanh`` talking module).  ``dtype``: the points are cast
    to it (``None``, the default, keeps theirs: ``router_fn``'s own parameters fix its precision,
    so pass a router in the dtype you ask for)."""
    if not callable(router_fn):
        raise TypeError(f"router_fn must be a callable z (D,) -> gates (E,), got {type(router_fn).__name__}")
    if not isinstance(points, Tensor) or points.ndim == 0:
        raise TypeError(f"points must be a torch.Tensor of shape (..., D), got {type(points).__name__}")
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, 1)
    dtype = points.dtype if dtype is None else check_dtype(dtype)
    flat = flat_tokens(points, points.shape[-1], "points", dtype=dtype)
    jac = torch.func.vmap(torch.func.jacrev(router_fn), chunk_size=chunk_size)(flat)
    if jac.ndim != 3:
        raise ValueError(f"router_fn must map one point (D,) to gates (E,); its Jacobian has shape "
                         f"{tuple(jac.shape[1:])}")
    local = torch.linalg.matrix_norm(jac.detach(), ord=2)
    check_result({"the local constants": local}, "local_lipschitz_generic")
    return local


def router_lipschitz(layer, inputs: Tensor, wrt: str = "code", *, steps: int = 8,
                     step_size: float = 0.5, radius: float = DEFAULT_RADIUS,
                     seed: int = 0, dtype: torch.dtype = torch.float64) -> LipschitzResult:
    """Certified / local / empirical router Lipschitz constants (docs/method.md §4) at the tokens of
    ``inputs`` — the layer's inputs ``x (..., d_in)`` (for ``wrt="code"`` the code ``h = A x`` is
    the variable).

    Empirical search: ``steps`` normalised-gradient steps of size ``step_size·ρ/(1 + i)`` on the
    sphere ``‖δ‖ = ρ = radius / ‖M‖₂`` around each token (``radius`` in logit units), restarts
    ``±v_t`` (``v_t`` the top right-singular vector of ``J_s(g_t) M``; a seeded random row-space
    direction where that Jacobian vanishes).  The search runs in the row space of ``M`` (the only
    directions that reach the router); the reported quotient ``‖g(z+δ) − g(z)‖ / ‖δ‖`` is then
    evaluated with the layer's own router at the full-space ``δ``.  Everything runs in ``dtype``
    (float64 default; the result's tensors are in it).
    """
    check_router_layer(layer)
    wrt = _check_wrt(layer, wrt)
    dtype = check_dtype(dtype)
    steps = check_int("steps", steps, 0)
    step_size, radius = check_positive_real("step_size", step_size), check_positive_real("radius", radius)
    seed = check_seed(seed)
    x = flat_tokens(inputs, layer.in_features, device=layer.A.device, dtype=dtype)
    M = _router_map(layer, wrt, dtype)
    norm_M = _norm2(M)
    US, Vh = reduced_map(M)
    z, logits = _points_and_logits(layer, x, wrt, dtype)
    g0 = layer.gates_from_logits(logits)[0]
    local, q = local_svd(g0, US)
    if norm_M == 0.0:
        empirical_t, rho = torch.zeros_like(local), 0.0
    else:
        rho = radius / norm_M
        gen = torch.Generator().manual_seed(seed)
        rand = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.device, q.dtype)
        q = torch.where((local <= 1e-12 * norm_M).unsqueeze(-1), rand, q)
        q = q / q.norm(dim=-1, keepdim=True)
        c, _ = ascend_logits(layer.gates_from_logits, logits, US, torch.stack([q, -q]),
                             torch.full_like(local, rho), steps, step_size, sphere=True)
        delta = c @ Vh
        if not math.isfinite(rho) or not (delta.norm(dim=-1) > 0).all():
            raise ValueError(f"radius={radius:g} is too extreme for this layer in {dtype}: the search "
                             f"perturbation (ρ = radius / ‖M‖₂ = {rho:g}) under- or overflows")
        route = gates_of_code if wrt == "code" else gates_of_input
        g1 = dtype_call(layer, lambda L: route(L, z + delta), dtype=dtype)
        empirical_t = (g1 - g0).norm(dim=-1) / delta.norm(dim=-1)
    check_result({"the local constants": local, "the empirical quotients": empirical_t},
                 "router_lipschitz", "the inputs, the layer's weights or radius")
    i = int(local.argmax())
    return LipschitzResult(certified=math.inf if _is_topk(layer) else 0.5 * norm_M,
                           local_max=float(local[i]), empirical=float(empirical_t.max()),
                           local=local, empirical_per_token=empirical_t, argmax_index=i,
                           argmax_input=inputs.detach().reshape(-1, layer.in_features)[i].clone(),
                           wrt=wrt, radius=rho, certified_exists=not _is_topk(layer))
