"""Saving / loading adapters, and the official TalkLoRA checkpoint layout (SPEC §2).

Adapter folder (``save_adapter`` / ``load_adapter``), format ``talklora-min-adapter`` version 1::

    talklora_adapter.json                     the manifest, written last (the commit point):
        {"format": "talklora-min-adapter", "format_version": 1,
         "config": AdapterConfig.to_dict(),
         "weights": {"file": "talklora_weights.<sha256[:16]>.safetensors", "sha256": <hex>}}
    talklora_weights.<sha256[:16]>.safetensors
        "<module path>.<name>" for A, C, B, T, W_r, W_g (a TalkLoRA structure: its talk_* parameters
        instead of T); a B tied across layers
        (share_B_across_layers) is stored once, as "shared_B.<projection type>" (path with layer
        indices as *, e.g. layers.*.q_proj)

Atomicity: the weights go to a new, content-named file, then the manifest is replaced in one
``os.replace`` (``talklora_min._atomic``); only then are unreferenced weight files and temporaries
of killed saves removed.  A save killed at any point leaves the complete old or the complete new
adapter.  Integrity: a load recomputes the weights file's SHA-256 and refuses a mismatch; integer,
bool or complex tensors, and values the model's dtype cannot hold (finite → Inf), are refused with
a message naming the tensor, before anything is copied.  One writer per folder at a time.

The file names differ from PEFT's (``adapter_config.json`` / ``adapter_model.safetensors``), so
neither library mistakes the other's folder: ``load_adapter`` given a PEFT folder raises
:class:`AdapterFormatError` naming the converter ``talklora_min.hf.from_peft``; PEFT given ours says
it can't find ``adapter_config.json``.  Folders written by talklora-min before the format marker
(``adapter_config.json`` without ``peft_type`` + ``adapter_model.safetensors``) still load, read
only, without the integrity check (a ``UserWarning`` says so); the next ``save_adapter`` into such a
folder replaces them by the current format.

Tensors are read with ``safetensors.torch.load`` only (never pickle).

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

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from . import _atomic
from .inject import (AdapterConfig, InjectionReport, adapter_layers, inject, projection_type, saved_modules,
                     target_matches)
from .layers import LoRALinear, MoELoRALinear, TalkLoRALinear
from .structures import TALK_SETTINGS

FORMAT = "talklora-min-adapter"
FORMAT_VERSION = 1
MANIFEST_NAME = "talklora_adapter.json"
WEIGHTS_PREFIX, WEIGHTS_SUFFIX = "talklora_weights.", ".safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"        # talklora-min < format 1; also PEFT's config name
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
SHARED_B_PREFIX = "shared_B."
MODULES_TO_SAVE_PREFIX = "modules_to_save."
FROM_PEFT = "talklora_min.hf.from_peft"


class AdapterFormatError(ValueError):
    """The folder is not a talklora-min adapter of a supported format (e.g. a PEFT folder)."""


class AdapterIntegrityError(ValueError):
    """The weights file is corrupted, truncated, or does not match the hash its manifest records."""


# ----------------------------------------------------------------------------- argument checks
def _check_model(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_path(value, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise TypeError(f"{name} must be a non-empty str or os.PathLike path, got {value!r}")
    return Path(value)


def _check_value(key: str, target: Tensor, value, source) -> None:
    """One tensor ``value`` for the model entry ``target``: type, shape, dtype kind, and that the
    target dtype can hold its values (finite stays finite).  Raises ``TypeError`` / ``ValueError``
    naming ``key``; copies nothing."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{source}: {key!r} is a {type(value).__name__}; every value must be a torch.Tensor")
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{source}: shape mismatch for {key!r}: expected {tuple(target.shape)}, "
                         f"got {tuple(value.shape)}")
    if target.is_floating_point():
        if not value.is_floating_point():
            raise ValueError(f"{source}: {key!r} has dtype {value.dtype}; it must be a floating-point "
                             f"tensor (the model holds {target.dtype})")
        if value.dtype != target.dtype and value.numel():
            finite = torch.isfinite(value)
            if (finite & ~torch.isfinite(value.to(target.dtype))).any():
                biggest = value[finite].abs().max().item()
                raise ValueError(f"{source}: {key!r} holds values up to {biggest:.3g} that overflow the "
                                 f"model's {target.dtype}; load into a model of dtype {value.dtype}")
    elif value.dtype != target.dtype:
        raise ValueError(f"{source}: {key!r} has dtype {value.dtype}, the model holds {target.dtype}")


def _copy_plan(plan: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value)


# ----------------------------------------------------------------------------- adapter files
def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor by file key (live Parameters, not copies).  A ``B`` Parameter shared by
    several layers appears once, as ``shared_B.<projection_type(path)>`` (e.g. ``shared_B.layers.*.q_proj``)."""
    layers = adapter_layers(_check_model(model))
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:     # JSONDecodeError is a ValueError
        raise AdapterFormatError(f"invalid adapter config {path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise AdapterFormatError(f"invalid adapter config {path}: expected a JSON object, "
                                 f"got {type(data).__name__}")
    return data


def _is_peft_folder(directory: Path) -> bool:
    path = directory / LEGACY_CONFIG_NAME
    if not path.is_file():
        return False
    try:
        return "peft_type" in json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, TypeError):
        return False


def _peft_error(directory: Path) -> AdapterFormatError:
    return AdapterFormatError(
        f"{directory} is a PEFT adapter folder ({LEGACY_CONFIG_NAME} has 'peft_type'), not a talklora-min "
        f"adapter ({MANIFEST_NAME}). Load it with peft.PeftModel.from_pretrained(model, {str(directory)!r}) "
        f"and convert the result with {FROM_PEFT}(peft_model).")


def _config(data, path: Path) -> AdapterConfig:
    try:
        return AdapterConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise AdapterFormatError(f"invalid adapter config {path}: {err}") from err


def _parse_weights(data: bytes, path: Path) -> dict[str, Tensor]:
    try:
        return load(data)
    except Exception as err:    # SafetensorError, ...: truncated or not a safetensors file
        raise AdapterIntegrityError(f"cannot read adapter weights {path}: corrupted or truncated "
                                    f"safetensors file ({type(err).__name__}: {err})") from err


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights file not found: {path}")
    return path.read_bytes()


def _read_manifest(directory: Path) -> tuple[AdapterConfig, Path, str]:
    """(config, weights path, recorded sha256) of a format-1 folder."""
    path = directory / MANIFEST_NAME
    manifest = _read_json(path)
    if manifest.get("format") != FORMAT:
        raise AdapterFormatError(f"{path}: 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFormatError(f"{path}: format_version {version!r} is not supported by this talklora-min "
                                 f"(reads version {FORMAT_VERSION}); upgrade talklora-min")
    weights = manifest.get("weights")
    if not (isinstance(weights, dict) and isinstance(weights.get("file"), str)
            and isinstance(weights.get("sha256"), str) and Path(weights["file"]).name == weights["file"]
            and weights["file"].startswith(WEIGHTS_PREFIX)):
        raise AdapterFormatError(f"{path}: 'weights' must be {{'file': '{WEIGHTS_PREFIX}<hash>{WEIGHTS_SUFFIX}', "
                                 f"'sha256': <hex>}}, got {weights!r}")
    return _config(manifest.get("config"), path), directory / weights["file"], weights["sha256"]


def _verified_weights(path: Path, sha256: str) -> dict[str, Tensor]:
    data = _read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise AdapterIntegrityError(f"adapter weights {path} do not match the SHA-256 recorded in "
                                    f"{MANIFEST_NAME} (recorded {sha256[:16]}…, file {digest[:16]}…): the file "
                                    f"was changed or corrupted after saving")
    return _parse_weights(data, path)


def read_adapter(directory) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """The config and the (verified) tensors of an adapter folder, without touching any model.

    Raises ``FileNotFoundError`` (no adapter there), :class:`AdapterFormatError` (a PEFT folder, an
    unknown format or version, an invalid config) or :class:`AdapterIntegrityError` (hash mismatch,
    unreadable weights)."""
    directory = _check_path(directory, "directory")
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {directory}")
    if (directory / MANIFEST_NAME).is_file():
        config, weights, sha256 = _read_manifest(directory)
        return config, _verified_weights(weights, sha256)
    if _is_peft_folder(directory):
        raise _peft_error(directory)
    legacy = directory / LEGACY_CONFIG_NAME
    if legacy.is_file():
        config = _config(_read_json(legacy), legacy)
        weights = directory / LEGACY_WEIGHTS_NAME
        tensors = _parse_weights(_read_bytes(weights), weights)
        warnings.warn(f"{directory} is a talklora-min adapter folder of the old format ({LEGACY_CONFIG_NAME} + "
                      f"{LEGACY_WEIGHTS_NAME}, no content hash): loaded without an integrity check; "
                      f"save_adapter() again to convert it", UserWarning, stacklevel=3)
        return config, tensors
    raise FileNotFoundError(f"adapter config file not found: {directory / MANIFEST_NAME} "
                            f"(no talklora-min adapter in {directory})")


def _clean_folder(directory: Path, keep: str) -> None:
    """Remove weight files other than ``keep`` and the temporaries of killed saves."""
    for p in directory.glob(f"{WEIGHTS_PREFIX}*{WEIGHTS_SUFFIX}"):
        if p.name != keep:
            p.unlink(missing_ok=True)
    for pattern in (f".{WEIGHTS_PREFIX}*{_atomic.TMP_SUFFIX}", f".{MANIFEST_NAME}.*{_atomic.TMP_SUFFIX}"):
        for p in directory.glob(pattern):
            p.unlink(missing_ok=True)
    legacy = directory / LEGACY_CONFIG_NAME
    if legacy.is_file() and not _is_peft_folder(directory):
        legacy.unlink()
        (directory / LEGACY_WEIGHTS_NAME).unlink(missing_ok=True)


_KIND_OF = {LoRALinear: "lora", MoELoRALinear: "moelora", TalkLoRALinear: "talklora"}


def _check_config_describes(model: nn.Module, config: AdapterConfig) -> None:
    """Refuse to save a ``config`` that would not rebuild ``model``'s adapters on load: every adapter
    layer must be of ``config.kind`` with its rank / experts / router / top-k, its path must match a
    target pattern, and B must be tied exactly when ``share_B_across_layers`` is set."""
    problems = []
    for path, layer in adapter_layers(model).items():
        have = {"kind": _KIND_OF.get(type(layer), type(layer).__name__), "rank": layer.rank}
        want = {"kind": config.kind, "rank": config.rank}
        if config.kind != "lora" and have["kind"] != "lora":
            have.update(num_experts=layer.num_experts, router_input=layer.router_input, top_k=layer.top_k)
            want.update(num_experts=config.num_experts, router_input=config.router_input, top_k=config.top_k)
        if config.kind == have["kind"] == "talklora":
            have.update({k: getattr(layer, k) for k in TALK_SETTINGS})
            want.update({k: getattr(config, k) for k in TALK_SETTINGS})
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if config.target_modules is not None and not any(
                target_matches(path, p, config.target_match) for p in config.target_modules):
            diff["target_modules"] = (path, list(config.target_modules))
        if getattr(layer, "B_is_tied", False) and not config.share_B_across_layers:
            diff["share_B_across_layers"] = (True, False)
        if diff:
            problems.append(f"{path}: " + ", ".join(f"{k} is {h!r} in the model but {w!r} in the config"
                                                     for k, (h, w) in diff.items()))
    if config.share_B_across_layers:
        groups: dict[str, set[int]] = {}
        for path, layer in adapter_layers(model).items():
            groups.setdefault(projection_type(path), set()).add(id(layer.B))
        untied = [g for g, ids in groups.items() if len(ids) > 1]
        if untied:
            problems.append(f"share_B_across_layers is set in the config but B is not tied within {untied}")
    if problems:
        raise ValueError("config does not describe the model's adapters, so the folder would not load "
                         "back into the same model: " + "; ".join(problems[:5])
                         + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


def save_adapter(model: nn.Module, directory, config: AdapterConfig) -> None:
    """Write the adapter folder (see the module doc) atomically: a reader, or a process killed
    mid-save, sees the complete old or the complete new adapter.  Files get the user's umask."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    directory = _check_path(directory, "directory")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model).items()}
    if not tensors:
        raise ValueError(f"model ({type(model).__name__}) has no adapter layers to save: inject() first")
    _check_config_describes(model, config)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"directory {directory} exists and is not a folder")
    if _is_peft_folder(directory):
        raise AdapterFormatError(f"{directory} holds a PEFT adapter ({LEGACY_CONFIG_NAME} with 'peft_type'); "
                                 f"save the talklora-min adapter into another folder")
    data = save(tensors, metadata={"format": "pt", "talklora_format": FORMAT})
    sha256 = hashlib.sha256(data).hexdigest()
    weights = f"{WEIGHTS_PREFIX}{sha256[:16]}{WEIGHTS_SUFFIX}"
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(),
                "weights": {"file": weights, "sha256": sha256}}
    directory.mkdir(parents=True, exist_ok=True)
    _atomic.write_bytes(directory / weights, data)
    _atomic.write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _clean_folder(directory, keep=weights)


def _plan_adapter(model_tensors: dict[str, Tensor], tensors: dict[str, Tensor], source) -> list:
    """Keys, shapes, dtypes and value ranges of everything, before any copy."""
    unknown = sorted(set(tensors) - set(model_tensors))
    missing = sorted(set(model_tensors) - set(tensors))
    if unknown:
        raise ValueError(f"{source}: unknown adapter key(s) {unknown[:8]} not in the model "
                         f"(expected keys like {sorted(model_tensors)[:4]})")
    if missing:
        raise ValueError(f"{source}: missing adapter key(s) {missing[:8]}")
    for key, value in tensors.items():
        _check_value(key, model_tensors[key], value, source)
    return [(model_tensors[key].detach(), value) for key, value in tensors.items()]


def load_adapter_weights(model: nn.Module, directory_or_file) -> list[str]:
    """Load an adapter folder's weights (or a weights ``.safetensors`` file given directly, which is
    then not hash-checked) into an already-injected model; returns the loaded keys.  Nothing is
    copied unless every tensor checks."""
    model_tensors = adapter_tensors(model)
    path = _check_path(directory_or_file, "directory_or_file")
    if path.is_dir():
        _, tensors = read_adapter(path)
    else:
        tensors = _parse_weights(_read_bytes(path), path)
    _copy_plan(_plan_adapter(model_tensors, tensors, path))
    return sorted(tensors)


def load_adapter(model: nn.Module, directory) -> InjectionReport:
    """Read and verify the folder, ``inject`` its config into the fresh ``model``, load the tensors.

    On any error the model is left as it was (adapter layers replaced by their base linears,
    ``requires_grad`` flags as before).
    """
    if adapter_layers(_check_model(model)):
        raise ValueError("model already has adapter layers: load_adapter needs a fresh model "
                         "(use load_adapter_weights for an injected one)")
    directory = _check_path(directory, "directory")
    config, tensors = read_adapter(directory)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        try:
            report = inject(model, config)
        except ValueError as err:
            raise ValueError(f"cannot load the adapter {directory} into model ({type(model).__name__}): "
                             f"{err}") from err
        _copy_plan(_plan_adapter(adapter_tensors(model), tensors, directory))
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
    unknown = sorted(k for k in state if k not in expected
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
    given = {rename.get(k, k): k for k in state if k not in adapter_keys
             and not any(part.startswith("lora_") for part in k.split("."))}
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
    checked; B tensors of tied layers equal), copy.  Adapter keys (any key with a ``lora_*``
    component) must match the model exactly: unknown, missing, wrongly shaped keys, a wrong number
    of experts, integer/bool tensors, values the model's dtype cannot hold, or B tensors that differ
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
