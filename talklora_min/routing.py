"""Routing: the gates from the router's logits (dense softmax or hard–soft top-k) and the auxiliary
load-balance losses (docs/method.md §1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import BALANCE_LOSSES


def route(logits_t: Tensor, top_k: int | None) -> tuple[Tensor, Tensor | None]:
    """Gates ``(E, N)`` from logits ``(E, N)``: softmax over the experts (dim 0) or, with ``top_k``, the
    softmax over each token's k largest logits; and the top-k indices ``(k, N)`` (None when dense)."""
    if top_k is None:
        return torch.softmax(logits_t, 0), None
    values, index = logits_t.topk(top_k, dim=0)
    return torch.softmax(torch.full_like(logits_t, float("-inf")).scatter(0, index, values), 0), index


def balance_loss(kind: str, logits: Tensor, gates: Tensor) -> Tensor:
    """Auxiliary load-balance loss over all tokens of one forward (gates ``(..., E)``).

    * ``switch``  (Switch Transformer): ``E · Σ_e f_e P_e``, ``f_e`` = share of tokens whose top-1
      expert is e, ``P_e`` = mean gate of e.  Minimum 1 at balanced load.
    * ``cv``      squared coefficient of variation of the soft load ``L_e = Σ_t g_e(t)``.
    * ``entropy`` ``mean_t H(g(t)) − H(mean_t g(t))``: confident tokens, balanced batch (LoRA-Mixer's
      routing-specialisation objective).
    """
    E = gates.shape[-1]
    g = gates.reshape(-1, E)
    if kind == "switch":
        f = F.one_hot(logits.reshape(-1, E).argmax(-1), E).to(g.dtype).mean(0)
        return E * (f * g.mean(0)).sum()
    if kind == "cv":
        load = g.sum(0)
        return load.var(unbiased=False) / load.mean().pow(2)
    if kind == "entropy":
        def entropy(p):
            return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)
        return entropy(g).mean() - entropy(g.mean(0))
    raise ValueError(f"balance loss kind must be one of {BALANCE_LOSSES}, got {kind!r}")
