"""Adapter layers around a frozen ``nn.Linear`` (or transformers ``Conv1D``): LoRA, MoELoRA and
TalkLoRA (SPEC §1).

Notation: ``x`` a token (last axis ``d_in``), ``r`` total rank, ``E`` experts, ``m = r / E``.

* LoRA      ``y = W0 x + b + s · B A x``
* MoELoRA   ``h = A x = [h_1; …; h_E]``, ``y = W0 x + b + s · Σ_e g_e B_e C_e h_e`` with
  ``g = softmax(W_r h)`` (``router_input="code"``) or ``g = softmax(W_g x)`` (``"input"``).
* TalkLoRA  MoELoRA-code whose router reads ``h~ = (T ⊗ I_m) h`` (paper Eq. for the Talking
  Module): ``g = softmax(W_r h~)``; the experts still read the un-mixed blocks ``h_e``.

Scaling: ``alpha=None`` gives ``s = 1`` (the official TalkLoRA code), a number gives
``s = alpha / r`` (PEFT convention).  Dropout ``p`` acts on ``x`` before ``A`` and on the summed
adapter output; ``gate_dropout=True`` also drops gates after the softmax, as the official code
does (then gates no longer sum to 1 in training).  The default leaves gates undropped.

Experts are batched: ``C (E, m, m)`` and ``B (E, d_out, m)`` are stacked, and the gated sum
``Σ_e g_e B_e z_e`` is one matmul with ``B`` laid out as ``(d_out, r)``.  NaN/Inf inputs are
not checked in ``forward`` (that would cost a device sync per call): they propagate to the
output exactly as through ``nn.Linear``.  The probes reject non-finite inputs.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

ROUTER_INPUTS = ("code", "input")
BALANCE_LOSSES = ("switch", "cv", "entropy")
TALK_INITS = ("official", "identity", "uniform-mix:<alpha>")


# ----------------------------------------------------------------------------- validation
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


def parse_talk_init(talk_init) -> str | float:
    """Return "official", "identity" or the uniform-mix strength α in [0, 1].

    Accepted: ``"official"``, ``"identity"``, ``"uniform-mix:0.5"`` (or ``"uniform-mix 0.5"``), or
    a bare number α.
    """
    if isinstance(talk_init, str) and talk_init in ("official", "identity"):
        return talk_init
    alpha = talk_init
    if isinstance(talk_init, str) and talk_init.startswith("uniform-mix"):
        try:
            alpha = float(talk_init[len("uniform-mix"):].strip(" :="))
        except ValueError:
            alpha = None
    if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"talk_init must be one of {TALK_INITS} (alpha in [0, 1]) or a number "
                         f"alpha in [0, 1], got {talk_init!r}")
    return float(alpha)


def talk_matrix(num_experts: int, talk_init="official", *, dtype=None, device=None,
                generator: torch.Generator | None = None) -> Tensor:
    """The Talking Module's initial ``T (E, E)`` (row index = output expert).

    official: ``U(±1/√E)`` (``kaiming_uniform_(a=√5)``); identity: ``I``;
    uniform-mix α: ``T = α I + (1 − α) J / E`` (doubly stochastic).
    """
    init = parse_talk_init(talk_init)
    E = check_positive_int("num_experts", num_experts)
    if init == "official":
        bound = 1.0 / math.sqrt(E)
        return torch.empty(E, E, dtype=dtype, device=device).uniform_(-bound, bound, generator=generator)
    eye = torch.eye(E, dtype=dtype, device=device)
    if init == "identity":
        return eye
    return init * eye + (1.0 - init) * torch.full((E, E), 1.0 / E, dtype=dtype, device=device)


def absorbed_router(W_r: Tensor, T: Tensor, m: int) -> Tensor:
    """Absorb the Talking Module into the router: ``W' = W_r (T ⊗ I_m)``, shape ``(E, r)``.

    Blockwise (column block e of width m): ``W'^{(e)} = Σ_e' T[e', e] W_r^{(e')}``.
    Because ``h~ = (T ⊗ I_m) h``, ``W_r h~ = W' h`` for every code h (SPEC §3, talk absorption).
    """
    E = T.shape[0]
    if T.shape != (E, E) or W_r.shape != (E, E * m):
        raise ValueError(f"absorbed_router: need T (E, E) and W_r (E, E·m); got T {tuple(T.shape)}, "
                         f"W_r {tuple(W_r.shape)}, m={m}")
    eye = torch.eye(m, dtype=T.dtype, device=T.device)
    return W_r @ torch.kron(T, eye)


# ----------------------------------------------------------------------------- balance losses
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


# ----------------------------------------------------------------------------- layers
class AdapterLayer(nn.Module):
    """Common machinery: frozen base, scaling, dropout, weight access by SPEC name.

    ``base`` is an ``nn.Linear`` or a transformers ``Conv1D`` (its weight is stored transposed,
    ``(d_in, d_out)``; the adapter tensors have the same shapes as for ``nn.Linear``).  The layer
    exposes the base's ``weight`` and ``bias`` (read-only), so parents that read ``child.weight``
    (T5's ``wo.weight.dtype`` …) keep working.  Adapter parameters are float32 over half-precision
    bases (:func:`adapter_dtype`); ``dtype=`` overrides.  The adapter branch runs in the adapter's
    dtype and is added to the base output in the base output's dtype (autocast-friendly).
    ``adapter_enabled = False`` (see ``inject.disable_adapters``) gives the base output only.
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
        return nn.Parameter(torch.empty(*shape, dtype=self.param_dtype, device=self.base.weight.device))

    def _drop(self, t: Tensor) -> Tensor:
        return F.dropout(t, self.dropout, self.training) if self.dropout else t

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"input x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape (..., d_in={self.in_features}), got {tuple(x.shape)}")

    def get_weights(self) -> dict[str, Tensor]:
        """Copies of the adapter tensors under their SPEC names."""
        return {name: getattr(self, name).detach().clone() for name in self.weight_names}

    @torch.no_grad()
    def set_weights(self, **tensors: Tensor) -> None:
        """Copy tensors into the adapter by SPEC name; checks names, types, shapes and finiteness
        first (nothing is copied on error).  Values are cast to the layer's dtype and device (as
        ``Tensor.copy_`` does); a value that is NaN/Inf, or overflows that dtype, is refused."""
        unknown = sorted(set(tensors) - set(self.weight_names))
        if unknown:
            raise ValueError(f"unknown weight name(s) {unknown} for {type(self).__name__}; "
                             f"accepted: {list(self.weight_names)}")
        for name, value in tensors.items():
            expected = tuple(getattr(self, name).shape)
            if not isinstance(value, Tensor):
                raise ValueError(f"weight {name} must have shape {expected} (a torch.Tensor), "
                                 f"got {type(value).__name__}")
            if tuple(value.shape) != expected:
                raise ValueError(f"weight {name} must have shape {expected}, got {tuple(value.shape)}")
            if value.is_complex():
                raise ValueError(f"weight {name} must be a real tensor, got dtype {value.dtype}")
            cast_finite(value, getattr(self, name).dtype, f"weight {name}", "; set_weights needs finite values")
        if getattr(self, "merged", False):
            raise RuntimeError("unmerge() before set_weights(): the base weight holds the old adapter")
        for name, value in tensors.items():
            getattr(self, name).copy_(value)

    def adapter_output(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

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
        return out + self.adapter_output(x.to(self.A.dtype)).to(out.dtype)

    def extra_repr(self) -> str:
        return f"d_in={self.in_features}, d_out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


class LoRALinear(AdapterLayer):
    """``y = W0 x + b + s · B A x`` with ``A (r, d_in)``, ``B (d_out, r)``; ``B = 0`` at init."""

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

    def adapter_output(self, x: Tensor) -> Tensor:
        return self.scaling * F.linear(F.linear(self._drop(x), self.A), self.B)

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
    """Dense soft mixture of E LoRA experts sharing ``A`` (SPEC §1).

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
    def code(self, x: Tensor) -> Tensor:
        """Shared low-rank code ``h = A x``, shape ``(..., r)``."""
        return F.linear(x, self.A)

    def router_code(self, h: Tensor) -> Tensor:
        """What a code router reads: ``h`` itself for MoELoRA (TalkLoRA mixes it)."""
        return h

    def router_logits(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        """Router logits ``W_r h`` (code) / ``W_g x`` (input), shape ``(..., E)``."""
        if self.router_input == "input":
            return F.linear(x, self.W_g)
        return F.linear(self.router_code(self.code(x) if h is None else h), self.W_r)

    def effective_router(self) -> Tensor:
        """The linear map from the router's input to its logits: ``W_r`` (code, w.r.t. h) or
        ``W_g`` (input, w.r.t. x).  TalkLoRA returns ``W_r (T ⊗ I_m)``."""
        return self.W_r if self.router_input == "code" else self.W_g

    def gates_from_logits(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """Dense ``softmax`` or, with ``top_k``, the softmax renormalised over the k largest logits.
        Returns ``(gates, topk_indices or None)``."""
        if self.top_k is None:
            return torch.softmax(logits, -1), None
        values, index = logits.topk(self.top_k, dim=-1)
        masked = torch.full_like(logits, float("-inf")).scatter(-1, index, values)
        return torch.softmax(masked, -1), index

    def gates(self, x: Tensor) -> Tensor:
        """Routing weights ``g(x)`` in eval semantics (no dropout), shape ``(..., E)``."""
        return self.gates_from_logits(self.router_logits(x))[0]

    def mix_experts(self, h: Tensor, gates: Tensor) -> Tensor:
        """``Σ_e g_e B_e C_e h_e`` for code ``h (..., r)`` and gates ``(..., E)`` — batched, no loop."""
        z = torch.einsum("...ej,eij->...ei", h.unflatten(-1, (self.num_experts, self.expert_rank)), self.C)
        u = (gates.unsqueeze(-1) * z).flatten(-2)
        return F.linear(u, self.B.transpose(0, 1).reshape(self.out_features, self.rank))

    def add_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """Call ``hook(layer, logits, gates, topk_index)`` on every forward; ``.remove()`` the handle.
        The hook sees the routing decision: gates after the softmax / top-k renormalisation and
        before any training-time gate dropout."""
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def adapter_output(self, x: Tensor) -> Tensor:
        x = self._drop(x)
        h = self.code(x)
        logits = self.router_logits(x, h)
        gates, index = self.gates_from_logits(logits)
        if self._routing_hooks:
            for hook in tuple(self._routing_hooks.values()):
                hook(self, logits, gates, index)
        if self.balance_loss is not None:
            self.aux_loss = balance_loss(self.balance_loss, logits, gates)
        if self.gate_dropout:
            gates = self._drop(gates)
        return self.scaling * self._drop(self.mix_experts(h, gates))

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

    ``h~_e = Σ_e' T[e, e'] h_e'``; ``g = softmax(W_r h~)``; experts read the un-mixed ``h_e``.
    ``talk_init``: ``"official"`` (U(±1/√E)), ``"identity"`` or ``"uniform-mix:α"`` / ``α``.
    """

    def __init__(self, base: nn.Module, rank: int, num_experts: int, alpha=None, dropout: float = 0.0,
                 talk_init="official", *, top_k: int | None = None, gate_dropout: bool = False,
                 balance_loss: str | None = None, dtype: torch.dtype | None = None):
        parse_talk_init(talk_init)
        super().__init__(base, rank, num_experts, "code", alpha, dropout, top_k,
                         gate_dropout=gate_dropout, balance_loss=balance_loss, dtype=dtype)
        self.talk_init = talk_init
        self.T = self._parameter(num_experts, num_experts)
        self._reset_talk()

    weight_names = ("A", "C", "B", "T", "W_r")

    @torch.no_grad()
    def _reset_talk(self) -> None:
        self.T.copy_(talk_matrix(self.num_experts, self.talk_init, dtype=self.T.dtype, device=self.T.device))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_talk()

    def router_code(self, h: Tensor) -> Tensor:
        """``h~ = (T ⊗ I_m) h``: block e of the output is ``Σ_e' T[e, e'] h_e'``."""
        blocks = h.unflatten(-1, (self.num_experts, self.expert_rank))
        return torch.einsum("ef,...fm->...em", self.T, blocks).flatten(-2)

    def effective_router(self) -> Tensor:
        """``W_eff = W_r (T ⊗ I_m)``, shape ``(E, r)`` (SPEC §3, talk absorption)."""
        return absorbed_router(self.W_r, self.T, self.expert_rank)
