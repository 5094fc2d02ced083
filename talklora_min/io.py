"""Saving / loading adapters, and the official TalkLoRA checkpoint layout (SPEC §2).

Adapter directory (``save_adapter`` / ``load_adapter``)::

    adapter_config.json          AdapterConfig.to_json()
    adapter_model.safetensors    "<module path>.<SPEC name>" for A, C, B, T, W_r, W_g;
                                 a B tied across layers (share_B_across_layers) is stored once,
                                 as "shared_B.<projection type>" (path with layer indices as *, e.g. layers.*.q_proj)

Tensors are read with ``safetensors.torch.load_file`` only (never pickle); writes are atomic.

Official layout (``export_official_state_dict`` / ``load_official_state_dict``), per TalkLoRA layer
``<path>`` (our base linear lives at ``<path>.base``)::

    <path>.weight / <path>.bias                 <- <path>.base.weight / <path>.base.bias
    <path>.lora_A.default.weight                <- A        (r, d_in)
    <path>.lora_A_experts.default.{e}.weight    <- C[e]     (m, m)
    <path>.lora_A_talk.default.weight           <- T        (E, E)
    <path>.lora_A_route.default.weight          <- W_r      (E, r)
    <path>.lora_B.default.{e}.weight            <- B[e]     (d_out, m), same in every tied layer

All other entries of the model's ``state_dict`` keep their names.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .inject import AdapterConfig, InjectionReport, adapter_layers, inject, projection_type, saved_modules
from .layers import TalkLoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SHARED_B_PREFIX = "shared_B."
MODULES_TO_SAVE_PREFIX = "modules_to_save."


# ----------------------------------------------------------------------------- adapter files
def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then ``os.replace`` it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor by file key (live Parameters, not copies).  A ``B`` Parameter shared by
    several layers appears once, as ``shared_B.<projection_type(path)>`` (e.g. ``shared_B.layers.*.q_proj``)."""
    layers = adapter_layers(model)
    users: dict[int, list[str]] = {}
    for path, layer in layers.items():
        users.setdefault(id(layer.B), []).append(path)
    out: dict[str, Tensor] = {}
    for path, layer in layers.items():
        for name in layer.weight_names:
            key = f"{path}.{name}"
            if name == "B" and len(users[id(layer.B)]) > 1:
                first = users[id(layer.B)][0]
                if first != path:
                    continue
                key = SHARED_B_PREFIX + projection_type(first)
            if key in out:
                raise ValueError(f"two adapter tensors map to the same file key {key!r}")
            out[key] = getattr(layer, name)
    for path, module in saved_modules(model).items():     # AdapterConfig.modules_to_save: full params
        for name, param in module.named_parameters():
            out[f"{MODULES_TO_SAVE_PREFIX}{path}.{name}"] = param
    return out


def save_adapter(model: nn.Module, directory, config: AdapterConfig) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model).items()}
    if not tensors:
        raise ValueError(f"{type(model).__name__} has no adapter layers to save: inject() first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, config.to_json().encode())


def _weights_path(directory_or_file) -> Path:
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights file not found: {path}")
    return path


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except Exception as err:    # SafetensorError, OSError, ...: truncated or not a safetensors file
        raise ValueError(f"cannot read adapter weights {path}: corrupted or truncated safetensors "
                         f"file ({type(err).__name__}: {err})") from err


def _check_and_copy(model_tensors: dict[str, Tensor], tensors: dict[str, Tensor], source) -> None:
    """Key and shape checks for everything first, then copy (so a failed load changes nothing)."""
    unknown = sorted(set(tensors) - set(model_tensors))
    missing = sorted(set(model_tensors) - set(tensors))
    if unknown:
        raise ValueError(f"{source}: unknown adapter key(s) {unknown[:8]} not in the model "
                         f"(expected keys like {sorted(model_tensors)[:4]})")
    if missing:
        raise ValueError(f"{source}: missing adapter key(s) {missing[:8]}")
    for key, value in tensors.items():
        expected = tuple(model_tensors[key].shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"{source}: shape mismatch for {key!r}: expected {expected}, "
                             f"got {tuple(value.shape)}")
    with torch.no_grad():
        for key, value in tensors.items():
            model_tensors[key].copy_(value)


def load_adapter_weights(model: nn.Module, directory_or_file) -> list[str]:
    """Load ``adapter_model.safetensors`` into an already-injected model; returns the loaded keys."""
    path = _weights_path(directory_or_file)
    tensors = _read_safetensors(path)
    _check_and_copy(adapter_tensors(model), tensors, path)
    return sorted(tensors)


def load_adapter(model: nn.Module, directory) -> InjectionReport:
    """Read the config, ``inject`` it into the fresh ``model``, and load the saved tensors.

    On any error after injection the model is restored (adapter layers replaced by their base
    linears, ``requires_grad`` flags as before).
    """
    if adapter_layers(model):
        raise ValueError("model already has adapter layers: load_adapter needs a fresh model "
                         "(use load_adapter_weights for an injected one)")
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"adapter config file not found: {config_path}")
    weights_path = _weights_path(directory)
    try:
        config = AdapterConfig.from_json(config_path.read_text())
    except (ValueError, TypeError) as err:     # JSONDecodeError is a ValueError
        raise ValueError(f"invalid adapter config {config_path}: {err}") from err
    tensors = _read_safetensors(weights_path)

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        report = inject(model, config)
        _check_and_copy(adapter_tensors(model), tensors, weights_path)
    except BaseException:
        for path, layer in adapter_layers(model).items():
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base)
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        raise
    return report


# ----------------------------------------------------------------------------- official layout
def _official_layers(model: nn.Module) -> dict[str, TalkLoRALinear]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers: inject an "
                         f"AdapterConfig(kind='talklora') first")
    for path, layer in layers.items():
        if not isinstance(layer, TalkLoRALinear):
            raise ValueError(f"layer {path!r} is a {type(layer).__name__}; the official layout "
                             f"needs TalkLoRALinear layers (AdapterConfig kind='talklora')")
        if layer.scaling != 1.0 or layer.top_k is not None:
            raise ValueError(f"layer {path!r} has scaling {layer.scaling:g}, top_k {layer.top_k}; the "
                             f"official forward needs alpha=None (s = 1) and dense routing (top_k=None)")
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


def load_official_state_dict(model: nn.Module, state_dict: dict[str, Tensor],
                             strict: bool = True) -> OfficialLoadReport:
    """Load an official TalkLoRA state dict into a model injected with TalkLoRALinear layers.

    Adapter keys (any key with a ``lora_*`` component) must match the model exactly: unknown,
    missing, wrongly shaped keys, a wrong number of experts, or B tensors that differ between layers
    whose B is tied raise ``ValueError`` before anything is copied.  ``strict`` extends the
    missing/unknown checks to the non-adapter entries (base weights, embeddings …).
    """
    layers = _official_layers(model)
    ours = model.state_dict(keep_vars=True)
    plan: list[tuple[Tensor, Tensor]] = []           # (destination, source)
    expected_adapter: set[str] = set()
    for path, layer in layers.items():
        n_experts = len({k for k in state_dict if k.startswith(f"{path}.lora_A_experts.default.")})
        if n_experts and n_experts != layer.num_experts:
            raise ValueError(f"layer {path!r}: state dict has {n_experts} experts, the model layer "
                             f"has num_experts={layer.num_experts}")
        for key, (name, e) in _official_keys(path, layer).items():
            expected_adapter.add(key)
            if key not in state_dict:
                raise ValueError(f"missing adapter key {key!r} for layer {path!r}")
            target = getattr(layer, name).detach()           # shares storage with the Parameter
            target = target if e is None else target[e]
            if tuple(state_dict[key].shape) != tuple(target.shape):
                raise ValueError(f"shape mismatch for {key!r}: expected {tuple(target.shape)} "
                                 f"(rank {layer.rank}, num_experts {layer.num_experts}), "
                                 f"got {tuple(state_dict[key].shape)}")
            plan.append((target, state_dict[key]))
    unknown = sorted(k for k in state_dict if k not in expected_adapter
                     and any(part.startswith("lora_") for part in k.split(".")))
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
            ref = state_dict[f"{paths[0]}.lora_B.default.{e}.weight"]
            for other in paths[1:]:
                if not torch.equal(state_dict[f"{other}.lora_B.default.{e}.weight"], ref):
                    raise ValueError(f"the model ties B across its '{group}' layers, but the state dict "
                                     f"has different lora_B.default.{e} in {paths[0]!r} and {other!r}")

    # Non-adapter entries: official names map to ours (<path>.weight -> <path>.base.weight).
    rename = {}
    for path in layers:
        rename[f"{path}.weight"], rename[f"{path}.bias"] = f"{path}.base.weight", f"{path}.base.bias"
    wanted = {k for k in ours if not any(k.startswith(p + ".") for p in layers)}
    wanted |= {v for v in rename.values() if v in ours}
    given = {rename.get(k, k): k for k in state_dict if k not in expected_adapter and k not in unknown}
    extra = sorted(given[k] for k in set(given) - wanted)
    missing = sorted(wanted - set(given))
    if strict and (extra or missing):
        raise ValueError(f"non-adapter keys do not match the model (strict=True): unknown {extra[:8]}, "
                         f"missing {[k.replace('.base.', '.') for k in missing[:8]]}")
    for ours_key in sorted(wanted & set(given)):
        src = state_dict[given[ours_key]]
        if tuple(src.shape) != tuple(ours[ours_key].shape):
            raise ValueError(f"shape mismatch for {given[ours_key]!r}: expected "
                             f"{tuple(ours[ours_key].shape)}, got {tuple(src.shape)}")
        plan.append((ours[ours_key].detach(), src))

    with torch.no_grad():
        for target, src in plan:
            target.copy_(src)
    return OfficialLoadReport(list(layers), shared, missing, extra)
