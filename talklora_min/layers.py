"""Adapter layers around a frozen ``nn.Linear`` (or transformers ``Conv1D``): LoRA, MoELoRA and
TalkLoRA (docs/method.md §1).

Notation: ``x`` a token (last axis ``d_in``), ``r`` total rank, ``E`` experts, ``m = r / E``.

* LoRA      ``y = W0 x + b + s · B A x``
* MoELoRA   ``h = A x = [h_1; …; h_E]``, ``y = W0 x + b + s · Σ_e g_e B_e C_e h_e`` with
  ``g = softmax(W_r h)`` (``router_input="code"``) or ``g = softmax(W_g x)`` (``"input"``).
* TalkLoRA  MoELoRA-code whose router reads ``h~ = (T ⊗ I_m) h`` (paper Eq. for the Talking
  Module): ``g = softmax(W_r h~)``; the experts still read the un-mixed blocks ``h_e``.  ``T`` is
  free (``talk_structure="full"``) or one of the structured parametrisations of
  :mod:`talklora_min.structures`.

Scaling: ``alpha=None`` gives ``s = 1`` (the official TalkLoRA code), a number gives
``s = alpha / r`` (PEFT convention).  Dropout ``p`` acts on ``x`` before ``A`` (all layers) and, for
the mixtures, on the summed adapter output; ``gate_dropout=True`` also drops gates after the
softmax, as the official code does (then gates no longer sum to 1 in training).  The default
leaves gates undropped.

How the forward is computed (same maths, fewer and cheaper operations): the adapter branch of every
layer is one autograd Function with a hand-written backward (:mod:`talklora_min.fused`).  Per call
the parameter-sized products are formed once — T folded into the router, ``W_eff = W_r (T ⊗ I_m)``
``(E, r)`` (§3, talk absorption), so no token's code is mixed; each ``C_e`` folded into its ``B_e``,
``W = s [B_1 C_1, …, B_E C_E]`` ``(d_out, r)`` (one batched matmul) — and the experts are one GEMM on
the gated code ``u = [g_1 h_1; …; g_E h_E]``, added to the base output inside that GEMM (``addmm``)
when no output dropout is active, as LoRA's ``s B h`` is.  No Python loop over experts.  The public
pieces (``code``, ``router_logits``, ``gates_from_logits``, ``mix_experts``, ``effective_router``)
compute the same numbers, for the probes.  NaN/Inf inputs are not checked in ``forward`` (that would
cost a device sync per call): they propagate to the output exactly as through ``nn.Linear``.  The
probes reject non-finite inputs.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

# argument checks and the Talking Module's maps live in their own modules; importable from here too
from .checks import (BALANCE_LOSSES, ROUTER_INPUTS, _checked_weight, _is_number,  # noqa: F401
                     adapter_dtype, cast_finite, check_alpha_dropout, check_base, check_moe_args,
                     check_positive_int, is_conv1d)
from .fused import FusedAdapter, expert_rows
from .routing import balance_loss, route
from .structures import (TALK_INITS, TALK_STRUCTURES, TalkStructure, absorbed_router,  # noqa: F401
                         parse_talk_init, talk_matrix)


# ----------------------------------------------------------------------------- layers
class AdapterLayer(nn.Module):
    """Common machinery: frozen base, scaling, dropout, weight access by their docs/method.md §8 names.

    ``base`` is an ``nn.Linear`` or a transformers ``Conv1D`` (its weight is stored transposed,
    ``(d_in, d_out)``; the adapter tensors have the same shapes as for ``nn.Linear``).  The layer
    exposes the base's ``weight`` and ``bias`` (read-only), so parents that read ``child.weight``
    (T5's ``wo.weight.dtype`` …) keep working.  Adapter parameters are float32 over half-precision
    bases (:func:`adapter_dtype`); ``dtype=`` overrides.  The adapter branch runs in the adapter's
    dtype and is added to the base output in the base output's dtype (autocast-friendly).
    ``adapter_enabled = False`` (see ``inject.disable_adapters``) gives the base output only.

    A subclass computes its branch in :meth:`_adapter` (added to the base output inside the last
    GEMM) and says in :meth:`_output_dropout` whether a dropout acts on the branch's output.
    """

    weight_names: tuple[str, ...] = ()

    def __init__(self, base: nn.Module, rank: int, alpha=None, dropout: float = 0.0, *,
                 dtype: torch.dtype | None = None):
        super().__init__()
        check_base(base)
        rank = check_positive_int("rank", rank)
        check_alpha_dropout(alpha, dropout)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
        self.base = base
        base.requires_grad_(False)
        self.fan_in_fan_out = is_conv1d(base)
        d_out, d_in = base.weight.shape[::-1] if self.fan_in_fan_out else base.weight.shape
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.rank, self.alpha, self.dropout = rank, alpha, float(dropout)
        self.scaling = 1.0 if alpha is None else alpha / rank
        self.param_dtype = adapter_dtype(base.weight.dtype) if dtype is None else dtype
        self.adapter_enabled = True

    # The base's weight and bias, for parents that read them (no new parameters are registered).
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def base_weight(self) -> Tensor:
        """The base weight as ``(d_out, d_in)`` (transposes a ``Conv1D`` weight)."""
        w = self.base.weight
        return w.t() if self.fan_in_fan_out else w

    # B may be tied to another layer's B (``tie_B``): then only the owner registers the Parameter,
    # so state dicts, ``save_pretrained`` and optimisers see it once.
    @property
    def B(self) -> Tensor:
        p = self._parameters.get("B")
        if p is not None:
            return p
        owner = self.__dict__.get("_B_owner")
        if owner is None:
            raise AttributeError("B")
        return owner.B

    def tie_B(self, owner: "AdapterLayer") -> None:
        """Use ``owner.B`` as this layer's ``B`` (one Parameter, registered in the owner only)."""
        if not isinstance(owner, AdapterLayer) or owner is self:
            raise ValueError("tie_B: owner must be another adapter layer")
        if tuple(owner.B.shape) != tuple(self.B.shape) or owner.B.dtype != self.B.dtype:
            raise ValueError(f"tie_B: B shapes/dtypes differ: {tuple(self.B.shape)} {self.B.dtype} vs "
                             f"{tuple(owner.B.shape)} {owner.B.dtype}")
        while "_B_owner" in owner.__dict__:     # always point at the registering layer
            owner = owner.__dict__["_B_owner"]
        self._parameters.pop("B", None)
        object.__setattr__(self, "_B_owner", owner)     # plain attribute: not a submodule

    @property
    def B_is_tied(self) -> bool:
        return "_B_owner" in self.__dict__

    def _parameter(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(shape, dtype=self.param_dtype, device=self.base.weight.device))

    def _drop(self, t: Tensor) -> Tensor:
        return F.dropout(t, self.dropout, self.training) if self.dropout else t

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"input x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape (..., d_in={self.in_features}), got {tuple(x.shape)}")

    def get_weights(self) -> dict[str, Tensor]:
        """Copies of the adapter tensors under their docs/method.md §8 names."""
        return {name: getattr(self, name).detach().clone() for name in self.weight_names}

    def _checked_weights(self, tensors: dict, accepted: tuple[str, ...]) -> dict[str, Tensor]:
        """Names, types, shapes and finiteness of every tensor (cast to the layer's dtype)."""
        unknown = sorted(set(tensors) - set(accepted))
        if unknown:
            raise ValueError(f"unknown weight name(s) {unknown} for {type(self).__name__}; "
                             f"accepted: {list(accepted)}")
        out = {}
        for name, value in tensors.items():
            target = getattr(self, name)
            out[name] = _checked_weight(name, value, tuple(target.shape), target.dtype)
        return out

    @torch.no_grad()
    def set_weights(self, **tensors: Tensor) -> None:
        """Copy tensors into the adapter by name (docs/method.md §8); checks names, types, shapes and finiteness
        first (nothing is copied on error).  Values are cast to the layer's dtype and device (as
        ``Tensor.copy_`` does); a value that is NaN/Inf, or overflows that dtype, is refused."""
        self._checked_weights(tensors, self.weight_names)
        if getattr(self, "merged", False):
            raise RuntimeError("unmerge() before set_weights(): the base weight holds the old adapter")
        for name, value in tensors.items():
            getattr(self, name).copy_(value)

    def _adapter(self, x: Tensor, out: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        """``out + adapter(x)`` (``adapter(x)`` alone for ``out=None``) before any output dropout, over
        the N tokens of ``x (..., d_in)``: ``(N, d_out)``, ``out (N, d_out)``."""
        raise NotImplementedError

    def _output_dropout(self) -> bool:
        """Whether a dropout acts on the adapter output in this mode (then it is not fused)."""
        return False

    def adapter_output(self, x: Tensor) -> Tensor:
        """The adapter branch alone, ``forward(x) − base(x)``."""
        y = self._adapter(x, None).view(*x.shape[:-1], self.out_features)
        return self._drop(y) if self._output_dropout() else y

    def forward(self, x: Tensor, base_output: Tensor | None = None) -> Tensor:
        """``base(x) + adapter(x)``.  ``base_output``: ``base(x)`` computed beforehand (a frozen base
        on inputs that do not change, e.g. a cached prefix), used instead of running the base."""
        self._check_input(x)
        if base_output is None:
            out = self.base(x)
        else:
            expected = (*x.shape[:-1], self.out_features)
            if not isinstance(base_output, Tensor) or tuple(base_output.shape) != expected:
                raise ValueError(f"base_output must be a tensor of shape {expected} (base(x)), got "
                                 f"{tuple(base_output.shape) if isinstance(base_output, Tensor) else type(base_output).__name__}")
            if getattr(self, "merged", False):
                raise RuntimeError("base_output cannot be used on a merged layer (its base weight holds the adapter)")
            out = base_output
        if getattr(self, "merged", False) or not self.adapter_enabled:
            return out
        if self._output_dropout() or out.dtype != self.A.dtype:
            return out + self.adapter_output(x.to(self.A.dtype)).to(out.dtype)
        # added inside the adapter's last GEMM, out of place (a caller's base_output is never modified)
        return self._adapter(x, out.reshape(-1, self.out_features)).view(out.shape)

    def extra_repr(self) -> str:
        return f"d_in={self.in_features}, d_out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


class LoRALinear(AdapterLayer):
    """``y = W0 x + b + s · B A x`` with ``A (r, d_in)``, ``B (d_out, r)``; ``B = 0`` at init.
    Computed as ``addmm(W0 x + b, A x, (s B)ᵀ)``: the scaling is applied to ``B``, not per token."""

    weight_names = ("A", "B")

    def __init__(self, base: nn.Module, rank: int, alpha=None, dropout: float = 0.0, *,
                 dtype: torch.dtype | None = None):
        super().__init__(base, rank, alpha, dropout, dtype=dtype)
        self.A = self._parameter(rank, self.in_features)
        self.B = self._parameter(self.out_features, rank)
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.merged = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.A.uniform_(-1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        self.B.zero_()

    def delta_weight(self) -> Tensor:
        """``ΔW = s · B A``, shape ``(d_out, d_in)``."""
        return self.scaling * (self.B @ self.A)

    def _adapter(self, x: Tensor, out: Tensor | None) -> Tensor:
        """:class:`~talklora_min.fused.FusedAdapter` (one autograd node, hand-written backward)."""
        x = self._drop(x).reshape(-1, self.in_features)
        return FusedAdapter.apply(x, self.A, self.B, None, None, None, out, self.scaling, "code", None, None)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s·BA`` into the base weight.  The original ``W0`` is kept, so ``unmerge`` restores
        it bit for bit (costs one extra copy of ``W0`` while merged)."""
        if self.merged:
            raise RuntimeError("layer is already merged")
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("cannot merge: the adapter weights A or B contain NaN or Inf")
        self._unmerged_weight = self.base.weight.detach().clone()
        self.base.weight.add_((delta.t() if self.fan_in_fan_out else delta).to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self.base.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False


RoutingHook = Callable[["MoELoRALinear", Tensor, Tensor, "Tensor | None"], None]


class MoELoRALinear(AdapterLayer):
    """Dense soft mixture of E LoRA experts sharing ``A`` (docs/method.md §1).

    ``h = A x``, blocks ``h_e = h[e·m:(e+1)·m]``; expert ``y_e = B_e C_e h_e``;
    ``y = W0 x + b + s · Σ_e g_e y_e``; ``g = softmax(W_r h)`` or ``softmax(W_g x)``.
    ``top_k`` keeps the k largest logits and renormalises the softmax over them (hard–soft top-k:
    gradients flow through the soft weights of the selected experts).  ``balance_loss`` stores an
    auxiliary loss of the last forward in ``self.aux_loss`` (see :func:`balance_loss`).
    """

    def __init__(self, base: nn.Module, rank: int, num_experts: int, router_input: str = "code",
                 alpha=None, dropout: float = 0.0, top_k: int | None = None, *,
                 gate_dropout: bool = False, balance_loss: str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(base, rank, alpha, dropout, dtype=dtype)
        check_moe_args(rank, num_experts, router_input, top_k, balance_loss)
        rank, num_experts = self.rank, int(num_experts)
        top_k = None if top_k is None else int(top_k)
        if not isinstance(gate_dropout, bool):
            raise ValueError(f"gate_dropout must be a bool, got {gate_dropout!r}")
        self.num_experts, self.expert_rank = num_experts, rank // num_experts
        self.router_input, self.top_k = router_input, top_k
        self.gate_dropout, self.balance_loss = bool(gate_dropout), balance_loss
        E, m = num_experts, self.expert_rank
        self.A = self._parameter(rank, self.in_features)
        self.C = self._parameter(E, m, m)
        self.B = self._parameter(E, self.out_features, m)
        if router_input == "code":
            self.W_r = self._parameter(E, rank)
        else:
            self.W_g = self._parameter(E, self.in_features)
        self.aux_loss: Tensor | None = None
        self._routing_hooks: OrderedDict[int, RoutingHook] = OrderedDict()
        MoELoRALinear.reset_parameters(self)

    @property
    def weight_names(self) -> tuple[str, ...]:
        return ("A", "C", "B", "W_r") if self.router_input == "code" else ("A", "C", "B", "W_g")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: every matrix ``U(±1/√fan_in)``, ``B = 0``."""
        def uniform(p, fan_in):
            p.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        uniform(self.A, self.in_features)
        uniform(self.C, self.expert_rank)
        self.B.zero_()
        if self.router_input == "code":
            uniform(self.W_r, self.rank)
        else:
            uniform(self.W_g, self.in_features)

    # -- the pieces of the forward, public so probes can differentiate through them
    # These compute exactly what the forward computes, in its layout ((A xᵀ)ᵀ …), so that routing
    # records of a forward and these methods agree bit for bit.
    def code(self, x: Tensor) -> Tensor:
        """Shared low-rank code ``h = A x``, shape ``(..., r)``."""
        return (self.A @ x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], self.rank)

    def router_code(self, h: Tensor) -> Tensor:
        """What a code router reads: ``h`` itself for MoELoRA (TalkLoRA mixes it)."""
        return h

    def router_logits(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        """Router logits ``W_eff h`` (code; ``W_eff`` = :meth:`effective_router`) / ``W_g x`` (input),
        shape ``(..., E)``."""
        z = x if self.router_input == "input" else self.code(x) if h is None else h
        logits_t = self.effective_router() @ z.reshape(-1, z.shape[-1]).t()
        return logits_t.t().reshape(*z.shape[:-1], self.num_experts)

    def effective_router(self) -> Tensor:
        """The linear map from the router's input to its logits: ``W_r`` (code, w.r.t. h) or
        ``W_g`` (input, w.r.t. x).  TalkLoRA returns ``W_r (T ⊗ I_m)``."""
        return self.W_r if self.router_input == "code" else self.W_g

    def gates_from_logits(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """Dense ``softmax`` or, with ``top_k``, the softmax renormalised over the k largest logits.
        Returns ``(gates, topk_indices or None)``."""
        gates_t, index_t = route(logits.reshape(-1, self.num_experts).t(), self.top_k)
        gates = gates_t.t().reshape(logits.shape)
        return gates, None if index_t is None else index_t.t().reshape(*logits.shape[:-1], self.top_k)

    def gates(self, x: Tensor) -> Tensor:
        """Routing weights ``g(x)`` in eval semantics (no dropout), shape ``(..., E)``."""
        return self.gates_from_logits(self.router_logits(x))[0]

    def mix_experts(self, h: Tensor, gates: Tensor) -> Tensor:
        """``Σ_e g_e B_e C_e h_e`` for code ``h (..., r)`` and gates ``(..., E)`` — batched, no loop."""
        u = (h.unflatten(-1, (self.num_experts, self.expert_rank)) * gates.unsqueeze(-1)).flatten(-2)
        return u @ expert_rows(self.B, self.C, 1.0)

    def add_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """Call ``hook(layer, logits, gates, topk_index)`` on every forward; ``.remove()`` the handle.
        The hook sees the routing decision: gates after the softmax / top-k renormalisation and
        before any training-time gate dropout."""
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def _output_dropout(self) -> bool:
        return self.training and self.dropout > 0

    def _talk(self) -> Tensor | None:
        """The Talking Module the router applies (None: MoELoRA, no mixing)."""
        return None

    def _adapter(self, x: Tensor, out: Tensor | None) -> Tensor:
        """:class:`~talklora_min.fused.FusedAdapter` (one autograd node, hand-written backward)."""
        lead, E = x.shape[:-1], self.num_experts
        x = self._drop(x).reshape(-1, self.in_features)
        keep = None
        if self.gate_dropout and self.training and self.dropout:
            keep = F.dropout(x.new_ones(x.shape[0], E), self.dropout)      # mask / (1 − p)
        router = self.W_r if self.router_input == "code" else self.W_g
        routing = bool(self._routing_hooks) or self.balance_loss is not None
        outputs = FusedAdapter.apply(x, self.A, self.B, self.C, router, self._talk(), out, self.scaling,
                                     self.router_input, self.top_k, keep, routing)
        if not routing:
            return outputs
        y, logits, gates, *index = outputs
        if self._routing_hooks:
            index = index[0].reshape(*lead, -1) if index else None
            for hook in tuple(self._routing_hooks.values()):
                hook(self, logits.reshape(*lead, E), gates.reshape(*lead, E), index)
        if self.balance_loss is not None:
            self.aux_loss = balance_loss(self.balance_loss, logits, gates)
        return y

    def merge(self) -> None:
        raise RuntimeError(
            f"{type(self).__name__} cannot be merged into the base weight: its gates g(x) depend on "
            "the input, so Σ_e g_e(x) B_e C_e A_e x is not one fixed linear map. For analysis, "
            "merged_weight_at_gates(g) gives the weight at fixed gate values g.")

    def merged_weight_at_gates(self, gates: Tensor) -> Tensor:
        """``W0 + s · Σ_e g_e B_e C_e A_e`` for a fixed gate vector ``g (E,)``, shape ``(d_out, d_in)``."""
        gates = torch.as_tensor(gates, dtype=self.A.dtype, device=self.A.device)
        if gates.shape != (self.num_experts,):
            raise ValueError(f"gates must have shape ({self.num_experts},), got {tuple(gates.shape)}")
        if not torch.isfinite(gates).all():
            raise ValueError("gates must be finite")
        blocks = self.A.unflatten(0, (self.num_experts, self.expert_rank))       # (E, m, d_in)
        delta = torch.einsum("e,eom,emn,end->od", gates, self.B, self.C, blocks)
        if not torch.isfinite(delta).all():
            raise ValueError("cannot merge: the adapter weights contain NaN or Inf")
        return self.base_weight() + self.scaling * delta.to(self.base.weight.dtype)


class TalkLoRALinear(MoELoRALinear):
    """MoELoRA-code whose router reads ``h~ = (T ⊗ I_m) h`` (the Talking Module, ``T (E, E)``).

    ``h~_e = Σ_e' T[e, e'] h_e'``; ``g = softmax(W_r h~) = softmax(W_eff h)`` with
    ``W_eff = W_r (T ⊗ I_m)`` (:meth:`effective_router`); experts read the un-mixed ``h_e``.

    ``talk_structure`` (:data:`~talklora_min.structures.TALK_STRUCTURES`) chooses how T is
    parametrised (formulas in :mod:`talklora_min.structures`), with ``talk_groups`` (block),
    ``talk_bandwidth`` (banded) or ``talk_rank`` (low-rank).  ``"full"``: T is the parameter ``T``,
    initialised by ``talk_init`` — ``"official"`` (U(±1/√E)), ``"identity"`` or ``"uniform-mix:α"``
    / ``α``.  Other structures store their own parameters (``talk_*``) and start at their identity
    point (``talk_init`` ``"official"`` or ``"identity"``); broadcast and doubly-stochastic can also
    start at ``"uniform-mix:α"``.

    The effective T is :meth:`talk_matrix` (also ``layer.T`` and ``T`` in :meth:`get_weights`).
    :meth:`set_weights` takes the stored parameters by name and ``T`` where the structure can
    represent it (refused otherwise); ``T`` given together with structure parameters must equal
    the matrix they produce, so ``set_weights(**get_weights())`` round-trips every structure.
    """

    def __init__(self, base: nn.Module, rank: int, num_experts: int, alpha=None, dropout: float = 0.0,
                 talk_init="official", *, talk_structure: str = "full", talk_groups: int | None = None,
                 talk_bandwidth: int | None = None, talk_rank: int | None = None,
                 top_k: int | None = None, gate_dropout: bool = False,
                 balance_loss: str | None = None, dtype: torch.dtype | None = None):
        init = parse_talk_init(talk_init)
        check_positive_int("num_experts", num_experts)
        structure = TalkStructure(talk_structure, int(num_experts), talk_groups, talk_bandwidth, talk_rank)
        if structure.name != "full":
            if isinstance(init, float) and init < 1 and structure.name not in ("broadcast", "doubly-stochastic"):
                raise ValueError(f"talk_init={talk_init!r} (uniform mix) is not representable by "
                                 f"{structure.describe()}; accepted talk_init for it: 'official' or "
                                 f"'identity' (both start at its identity point)")
            if init == "official" or init == 1.0:
                talk_init = "identity"                  # the structures start at their identity point
        super().__init__(base, rank, num_experts, "code", alpha, dropout, top_k,
                         gate_dropout=gate_dropout, balance_loss=balance_loss, dtype=dtype)
        self.talk_init, self.structure = talk_init, structure
        for name, shape in structure.parameter_shapes().items():
            setattr(self, name, self._parameter(*shape))
        self._reset_talk()

    # the structure's settings under their constructor names (compared by save / load)
    talk_structure = property(lambda self: self.structure.name)
    talk_groups = property(lambda self: self.structure.groups)
    talk_bandwidth = property(lambda self: self.structure.bandwidth)
    talk_rank = property(lambda self: self.structure.rank)

    @property
    def weight_names(self) -> tuple[str, ...]:
        return ("A", "C", "B", *self.structure.parameter_shapes(), "W_r")

    @torch.no_grad()
    def _reset_talk(self) -> None:
        init, kw = parse_talk_init(self.talk_init), dict(dtype=self.param_dtype, device=self.A.device)
        if self.structure.name == "full":
            start = {"T": talk_matrix(self.num_experts, self.talk_init, **kw)}
        elif init == "identity":
            start = self.structure.start_parameters(**kw)
        else:
            start = self.structure.uniform_mix_parameters(init, **kw)
        for name, value in start.items():
            getattr(self, name).copy_(value)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_talk()

    @property
    def T(self) -> Tensor:
        """The effective Talking Module (the parameter itself for ``"full"``)."""
        if self.structure.name != "full":
            return self.talk_matrix()
        if "T" not in self._parameters:         # while registering it (``hasattr`` must see no T)
            raise AttributeError("T")
        return self._parameters["T"]

    def talk_matrix(self) -> Tensor:
        """The effective ``T (E, E)`` from the structure parameters (differentiable)."""
        if self.structure.name == "full":
            return self._parameters["T"]
        return self.structure.matrix({n: getattr(self, n) for n in self.structure.parameter_shapes()})

    def router_code(self, h: Tensor) -> Tensor:
        """``h~ = (T ⊗ I_m) h``: block e of the output is ``Σ_e' T[e, e'] h_e'``."""
        blocks = h.unflatten(-1, (self.num_experts, self.expert_rank))
        return torch.einsum("ef,...fm->...em", self.talk_matrix(), blocks).flatten(-2)

    def effective_router(self) -> Tensor:
        """``W_eff = W_r (T ⊗ I_m)``, shape ``(E, r)`` (docs/method.md §3, talk absorption)."""
        return absorbed_router(self.W_r, self.talk_matrix(), self.expert_rank)

    def _talk(self) -> Tensor:
        return self.talk_matrix()

    def get_weights(self) -> dict[str, Tensor]:
        """The stored tensors by name, and the effective ``T``."""
        weights = super().get_weights()
        weights["T"] = self.talk_matrix().detach().clone()
        return weights

    @torch.no_grad()
    def set_weights(self, **tensors: Tensor) -> None:
        if self.structure.name == "full" or "T" not in tensors:
            return super().set_weights(**tensors)
        E, dtype = self.num_experts, self.param_dtype
        T = _checked_weight("T", tensors.pop("T"), (E, E), dtype).to(self.A.device)
        checked = self._checked_weights(tensors, self.weight_names)
        current = {n: getattr(self, n).detach() for n in self.structure.parameter_shapes()}
        given = {n: checked[n].to(self.A.device) for n in current if n in checked}
        tensors.update(self.structure.parameters_with(T, given, current))
        super().set_weights(**tensors)

    def extra_repr(self) -> str:
        arg = self.structure.describe().removeprefix("talk_structure=")
        return super().extra_repr() + f", experts={self.num_experts}, talk_structure={arg}"
