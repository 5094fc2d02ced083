"""Put adapter layers into any ``nn.Module`` (PEFT-style target matching) — SPEC §1–§2 — and the
model-level helpers: ``unload``, ``merge_and_unload``, ``disable_adapters``, ``trainable_summary``."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .layers import (AdapterLayer, LoRALinear, MoELoRALinear, TalkLoRALinear, _is_number,
                     check_alpha_dropout, check_moe_args, check_positive_int, is_conv1d,
                     parse_talk_init)
from .structures import TALK_SETTINGS, check_talk_structure

KINDS = ("lora", "moelora", "talklora")
TARGET_MATCHES = ("exact", "suffix", "regex")
OFFICIAL_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
# target_modules=None: the first row with a match in the model, restricted to the names that match.
DEFAULT_TARGETS = (
    OFFICIAL_TARGETS,                                    # Llama, Mistral, Qwen2, Gemma, SmolLM2, Mixtral
    ("c_attn", "c_proj", "c_fc"),                        # GPT-2 family (transformers Conv1D)
    ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),    # T5
    ("query", "key", "value"),                           # BERT, RoBERTa, ViT
    ("q_lin", "k_lin", "v_lin"),                         # DistilBERT
)
SAVED_MODULE_FLAG = "_talklora_modules_to_save"          # set by inject on modules_to_save


@dataclass
class AdapterConfig:
    """What to inject where.  Validated on construction; ``to_json``/``from_json`` round-trip.

    ``target_match``: ``"suffix"`` (name equals the pattern or ends with ``"." + pattern``),
    ``"exact"`` (full module name) or ``"regex"`` (``re.fullmatch`` on the full name).
    ``share_B_across_layers`` ties the expert ``B`` of all adapted modules of one projection type
    (same path up to layer indices, see :func:`projection_type`) into one parameter, as the official
    TalkLoRA code does for q/k/v/up/down.  ``target_modules=None`` picks the architecture's usual
    projections (:data:`DEFAULT_TARGETS`).  ``aux_loss_weight > 0`` adds ``aux_loss_weight ×`` the
    mean balance loss of the adapted layers to ``model(...).loss`` and sets ``output.aux_loss``
    (needs ``balance_loss``).  ``modules_to_save`` names modules (same matching as the targets, e.g.
    a classifier head) that are trained in full and saved with the adapter.  ``talk_structure``
    (with ``talk_groups`` / ``talk_bandwidth`` / ``talk_rank``) parametrises TalkLoRA's T
    (:mod:`talklora_min.structures`; kind ``"talklora"`` only).
    """

    kind: str = "talklora"
    rank: int = 8
    num_experts: int = 4
    target_modules: tuple[str, ...] | None = OFFICIAL_TARGETS
    target_match: str = "suffix"
    alpha: float | None = None
    dropout: float = 0.0
    router_input: str = "code"
    top_k: int | None = None
    talk_init: str | float = "official"
    talk_structure: str = "full"
    talk_groups: int | None = None
    talk_bandwidth: int | None = None
    talk_rank: int | None = None
    gate_dropout: bool = False
    balance_loss: str | None = None
    share_B_across_layers: bool = False
    aux_loss_weight: float = 0.0
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ValueError(f"AdapterConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.target_modules is not None:
            self.target_modules = _names("target_modules", self.target_modules)
            if not self.target_modules:
                raise ValueError("AdapterConfig.target_modules must be None (architecture defaults) "
                                 "or a non-empty list of non-empty strings, got []")
        self.modules_to_save = _names("modules_to_save", self.modules_to_save)
        if not isinstance(self.target_match, str) or self.target_match not in TARGET_MATCHES:
            raise ValueError(f"AdapterConfig.target_match must be one of {TARGET_MATCHES}, "
                             f"got {self.target_match!r}")
        if self.target_match == "regex":
            for pattern in (self.target_modules or ()) + self.modules_to_save:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"AdapterConfig.target_modules: invalid regex {pattern!r}: {err}") from None
        self.rank = check_positive_int("AdapterConfig.rank", self.rank)
        if self.kind == "lora":
            pass
        else:
            self.num_experts = check_positive_int("AdapterConfig.num_experts", self.num_experts)
            check_moe_args(self.rank, self.num_experts, self.router_input, self.top_k, self.balance_loss)
            self.top_k = None if self.top_k is None else int(self.top_k)
            if self.kind == "talklora":
                if self.router_input != "code":
                    raise ValueError("AdapterConfig.router_input must be 'code' for kind='talklora'")
                parse_talk_init(self.talk_init)
        self._check_talk_structure()
        check_alpha_dropout(self.alpha, self.dropout)
        self.alpha = None if self.alpha is None else float(self.alpha)
        self.dropout = float(self.dropout)
        if _is_number(self.talk_init):
            self.talk_init = float(self.talk_init)
        if not isinstance(self.gate_dropout, bool) or not isinstance(self.share_B_across_layers, bool):
            raise ValueError("AdapterConfig.gate_dropout and share_B_across_layers must be booleans")
        w = self.aux_loss_weight
        if not _is_number(w) or not math.isfinite(w) or w < 0:
            raise ValueError(f"AdapterConfig.aux_loss_weight must be a finite number >= 0, got {w!r}")
        self.aux_loss_weight = float(w)
        if self.aux_loss_weight > 0 and (self.kind == "lora" or self.balance_loss is None):
            raise ValueError("AdapterConfig.aux_loss_weight > 0 needs a balance loss: set balance_loss "
                             f"to one of {('switch', 'cv', 'entropy')} (kind 'moelora' or 'talklora')")

    def _check_talk_structure(self) -> None:
        settings = {k: getattr(self, k) for k in TALK_SETTINGS}
        if self.kind != "talklora":
            if settings != {"talk_structure": "full", "talk_groups": None, "talk_bandwidth": None, "talk_rank": None}:
                raise ValueError(f"AdapterConfig.talk_structure / talk_groups / talk_bandwidth / talk_rank are "
                                 f"only meaningful for kind='talklora' (got kind={self.kind!r}, {settings})")
            return
        try:
            checked = check_talk_structure(self.talk_structure, self.num_experts, self.talk_groups,
                                           self.talk_bandwidth, self.talk_rank)
        except ValueError as err:
            raise ValueError(f"AdapterConfig.{err}") from None
        for name, value in zip(TALK_SETTINGS, checked):
            setattr(self, name, value)

    @classmethod
    def official(cls, **overrides) -> "AdapterConfig":
        """The official TalkLoRA setting: r = 32, E = 4, s = 1, dropout 0.05 in all three places,
        q/k/v/up/down targets, B tied per projection type."""
        settings = dict(kind="talklora", rank=32, num_experts=4, alpha=None, dropout=0.05,
                        gate_dropout=True, share_B_across_layers=True, target_modules=OFFICIAL_TARGETS)
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        out["modules_to_save"] = list(self.modules_to_save)
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

    def make_layer(self, base: nn.Module) -> AdapterLayer:
        if self.kind == "lora":
            return LoRALinear(base, self.rank, self.alpha, self.dropout)
        moe = dict(top_k=self.top_k, gate_dropout=self.gate_dropout, balance_loss=self.balance_loss)
        if self.kind == "moelora":
            return MoELoRALinear(base, self.rank, self.num_experts, self.router_input, self.alpha,
                                 self.dropout, **moe)
        return TalkLoRALinear(base, self.rank, self.num_experts, self.alpha, self.dropout,
                              self.talk_init, **moe, **{k: getattr(self, k) for k in TALK_SETTINGS})


def _names(field_name: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"AdapterConfig.{field_name} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


@dataclass
class InjectionReport:
    """Which modules were adapted, by which pattern, and the resulting parameter counts."""

    matched: list[str]
    matched_by_pattern: dict[str, list[str]]
    shared_B_groups: dict[str, list[str]] = field(default_factory=dict)
    trainable_parameters: int = 0
    total_parameters: int = 0
    target_modules: tuple[str, ...] = ()
    modules_to_save: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"adapted {len(self.matched)} modules; trainable parameters "
                 f"{self.trainable_parameters:,} of {self.total_parameters:,} "
                 f"({100 * self.trainable_parameters / max(self.total_parameters, 1):.3f}%)"]
        lines += [f"  {p!r}: {len(m)} match(es)" for p, m in self.matched_by_pattern.items()]
        lines += [f"  B shared by {len(m)} '{g}' layers" for g, m in self.shared_B_groups.items()]
        if self.modules_to_save:
            lines.append(f"  trained in full and saved (modules_to_save): {self.modules_to_save}")
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
    -> ``model.layers.*.self_attn.q_proj``.  ``share_B_across_layers`` ties B within a type.

    One layer stack = an index in the *middle* of the path (``layers.3.``).  A final index is kept:
    the members of ``nn.Sequential(Linear, Linear)`` (``0``, ``1``) are unrelated projections and
    are different types."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


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


def auxiliary_loss(model: nn.Module, reduction: str = "sum"):
    """The balance losses stored by the last forward of the model's MoE adapter layers, summed
    (``reduction="sum"``) or averaged over the layers that have one (``"mean"``); 0.0 if none."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be one of ('sum', 'mean'), got {reduction!r}")
    losses = [m.aux_loss for m in adapter_layers(model).values() if getattr(m, "aux_loss", None) is not None]
    if not losses:
        return 0.0
    return sum(losses) / (len(losses) if reduction == "mean" else 1)


def _clear_aux_losses(model: nn.Module, args) -> None:
    for layer in adapter_layers(model).values():
        if hasattr(layer, "aux_loss"):
            layer.aux_loss = None


def _add_aux_loss(weight: float, model: nn.Module, args, output):
    """Forward hook on the top model: ``output.loss += weight · mean balance loss`` and
    ``output.aux_loss`` (for dict-like outputs such as transformers' ``ModelOutput``)."""
    aux = auxiliary_loss(model, "mean")
    if isinstance(aux, float) or not isinstance(output, dict):
        return output
    output["aux_loss"] = aux
    if output.get("loss") is not None:
        output["loss"] = output["loss"] + weight * aux.to(output["loss"].device, output["loss"].dtype)
    return output


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every ``nn.Linear`` / transformers ``Conv1D`` (first name of shared ones)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """All names of every module, by ``id`` (a module shared by two parents has two names)."""
    out: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(name)
    return out


def resolve_targets(model: nn.Module, config: AdapterConfig) -> tuple[str, ...]:
    """``config.target_modules``, or for ``None`` the first :data:`DEFAULT_TARGETS` row with a match
    (only its matching names).  Raises ``ValueError`` listing the linear layers when none applies."""
    if config.target_modules is not None:
        return config.target_modules
    names = list(adaptable_modules(model))
    for row in DEFAULT_TARGETS:
        hits = tuple(p for p in row if any(target_matches(n, p, "suffix") for n in names))
        if hits:
            return hits
    listing = ", ".join(repr(n) for n in names[:12]) or "none"
    raise ValueError(f"target_modules=None: no default target of {DEFAULT_TARGETS} is in "
                     f"{type(model).__name__}; name the layers to adapt in AdapterConfig.target_modules. "
                     f"Its linear layers: {listing}")


def _check_injectable(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear) or is_conv1d(model) or isinstance(model, AdapterLayer):
        raise TypeError(f"model is itself a {type(model).__name__}: inject replaces submodules of a "
                        "model; wrap it (e.g. nn.Sequential(layer)) or build the adapter layer directly "
                        "(LoRALinear(layer, rank) …)")
    peft = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")})
    if peft:
        raise ValueError(f"model contains PEFT modules {peft[:4]}: inject would freeze PEFT's own adapters. "
                         "Convert them with talklora_min.hf.from_peft(model) or merge them with "
                         "model.merge_and_unload() first")
    if adapter_layers(model):
        raise ValueError("model already has adapter layers: inject into a fresh model")


def inject(model: nn.Module, config: AdapterConfig) -> InjectionReport:
    """Replace every ``nn.Linear`` / ``Conv1D`` matching the targets by an adapter layer, in place.

    All non-adapter parameters are frozen, except those of ``config.modules_to_save``.  A module
    reachable under several names (shared) is adapted once and stays shared.  Raises, before the
    model is changed, when a target matches nothing, when a parent would bypass the adapter (it
    calls a functional op with ``child.weight``: ``nn.MultiheadAttention.out_proj``), or when B
    cannot be tied.  Returns an :class:`InjectionReport`.
    """
    _check_injectable(model)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    targets = resolve_targets(model, config)
    candidates = adaptable_modules(model)
    aliases = _aliases(model)
    by_pattern = {p: [n for n in candidates if any(target_matches(a, p, config.target_match)
                                                   for a in aliases[id(candidates[n])])]
                  for p in targets}
    for pattern, hits in by_pattern.items():
        if not hits:
            examples = ", ".join(repr(n) for n in list(candidates)[:8]) or "none"
            raise ValueError(f"target pattern {pattern!r} ({config.target_match} match) matched no "
                             f"nn.Linear / Conv1D in {type(model).__name__}; its linear layers include: {examples}")
    matched = [n for n in candidates if any(n in hits for hits in by_pattern.values())]
    for name in matched:
        for alias in aliases[id(candidates[name])]:
            parent = model.get_submodule(alias.rpartition(".")[0])
            if isinstance(parent, nn.MultiheadAttention):
                raise ValueError(f"cannot adapt {alias!r}: nn.MultiheadAttention reads out_proj.weight "
                                 "directly (F.multi_head_attention_forward), so the adapter would be "
                                 "bypassed; adapt the surrounding Linear layers instead")
    saved = _match_modules_to_save(model, config, set(matched))
    groups: dict[str, list[str]] = {}
    if config.share_B_across_layers:  # check tie-ability before touching the model
        for name in matched:
            groups.setdefault(projection_type(name), []).append(name)
        groups = {g: names for g, names in groups.items() if len(names) > 1}
        for group, names in groups.items():
            layers = {n: candidates[n] for n in names}
            sizes = {n: (m.weight.shape[1] if is_conv1d(m) else m.weight.shape[0]) for n, m in layers.items()}
            if len(set(sizes.values())) > 1:
                raise ValueError(f"share_B_across_layers: '{group}' layers have different output sizes "
                                 f"{sizes}, so their B cannot be one tensor")
            dtypes = {n: str(m.weight.dtype) for n, m in layers.items()}
            devices = {n: str(m.weight.device) for n, m in layers.items()}
            if len(set(dtypes.values())) > 1 or len(set(devices.values())) > 1:
                raise ValueError(f"share_B_across_layers: '{group}' layers have different dtypes/devices "
                                 f"{dtypes} {devices}, so their B cannot be one tensor")

    model.requires_grad_(False)
    for name in matched:
        layer = config.make_layer(candidates[name]).train(candidates[name].training)   # keep eval mode
        for alias in aliases[id(candidates[name])]:
            parent_name, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
    for names in groups.values():
        first = model.get_submodule(names[0])
        for other in names[1:]:
            model.get_submodule(other).tie_B(first)
    for path in saved:
        module = model.get_submodule(path)
        module.requires_grad_(True)
        setattr(module, SAVED_MODULE_FLAG, True)
    if config.aux_loss_weight > 0:
        handles = [model.register_forward_pre_hook(_clear_aux_losses),
                   model.register_forward_hook(functools.partial(_add_aux_loss, config.aux_loss_weight))]
        model.__dict__["_talklora_hooks"] = handles
    return InjectionReport(matched, by_pattern, groups, count_parameters(model, True),
                           count_parameters(model, False), tuple(targets), saved)


def _match_modules_to_save(model: nn.Module, config: AdapterConfig, adapted: set[str]) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n]
    out = []
    for pattern in config.modules_to_save:
        hits = [n for n in names if target_matches(n, pattern, config.target_match)]
        if not hits:
            raise ValueError(f"modules_to_save pattern {pattern!r} ({config.target_match} match) matched no "
                             f"module of {type(model).__name__}; modules include: {names[-6:]}")
        clash = [n for n in hits if any(n == a or n.startswith(a + ".") or a.startswith(n + ".") for a in adapted)]
        if clash:
            raise ValueError(f"modules_to_save {clash} overlap adapted target layers: a module is either "
                             "adapted or trained in full, not both")
        out += [n for n in hits if n not in out]
    return out


def saved_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that ``inject`` marked as ``modules_to_save`` (trained in full, saved with the adapter)."""
    return {n: m for n, m in model.named_modules() if getattr(m, SAVED_MODULE_FLAG, False)}


# ----------------------------------------------------------------------------- model-level helpers
def unload(model: nn.Module) -> nn.Module:
    """Put every adapter layer's base module back (adapter discarded; merged LoRA weights stay
    merged) and remove inject's hooks; ``modules_to_save`` keep their trained values.  Returns
    ``model`` (changed in place)."""
    layers = adapter_layers(model)
    aliases = _aliases(model)
    for layer in layers.values():
        for alias in aliases[id(layer)]:
            parent_name, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base)
    for handle in model.__dict__.pop("_talklora_hooks", []):
        handle.remove()
    for module in saved_modules(model).values():      # stay trained, but no longer adapter state
        delattr(module, SAVED_MODULE_FLAG)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight (``W0 += s·BA``), then :func:`unload`.

    MoE layers cannot be merged (their gates depend on the input): raises before changing anything."""
    layers = adapter_layers(model)
    moe = [n for n, m in layers.items() if not isinstance(m, LoRALinear)]
    if moe:
        raise ValueError(f"merge_and_unload needs LoRA layers; {moe[:4]} are mixtures whose gates g(x) "
                         "depend on the input and have no single merged weight (use unload())")
    for layer in layers.values():
        if not layer.merged:
            layer.merge()
    return unload(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every adapter layer returns its base output only."""
    layers = list(adapter_layers(model).values())
    before = [layer.adapter_enabled for layer in layers]
    try:
        for layer in layers:
            layer.adapter_enabled = False
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.adapter_enabled = flag


def trainable_summary(model: nn.Module) -> str:
    """Trainable / total parameters (tied tensors counted once), by adapter type and modules_to_save."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable, total = count_parameters(model, True), count_parameters(model, False)
    lines = [f"trainable params: {trainable:,} || all params: {total:,} || "
             f"trainable%: {100 * trainable / max(total, 1):.4f}"]
    kinds: dict[str, list[AdapterLayer]] = {}
    for layer in adapter_layers(model).values():
        kinds.setdefault(type(layer).__name__, []).append(layer)
    for kind, layers in kinds.items():
        n = count_parameters(nn.ModuleList(layers), True)
        lines.append(f"  {kind}: {len(layers)} layers, {n:,} trainable params")
    for path, module in saved_modules(model).items():
        lines.append(f"  modules_to_save {path}: {count_parameters(module, True):,} trainable params")
    return "\n".join(lines)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`trainable_summary` (PEFT's ``print_trainable_parameters``)."""
    print(trainable_summary(model))
