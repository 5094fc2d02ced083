"""Perturbation amplification of the router and the adapter (docs/method.md §4; claims C5, C10).

For tokens ``x`` and a perturbation ``δ`` of relative size ``ε``:

* ``"gaussian_input"``  isotropic Gaussian in x, ``‖δ‖ = ε ‖x‖`` per token.
* ``"gaussian_block"``  Gaussian confined to expert block ``e`` of the code, ``δh = e_e ⊗ δ``,
  ``‖δh‖ = ε ‖h‖`` (``h = A x``; ``block=None``: a seeded random block per token, or a fixed int).
  The experts and a code router read ``h + δh``; an input router still reads ``x`` (no change).
* ``"adversarial"``     PGD in the ball ``‖δ‖ ≤ ε ‖x‖`` maximising ``‖Δg‖``.  The ascent runs in
  the row space of the router map ``M_x`` (``W_eff A`` or ``W_g``; the complement does not reach
  the router) from ``±`` the top right-singular vector of the local Jacobian ``J_s(g) M_x``; the
  Gaussian ``δ`` of ``"gaussian_input"`` (same seed) is kept as a candidate, and each token takes
  the candidate with the larger ``‖Δg‖`` measured with the layer's own forward pieces — so the
  adversarial routing quotient is never below the Gaussian one, token by token.

Metrics per token (``Δ`` = perturbed − clean, ``δ`` the x- or h-perturbation):

* ``routing_quotient``  ``‖Δg‖₂ / ‖δ‖₂``            — statistics median, p95, max
* ``total_variation``   ``½ ‖Δg‖₁``                 — median, p95, max
* ``adapter_quotient``  ``‖Δ adapter(x)‖₂ / ‖δ‖₂``  (``adapter = s Σ_e g_e B_e C_e h_e``) — median, p95, max
* ``top1_flip_rate``    ``[argmax g' ≠ argmax g]``  — mean
A quotient with ``δ = 0`` (a zero token) is defined as 0.  ``ε ≤ 0`` is rejected (the quotients
would all be 0/0).

One row per measurement: ``{"layer", "kind", "eps", "metric", "statistic", "value", "n_tokens"}``.
Everything is computed in ``dtype`` (float64 by default, float32 allowed) from the layer's own
methods (``code``, ``router_logits``, ``gates_from_logits``, ``mix_experts``), vectorised over
tokens, seeded with a local ``torch.Generator`` (the global RNG is never touched): the same call
gives identical rows.  A perturbation so large (or inputs so large) that a metric overflows
``dtype`` raises ``ValueError`` instead of returning NaN/Inf.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._util import check_dtype, check_int, check_result, check_router_layer, check_seed, dtype_call, flat_tokens
from .lipschitz import _router_map, ascend_logits, local_svd, reduced_map
from .records import SINGLE_LAYER_NAME, _as_mask, routed_layers

KINDS = ("gaussian_input", "gaussian_block", "adversarial")
QUANTILES = {"median": 0.5, "p95": 0.95}
ROW_KEYS = ("layer", "kind", "eps", "metric", "statistic", "value", "n_tokens")


def _as_list(value, name: str, accepted=None) -> list:
    """One item or an iterable of items (a string counts as one item), non-empty."""
    if isinstance(value, (str, numbers.Number)):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise TypeError(f"{name} must be one of {accepted} or a list of them, got {value!r} "
                            f"({type(value).__name__})") from None
    if not items:
        raise ValueError(f"{name} must not be empty")
    if accepted is not None:
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"{name} must be one of {accepted} (or a list of them), got {item!r} "
                                f"({type(item).__name__})")
            if item not in accepted:
                raise ValueError(f"{name} must be one of {accepted} (or a list of them), got {item!r}")
    return items


def _check_eps(eps) -> list[float]:
    """Positive finite relative sizes: a number (Python or numpy), a sequence, an array or tensor."""
    if isinstance(eps, (Tensor, np.ndarray)):
        eps = np.asarray(eps.detach().cpu() if isinstance(eps, Tensor) else eps).reshape(-1).tolist()
    if isinstance(eps, (str, bytes)) or eps is None:
        raise TypeError(f"eps must be a positive finite number or a sequence of them, got {eps!r}")
    values = _as_list(eps, "eps")
    for e in values:
        if isinstance(e, bool) or not isinstance(e, numbers.Real):
            raise TypeError(f"eps must be a positive finite number or a sequence of them, got {e!r} "
                            f"({type(e).__name__})")
        if not math.isfinite(e) or e <= 0:
            raise ValueError(f"eps must be a positive finite number or a sequence of them, got {e!r} "
                             "(eps = 0 would make every quotient 0/0)")
    return [float(e) for e in values]


def _unit(t: Tensor) -> Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)


def _quotient(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _rows(name: str, kind: str, eps: float, per_token: dict[str, Tensor]) -> list[dict]:
    n = per_token["routing_quotient"].numel()
    rows = []
    for metric in ("routing_quotient", "total_variation", "adapter_quotient"):
        v = per_token[metric]
        q = torch.quantile(v, torch.tensor(list(QUANTILES.values()), dtype=v.dtype, device=v.device))
        stats = dict(zip(QUANTILES, q.tolist()), max=float(v.max()))
        rows += [dict(layer=name, kind=kind, eps=eps, metric=metric, statistic=s, value=float(val),
                      n_tokens=n) for s, val in stats.items()]
    rows.append(dict(layer=name, kind=kind, eps=eps, metric="top1_flip_rate", statistic="mean",
                     value=float(per_token["top1_flip"].mean()), n_tokens=n))
    return rows


def _reduced_mixer(L):
    """``(h, g) ↦ s · R u`` with ``u = [g_e C_e h_e]_e`` and ``B_flat = Q R`` (thin QR of the
    ``(d_out, r)`` expert matrix): ``‖s R Δu‖ = ‖s B_flat Δu‖ = ‖Δ adapter‖`` exactly, at
    ``O(r²)`` instead of ``O(r d_out)`` per token.  Runs the layer's own ``mix_experts`` code with
    ``R`` in place of ``B`` (a stand-in object carrying the attributes it reads)."""
    E, m = L.num_experts, L.expert_rank
    R = torch.linalg.qr(L.B.transpose(0, 1).reshape(L.out_features, L.rank), mode="r")[1]
    k = R.shape[0]
    proxy = SimpleNamespace(B=R.reshape(k, E, m).transpose(0, 1), C=L.C, num_experts=E, expert_rank=m,
                            out_features=k, rank=L.rank)
    mix = type(L).mix_experts
    return lambda h, g: L.scaling * mix(proxy, h, g)


@dataclass
class _Draws:
    """The seeded random draws of one layer, in a fixed order (so results do not depend on which
    kinds run): Gaussian directions in x and in an expert block, the block per token, and — for the
    adversarial kind — the router map's row space and fallback start directions."""

    noise_x: Tensor                 # (N, d) unit directions in x
    noise_b: Tensor                 # (N, m) unit directions inside one expert block of h
    blocks: Tensor                  # (N,) the perturbed block per token
    US: Tensor | None = None        # (E, k) reduced router map (adversarial only)
    Vh: Tensor | None = None        # (k, d) its row space
    rand_q: Tensor | None = None    # (N, k) start directions where the local Jacobian vanishes


def _draw(layer, x: Tensor, kinds: list[str], seed: int, block, dtype: torch.dtype) -> _Draws:
    """Phase 1: every random draw (one local ``torch.Generator``; the global RNG is untouched).
    Drawn in float64 whatever ``dtype``, so all dtypes probe the same directions."""
    N, d = x.shape
    E, m = layer.num_experts, layer.expert_rank
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    draws = _Draws(_unit(torch.randn(N, d, generator=gen, dtype=f64)).to(x.device, dtype),
                   _unit(torch.randn(N, m, generator=gen, dtype=f64)).to(x.device, dtype),
                   torch.randint(E, (N,), generator=gen).to(x.device) if block is None else
                   torch.full((N,), block, dtype=torch.long, device=x.device))
    if "adversarial" in kinds:
        draws.US, draws.Vh = reduced_map(_router_map(layer, "input", dtype))
        draws.rand_q = torch.randn(N, draws.Vh.shape[0], generator=gen, dtype=f64).to(x.device, dtype)
    return draws


def _responses(L, x: Tensor, draws: _Draws, eps_list: list[float], kinds: list[str],
               pgd_steps: int) -> list[tuple[str, float, dict[str, Tensor]]]:
    """Phase 2 (inside :func:`dtype_call`, ``L`` carries the weights in the probe's dtype): the
    clean pass, then the per-token metrics of every (kind, ε), in the order of ``kinds`` × ``eps``."""
    N, E, m = x.shape[0], L.num_experts, L.expert_rank
    h = L.code(x)
    logits = L.router_logits(x, h)
    g = L.gates_from_logits(logits)[0]
    code_router = L.router_input == "code"
    mix = _reduced_mixer(L)
    top, y = g.argmax(-1), mix(h, g)
    x_norm = x.norm(dim=-1)

    # x-perturbations enter through the linear maps x ↦ h = A x and x ↦ logits (docs/method.md §3), so the
    # response to δ = a·u is h + a·A u and logits + a·(M_x u): precomputed for the Gaussian
    # directions u (and, for PGD, for the row-space basis Vh) instead of per ε.
    def response(u):
        hu = L.code(u)
        return hu, L.router_logits(u, hu)

    def gates_at(h2, logit_shift):
        logits2 = L.router_logits(None, h2) if code_router else logits + logit_shift
        return L.gates_from_logits(logits2)[0]

    def measure(h2, g2, delta_norm):
        dg = g2 - g
        dy = mix(h2, g2) - y
        return {"routing_quotient": _quotient(dg.norm(dim=-1), delta_norm),
                "total_variation": 0.5 * dg.abs().sum(-1),
                "adapter_quotient": _quotient(dy.norm(dim=-1), delta_norm),
                "top1_flip": (g2.argmax(-1) != top).to(x.dtype)}

    def gaussian_block(eps):
        dh = torch.zeros(N, E, m, dtype=x.dtype, device=x.device)
        dh[torch.arange(N, device=x.device), draws.blocks] = draws.noise_b * (eps * h.norm(dim=-1, keepdim=True))
        h2 = h + dh.flatten(-2)
        return measure(h2, gates_at(h2, 0.0), dh.flatten(-2).norm(dim=-1))

    if "gaussian_input" in kinds or "adversarial" in kinds:
        h_u, l_u = response(draws.noise_x)
        u_norm = draws.noise_x.norm(dim=-1)

    def gaussian_input(eps):
        a = (eps * x_norm).unsqueeze(-1)                       # ‖δ‖ = ε‖x‖, δ = a·u
        h2 = h + a * h_u
        return h2, gates_at(h2, a * l_u), a.squeeze(-1) * u_norm

    if "adversarial" in kinds:
        h_v, l_v = response(draws.Vh)                                       # (k, r), (k, E)
        local, q = local_svd(g, draws.US)
        q = _unit(torch.where((local <= 1e-12 * draws.US.norm()).unsqueeze(-1), draws.rand_q, q))
        radii = torch.tensor(eps_list, dtype=x.dtype, device=x.device).unsqueeze(-1) * x_norm
        starts = torch.stack([q, -q]).unsqueeze(1).expand(2, len(eps_list), *q.shape)
        c_all, _ = ascend_logits(L.gates_from_logits, logits, draws.US, starts, radii, pgd_steps, 0.5,
                                 sphere=False)                             # all ε in one batched ascent

    def adversarial(i_eps, eps):
        """The PGD candidate δ = c Vh (‖δ‖ = ‖c‖) or the Gaussian one, whichever moves g more."""
        h2, g2, delta_norm = gaussian_input(eps)
        c = c_all[i_eps]
        h_adv = h + c @ h_v
        g_adv = gates_at(h_adv, c @ l_v)
        take = (g_adv - g).norm(dim=-1) > (g2 - g).norm(dim=-1)
        return (torch.where(take.unsqueeze(-1), h_adv, h2), torch.where(take.unsqueeze(-1), g_adv, g2),
                torch.where(take, c.norm(dim=-1), delta_norm))

    out = []
    for kind in kinds:
        for i_eps, eps in enumerate(eps_list):
            if kind == "gaussian_block":
                per = gaussian_block(eps)
            else:
                per = measure(*(gaussian_input(eps) if kind == "gaussian_input" else adversarial(i_eps, eps)))
            out.append((kind, eps, per))
    return out


def _layer_rows(layer, name: str, x: Tensor, eps_list: list[float], kinds: list[str], seed: int,
                block, pgd_steps: int, dtype: torch.dtype = torch.float64) -> list[dict]:
    """All rows of one layer for tokens ``x (N, d_in)`` in ``dtype`` (already masked), in three
    phases: seeded draws, per-token metrics, summary rows."""
    draws = _draw(layer, x, kinds, seed, block, dtype)
    measured = dtype_call(layer, _responses, x, draws, eps_list, kinds, pgd_steps, dtype=dtype)
    for kind, eps, per in measured:
        check_result(per, f"perturbation_response (layer {name!r}, kind {kind!r}, eps {eps:g})",
                     "the inputs, the layer's weights or eps")
    return [row for kind, eps, per in measured for row in _rows(name, kind, eps, per)]


def _capture_inputs(model: nn.Module, layers: dict, inputs, model_kwargs: dict) -> tuple[dict, Tensor | None]:
    """Each routed layer's input(s) on one ``no_grad`` forward (forward pre-hooks), and the mask."""
    kwargs = dict(model_kwargs or {})
    if isinstance(inputs, dict):
        kwargs = {**inputs, **kwargs}
        args = ()
    elif isinstance(inputs, Tensor):
        args = (inputs,)
    else:
        raise TypeError(f"inputs for a model must be a tensor or a dict of forward keyword arguments, "
                        f"got {type(inputs).__name__}")
    captured = capture_layer_inputs(layers, lambda: model(*args, **kwargs))
    return captured, _as_mask(kwargs.get("attention_mask"))


def capture_layer_inputs(layers: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, list[Tensor]]:
    """The input ``x`` of every layer in ``layers`` (one tensor per call) during ``run()``, which is
    executed once under ``no_grad`` with forward pre-hooks (always removed afterwards)."""
    captured = {name: [] for name in layers}
    handles = [layer.register_forward_pre_hook(lambda mod, a, n=name: captured[n].append(a[0].detach()))
               for name, layer in layers.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _masked_tokens(xs: list[Tensor], mask: Tensor | None, name: str, d: int, device,
                   dtype: torch.dtype = torch.float64) -> Tensor:
    label = "inputs" if name == SINGLE_LAYER_NAME else f"input of layer {name!r}"
    parts = []
    for x in xs:
        t = flat_tokens(x, d, label, device=device, dtype=dtype)
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but layer {name!r} received "
                                 f"inputs with leading shape {tuple(x.shape[:-1])}")
            t = t[mask.reshape(-1).to(t.device)]
        parts.append(t)
    out = torch.cat(parts)
    if out.shape[0] == 0:
        raise ValueError(f"no unmasked tokens reach layer {name!r}")
    return out


def perturbation_response(layer_or_model: nn.Module, inputs, eps, kind, *, seed: int = 0,
                          block: int | None = None, pgd_steps: int = 10, model_kwargs: dict | None = None,
                          mask=None, dtype: torch.dtype = torch.float64) -> list[dict]:
    """Routing / adapter response to perturbations of relative size ``eps`` (docs/method.md §4).

    ``layer_or_model``: a MoE adapter layer (``inputs`` = its input ``x (..., d_in)``, rows named
    ``"layer"``; optional token ``mask`` of the leading shape) or a model (``inputs`` = its forward
    input, a tensor or a dict of keyword arguments, plus ``model_kwargs``; every routed layer's input
    is captured with forward pre-hooks on one ``no_grad`` forward, padding excluded through an
    ``attention_mask`` found in ``inputs``/``model_kwargs``; layers not called give no rows).
    ``eps``: a positive float or a sequence; ``kind``: one of ``KINDS`` or a sequence — one call
    measures the whole grid.  ``dtype``: the computation dtype (float64 default, or float32).
    Returns tidy rows with keys ``ROW_KEYS`` (see the module docstring).
    """
    kinds = _as_list(kind, "kind", KINDS)
    eps_list = _check_eps(eps)
    seed = check_seed(seed)
    pgd_steps = check_int("pgd_steps", pgd_steps, 0)
    dtype = check_dtype(dtype)
    if block is not None:
        block = check_int("block", block)
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be None or a dict, got {type(model_kwargs).__name__}")
    if mask is not None and not isinstance(mask, (Tensor, np.ndarray, list, tuple)):
        raise TypeError(f"mask must be None or a boolean / 0-1 tensor, array or list, got {type(mask).__name__}")
    if not isinstance(layer_or_model, nn.Module):
        raise TypeError(f"layer_or_model must be a MoE adapter layer or a torch.nn.Module holding some, "
                        f"got {type(layer_or_model).__name__}")
    if not any(hasattr(m, "add_routing_hook") for m in layer_or_model.modules()):
        raise ValueError(f"layer_or_model ({type(layer_or_model).__name__}) has no routed adapter layer "
                         f"(MoELoRALinear / TalkLoRALinear); inject one first")
    if hasattr(layer_or_model, "gates_from_logits"):
        layers = {SINGLE_LAYER_NAME: check_router_layer(layer_or_model, "layer_or_model")}
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs for a layer must be a tensor (..., d_in), got {type(inputs).__name__}")
        captured, token_mask = {SINGLE_LAYER_NAME: [inputs]}, _as_mask(mask)
    else:
        layers = routed_layers(layer_or_model)
        captured, token_mask = _capture_inputs(layer_or_model, layers, inputs, model_kwargs)
    for name, layer in layers.items():
        if block is not None and not 0 <= block < layer.num_experts:
            raise ValueError(f"block must be None (random block per token) or an expert index in "
                             f"[0, {layer.num_experts}) for layer {name!r}, got {block!r}")
    rows = []
    for name, layer in layers.items():
        if not captured[name]:
            continue
        x = _masked_tokens(captured[name], token_mask, name, layer.in_features, layer.A.device, dtype)
        rows += _layer_rows(layer, name, x, eps_list, kinds, seed, block, pgd_steps, dtype)
    return rows


def rows_to_frame(rows: Sequence[dict]):
    """Rows → ``pandas.DataFrame`` (columns ``ROW_KEYS``); pandas is imported lazily."""
    try:
        import pandas as pd
    except ImportError as err:  # pragma: no cover - pandas is an optional dependency
        raise ImportError("rows_to_frame needs pandas (pip install pandas)") from err
    return pd.DataFrame(list(rows), columns=list(ROW_KEYS))
