"""Saving / loading adapter folders (docs/method.md §8); the official TalkLoRA layout is in
:mod:`talklora_min.official` (re-exported here).

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
adapter.  Concurrency: a save holds an exclusive lock on the folder and a read a shared one
(``_atomic.folder_lock``, released by the kernel if the process dies), so saves to one folder run
one after the other and a reader sees the complete old or new adapter.  Clean-up only removes what
this library provably wrote: weight files whose safetensors header carries its format marker and
temporaries named as it names them; any other file (a foreign ``adapter_config.json`` included) is
left alone.  Integrity: a load recomputes the weights file's SHA-256 and refuses a mismatch; integer,
bool or complex tensors, NaN/Inf, and values the model's dtype cannot hold (finite → Inf) are refused
with a message naming the tensor, and the config's sizes are checked against the stored tensors,
before anything is allocated or copied; a failed ``load_adapter`` leaves the model as it was.

The file names differ from PEFT's (``adapter_config.json`` / ``adapter_model.safetensors``), so
neither library mistakes the other's folder: ``load_adapter`` given a PEFT folder raises
:class:`AdapterFormatError` naming the converter ``talklora_min.hf.from_peft``; PEFT given ours says
it can't find ``adapter_config.json``.  Folders written by talklora-min before the format marker
(``adapter_config.json`` without ``peft_type`` + ``adapter_model.safetensors``) still load, read
only, without the integrity check (a ``UserWarning`` says so); a ``save_adapter`` into such a folder
writes the current format next to them (the manifest is read first) and leaves the old pair in place,
since nothing marks it as ours.

Tensors are read with ``safetensors.torch.load`` only (never pickle).

"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from . import _atomic
from .inject import (AdapterConfig, InjectionReport, _add_aux_loss, _match_modules_to_save, adapter_layers,
                     inject, projection_type, rollback, saved_modules)
from .layers import LoRALinear, MoELoRALinear, TalkLoRALinear, is_conv1d
from .lifecycle import adapter_config
from .targets import adaptable_modules, resolve_targets
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
# the temporaries _atomic writes for a weights file or the manifest (".<name>.<12 hex>.tmp")
OUR_TEMPORARY = re.compile(rf"\.({re.escape(WEIGHTS_PREFIX)}[0-9a-f]{{16}}{re.escape(WEIGHTS_SUFFIX)}"
                           rf"|{re.escape(MANIFEST_NAME)})\.[0-9a-f]{{12}}{re.escape(_atomic.TMP_SUFFIX)}")


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
    """One tensor ``value`` for the model entry ``target``: type, shape, dtype kind, finite values (as
    ``set_weights`` demands), and that the target dtype can hold them (finite stays finite).  Raises
    ``TypeError`` / ``ValueError`` naming ``key``; copies nothing."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{source}: {key!r} is a {type(value).__name__}; every value must be a torch.Tensor")
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{source}: shape mismatch for {key!r}: expected {tuple(target.shape)}, "
                         f"got {tuple(value.shape)}")
    if target.is_floating_point():
        if not value.is_floating_point():
            raise ValueError(f"{source}: {key!r} has dtype {value.dtype}; it must be a floating-point "
                             f"tensor (the model holds {target.dtype})")
        if not value.numel():
            return
        # float8 has no isfinite: check it in float32, which holds every float8 value exactly
        checked = value if value.dtype.itemsize >= 2 else value.float()
        finite = torch.isfinite(checked)
        if not finite.all():
            raise ValueError(f"{source}: {key!r} contains {int((~finite).sum())} NaN/Inf value(s); "
                             f"weights must be finite")
        if value.dtype != target.dtype and not torch.isfinite(checked.to(target.dtype)).all():
            biggest = checked.abs().max().item()
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
    except (ValueError, UnicodeDecodeError, RecursionError) as err:   # JSONDecodeError is a ValueError
        raise AdapterFormatError(f"invalid adapter config {path}: not valid JSON ({type(err).__name__}: "
                                 f"{str(err)[:200]})") from err
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
    except (ValueError, UnicodeDecodeError, TypeError, RecursionError):
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
    with _atomic.folder_lock(directory, shared=True):
        return _read_folder(directory)


def _read_folder(directory: Path) -> tuple[AdapterConfig, dict[str, Tensor]]:
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
                      f"save_adapter() again to convert it", UserWarning, stacklevel=4)
        return config, tensors
    raise FileNotFoundError(f"adapter config file not found: {directory / MANIFEST_NAME} "
                            f"(no talklora-min adapter in {directory})")


def _written_by_us(path: Path) -> bool:
    """Whether the safetensors header of ``path`` carries this library's format marker."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100_000_000:
                return False
            header = json.loads(f.read(size))
        return header.get("__metadata__", {}).get("talklora_format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def _clean_folder(directory: Path, keep: str) -> None:
    """Remove this library's weight files other than ``keep`` (marker in the header) and the
    temporaries of killed saves (named as ``_atomic`` names them); nothing else."""
    for p in directory.glob(f"{WEIGHTS_PREFIX}*{WEIGHTS_SUFFIX}"):
        if p.name != keep and p.is_file() and not p.is_symlink() and _written_by_us(p):
            p.unlink(missing_ok=True)
    for p in directory.glob(".*" + _atomic.TMP_SUFFIX):
        if OUR_TEMPORARY.fullmatch(p.name) and not p.is_dir():
            p.unlink(missing_ok=True)


_KIND_OF = {LoRALinear: "lora", MoELoRALinear: "moelora", TalkLoRALinear: "talklora"}
MOE_SETTINGS = ("num_experts", "router_input", "top_k", "gate_dropout", "balance_loss")


def _layer_settings(layer) -> dict:
    out = {"kind": _KIND_OF.get(type(layer), type(layer).__name__), "rank": layer.rank,
           "scaling": layer.scaling, "dropout": layer.dropout}
    if isinstance(layer, MoELoRALinear):
        out.update({k: getattr(layer, k) for k in MOE_SETTINGS})
    if isinstance(layer, TalkLoRALinear):
        out.update({k: getattr(layer, k) for k in TALK_SETTINGS})
    return out


def _config_settings(config: AdapterConfig, path: str) -> dict:
    out = {"kind": config.kind, "rank": config.layer_rank(path), "scaling": config.layer_scaling(path),
           "dropout": config.dropout}
    if config.kind != "lora":
        out.update({k: getattr(config, k) for k in MOE_SETTINGS})
    if config.kind == "talklora":
        out.update({k: getattr(config, k) for k in TALK_SETTINGS})
    return out


def _same(key: str, have, want) -> bool:
    if key == "scaling":                       # alpha / r computed from the same numbers: equal up to rounding
        return math.isclose(have, want, rel_tol=1e-9, abs_tol=0.0)
    return have == want


def _check_config_describes(model: nn.Module, config: AdapterConfig) -> None:
    """Refuse a ``config`` that would not rebuild ``model``'s adapters on load: the config must adapt
    exactly the adapted modules, each with its kind, rank, scaling (alpha / r, rsLoRA, rank and alpha
    patterns), dropout and routing settings; B tied exactly when ``share_B_across_layers``; the same
    ``modules_to_save`` and ``aux_loss_weight``."""
    layers = adapter_layers(model)
    problems = []
    try:
        planned = {n for names in resolve_targets(model, config).values() for n in names}
    except ValueError as err:
        problems.append(f"target_modules: {err}")
        planned = set(layers)
    targets = f"target_modules {config.target_modules!r} ({config.target_match} match)"
    if planned - set(layers):
        problems.append(f"{targets} would also adapt {sorted(planned - set(layers))[:4]}, which the model leaves plain")
    if set(layers) - planned:
        problems.append(f"{targets} do not match the adapted layer(s) {sorted(set(layers) - planned)[:4]}")
    for path, layer in layers.items():
        have, want = _layer_settings(layer), _config_settings(config, path)
        diff = {k: (have[k], want[k]) for k in want if k in have and not _same(k, have[k], want[k])}
        if getattr(layer, "B_is_tied", False) and not config.share_B_across_layers:
            diff["share_B_across_layers"] = (True, False)
        if diff:
            problems.append(f"{path}: " + ", ".join(f"{k} is {h!r} in the model but {w!r} in the config"
                                                     for k, (h, w) in diff.items()))
    if config.share_B_across_layers:
        groups: dict[str, set[int]] = {}
        for path, layer in layers.items():
            groups.setdefault(projection_type(path), set()).add(id(layer.B))
        untied = [g for g, ids in groups.items() if len(ids) > 1]
        if untied:
            problems.append(f"share_B_across_layers is set in the config but B is not tied within {untied}")
    saved = sorted(saved_modules(model))
    try:
        wanted = sorted(_match_modules_to_save(model, config, set(layers)))
    except ValueError as err:
        wanted = [f"error: {err}"]
    if saved != wanted:
        problems.append(f"modules_to_save is {saved} in the model but {wanted} by the config")
    hooked = [h.args[0] for h in model._forward_hooks.values()
              if isinstance(h, functools.partial) and h.func is _add_aux_loss]
    if (hooked[0] if hooked else 0.0) != config.aux_loss_weight:
        problems.append(f"aux_loss_weight is {hooked[0] if hooked else 0.0} in the model but "
                        f"{config.aux_loss_weight} in the config")
    if problems:
        raise ValueError("config does not describe the model's adapters, so the folder would not load "
                         "back into the same model: " + "; ".join(problems[:5])
                         + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


def save_adapter(model: nn.Module, directory, config: AdapterConfig | None = None) -> None:
    """Write the adapter folder (see the module doc) atomically: a reader, or a process killed
    mid-save, sees the complete old or the complete new adapter.  Files get the user's umask.

    ``config=None`` uses the config the model was injected with (:func:`~talklora_min.adapter_config`);
    a config given or stored that does not describe the model's adapters is refused."""
    _save(model, directory, config)


def _save(model: nn.Module, directory, config: AdapterConfig | None, extra_files=None) -> None:
    """:func:`save_adapter`, plus the files ``extra_files(weights file name) -> {name: bytes}`` returns,
    written atomically under the same folder lock after the manifest and before the clean-up
    (``talklora_min.hf.save_pretrained``: the Trainer's resume index and config.json)."""
    _check_model(model)
    if config is None:
        config = adapter_config(model)
    elif not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig or None (the model's own), got {type(config).__name__}")
    directory = _check_path(directory, "directory")
    if not adapter_layers(model):
        raise ValueError(f"model ({type(model).__name__}) has no adapter layers to save: inject() first")
    _check_config_describes(model, config)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"directory {directory} exists and is not a folder")
    if _is_peft_folder(directory):
        raise AdapterFormatError(f"{directory} holds a PEFT adapter ({LEGACY_CONFIG_NAME} with 'peft_type'); "
                                 f"save the talklora-min adapter into another folder")
    directory.mkdir(parents=True, exist_ok=True)
    with _atomic.folder_lock(directory):
        _write_adapter(model, directory, config, extra_files)


def _write_adapter(model: nn.Module, directory: Path, config: AdapterConfig, extra_files=None) -> None:
    """The writing part of :func:`save_adapter` (checks done, folder locked by the caller)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model).items()}
    data = save(tensors, metadata={"format": "pt", "talklora_format": FORMAT})
    sha256 = hashlib.sha256(data).hexdigest()
    weights = f"{WEIGHTS_PREFIX}{sha256[:16]}{WEIGHTS_SUFFIX}"
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(),
                "weights": {"file": weights, "sha256": sha256}}
    _atomic.write_bytes(directory / weights, data)
    _atomic.write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for name, content in (extra_files(weights) if extra_files else {}).items():
        _atomic.write_bytes(directory / name, content)
    _clean_folder(directory, keep=weights)


def _plan_adapter(model_tensors: dict, tensors: dict[str, Tensor], source) -> list:
    """Keys and shapes (``model_tensors``: key -> tensor or shape), and for tensors also dtypes and
    values, of everything, before any copy."""
    unknown = sorted(set(tensors) - set(model_tensors))
    missing = sorted(set(model_tensors) - set(tensors))
    if unknown:
        raise ValueError(f"{source}: unknown adapter key(s) {unknown[:8]} not in the model "
                         f"(expected keys like {sorted(model_tensors)[:4]})")
    if missing:
        raise ValueError(f"{source}: missing adapter key(s) {missing[:8]}")
    for key, value in tensors.items():
        target = model_tensors[key]
        if isinstance(target, Tensor):
            _check_value(key, target, value, source)
        elif tuple(value.shape) != target:
            raise ValueError(f"{source}: shape mismatch for {key!r}: expected {target}, "
                             f"got {tuple(value.shape)}")
    return [(model_tensors[key].detach(), value) for key, value in tensors.items()
            if isinstance(model_tensors[key], Tensor)]


def planned_shapes(model: nn.Module, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The file keys and shapes of the adapter ``inject(model, config)`` would create, found by
    building its layers on the meta device (nothing allocated, the model unchanged)."""
    candidates = adaptable_modules(model)
    matched = {n for names in resolve_targets(model, config).values() for n in names}
    layers = {}
    for name, base in candidates.items():
        if name in matched:
            d_out, d_in = base.weight.shape[::-1] if is_conv1d(base) else base.weight.shape
            layers[name] = config.make_layer(nn.Linear(d_in, d_out, bias=False, device="meta"), name)
    out = {f"{n}.{w}": tuple(getattr(layer, w).shape) for n, layer in layers.items() for w in layer.weight_names}
    if config.share_B_across_layers:
        groups: dict[str, list[str]] = {}
        for name in layers:
            groups.setdefault(projection_type(name), []).append(name)
        for names in (g for g in groups.values() if len(g) > 1):
            out[SHARED_B_PREFIX + projection_type(names[0])] = out[f"{names[0]}.B"]
            for name in names:
                del out[f"{name}.B"]
    for path in _match_modules_to_save(model, config, matched):
        for name, param in model.get_submodule(path).named_parameters():
            out[f"{MODULES_TO_SAVE_PREFIX}{path}.{name}"] = tuple(param.shape)
    return out


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
    """Read and verify the folder, check the config's sizes against the stored tensors, ``inject``
    the config into the fresh ``model`` and load the tensors.

    All or nothing: on any error the model is exactly as before (base modules back, no hooks, no
    ``modules_to_save`` marks, no config, ``requires_grad`` flags as they were)."""
    if adapter_layers(_check_model(model)):
        raise ValueError("model already has adapter layers: load_adapter needs a fresh model "
                         "(use load_adapter_weights for an injected one)")
    directory = _check_path(directory, "directory")
    config, tensors = read_adapter(directory)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    def refused(err):
        return ValueError(f"cannot load the adapter {directory} into model ({type(model).__name__}): {err}")
    try:
        shapes = planned_shapes(model, config)
    except ValueError as err:
        raise refused(err) from err
    _plan_adapter(shapes, tensors, directory)                 # sizes checked before any allocation
    try:
        try:
            report = inject(model, config)
        except ValueError as err:
            raise refused(err) from err
        _copy_plan(_plan_adapter(adapter_tensors(model), tensors, directory))
    except BaseException:
        rollback(model, requires_grad)
        raise
    return report


from .official import (OfficialLoadReport, export_official_state_dict,  # noqa: E402,F401  (re-exported)
                        load_official_state_dict)
