"""The method registry: every adapter method the experiments train, declared once.

A method is one :class:`Method` entry: the adapter it injects (``AdapterConfig`` keyword arguments,
``None`` for the head-only / frozen-base baseline), how its router is initialised from the seed's
common random numbers (:data:`ROUTER_INITS`), which adapter tensors stay frozen, the weight of its
balance loss, the tags the claims select by (:data:`TAGS`), and its plot label, colour and marker.
Experiments, claims, figures and profiles refer to methods only through this registry: adding a
router, a communication structure or a control is one entry in :data:`METHODS`.

This module is pure data (no torch): the claims layer imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# How a method's router starts, given the seed's CRN draws W_r (E, r) and official T (E, E) of a
# layer (docs/method.md §5, training protocol):
ROUTER_INITS = {
    "crn": "W_r as drawn (official init U(±1/√r)); T as the method's talk_init / structure gives it",
    "scale-matched": "W_r' = W_r · ‖W_r (T ⊗ I_m)‖₂ / ‖W_r‖₂: TalkLoRA-official's router scale, no communication",
    "function-matched": "W' = W_r (T ⊗ I_m) (talk absorption, docs/method.md §3): the same function as "
                        "TalkLoRA-official at step 0, without T",
}

# Tags the claims and figures select methods by.
TAGS = {
    "reference": "the method under test (TalkLoRA with the paper's full T, official init)",
    "no-adapter": "no adapters: the head-only (classification) / frozen-base (LM) baseline of control P1",
    "baseline": "a baseline the paper names (LoRA, MoELoRA with a code router)",
    "routed": "has a router (gates); routing metrics, balance and churn apply",
    "talk": "has a Talking Module T",
    "function-matched": "the function-matched twin of the reference (same function at step 0, no T)",
    "scale-matched": "the scale-matched control of the reference (same ‖W_eff‖₂ at step 0, no T)",
    "isolates-communication": "differs from the reference only by the communication (same A, C, B, W_r stream)",
    "input-router": "routes on the token x instead of the code h",
    "balance-loss": "trained with an auxiliary balance loss",
    "structure": "TalkLoRA with a constrained communication structure (docs/method.md §1)",
    "twin-arm": "an arm of the function-matched twin experiment (C9)",
}


@dataclass(frozen=True)
class Method:
    """One adapter method.

    ``adapter``: keyword arguments of ``talklora_min.AdapterConfig`` (kind, router_input, top_k,
    balance_loss, talk_init, talk_structure, ...); rank, experts, targets and dropout come from the
    setting.  ``router_init``: a key of :data:`ROUTER_INITS`.  ``frozen``: adapter tensors kept at
    their initial value (e.g. ``("T",)``).  ``aux_weight``: weight of the balance loss in the
    training objective (0 without one).
    """

    name: str
    label: str
    color: str
    marker: str
    adapter: Mapping | None
    router_init: str = "crn"
    frozen: tuple[str, ...] = ()
    aux_weight: float = 0.0
    tags: frozenset = field(default_factory=frozenset)
    description: str = ""

    def __post_init__(self):
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"method {self.name!r}: router_init must be one of {list(ROUTER_INITS)}, "
                             f"got {self.router_init!r}")
        unknown = sorted(set(self.tags) - set(TAGS))
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown tag(s) {unknown}; accepted: {sorted(TAGS)}")
        object.__setattr__(self, "tags", frozenset(self.tags))
        if self.adapter is not None:
            object.__setattr__(self, "adapter", MappingProxyType(dict(self.adapter)))
        if self.adapter is None and (self.router_init != "crn" or self.frozen or self.aux_weight):
            raise ValueError(f"method {self.name!r} has no adapter: router_init, frozen and aux_weight "
                             "do not apply")
        if self.aux_weight and not (self.adapter or {}).get("balance_loss"):
            raise ValueError(f"method {self.name!r}: aux_weight > 0 needs adapter balance_loss")

    @property
    def kind(self) -> str | None:
        """``lora`` / ``moelora`` / ``talklora``, or ``None`` for the no-adapter baseline."""
        return None if self.adapter is None else self.adapter["kind"]

    @property
    def routed(self) -> bool:
        return self.kind in ("moelora", "talklora")

    def adapter_kwargs(self) -> dict:
        """A fresh dict of the ``AdapterConfig`` keyword arguments (``{}`` for the no-adapter baseline)."""
        return dict(self.adapter or {})


_AUX = 0.01          # balance-loss weight of the balance-loss routers (LoRA-Mixer / Switch scale)
_TALK = dict(kind="talklora", talk_init="official")
_CODE = dict(kind="moelora", router_input="code")


def _structure(name: str, label: str, color: str, marker: str, **talk) -> Method:
    return Method(name, label, color, marker, dict(kind="talklora", **talk),
                  tags={"routed", "talk", "structure"},
                  description=f"TalkLoRA with the {talk['talk_structure']!r} communication structure")


METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in (
    Method("head-only", "head only", "#000000", "*", None, tags={"no-adapter"},
           description="no adapters: only the classifier head trains (the frozen base for a causal LM)"),
    Method("lora", "LoRA", "#7f7f7f", "o", dict(kind="lora"), tags={"baseline"},
           description="LoRA of the same rank, the same A stream, B = 0"),
    Method("moelora-code", "MoELoRA (code router)", "#1f77b4", "s", _CODE,
           tags={"baseline", "routed", "isolates-communication"},
           description="MoELoRA routing on the code h with the CRN W_r (TalkLoRA with T = I at the same draws)"),
    Method("moelora-input", "MoELoRA (input router)", "#17becf", "^", dict(kind="moelora", router_input="input"),
           tags={"routed", "input-router"}, description="MoELoRA routing on the token x (W_g from its own stream)"),
    Method("talklora-official", "TalkLoRA", "#d62728", "D", _TALK, tags={"reference", "routed", "talk", "twin-arm"},
           description="TalkLoRA, the paper's full T with the official init U(±1/√E)"),
    Method("talklora-identity", "TalkLoRA (T = I init)", "#9467bd", "v", dict(kind="talklora", talk_init="identity"),
           tags={"routed", "talk"}, description="TalkLoRA started at T = I (= MoELoRA-code at step 0)"),
    Method("moelora-code-scaled", "scale-matched control", "#ff7f0e", "<", _CODE, router_init="scale-matched",
           tags={"routed", "scale-matched", "isolates-communication"},
           description="MoELoRA-code with W_r rescaled to TalkLoRA-official's ‖W_r(T⊗I)‖₂"),
    Method("moelora-twin", "function-matched twin", "#2ca02c", "h", _CODE, router_init="function-matched",
           tags={"routed", "function-matched", "isolates-communication", "twin-arm"},
           description="MoELoRA-code with W' = W_r(T⊗I): TalkLoRA-official's function at step 0, no T"),
    Method("talklora-frozen-T", "TalkLoRA, T frozen", "#ff9896", "^", _TALK, frozen=("T",),
           tags={"routed", "talk", "twin-arm"}, description="TalkLoRA-official with T kept at its init"),
    Method("talklora-identity-matched", "TalkLoRA (T = I, W_r = W')", "#c5b0d5", "o",
           dict(kind="talklora", talk_init="identity"), router_init="function-matched",
           tags={"routed", "talk", "twin-arm"},
           description="TalkLoRA with T = I and W_r = W_r(T⊗I): function-matched, communication free to grow"),
    Method("topk-entropy", "top-2 + entropy loss", "#8c564b", "P",
           dict(_CODE, top_k=2, balance_loss="entropy"), aux_weight=_AUX, tags={"routed", "balance-loss"},
           description="LoRA-Mixer hard-soft top-2 routing with the entropy-shaping balance loss"),
    Method("switch", "Switch balance loss", "#bcbd22", "X", dict(_CODE, balance_loss="switch"), aux_weight=_AUX,
           tags={"routed", "balance-loss"}, description="dense code router with the Switch balance loss"),
    _structure("talklora-broadcast", "TalkLoRA broadcast", "#e377c2", "p", talk_structure="broadcast"),
    _structure("talklora-doubly-stochastic", "TalkLoRA doubly stochastic", "#7b4173", "d",
               talk_structure="doubly-stochastic"),
    _structure("talklora-block", "TalkLoRA block (2 groups)", "#ad494a", "s", talk_structure="block",
               talk_groups=2),
    _structure("talklora-banded", "TalkLoRA banded (±1)", "#637939", "^", talk_structure="banded",
               talk_bandwidth=1),
    _structure("talklora-low-rank", "TalkLoRA I + UVᵀ (rank 1)", "#8c6d31", "v", talk_structure="low-rank",
               talk_rank=1),
)})
ORDER = tuple(METHODS)      # plotting and report order


def method(name: str) -> Method:
    """The registry entry ``name``; ``ValueError`` listing the accepted names."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {name!r}")
    return METHODS[name]


def tagged(*tags: str, among=None) -> tuple[str, ...]:
    """Names of the methods that carry every tag in ``tags`` (registry order), optionally only those
    ``among`` a collection of names."""
    unknown = sorted(set(tags) - set(TAGS))
    if unknown:
        raise ValueError(f"unknown tag(s) {unknown}; accepted: {sorted(TAGS)}")
    keep = None if among is None else set(among)
    return tuple(n for n, m in METHODS.items() if set(tags) <= m.tags and (keep is None or n in keep))


def reference() -> str:
    """The method under test (the single entry tagged ``reference``)."""
    (name,) = tagged("reference")
    return name


def label(name: str) -> str:
    return METHODS[name].label if name in METHODS else str(name)


def color(name: str, default: str = "#333333") -> str:
    return METHODS[name].color if name in METHODS else default


def marker(name: str, default: str = "o") -> str:
    return METHODS[name].marker if name in METHODS else default


def check_names(names, what: str, allowed=None) -> list[str]:
    """``names`` as a list if every one is a registered method (and in ``allowed`` when given),
    else ``ValueError`` naming ``what`` and the accepted names."""
    accepted = list(METHODS) if allowed is None else list(allowed)
    bad = [n for n in names if n not in accepted]
    if bad:
        raise ValueError(f"{what}: unknown method(s) {bad}; accepted: {accepted}")
    return list(names)
