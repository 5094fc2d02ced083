"""The adapter branch of every layer as one autograd Function with a hand-written backward.

Same maths as the layers' public pieces (``code``, ``router_logits``, ``gates_from_logits``,
``mix_experts``), for the N tokens of ``x (N, d_in)`` and a base output ``out (N, d_out)``::

    h = A x                                                    (r per token)
    LoRA:     u = h,                                W = s B
    mixtures: logits = W_eff h, W_eff = W_r K, K = T ⊗ I_m   (code router; W_eff = W_r when T is None)
                     = W_g x                                (input router)
              g = softmax(logits)  (with top_k: the softmax over the k largest logits)
              g' = g ∘ keep        (gate dropout, keep = mask / (1 − p); else g' = g)
              u = [g'_1 h_1; …; g'_E h_E],          W = s [B_1 C_1, …, B_E C_E]
    y = out + W u

Backward, from ``ȳ`` (and, for the mixtures, the gradients of the returned logits and gates)::

    ū = Wᵀ ȳ;  W̄ = ȳ uᵀ  (LoRA: B̄ = s W̄;  mixtures: B̄_e = s W̄_e C_eᵀ, C̄_e = s B_eᵀ W̄_e)
    ḡ' = Σ_j (ū ∘ h) per expert block;  h̄ = ū ∘ g';  ḡ = ḡ' ∘ keep (+ returned-gates gradient)
    logits̄ = g ∘ (ḡ − ⟨ḡ, g⟩)  (+ returned-logits gradient)
    code:  h̄ += W_effᵀ logits̄;  W̄_eff = logits̄ hᵀ;  W̄_r = W̄_eff Kᵀ;  T̄[e, f] = Σ_j (W_rᵀ W̄_eff)[e m + j, f m + j]
    input: x̄ = W_gᵀ logits̄;  W̄_g = logits̄ xᵀ
    Ā = h̄ xᵀ;  x̄ += Aᵀ h̄;  out̄ = ȳ

Why one Function: on CPU, what a mixture adds to LoRA's arithmetic is small (``E·r`` per token for
the router, ``r`` for the gating), and its cost was per-operation overhead — every op of the
straightforward version records an autograd node and picks its own memory layout.  Here autograd
sees one node; T is folded into the router once per call (``W_eff``, ``E × r``: the tokens' codes
are never mixed); and every per-token intermediate is laid out token-minor, ``(r, N)`` / ``(E, N)``:
MKL's GEMMs with a small output dimension r are markedly faster when r is the row dimension, and
the softmax over a few experts is several times faster along dim 0.  LoRA goes through the same
Function (``router=None``), so the two differ by the routing only.  Kept for backward: ``h`` (as
LoRA), and for the mixtures the gates and ``u`` (``N·(E + r)`` numbers more than LoRA) and the
parameter-sized ``W`` (``W_eff`` and ``T ⊗ I_m`` with a T), which would otherwise be recomputed.
Double backward is not supported (``once_differentiable``).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .routing import route
from .structures import talk_kron


def expert_rows(B: Tensor, C: Tensor | None, scaling: float) -> Tensor:
    """``Wᵀ (r, d_out)``, row-major: LoRA ``s Bᵀ``; mixtures ``s [B_1 C_1, …, B_E C_E]ᵀ`` (one batched
    matmul, rows ``(B_e C_e)ᵀ = C_eᵀ B_eᵀ``).  Both in the same layout, so they run the same GEMMs."""
    Wt = B.t().contiguous() if C is None else torch.bmm(C.mT, B.mT).view(-1, B.shape[1])
    return Wt if scaling == 1.0 else scaling * Wt


class FusedAdapter(torch.autograd.Function):
    """``FusedAdapter.apply(x, A, B, C, router, T, out, scaling, router_input, top_k, keep, routing)``.

    LoRA: ``B (d_out, r)``, ``C = router = T = None``; returns ``y``.  Mixtures: ``B (E, d_out, m)``,
    ``C (E, m, m)``, ``router`` = ``W_r (E, r)`` (``router_input="code"``, ``T (E, E)`` or None) or
    ``W_g (E, d_in)`` (``"input"``), ``keep (N, E)`` gate-dropout multipliers or None; returns ``y``,
    and with ``routing=True`` ``(y, logits, gates)`` (+ ``topk_index`` with ``top_k``), logits and
    gates ``(N, E)`` before gate dropout and differentiable (for routing hooks and balance losses).
    ``x (N, d_in)``; ``out (N, d_out)``, or None for the branch alone.
    """

    @staticmethod
    def forward(ctx, x, A, B, C, router, T, out, scaling: float, router_input: str, top_k, keep,
                routing: bool = False):
        hT = A @ x.t()                                                   # (r, N)
        r = hT.shape[0]
        outputs = ()
        if router is None:                                               # LoRA
            uT, gatesT, keep_t, K, W_eff = hT, None, None, None, None
        else:
            E, _, m = B.shape
            code = router_input == "code"
            if code:
                K = None if T is None else talk_kron(T, m)
                W_eff = router if K is None else router @ K              # W_r (T ⊗ I_m), (E, r)
                logitsT = W_eff @ hT                                      # (E, N)
            else:
                K = W_eff = None
                logitsT = router @ x.t()
            gatesT, index = route(logitsT, top_k)
            keep_t = None if keep is None else keep.t()
            usedT = gatesT if keep_t is None else gatesT * keep_t
            uT = (hT.view(E, m, -1) * usedT.unsqueeze(1)).view(r, -1)
            if routing:
                outputs = (logitsT.t(), gatesT.t())
                if top_k is not None:
                    ctx.mark_non_differentiable(index)
                    outputs += (index.t(),)
        Wt = expert_rows(B, C, scaling)
        y = uT.t() @ Wt if out is None else torch.addmm(out, uT.t(), Wt)
        # mixtures keep u and W (N·r and a parameter-sized matrix) rather than recompute them
        ctx.save_for_backward(x, A, B, C, router, hT, gatesT, keep_t, K, W_eff,
                              None if router is None else uT, None if router is None else Wt)
        ctx.scaling, ctx.code = scaling, router_input == "code"
        ctx.set_materialize_grads(False)
        return (y, *outputs) if outputs else y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_logits=None, grad_gates=None, *_):
        x, A, B, C, router, hT, gatesT, keep_t, K, W_eff, uT, Wt = ctx.saved_tensors
        if router is None and grad_y is not None:
            Wt = expert_rows(B, None, ctx.scaling)                       # LoRA: s Bᵀ, recomputed
        need = ctx.needs_input_grad
        grad = dict.fromkeys(("x", "A", "B", "C", "router", "T"))
        r = hT.shape[0]
        router_x = None
        if router is None:                                               # LoRA
            ghT = Wt @ grad_y.t()
            if need[2]:
                grad["B"] = (hT @ grad_y).t() if ctx.scaling == 1.0 else ctx.scaling * (hT @ grad_y).t()
        else:
            E, d_out, m = B.shape
            h3 = hT.view(E, m, -1)
            if grad_y is not None:
                usedT = gatesT if keep_t is None else gatesT * keep_t
                gu3 = (Wt @ grad_y.t()).view(E, m, -1)                       # ūᵀ
                if need[2] or need[3]:
                    gZ = (uT @ grad_y).view(E, m, d_out)                             # (W̄_e)ᵀ
                    if ctx.scaling != 1.0:
                        gZ = ctx.scaling * gZ
                    grad["B"] = torch.bmm(C, gZ).mT if need[2] else None
                    grad["C"] = torch.bmm(B.mT, gZ.mT) if need[3] else None
                grad_gT = (gu3 * h3).sum(1)                                     # (E, N)
                ghT = (gu3 * usedT.unsqueeze(1)).view(r, -1)
                if keep_t is not None:
                    grad_gT = grad_gT * keep_t
                if grad_gates is not None:
                    grad_gT = grad_gT + grad_gates.t()
            else:
                ghT = torch.zeros_like(hT)
                grad_gT = None if grad_gates is None else grad_gates.t()
            grad_lT = None
            if grad_gT is not None:
                grad_lT = torch._softmax_backward_data(grad_gT, gatesT, 0, gatesT.dtype)
            if grad_logits is not None:
                grad_lT = grad_logits.t() if grad_lT is None else grad_lT + grad_logits.t()
            if grad_lT is not None:
                if ctx.code:
                    ghT = ghT.addmm_(W_eff.t(), grad_lT)
                    if need[4] or need[5]:
                        grad_eff = grad_lT @ hT.t()                                 # (E, r)
                        grad["router"] = grad_eff if K is None else grad_eff @ K.t()
                        if K is not None and need[5]:                           # through K = T ⊗ I_m
                            grad_K = (router.t() @ grad_eff).view(E, m, E, m)
                            grad["T"] = grad_K.diagonal(dim1=1, dim2=3).sum(-1)
                else:
                    router_x = grad_lT.t() @ router if need[0] else None
                    grad["router"] = grad_lT @ x if need[4] else None
        if need[1]:
            grad["A"] = ghT @ x
        if need[0]:
            grad["x"] = ghT.t() @ A if router_x is None else router_x.addmm_(ghT.t(), A)
        return (grad["x"], grad["A"], grad["B"], grad["C"], grad["router"], grad["T"],
                grad_y if need[6] else None, None, None, None, None, None)
