"""The reparameterisation maps between TalkLoRA and the two MoELoRA routers (docs/method.md §3).

Notation as in :mod:`talklora_min.layers`: ``A (r, d_in)``, ``C (E, m, m)``, ``B (E, d_out, m)``,
``T (E, E)``, ``W_r (E, r)`` (code router), ``W_g (E, d_in)`` (input router), ``m = r / E``,
``h = A x``.  Every map below returns a layer computing *the same function* as its source
(same outputs, same gates; logits are equal too except where a docstring says otherwise):

==========================================  ==================================================
:func:`moelora_from_identity_talk`          TalkLoRA(T = I)            -> MoELoRA-code(W_r)
:func:`talklora_from_moelora`               MoELoRA-code(W_r)          -> TalkLoRA(T = I, W_r)
:func:`absorb_talk`                         TalkLoRA(T, W_r)           -> MoELoRA-code(W_r (T ⊗ I_m))
:func:`input_router_from_code`              MoELoRA-code(W') / TalkLoRA -> MoELoRA-input(W_g = W' A)
:func:`code_router_from_input`              MoELoRA-input(W_g)         -> MoELoRA-code(W'), W' A = W_g
==========================================  ==================================================

The last map is partial: it exists iff ``W_g`` lies in the row space of ``A`` up to a shift that
softmax ignores (see :func:`rowspace_residual`); :func:`non_representable_counterexample` builds a
MoELoRA-input layer for which it does not.

Conventions shared by all maps
------------------------------
* **The base is shared, not copied.**  The new layer wraps the *same* ``nn.Linear`` object as the
  source (``new.base is old.base``): the frozen ``W0``/``b`` are not duplicated, and anything that
  later changes the base weight in place (e.g. a LoRA ``merge`` elsewhere) is seen by both layers.
  Deep-copy the source first if you need independent bases.
* **Adapter tensors are copied** (``get_weights`` clones, ``set_weights`` copies), so training the
  new layer never changes the source.  B tied across layers (``share_B_across_layers``) is
  therefore *untied* in the result.
* Hyper-parameters carry over: ``alpha`` (so the scaling ``s`` is equal), ``dropout``,
  ``top_k``, ``gate_dropout``, ``balance_loss`` and the train/eval mode.  Routing hooks are not
  carried over.  Building the new layer does not consume the caller's global RNG.
* TalkLoRA layers of every communication structure (``talk_structure``) go through the maps by
  their effective T (``layer.T``, ``get_weights()["T"]``).
* Tensor versions of the router maps (:func:`absorbed_router`, :func:`input_router_weight`,
  :func:`code_router_weight`) work on plain tensors.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import MoELoRALinear, TalkLoRALinear, absorbed_router

__all__ = [
    "absorb_talk", "absorbed_router", "code_router_from_input", "code_router_weight",
    "default_tolerance", "input_router_from_code", "input_router_weight", "is_code_representable",
    "moelora_from_identity_talk", "non_representable_counterexample", "rowspace_residual",
    "talklora_from_moelora",
]


# ----------------------------------------------------------------------------- helpers
def _require(layer, cls, router_input: str | None, fn: str) -> None:
    if not isinstance(layer, cls):
        raise TypeError(f"{fn} expects a {cls.__name__}, got {type(layer).__name__}")
    if router_input is not None and layer.router_input != router_input:
        raise ValueError(f"{fn} expects router_input={router_input!r}, got {layer.router_input!r}")


def _moe_kwargs(layer: MoELoRALinear) -> dict:
    return dict(alpha=layer.alpha, dropout=layer.dropout, top_k=layer.top_k,
                gate_dropout=layer.gate_dropout, balance_loss=layer.balance_loss)


def _build(cls, base: nn.Linear, *args, training: bool, **kwargs):
    """Construct a layer without touching the caller's RNG (the init is overwritten anyway)."""
    with torch.random.fork_rng(devices=[]):
        layer = cls(base, *args, **kwargs)
    return layer.train(training)


def _moelora(src: MoELoRALinear, router_input: str, **weights: Tensor) -> MoELoRALinear:
    kw = _moe_kwargs(src)
    new = _build(MoELoRALinear, src.base, src.rank, src.num_experts, router_input,
                 kw.pop("alpha"), kw.pop("dropout"), kw.pop("top_k"), training=src.training, **kw)
    new.set_weights(**weights)
    return new


def _expert_weights(layer: MoELoRALinear) -> dict[str, Tensor]:
    w = layer.get_weights()
    return {"A": w["A"], "C": w["C"], "B": w["B"]}


def default_tolerance(dtype: torch.dtype) -> float:
    """Default tolerance of the representability test: ``√eps`` of ``dtype``
    (≈ 3.5e-4 for float32, 1.5e-8 for float64) — far above round-off of ``W' A`` and of the
    float64 projection, far below the residual of a genuine counterexample (≥ 1/√2 for ours)."""
    return math.sqrt(torch.finfo(dtype).eps)


# ----------------------------------------------------------------------------- tensor maps
def input_router_weight(W_code: Tensor, A: Tensor) -> Tensor:
    """Inclusion of the code router in the input router: ``W_g = W' A``, shape ``(E, d_in)``,
    so that ``W_g x = W' (A x) = W' h`` for every token x (docs/method.md §3)."""
    return W_code @ A


def _centered(W: Tensor) -> Tensor:
    """``(I − J/E) W``: remove the mean row (softmax ignores a logit shift common to all experts)."""
    return W - W.mean(0, keepdim=True)


def rowspace_residual(W_g: Tensor, A: Tensor, *, modulo_shift: bool = False) -> float:
    """Relative least-squares residual of the router rows against ``rowspace(A)``:

        ``ρ = ‖W_g − W_g P_A‖_F / ‖W_g‖_F``,  ``P_A = A⁺ A`` (orthogonal projector onto rowspace(A)),

    i.e. ``min_{W'} ‖W_g − W' A‖_F / ‖W_g‖_F``, computed in float64 with the pseudo-inverse.
    ``ρ = 0`` iff ``W_g = W' A`` for some ``W' (E, r)``; ``ρ`` is defined as 0 for ``W_g = 0``.

    ``modulo_shift=True`` first centres the rows, ``W_g ← (I − J/E) W_g``: softmax is invariant to
    adding the same number ``vᵀx`` to every logit, so a code router reproduces the *gates* of
    ``W_g`` iff ``W_g = W' A + 1 vᵀ`` for some v, iff the centred rows lie in rowspace(A).  This is the
    criterion :func:`is_code_representable` uses; it is never larger than the plain residual's
    numerator (and is 0 for every E = 1 layer, whose single gate is constantly 1).
    """
    W = W_g.detach().to(torch.float64)
    A64 = A.detach().to(torch.float64)
    if W.ndim != 2 or A64.ndim != 2 or W.shape[1] != A64.shape[1]:
        raise ValueError(f"rowspace_residual: need W_g (E, d_in) and A (r, d_in); got "
                         f"{tuple(W_g.shape)} and {tuple(A.shape)}")
    if modulo_shift:
        W = _centered(W)
    norm = torch.linalg.matrix_norm(W)
    if norm == 0:
        return 0.0
    projected = (W @ torch.linalg.pinv(A64)) @ A64
    return float(torch.linalg.matrix_norm(W - projected) / norm)


def code_router_weight(W_g: Tensor, A: Tensor, *, modulo_shift: bool = False) -> Tensor:
    """Least-squares solution of ``W_g = W' A``: ``W' = W_g A⁺`` (minimum norm), float64 solve,
    returned in ``W_g``'s dtype.  Exact iff :func:`rowspace_residual` is 0; with ``modulo_shift``
    it solves ``(I − J/E) W_g = W' A`` instead (same gates, logits shifted per token)."""
    W = W_g.detach().to(torch.float64)
    if modulo_shift:
        W = _centered(W)
    return (W @ torch.linalg.pinv(A.detach().to(torch.float64))).to(W_g.dtype)


# ----------------------------------------------------------------------------- layer maps
def moelora_from_identity_talk(layer: TalkLoRALinear, *, atol: float = 0.0) -> MoELoRALinear:
    """C1: TalkLoRA with ``T = I`` *is* MoELoRA-code with the same ``A, C, B, W_r``.

    ``h~ = (I ⊗ I_m) h = h`` so ``g = softmax(W_r h)``.  Requires ``|T − I| ≤ atol`` entrywise
    (default: exactly the identity); for any other T use :func:`absorb_talk`.
    """
    _require(layer, TalkLoRALinear, "code", "moelora_from_identity_talk")
    T = layer.T.detach()
    eye = torch.eye(layer.num_experts, dtype=T.dtype, device=T.device)
    if not torch.allclose(T, eye, rtol=0.0, atol=atol):
        dev = float((T - eye).abs().max())
        raise ValueError(f"T is not the identity (max |T - I| = {dev:.3g} > atol={atol}); "
                         "use absorb_talk(layer), which maps any T to MoELoRA-code with "
                         "W' = W_r (T ⊗ I_m)")
    w = layer.get_weights()
    return _moelora(layer, "code", **_expert_weights(layer), W_r=w["W_r"])


def talklora_from_moelora(layer: MoELoRALinear, talk_structure: str = "full", **structure_args) -> TalkLoRALinear:
    """C1 (converse): MoELoRA-code ``(A, C, B, W_r)`` is TalkLoRA with ``T = I`` and the same tensors.

    ``talk_structure`` (and its ``talk_groups`` / ``talk_bandwidth`` / ``talk_rank``) picks the
    communication structure of the result, at its (exact) identity point.
    """
    _require(layer, MoELoRALinear, "code", "talklora_from_moelora")
    if isinstance(layer, TalkLoRALinear):
        raise TypeError("talklora_from_moelora expects a MoELoRALinear, got a TalkLoRALinear")
    w = layer.get_weights()
    kw = _moe_kwargs(layer)
    new = _build(TalkLoRALinear, layer.base, layer.rank, layer.num_experts, kw.pop("alpha"),
                 kw.pop("dropout"), "identity", training=layer.training, talk_structure=talk_structure,
                 **structure_args, **kw)
    new.set_weights(**w, T=torch.eye(layer.num_experts, dtype=w["A"].dtype, device=w["A"].device))
    return new


def absorb_talk(layer: TalkLoRALinear) -> MoELoRALinear:
    """C2: TalkLoRA(A, C, B, T, W_r) equals MoELoRA-code(A, C, B, ``W' = W_r (T ⊗ I_m)``) for any T.

    ``W_r h~ = W_r (T ⊗ I_m) h = W' h``, so logits, gates and outputs coincide.  Blockwise
    ``W'^{(e)} = Σ_e' T[e', e] W_r^{(e')}`` (see :func:`absorbed_router`).  Hence, with a linear T,
    the function class of TalkLoRA equals that of MoELoRA-code; T only reparameterises the router.
    """
    _require(layer, TalkLoRALinear, "code", "absorb_talk")
    w = layer.get_weights()
    W_abs = absorbed_router(w["W_r"], w["T"], layer.expert_rank)
    return _moelora(layer, "code", **_expert_weights(layer), W_r=W_abs)


def input_router_from_code(layer: MoELoRALinear) -> MoELoRALinear:
    """C3 (inclusion): MoELoRA-code with router ``W'`` equals MoELoRA-input with ``W_g = W' A``.

    Accepts MoELoRA-code (``W' = W_r``) or TalkLoRA (``W' = W_r (T ⊗ I_m)``):
    ``W_g x = W' A x = W' h``.  Logits agree up to float round-off of the product ``W' A``.
    """
    _require(layer, MoELoRALinear, "code", "input_router_from_code")
    W_code = layer.effective_router().detach()
    return _moelora(layer, "input", **_expert_weights(layer),
                    W_g=input_router_weight(W_code, layer.A.detach()).clone())


def is_code_representable(layer_input: MoELoRALinear, tol: float | None = None) -> bool:
    """Whether a MoELoRA-input layer has a MoELoRA-code (hence TalkLoRA, T = I) equivalent with the
    same experts: ``rowspace_residual(W_g, A, modulo_shift=True) ≤ tol``
    (``tol=None``: :func:`default_tolerance` of the weight dtype)."""
    _require(layer_input, MoELoRALinear, "input", "is_code_representable")
    tol = default_tolerance(layer_input.A.dtype) if tol is None else tol
    return rowspace_residual(layer_input.W_g, layer_input.A, modulo_shift=True) <= tol


def code_router_from_input(layer_input: MoELoRALinear, tol: float | None = None) -> MoELoRALinear:
    """C3 (partial converse): MoELoRA-input ``W_g`` -> MoELoRA-code ``W'`` with ``W' A = W_g``.

    Solves ``W' = W_g A⁺`` (float64 least squares).  If ``W_g`` itself is in rowspace(A) the logits
    are reproduced; if only its centred rows are (``W_g = W' A + 1 vᵀ``), ``W' = (I − J/E) W_g A⁺``
    reproduces the gates and outputs while the logits differ by the per-token constant ``vᵀ x``.
    Raises ``ValueError`` stating the residual when neither holds within ``tol``
    (``None``: :func:`default_tolerance`): then no code router with these experts is equivalent.
    """
    _require(layer_input, MoELoRALinear, "input", "code_router_from_input")
    tol = default_tolerance(layer_input.A.dtype) if tol is None else tol
    W_g, A = layer_input.W_g.detach(), layer_input.A.detach()
    plain = rowspace_residual(W_g, A)
    if plain <= tol:
        W_code = code_router_weight(W_g, A)
    else:
        shifted = rowspace_residual(W_g, A, modulo_shift=True)
        if shifted > tol:
            raise ValueError(
                f"W_g is not in the row space of A: relative residual ‖W_g − W_g P_A‖/‖W_g‖ = {plain:.3e} "
                f"(modulo the softmax shift {shifted:.3e}) > tol = {tol:.3e}; no MoELoRA-code / "
                "TalkLoRA layer with the same experts computes these gates")
        W_code = code_router_weight(W_g, A, modulo_shift=True)
    return _moelora(layer_input, "code", **_expert_weights(layer_input), W_r=W_code)


def non_representable_counterexample(d_in: int, rank: int, num_experts: int, *, seed: int = 0,
                                     dtype: torch.dtype = torch.float64, d_out: int | None = None,
                                     bias: bool = True) -> MoELoRALinear:
    """A MoELoRA-input layer with no MoELoRA-code / TalkLoRA equivalent with the same experts (C3).

    Construction (deterministic in ``seed``; fresh base ``nn.Linear(d_in, d_out or d_in)``):
    * ``A (r, d_in)`` Gaussian / √d_in (full row rank almost surely, needs ``d_in > r`` so that
      rowspace(A) is a proper subspace);
    * ``C_e`` random orthogonal (invertible, condition number 1); ``B`` Gaussian, non-zero;
    * ``W_g = W₀ A + N`` with ``W₀`` Gaussian and ``N = (I − J/E) G (I − P_A)`` — centred rows
      orthogonal to rowspace(A) — scaled so ``‖N‖_F = ‖W₀ A‖_F``.

    Since ``N ⊥ W₀ A`` (Frobenius), ``rowspace_residual(W_g, A) = 1/√2 ≈ 0.707`` and the
    shift-invariant residual is ≥ 1/√2.  Why no code router works: at fixed code h the code gates
    are constant, but these gates move with the component of x in ker(A) (through N), and with
    invertible C_e and generic B the outputs ``Σ_e g_e B_e C_e h_e`` move with them.
    Needs ``num_experts ≥ 2`` (one expert has constant gate 1, always representable).
    """
    if not isinstance(d_in, int) or not isinstance(rank, int) or d_in <= rank:
        raise ValueError(f"non_representable_counterexample needs d_in > rank so that rowspace(A) is a "
                         f"proper subspace of R^d_in; got d_in={d_in}, rank={rank}")
    if not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(f"non_representable_counterexample needs num_experts >= 2 (with one expert the "
                         f"gate is constantly 1); got {num_experts!r}")
    E, d_out = num_experts, d_in if d_out is None else d_out
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = nn.Linear(d_in, d_out, bias=bias).to(dtype)
        layer = MoELoRALinear(base, rank, E, "input")
    m = layer.expert_rank
    A = randn(rank, d_in) / math.sqrt(d_in)
    C = torch.linalg.qr(randn(E, m, m)).Q
    B = randn(E, d_out, m) / math.sqrt(m)
    inside = randn(E, rank) @ A
    P_A = torch.linalg.pinv(A) @ A
    N = _centered(randn(E, d_in) @ (torch.eye(d_in, dtype=f64) - P_A))
    N = N * (torch.linalg.matrix_norm(inside) / torch.linalg.matrix_norm(N))
    layer.set_weights(A=A.to(dtype), C=C.to(dtype), B=B.to(dtype), W_g=(inside + N).to(dtype))
    return layer
