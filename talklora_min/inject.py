"""Put adapter layers into any ``nn.Module`` (PEFT-style target matching, :mod:`talklora_min.targets`)
and take them out again (``unload``) — docs/method.md §1–§2, §8.  Model-level helpers (merging,
disabling, summaries) are in :mod:`talklora_min.lifecycle`.

``inject`` remembers its config on the model (:func:`adapter_config`), so ``save_adapter(model, dir)``
needs no config; on a transformers model it also replaces the instance's ``save_pretrained`` by one
that writes the adapter (``talklora_min.hf.save_pretrained``), so ``Trainer`` checkpoints hold the
adapter, not the frozen base.  ``unload`` undoes both."""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass, field

from torch import nn

from .layers import (AdapterLayer, LoRALinear, MoELoRALinear, TalkLoRALinear, _is_number,
                     check_alpha_dropout, check_moe_args, check_positive_int, is_conv1d,
                     parse_talk_init)
from .structures import TALK_SETTINGS, check_talk_structure
from .targets import (ALL_LINEAR, DEFAULT_TARGETS, OFFICIAL_TARGETS, TARGET_MATCHES, _aliases,  # noqa: F401
                      adaptable_modules, projection_type, resolve_targets, target_matches)

KINDS = ("lora", "moelora", "talklora")
SAVED_MODULE_FLAG = "_talklora_modules_to_save"          # set by inject on modules_to_save
CONFIG_ATTR = "_talklora_adapter_config"                 # the AdapterConfig inject used
MAX_SIZE = 2**31 - 1                                     # bound on rank / num_experts (torch sizes)


@dataclass
class AdapterConfig:
    """What to inject where.  Validated on construction; ``to_json``/``from_json`` round-trip.

    ``target_match``: ``"suffix"`` (name equals the pattern or ends with ``"." + pattern``),
    ``"exact"`` (full module name) or ``"regex"`` (``re.fullmatch`` on the full name).
    ``share_B_across_layers`` ties the expert ``B`` of all adapted modules of one projection type
    (same path up to layer indices, see :func:`projection_type`) into one parameter, as the official
    TalkLoRA code does for q/k/v/up/down.  ``target_modules=None`` picks the architecture's usual
    projections (:data:`DEFAULT_TARGETS`); ``"all-linear"`` every ``nn.Linear`` / ``Conv1D`` except
    the output head (``model.get_output_embeddings()``), as PEFT.  Scaling ``s = alpha / r``
    (``alpha / √r`` with ``use_rslora``; ``alpha=None``: ``s = 1``); ``rank_pattern`` /
    ``alpha_pattern`` give some modules another rank / alpha, keys matched as in PEFT
    (``re.match(rf"(.*\.)?({key})$", name)``, first key that matches).  ``aux_loss_weight > 0``
    adds ``aux_loss_weight ×`` the mean balance loss of the adapted layers to ``model(...).loss`` and
    sets ``output.aux_loss`` (needs ``balance_loss``).  ``modules_to_save`` names modules (same
    matching as the targets, e.g. a classifier head) that are trained in full and saved with the adapter.  ``talk_structure``
    (with ``talk_groups`` / ``talk_bandwidth`` / ``talk_rank``) parametrises TalkLoRA's T
    (:mod:`talklora_min.structures`; kind ``"talklora"`` only).
    """

    kind: str = "talklora"
    rank: int = 8
    num_experts: int = 4
    target_modules: tuple[str, ...] | str | None = None
    target_match: str = "suffix"
    alpha: float | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
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
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR
        elif self.target_modules is not None:
            self.target_modules = _names("target_modules", self.target_modules)
            if not self.target_modules:
                raise ValueError("AdapterConfig.target_modules must be None (architecture defaults) "
                                 "or a non-empty list of non-empty strings, got []")
        self.modules_to_save = _names("modules_to_save", self.modules_to_save)
        if not isinstance(self.target_match, str) or self.target_match not in TARGET_MATCHES:
            raise ValueError(f"AdapterConfig.target_match must be one of {TARGET_MATCHES}, "
                             f"got {self.target_match!r}")
        if self.target_match == "regex":
            for pattern in _patterns(self.target_modules) + self.modules_to_save:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"AdapterConfig.target_modules: invalid regex {pattern!r}: {err}") from None
        self.rank = _size("AdapterConfig.rank", self.rank)
        if self.kind == "lora":
            pass
        else:
            self.num_experts = _size("AdapterConfig.num_experts", self.num_experts)
            check_moe_args(self.rank, self.num_experts, self.router_input, self.top_k, self.balance_loss)
            self.top_k = None if self.top_k is None else int(self.top_k)
            if self.kind == "talklora":
                if self.router_input != "code":
                    raise ValueError("AdapterConfig.router_input must be 'code' for kind='talklora'")
                parse_talk_init(self.talk_init)
        self._check_talk_structure()
        check_alpha_dropout(self.alpha, self.dropout)
        self.alpha = None if self.alpha is None else float(self.alpha)
        self._check_scaling_fields()
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

    def _check_scaling_fields(self) -> None:
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"AdapterConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        if self.use_rslora and self.alpha is None:
            raise ValueError("AdapterConfig.use_rslora=True needs a number alpha (s = alpha / sqrt(rank))")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
                raise ValueError(f"AdapterConfig.{name} must be a dict of module-name patterns (non-empty "
                                 f"strings) to values, got {value!r}")
            for key in value:
                try:
                    re.compile(key)
                except re.error as err:
                    raise ValueError(f"AdapterConfig.{name}: invalid pattern {key!r}: {err}") from None
        self.rank_pattern = {k: _size(f"AdapterConfig.rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()}
        if self.kind != "lora":
            for key, r in self.rank_pattern.items():
                if r % self.num_experts:
                    raise ValueError(f"AdapterConfig.rank_pattern[{key!r}] = {r} must be divisible by "
                                     f"num_experts ({self.num_experts})")
        for key, a in self.alpha_pattern.items():
            if not _is_number(a) or not math.isfinite(a) or a <= 0:
                raise ValueError(f"AdapterConfig.alpha_pattern[{key!r}] must be a positive number, got {a!r}")
        self.alpha_pattern = {k: float(v) for k, v in self.alpha_pattern.items()}

    def layer_rank(self, name: str) -> int:
        """The rank of the adapter on module ``name`` (``rank_pattern``, else ``rank``)."""
        return _pattern_value(self.rank_pattern, name, self.rank)

    def layer_scaling(self, name: str) -> float:
        """``s`` of the adapter on module ``name``: ``alpha / r`` (``alpha / √r`` with ``use_rslora``),
        1 for ``alpha=None``; ``alpha_pattern`` / ``rank_pattern`` override per module."""
        rank, alpha = self.layer_rank(name), _pattern_value(self.alpha_pattern, name, self.alpha)
        if alpha is None:
            return 1.0
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @classmethod
    def official(cls, **overrides) -> "AdapterConfig":
        """The official TalkLoRA setting: r = 32, E = 4, s = 1, dropout 0.05 in all three places,
        q/k/v/up/down targets, B tied per projection type."""
        settings = dict(kind="talklora", rank=32, num_experts=4, alpha=None, dropout=0.05,
                        gate_dropout=True, share_B_across_layers=True, target_modules=OFFICIAL_TARGETS)
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        targets = self.target_modules
        out["target_modules"] = targets if targets is None or isinstance(targets, str) else list(targets)
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

    def make_layer(self, base: nn.Module, name: str = "") -> AdapterLayer:
        """The adapter layer for module ``name`` around ``base`` (rank / scaling from the patterns)."""
        rank, alpha = self.layer_rank(name), _pattern_value(self.alpha_pattern, name, self.alpha)
        if self.kind == "lora":
            layer = LoRALinear(base, rank, alpha, self.dropout)
        else:
            moe = dict(top_k=self.top_k, gate_dropout=self.gate_dropout, balance_loss=self.balance_loss)
            if self.kind == "moelora":
                layer = MoELoRALinear(base, rank, self.num_experts, self.router_input, alpha, self.dropout, **moe)
            else:
                layer = TalkLoRALinear(base, rank, self.num_experts, alpha, self.dropout, self.talk_init, **moe,
                                       **{k: getattr(self, k) for k in TALK_SETTINGS})
        layer.scaling = self.layer_scaling(name)          # alpha / √r with rsLoRA, exactly as PEFT
        return layer


def _size(name: str, value) -> int:
    value = check_positive_int(name, value)
    if value > MAX_SIZE:
        raise ValueError(f"{name} must be at most {MAX_SIZE} (2**31 - 1), got {value}")
    return value


def _patterns(targets) -> tuple[str, ...]:
    return targets if isinstance(targets, tuple) else ()


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key with
    ``re.match(rf"(.*\.)?({key})$", name)``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


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


def _check_tieable(candidates: dict[str, nn.Module], matched: list[str]) -> dict[str, list[str]]:
    """The tied-B groups (projection type -> names) of ``share_B_across_layers``; raises if a group's
    layers differ in output size, dtype or device."""
    groups: dict[str, list[str]] = {}
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
    return groups


def inject(model: nn.Module, config: AdapterConfig) -> InjectionReport:
    """Replace every ``nn.Linear`` / ``Conv1D`` matching the targets by an adapter layer, in place.

    All non-adapter parameters are frozen, except those of ``config.modules_to_save``.  A module
    reachable under several names (shared) is adapted once and stays shared.  The config is kept on
    the model (:func:`adapter_config`).  Raises, before the model is changed, when a target matches
    nothing, when a parent would bypass the adapter (it calls a functional op with ``child.weight``:
    ``nn.MultiheadAttention.out_proj``), or when B cannot be tied; any later error puts the model
    back as it was.  Returns an :class:`InjectionReport`.
    """
    _check_injectable(model)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    by_pattern = resolve_targets(model, config)
    candidates = adaptable_modules(model)
    aliases = _aliases(model)
    matched = [n for n in candidates if any(n in hits for hits in by_pattern.values())]
    for name in matched:
        for alias in aliases[id(candidates[name])]:
            parent = model.get_submodule(alias.rpartition(".")[0])
            if isinstance(parent, nn.MultiheadAttention):
                raise ValueError(f"cannot adapt {alias!r}: nn.MultiheadAttention reads out_proj.weight "
                                 "directly (F.multi_head_attention_forward), so the adapter would be "
                                 "bypassed; adapt the surrounding Linear layers instead")
    saved = _match_modules_to_save(model, config, set(matched))
    groups = _check_tieable(candidates, matched) if config.share_B_across_layers else {}

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        layers = {n: config.make_layer(candidates[n], n).train(candidates[n].training) for n in matched}
        model.requires_grad_(False)
        for name, layer in layers.items():
            if isinstance(layer, LoRALinear):
                _keep_state_dict_unmerged(layer)
            for alias in aliases[id(candidates[name])]:
                parent_name, _, child = alias.rpartition(".")
                setattr(model.get_submodule(parent_name), child, layer)
        for names in groups.values():
            for other in names[1:]:
                layers[other].tie_B(layers[names[0]])
        for path in saved:
            module = model.get_submodule(path)
            module.requires_grad_(True)
            setattr(module, SAVED_MODULE_FLAG, True)
        if config.aux_loss_weight > 0:
            handles = [model.register_forward_pre_hook(_clear_aux_losses),
                       model.register_forward_hook(functools.partial(_add_aux_loss, config.aux_loss_weight))]
            model.__dict__["_talklora_hooks"] = handles
        remember_config(model, config)
    except BaseException:
        rollback(model, requires_grad)
        raise
    return InjectionReport(matched, by_pattern, groups, count_parameters(model, True),
                           count_parameters(model, False), tuple(by_pattern), saved)


def rollback(model: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Undo an ``inject``: :func:`unload` (bases, hooks, flags, config) and the ``requires_grad``
    flags recorded before it (``{parameter name: flag}``)."""
    unload(model)
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, p.requires_grad))


def remember_config(model: nn.Module, config: AdapterConfig) -> None:
    """Keep (a copy of) ``config`` on the adapted ``model``, and on a transformers model make
    ``model.save_pretrained`` write the adapter (:func:`talklora_min.hf.save_pretrained`)."""
    model.__dict__[CONFIG_ATTR] = copy.deepcopy(config)
    if _is_transformers_model(model):
        model.__dict__["save_pretrained"] = functools.partial(_save_pretrained, model)


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(model).__mro__)


def _save_pretrained(model: nn.Module, save_directory, *args, **kwargs):
    """``model.save_pretrained`` of an injected transformers model: the adapter, not the base."""
    from .hf import save_pretrained
    return save_pretrained(model, save_directory, *args, **kwargs)


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


# ----------------------------------------------------------------------------- merged LoRA layers
def _keep_state_dict_unmerged(layer: LoRALinear) -> None:
    """A merged layer's state dict holds ``W0`` (not ``W0 + s·BA``) as ``base.weight``, so loading it
    into a fresh (unmerged) layer does not add the delta twice; loading into a merged layer unmerges
    first and merges the loaded adapter after.  Plain functions of the module: copies keep working."""
    layer.register_state_dict_post_hook(_unmerged_state)
    layer.register_load_state_dict_pre_hook(_unmerge_before_load)
    layer.register_load_state_dict_post_hook(_merge_after_load)


def _unmerged_state(layer, state_dict, prefix, local_metadata) -> None:
    if getattr(layer, "merged", False) and prefix + "base.weight" in state_dict:
        state_dict[prefix + "base.weight"] = layer._unmerged_weight.detach()


def _unmerge_before_load(layer, state_dict, prefix, *args) -> None:
    if getattr(layer, "merged", False):
        layer.unmerge()
        layer.__dict__["_talklora_remerge"] = True


def _merge_after_load(layer, incompatible_keys) -> None:
    if layer.__dict__.pop("_talklora_remerge", False):
        layer.merge()


# ----------------------------------------------------------------------------- model-level helpers
def unload(model: nn.Module) -> nn.Module:
    """Put every adapter layer's base module back (adapter discarded; merged LoRA weights stay
    merged), remove inject's hooks, its config and its ``save_pretrained``; ``modules_to_save`` keep
    their trained values.  Returns ``model`` (changed in place)."""
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
    model.__dict__.pop(CONFIG_ATTR, None)
    patched = model.__dict__.get("save_pretrained")
    if isinstance(patched, functools.partial) and patched.func is _save_pretrained:
        del model.__dict__["save_pretrained"]
    return model
