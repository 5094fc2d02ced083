"""The official TalkLoRA checkpoint layout (docs/method.md §2): export and import of full state dicts.

Official layout (``export_official_state_dict`` / ``load_official_state_dict``), per TalkLoRA layer
``<path>`` (our base linear lives at ``<path>.base``)::

    <path>.weight / <path>.bias                 <- <path>.base.weight / <path>.base.bias
    <path>.lora_A.default.weight                <- A        (r, d_in)
    <path>.lora_A_experts.default.{e}.weight    <- C[e]     (m, m)
    <path>.lora_A_talk.default.weight           <- T        (E, E)
    <path>.lora_A_route.default.weight          <- W_r      (E, r)
    <path>.lora_B.default.{e}.weight            <- B[e]     (d_out, m), same in every tied layer

All other entries of the model's ``state_dict`` keep their names.

An adapter key is one of the five official forms above (``.lora_A.default.weight``,
``.lora_A_experts.default.{e}.weight``, ``.lora_A_talk.default.weight``, ``.lora_A_route.default.weight``,
``.lora_B.default.{e}.weight``); any other key — also of a module whose name starts with ``lora_``,
such as a ``lora_head`` — is an ordinary entry of the model.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .inject import adapter_layers, projection_type
from .io import _check_model, _check_value, _copy_plan
from .layers import TalkLoRALinear

# the adapter entries of the official layout (any other key is an ordinary model entry)
ADAPTER_KEY = re.compile(r"(^|\.)lora_(A|A_experts|A_talk|A_route|B)\.default(\.\d+)?\.weight$")


def _official_layers(model: nn.Module) -> dict[str, TalkLoRALinear]:
    layers = adapter_layers(_check_model(model))
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no adapter layers: inject an "
                         f"AdapterConfig(kind='talklora') first")
    for path, layer in layers.items():
        if not isinstance(layer, TalkLoRALinear):
            raise ValueError(f"model layer {path!r} is a {type(layer).__name__}; the official layout "
                             f"needs TalkLoRALinear layers (AdapterConfig kind='talklora')")
        if layer.scaling != 1.0 or layer.top_k is not None:
            raise ValueError(f"model layer {path!r} has scaling {layer.scaling:g}, top_k {layer.top_k}; the "
                             f"official forward needs alpha=None (s = 1) and dense routing (top_k=None)")
        if layer.talk_structure != "full":
            raise ValueError(f"model layer {path!r} has talk_structure={layer.talk_structure!r}; the official "
                             f"layout holds a free T (talk_structure='full') only, so a {layer.talk_structure!r} "
                             f"T cannot be imported or exported (save_adapter keeps its parameters)")
    return layers


def _official_keys(path: str, layer: TalkLoRALinear) -> dict[str, tuple[str, int | None]]:
    """Official key -> (our tensor name, expert index or None) for one layer."""
    keys = {f"{path}.lora_A.default.weight": ("A", None),
            f"{path}.lora_A_talk.default.weight": ("T", None),
            f"{path}.lora_A_route.default.weight": ("W_r", None)}
    for e in range(layer.num_experts):
        keys[f"{path}.lora_A_experts.default.{e}.weight"] = ("C", e)
        keys[f"{path}.lora_B.default.{e}.weight"] = ("B", e)
    return keys


def export_official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's full state dict in the official layout (cloned tensors), see the module doc."""
    layers = _official_layers(model)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        path = next((p for p in layers if key.startswith(p + ".")), None)
        if path is None:
            out[key] = value.detach().clone()
        elif key in (f"{path}.base.weight", f"{path}.base.bias"):
            out[path + key[len(path) + len(".base"):]] = value.detach().clone()
    for path, layer in layers.items():
        for key, (name, e) in _official_keys(path, layer).items():
            value = getattr(layer, name).detach()
            out[key] = (value if e is None else value[e]).clone()
    return out


@dataclass
class OfficialLoadReport:
    """Which layers were loaded, the tied-B groups (checked equal, loaded once) and, with
    ``strict=False``, the model entries the state dict did not cover (left unchanged) and the
    non-adapter state-dict keys the model has no place for (ignored)."""

    layers: list[str]
    shared_B_groups: dict[str, list[str]] = field(default_factory=dict)
    not_loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def _parse_state_dict(state_dict) -> dict[str, Tensor]:
    """Phase 1: a mapping of ``str`` keys to ``torch.Tensor`` values (``TypeError`` naming the key)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of str keys to torch.Tensor values, "
                        f"got {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings, got {key!r} ({type(key).__name__})")
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}; every value must be a "
                            f"torch.Tensor (e.g. torch.from_numpy(array))")
    return dict(state_dict)


def _plan_official_adapters(layers: dict[str, TalkLoRALinear], state: dict[str, Tensor]):
    """Phase 2a: (plan, expected adapter keys, tied-B groups) for the adapter tensors."""
    plan: list[tuple[Tensor, Tensor]] = []           # (destination, source)
    expected: set[str] = set()
    for path, layer in layers.items():
        n_experts = len({k for k in state if k.startswith(f"{path}.lora_A_experts.default.")})
        if n_experts and n_experts != layer.num_experts:
            raise ValueError(f"layer {path!r}: state dict has {n_experts} experts, the model layer "
                             f"has num_experts={layer.num_experts}")
        for key, (name, e) in _official_keys(path, layer).items():
            expected.add(key)
            if key not in state:
                raise ValueError(f"missing adapter key {key!r} for layer {path!r}")
            target = getattr(layer, name).detach()           # shares storage with the Parameter
            target = target if e is None else target[e]
            _check_value(key, target, state[key],
                         f"state dict (rank {layer.rank}, num_experts {layer.num_experts})")
            plan.append((target, state[key]))
    unknown = sorted(k for k in state if k not in expected and ADAPTER_KEY.search(k))
    if unknown:
        raise ValueError(f"unknown adapter key(s) {unknown[:8]}: no TalkLoRALinear layer of the model "
                         f"(adapted: {list(layers)[:4]}...) expects them")

    # B tied across layers: the state dict must hold the same B_e in every layer of a group.
    groups: dict[int, list[str]] = {}
    for path, layer in layers.items():
        groups.setdefault(id(layer.B), []).append(path)
    shared = {projection_type(paths[0]): paths for paths in groups.values() if len(paths) > 1}
    for group, paths in shared.items():
        for e in range(layers[paths[0]].num_experts):
            ref = state[f"{paths[0]}.lora_B.default.{e}.weight"]
            for other in paths[1:]:
                if not torch.equal(state[f"{other}.lora_B.default.{e}.weight"], ref):
                    raise ValueError(f"the model ties B across its '{group}' layers, but the state dict "
                                     f"has different lora_B.default.{e} in {paths[0]!r} and {other!r}")
    return plan, expected, shared


def _plan_official_rest(model: nn.Module, layers: dict, state: dict[str, Tensor], adapter_keys: set[str],
                        strict: bool):
    """Phase 2b: (plan, missing, extra) for the non-adapter entries; official names map to ours
    (``<path>.weight`` -> ``<path>.base.weight``)."""
    ours = model.state_dict(keep_vars=True)
    rename = {}
    for path in layers:
        rename[f"{path}.weight"], rename[f"{path}.bias"] = f"{path}.base.weight", f"{path}.base.bias"
    wanted = {k for k in ours if not any(k.startswith(p + ".") for p in layers)}
    wanted |= {v for v in rename.values() if v in ours}
    given = {rename.get(k, k): k for k in state if k not in adapter_keys and not ADAPTER_KEY.search(k)}
    extra = sorted(given[k] for k in set(given) - wanted)
    missing = sorted(wanted - set(given))
    if strict and (extra or missing):
        raise ValueError(f"non-adapter keys do not match the model (strict=True): unknown {extra[:8]}, "
                         f"missing {[k.replace('.base.', '.') for k in missing[:8]]}")
    plan = []
    for ours_key in sorted(wanted & set(given)):
        _check_value(given[ours_key], ours[ours_key], state[given[ours_key]], "state dict")
        plan.append((ours[ours_key].detach(), state[given[ours_key]]))
    return plan, missing, extra


def load_official_state_dict(model: nn.Module, state_dict: dict[str, Tensor],
                             strict: bool = True) -> OfficialLoadReport:
    """Load an official TalkLoRA state dict into a model injected with TalkLoRALinear layers.

    Three phases: parse (a mapping of str → Tensor), plan (every key, shape, dtype and value range
    checked; B tensors of tied layers equal), copy.  Adapter keys (the official forms, see the module
    doc) must match the model exactly: unknown, missing, wrongly shaped keys, a wrong number of
    experts, integer/bool tensors, NaN/Inf or values the model's dtype cannot hold, or B tensors that differ
    between layers whose B is tied raise ``TypeError`` / ``ValueError`` before anything is copied.
    ``strict`` extends the missing/unknown checks to the non-adapter entries (base weights,
    embeddings …).
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    layers = _official_layers(model)
    state = _parse_state_dict(state_dict)
    adapter_plan, adapter_keys, shared = _plan_official_adapters(layers, state)
    rest_plan, missing, extra = _plan_official_rest(model, layers, state, adapter_keys, strict)
    _copy_plan(adapter_plan + rest_plan)
    return OfficialLoadReport(list(layers), shared, missing, extra)
