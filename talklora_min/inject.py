"""Put adapter layers into any ``nn.Module`` (PEFT-style target matching) — SPEC §1–§2."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from torch import nn

from .layers import (AdapterLayer, LoRALinear, MoELoRALinear, TalkLoRALinear, check_alpha_dropout,
                     check_moe_args, check_positive_int, parse_talk_init)

KINDS = ("lora", "moelora", "talklora")
TARGET_MATCHES = ("exact", "suffix", "regex")
OFFICIAL_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """What to inject where.  Validated on construction; ``to_json``/``from_json`` round-trip.

    ``target_match``: ``"suffix"`` (name equals the pattern or ends with ``"." + pattern``),
    ``"exact"`` (full module name) or ``"regex"`` (``re.fullmatch`` on the full name).
    ``share_B_across_layers`` ties the expert ``B`` of all adapted modules of one projection type
    (same path up to layer indices, see :func:`projection_type`) into one parameter, as the official
    TalkLoRA code does for q/k/v/up/down.
    """

    kind: str = "talklora"
    rank: int = 8
    num_experts: int = 4
    target_modules: tuple[str, ...] = OFFICIAL_TARGETS
    target_match: str = "suffix"
    alpha: float | None = None
    dropout: float = 0.0
    router_input: str = "code"
    top_k: int | None = None
    talk_init: str | float = "official"
    gate_dropout: bool = False
    balance_loss: str | None = None
    share_B_across_layers: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"AdapterConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"AdapterConfig.target_modules must be a non-empty list of non-empty "
                             f"strings, got {self.target_modules!r}")
        if self.target_match not in TARGET_MATCHES:
            raise ValueError(f"AdapterConfig.target_match must be one of {TARGET_MATCHES}, "
                             f"got {self.target_match!r}")
        if self.target_match == "regex":
            for pattern in self.target_modules:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"AdapterConfig.target_modules: invalid regex {pattern!r}: {err}") from None
        if self.kind == "lora":
            check_positive_int("AdapterConfig.rank", self.rank)
        else:
            check_moe_args(self.rank, self.num_experts, self.router_input, self.top_k, self.balance_loss)
            if self.kind == "talklora":
                if self.router_input != "code":
                    raise ValueError("AdapterConfig.router_input must be 'code' for kind='talklora'")
                parse_talk_init(self.talk_init)
        check_alpha_dropout(self.alpha, self.dropout)
        if not isinstance(self.gate_dropout, bool) or not isinstance(self.share_B_across_layers, bool):
            raise ValueError("AdapterConfig.gate_dropout and share_B_across_layers must be booleans")

    @classmethod
    def official(cls, **overrides) -> "AdapterConfig":
        """The official TalkLoRA setting: r = 32, E = 4, s = 1, dropout 0.05 in all three places,
        q/k/v/up/down targets, B tied per projection type."""
        settings = dict(kind="talklora", rank=32, num_experts=4, alpha=None, dropout=0.05,
                        gate_dropout=True, share_B_across_layers=True, target_modules=OFFICIAL_TARGETS)
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise ValueError(f"AdapterConfig data must be a JSON object / dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown AdapterConfig field(s) {unknown}; accepted: {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        return cls.from_dict(json.loads(text))

    def make_layer(self, base: nn.Linear) -> AdapterLayer:
        if self.kind == "lora":
            return LoRALinear(base, self.rank, self.alpha, self.dropout)
        moe = dict(top_k=self.top_k, gate_dropout=self.gate_dropout, balance_loss=self.balance_loss)
        if self.kind == "moelora":
            return MoELoRALinear(base, self.rank, self.num_experts, self.router_input, self.alpha,
                                 self.dropout, **moe)
        return TalkLoRALinear(base, self.rank, self.num_experts, self.alpha, self.dropout,
                              self.talk_init, **moe)


@dataclass
class InjectionReport:
    """Which modules were adapted, by which pattern, and the resulting parameter counts."""

    matched: list[str]
    matched_by_pattern: dict[str, list[str]]
    shared_B_groups: dict[str, list[str]] = field(default_factory=dict)
    trainable_parameters: int = 0
    total_parameters: int = 0

    def __str__(self) -> str:
        lines = [f"adapted {len(self.matched)} modules; trainable parameters "
                 f"{self.trainable_parameters:,} of {self.total_parameters:,} "
                 f"({100 * self.trainable_parameters / max(self.total_parameters, 1):.3f}%)"]
        lines += [f"  {p!r}: {len(m)} match(es)" for p, m in self.matched_by_pattern.items()]
        lines += [f"  B shared by {len(m)} '{g}' layers" for g, m in self.shared_B_groups.items()]
        return "\n".join(lines)


def target_matches(name: str, pattern: str, mode: str) -> bool:
    if mode == "exact":
        return name == pattern
    if mode == "suffix":
        return name == pattern or name.endswith("." + pattern)
    if mode == "regex":
        return re.fullmatch(pattern, name) is not None
    raise ValueError(f"target_match must be one of {TARGET_MATCHES}, got {mode!r}")


def projection_type(name: str) -> str:
    """The module path with every layer index replaced by ``*``: ``model.layers.3.self_attn.q_proj``
    -> ``model.layers.*.self_attn.q_proj``.  ``share_B_across_layers`` ties B within a type."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """All adapter layers of a model, by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters, each tensor counted once even when tied across layers."""
    seen, total = set(), 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def auxiliary_loss(model: nn.Module):
    """Sum of the balance losses stored by the last forward of every MoE adapter layer (0 if none)."""
    losses = [m.aux_loss for m in adapter_layers(model).values() if getattr(m, "aux_loss", None) is not None]
    return sum(losses) if losses else 0.0


def inject(model: nn.Module, config: AdapterConfig) -> InjectionReport:
    """Replace every ``nn.Linear`` matching ``config.target_modules`` by an adapter layer, in place.

    All non-adapter parameters are frozen.  Raises ``ValueError`` naming the pattern when a target
    matches no ``nn.Linear``.  Returns an :class:`InjectionReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if adapter_layers(model):
        raise ValueError("model already has adapter layers: inject into a fresh model")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    by_pattern = {p: [n for n in linears if target_matches(n, p, config.target_match)]
                  for p in config.target_modules}
    for pattern, hits in by_pattern.items():
        if not hits:
            examples = ", ".join(repr(n) for n in linears[:6]) or "none"
            raise ValueError(f"target pattern {pattern!r} ({config.target_match} match) matched no "
                             f"nn.Linear in {type(model).__name__}; its linear layers include: {examples}")
    matched = [n for n in linears if any(n in hits for hits in by_pattern.values())]
    groups: dict[str, list[str]] = {}
    if config.share_B_across_layers:  # check tie-ability before touching the model
        for name in matched:
            groups.setdefault(projection_type(name), []).append(name)
        for group, names in groups.items():
            sizes = {n: model.get_submodule(n).out_features for n in names}
            if len(set(sizes.values())) > 1:
                raise ValueError(f"share_B_across_layers: '{group}' layers have different output sizes "
                                 f"{sizes}, so their B cannot be one tensor")

    model.requires_grad_(False)
    for name in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, config.make_layer(getattr(parent, child)))

    for names in groups.values():
        first = model.get_submodule(names[0])
        for other in names[1:]:
            model.get_submodule(other).B = first.B
    return InjectionReport(matched, by_pattern, groups, count_parameters(model, True),
                           count_parameters(model, False))
