"""TalkLoRA's Talking Module ``T (E, E)``: its initialisation (``talk_init``), its absorption into the
router (``W_r (T ⊗ I_m)``, docs/method.md §3) and the communication structures, parametrisations of T
(docs/method.md §1).

``TalkLoRALinear(..., talk_structure=...)`` stores the *structure parameters* below and computes the
effective ``T`` from them on every forward; the router then reads ``W_eff = W_r (T ⊗ I_m)`` (§3), so
probes and reparameterisation maps see only the effective T.  Every structure has an identity point
(``T = I``) where the layer is MoELoRA-code with the same ``A, C, B, W_r`` exactly, and is trainable
from there: ``T``, ``a``, the blocks, the band and ``U`` get a non-zero gradient at it (``Θ`` and ``V``,
multiplied by ``1 − α = 0`` and ``U = 0``, from the second step on).

=====================  =============================================  ==========================  ============================
structure              T                                              parameters                  identity point (start)
=====================  =============================================  ==========================  ============================
``full``               free (the paper's T; ``talk_init``)            ``T (E, E)``                ``T = I`` (``talk_init="identity"``)
``broadcast``          ``α I + (1 − α) J / E``, ``α = fold(a)``       ``talk_alpha ()``            ``a = 1`` (exact)
``doubly-stochastic``  ``α I + (1 − α) Sinkhorn(exp Θ)``              ``talk_alpha, talk_logits``  ``a = 1``, ``Θ = 0`` (exact)
``block``              block-diagonal, ``talk_groups`` free blocks    ``talk_blocks (G, k, k)``    identity blocks (exact)
``banded``             ``T[i, j] = 0`` beyond circular distance b     ``talk_band (E, 2b + 1)``    diagonal 1, band 0 (exact)
``low-rank``           ``I + U Vᵀ``                                   ``talk_U, talk_V (E, k)``    ``U = 0`` (exact)
=====================  =============================================  ==========================  ============================

* **broadcast**: every expert hears the mean of all.  ``α ∈ [0, 1]`` is ``fold(a)``, the triangle
  wave of period 2 (``fold(a) = a`` on ``[0, 1]``, ``2 − a`` on ``[1, 2]``, …): ``a`` itself when it
  lies in ``[0, 1]`` (where it is stored), slope ±1 everywhere, so at the identity ``a = 1`` the
  gradient reaches ``a``, and a step beyond 1 folds back instead of leaving the range.  ``α = 0``
  (``T = J / E``) is only reached on the boundary.
* **doubly-stochastic**: ``T = α I + (1 − α) S``, ``S = Sinkhorn(exp Θ)`` (row and column
  normalisation in the log domain until the row sums are within :data:`SINKHORN_TOL` of 1, at most
  :data:`SINKHORN_MAX_ITER` iterations), ``α = fold(a)`` as for broadcast (``talk_alpha``, ``Θ`` is
  ``talk_logits``).  A convex combination of doubly-stochastic matrices: T is non-negative, its
  rows and columns sum to 1 (within ``1e-5``), so ``‖T‖₂ ≤ 1`` (§4).  ``α = 0`` is the plain
  ``Sinkhorn(exp Θ)``; the identity weight α makes the identity point exact (``a = 1``: ``T = I``
  for any Θ) and trainable: at ``a = 1``, ``∂T/∂a = I − S ≠ 0``; the start is ``a = 1``, ``Θ = 0``
  (``S = J / E``, so it first moves like broadcast).  Why not ``Sinkhorn(exp Θ)`` alone: it reaches
  I only as Θ's diagonal grows without bound, ``Θ = c I`` giving ``max |T − I| = (E − 1) / (e^c +
  E − 1)``; near there Sinkhorn contracts by ``λ₂² ≈ 1 − 2 max |T − I|`` per iteration (thousands of
  iterations at ``max |T − I| = 10⁻³``) and the gradient w.r.t. Θ is proportional to the
  off-diagonal entries, so such a start hardly trains.
* **block** (hierarchical): experts in ``talk_groups`` equal consecutive groups of ``k = E / G``;
  ``talk_blocks[g]`` is the block of group g, everything outside the blocks is exactly 0.
* **banded** (selective, local): ``T[i, (i + o) mod E] = talk_band[i, o + b]`` for offsets
  ``o = −b … b`` (``b = talk_bandwidth``, ``0 ≤ b ≤ (E − 1) // 2``; a larger b is ``"full"``);
  entries at circular distance ``min(|i − j|, E − |i − j|) > b`` are exactly 0.
* **low-rank**: ``T = I + U Vᵀ`` with ``U, V (E, talk_rank)``; ``U`` starts at 0 (identity) and ``V``
  at ``U(±1/√E)``, so the gradient ``∂L/∂U = (∂L/∂T) V`` is non-zero from the first step.

:meth:`TalkStructure.parameters_for` maps a matrix ``T`` back to the parameters, and refuses one the
structure cannot represent (naming the structure and the offending entry).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .checks import _is_number, check_positive_int

TALK_INITS = ("official", "identity", "uniform-mix:<alpha>")
TALK_STRUCTURES = ("full", "broadcast", "doubly-stochastic", "block", "banded", "low-rank")
TALK_SETTINGS = ("talk_structure", "talk_groups", "talk_bandwidth", "talk_rank")   # constructor names
# the structure argument each structure requires (and no other structure accepts)
STRUCTURE_ARGUMENT = {"block": "talk_groups", "banded": "talk_bandwidth", "low-rank": "talk_rank"}

SINKHORN_TOL = 1e-6             # |log row sum| of Sinkhorn(exp Θ) before its last row normalisation
SINKHORN_MAX_ITER = 1000


# ----------------------------------------------------------------------------- talk_init, absorption
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
    Because ``h~ = (T ⊗ I_m) h``, ``W_r h~ = W' h`` for every code h (docs/method.md §3, talk
    absorption).  Exact for ``T = I``; the layers' forward computes it the same way.
    """
    E = T.shape[0]
    if T.shape != (E, E) or W_r.shape != (E, E * m):
        raise ValueError(f"absorbed_router: need T (E, E) and W_r (E, E·m); got T {tuple(T.shape)}, "
                         f"W_r {tuple(W_r.shape)}, m={m}")
    return W_r @ talk_kron(T, m)


def talk_kron(T: Tensor, m: int) -> Tensor:
    """``T ⊗ I_m``, ``(r, r)``."""
    return torch.kron(T, torch.eye(m, dtype=T.dtype, device=T.device))


# ----------------------------------------------------------------------------- structures
def check_talk_structure(talk_structure, num_experts: int, talk_groups=None, talk_bandwidth=None,
                         talk_rank=None) -> tuple[str, int | None, int | None, int | None]:
    """Validate a structure and its argument; returns ``(structure, groups, bandwidth, rank)`` with
    ints.  ``ValueError`` names the argument and the accepted values."""
    if not isinstance(talk_structure, str) or talk_structure not in TALK_STRUCTURES:
        raise ValueError(f"talk_structure must be one of {TALK_STRUCTURES}, got {talk_structure!r}")
    E = num_experts
    given = {"talk_groups": talk_groups, "talk_bandwidth": talk_bandwidth, "talk_rank": talk_rank}
    needed = STRUCTURE_ARGUMENT.get(talk_structure)
    for name, value in given.items():
        if name != needed and value is not None:
            users = [s for s, a in STRUCTURE_ARGUMENT.items() if a == name]
            raise ValueError(f"{name} is only used by talk_structure={users[0]!r}; leave it None for "
                             f"talk_structure={talk_structure!r} (got {name}={value!r})")
    if needed is None:
        return talk_structure, None, None, None
    value = given[needed]
    if talk_structure == "block":
        divisors = [g for g in range(1, E + 1) if E % g == 0]
        if not _is_number(value, integer=True) or value not in divisors:
            raise ValueError(f"talk_groups must be a positive integer dividing num_experts={E} (one of "
                             f"{divisors}) for talk_structure='block', got {value!r}")
    elif talk_structure == "banded":
        top = (E - 1) // 2
        if not _is_number(value, integer=True) or not 0 <= value <= top:
            raise ValueError(f"talk_bandwidth must be an integer in [0, {top}] = [0, (num_experts - 1) // 2] "
                             f"for talk_structure='banded' with num_experts={E} (a wider band is "
                             f"talk_structure='full'), got {value!r}")
    else:
        if not _is_number(value, integer=True) or not 1 <= value <= E:
            raise ValueError(f"talk_rank must be an integer in [1, num_experts={E}] for "
                             f"talk_structure='low-rank', got {value!r}")
    value = int(value)
    return (talk_structure, value if needed == "talk_groups" else None,
            value if needed == "talk_bandwidth" else None, value if needed == "talk_rank" else None)


def fold_unit(a: Tensor) -> Tensor:
    """The triangle wave of period 2 with ``fold(a) = a`` on ``[0, 1]`` and ``2 − a`` on ``[1, 2]``
    (slope ±1; at ``a = 1`` the slope is +1)."""
    u = torch.remainder(a, 2.0)
    return torch.where(u <= 1, u, 2 - u)


def sinkhorn(theta: Tensor, tol: float = SINKHORN_TOL, max_iter: int = SINKHORN_MAX_ITER) -> Tensor:
    """Doubly-stochastic ``Sinkhorn(exp Θ)``: column then row normalisation in the log domain until the
    log row sums before the row step are within ``tol`` of 0 (then rows are exact and columns within
    ``≈ tol``); differentiable (unrolled).  One device sync per iteration, for the check."""
    log_t = theta
    for _ in range(max_iter):
        log_t = log_t - log_t.logsumexp(0, keepdim=True)
        log_rows = log_t.logsumexp(1, keepdim=True)
        log_t = log_t - log_rows
        if float(log_rows.detach().abs().max()) <= tol:
            break
    else:
        warnings.warn(f"Sinkhorn normalisation did not reach tolerance {tol:g} in {max_iter} iterations "
                      "(talk_logits too extreme): T is only approximately doubly stochastic",
                      RuntimeWarning, stacklevel=3)
    return log_t.exp()


def _tolerance(dtype: torch.dtype) -> float:
    """Tolerance for 'T is representable': ``√eps`` of the dtype (round-off, not modelling error)."""
    return math.sqrt(torch.finfo(dtype).eps)


@dataclass(frozen=True)
class TalkStructure:
    """One communication structure for ``num_experts`` experts (see the module table)."""

    name: str
    num_experts: int
    groups: int | None = None
    bandwidth: int | None = None
    rank: int | None = None
    _index_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        checked = check_talk_structure(self.name, self.num_experts, self.groups, self.bandwidth, self.rank)
        for attr, value in zip(("name", "groups", "bandwidth", "rank"), checked):
            object.__setattr__(self, attr, value)

    def describe(self) -> str:
        arg = STRUCTURE_ARGUMENT.get(self.name)
        extra = f", {arg}={getattr(self, arg.removeprefix('talk_'))}" if arg else ""
        return f"talk_structure={self.name!r}{extra}"

    # ------------------------------------------------------------------ parameters
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        E = self.num_experts
        if self.name == "full":
            return {"T": (E, E)}
        if self.name == "broadcast":
            return {"talk_alpha": ()}
        if self.name == "doubly-stochastic":
            return {"talk_alpha": (), "talk_logits": (E, E)}
        if self.name == "block":
            k = E // self.groups
            return {"talk_blocks": (self.groups, k, k)}
        if self.name == "banded":
            return {"talk_band": (E, 2 * self.bandwidth + 1)}
        return {"talk_U": (E, self.rank), "talk_V": (E, self.rank)}

    def offsets(self) -> list[int]:
        """banded: the circular offset of each column of ``talk_band`` (``−b … b``)."""
        return list(range(-self.bandwidth, self.bandwidth + 1))

    def _flat_index(self, device) -> Tensor:
        """block / banded: positions in ``T.flatten()`` of the parameter's entries, in their order."""
        key = str(device)
        if key not in self._index_cache:
            E = self.num_experts
            if self.name == "block":
                k = E // self.groups
                g, a, b = torch.meshgrid(torch.arange(self.groups), torch.arange(k), torch.arange(k), indexing="ij")
                rows, cols = g * k + a, g * k + b
            else:
                i = torch.arange(E).unsqueeze(1)
                rows, cols = i.expand(E, len(self.offsets())), (i + torch.tensor(self.offsets())) % E
            self._index_cache[key] = (rows * E + cols).flatten().to(device)
        return self._index_cache[key]

    def support(self) -> Tensor:
        """Boolean ``(E, E)``: the entries the structure may make non-zero."""
        E = self.num_experts
        if self.name not in ("block", "banded"):
            return torch.ones(E, E, dtype=torch.bool)
        mask = torch.zeros(E * E, dtype=torch.bool)
        mask[self._flat_index("cpu")] = True
        return mask.view(E, E)

    # ------------------------------------------------------------------ effective T
    def matrix(self, params: dict[str, Tensor]) -> Tensor:
        """The effective ``T (E, E)`` from the structure parameters (differentiable)."""
        E = self.num_experts
        if self.name == "full":
            return params["T"]
        if self.name in ("broadcast", "doubly-stochastic"):
            alpha = fold_unit(params["talk_alpha"])
            eye = torch.eye(E, dtype=alpha.dtype, device=alpha.device)
            mix = torch.ones_like(eye) / E if self.name == "broadcast" else sinkhorn(params["talk_logits"])
            return alpha * eye + (1 - alpha) * mix
        if self.name == "low-rank":
            U = params["talk_U"]
            return torch.eye(E, dtype=U.dtype, device=U.device) + U @ params["talk_V"].t()
        values = params["talk_blocks" if self.name == "block" else "talk_band"]
        flat = values.new_zeros(E * E).scatter(0, self._flat_index(values.device), values.flatten())
        return flat.view(E, E)

    # ------------------------------------------------------------------ initialisation
    def start_parameters(self, dtype=None, device=None) -> dict[str, Tensor]:
        """The structure's start, its identity point (``talk_V`` of low-rank drawn ``U(±1/√E)`` from the
        global RNG; doubly-stochastic: ``a = 1``, ``Θ = 0``)."""
        E, kw = self.num_experts, dict(dtype=dtype, device=device)
        eye = torch.eye(E, **kw)
        if self.name == "full":
            return {"T": eye}
        if self.name == "broadcast":
            return {"talk_alpha": torch.ones((), **kw)}
        if self.name == "doubly-stochastic":
            return {"talk_alpha": torch.ones((), **kw), "talk_logits": torch.zeros(E, E, **kw)}
        if self.name == "low-rank":
            bound = 1 / math.sqrt(E)
            return {"talk_U": torch.zeros(E, self.rank, **kw),
                    "talk_V": torch.empty(E, self.rank, **kw).uniform_(-bound, bound)}
        # block / banded: the identity's entries on the support (no representability check, which
        # would read values, so layers can be planned on the meta device)
        name, shape = next(iter(self.parameter_shapes().items()))
        return {name: eye.flatten()[self._flat_index(eye.device)].view(shape).clone()}

    def uniform_mix_parameters(self, alpha: float, dtype=None, device=None) -> dict[str, Tensor]:
        """``T = α I + (1 − α) J / E`` (broadcast, doubly-stochastic: ``a = α``, ``Θ = 0``)."""
        params = {"talk_alpha": torch.tensor(float(alpha), dtype=dtype, device=device)}
        if self.name == "doubly-stochastic":
            params["talk_logits"] = torch.zeros(self.num_experts, self.num_experts, dtype=dtype, device=device)
        return params

    # ------------------------------------------------------------------ T -> parameters
    def parameters_with(self, T: Tensor, given: dict[str, Tensor], current: dict[str, Tensor]) -> dict[str, Tensor]:
        """What ``set_weights(T=T, **given)`` stores: with no structure parameters given, those for T
        (:meth:`parameters_for`, or refusal); otherwise ``given`` itself, if the matrix it makes (with
        the ``current`` values of the others) is T within ``√eps`` — else ``ValueError``."""
        if not given:
            return self.parameters_for(T, keep=current)
        err = float((self.matrix({**current, **given}) - T).abs().max())
        if err > _tolerance(T.dtype) * max(1.0, float(T.abs().max())):
            raise ValueError(f"weight T does not match the {self.describe()} parameters given with it "
                             f"({sorted(given)}): they produce a T that differs by up to {err:.3g}; give T "
                             f"alone or the structure parameters alone")
        return {}

    def parameters_for(self, T: Tensor, keep: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Structure parameters whose effective matrix is ``T``; ``ValueError`` if the structure cannot
        represent ``T`` (within ``√eps`` of its dtype; the zeros of block / banded exactly).
        ``keep``: current parameters, used where T leaves a choice (at ``T = I``, low-rank keeps V and
        doubly-stochastic Θ; a doubly-stochastic ``T ≠ I`` is taken as ``α = 0``, ``Θ = log T``)."""
        E, tol = self.num_experts, _tolerance(T.dtype)

        def refuse(why: str):
            raise ValueError(f"T is not representable by {self.describe()}: {why}; set the structure "
                             f"parameters {list(self.parameter_shapes())} instead, or use talk_structure='full'")

        if self.name == "full":
            return {"T": T}
        if self.name in ("block", "banded"):
            outside = T.masked_fill(self.support().to(T.device), 0)
            if outside.any():
                i, j = divmod(int(outside.abs().flatten().argmax()), E)
                where = "outside the diagonal blocks" if self.name == "block" else "beyond the band"
                refuse(f"entries {where} must be exactly 0, found T[{i}, {j}] = {float(T[i, j]):.3g}")
            name, shape = next(iter(self.parameter_shapes().items()))
            return {name: T.flatten()[self._flat_index(T.device)].view(shape).clone()}
        if self.name == "broadcast":
            alpha = T[0, 0] - T[0, 1] if E > 1 else torch.ones((), dtype=T.dtype, device=T.device)
            if not 0 <= float(alpha) <= 1 + tol:
                refuse(f"α = T[0, 0] − T[0, 1] = {float(alpha):.3g} is outside [0, 1]")
            alpha = alpha.clamp(0, 1)
            params = {"talk_alpha": alpha.clone()}
        elif self.name == "doubly-stochastic":
            eye = torch.eye(E, dtype=T.dtype, device=T.device)
            if float((T - eye).abs().max()) <= tol:
                logits = keep["talk_logits"].clone() if keep is not None else torch.zeros_like(T)
                return {"talk_alpha": torch.ones((), dtype=T.dtype, device=T.device), "talk_logits": logits}
            if not (T > 0).all():
                refuse("entries must be > 0 (T = α I + (1 − α) Sinkhorn(exp Θ)), or T = I")
            dev = max(float((T.sum(0) - 1).abs().max()), float((T.sum(1) - 1).abs().max()))
            if dev > max(tol, 10 * SINKHORN_TOL):
                refuse(f"rows and columns must sum to 1, they are off by up to {dev:.3g}")
            params = {"talk_alpha": torch.zeros((), dtype=T.dtype, device=T.device), "talk_logits": T.log()}
        else:                                                   # low-rank: T − I of rank ≤ k
            D = (T - torch.eye(E, dtype=T.dtype, device=T.device)).double()
            if not D.any() and keep is not None:
                return {"talk_U": torch.zeros_like(keep["talk_U"]), "talk_V": keep["talk_V"].clone()}
            U, S, Vh = torch.linalg.svd(D)
            k = self.rank
            if k < E and S[k] > tol * max(1.0, float(S[0])):
                refuse(f"T − I has rank > talk_rank={k} (singular value {k + 1} is {float(S[k]):.3g})")
            root = S[:k].sqrt()
            params = {"talk_U": (U[:, :k] * root).to(T.dtype), "talk_V": (Vh[:k].t() * root).to(T.dtype)}
        back = self.matrix(params)
        err = float((back - T).abs().max())
        # a doubly-stochastic T given to SINKHORN_TOL comes back normalised: that close is representable
        limit = max(tol, 10 * SINKHORN_TOL) if self.name == "doubly-stochastic" else tol
        if err > limit * max(1.0, float(T.abs().max())):
            refuse(f"the closest {self.name} matrix differs from it by up to {err:.3g}")
        return params
