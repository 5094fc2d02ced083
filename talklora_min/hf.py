"""Hugging Face integration: checkpoints that hold the adapter, one-call loading, PEFT conversion and
a Trainer callback (docs/method.md §8).

This module needs ``transformers`` (imported here) and, for the PEFT converters, ``peft`` (imported
inside them).  The core package (``import talklora_min``) imports neither.

* :func:`save_pretrained` — what ``model.save_pretrained(dir)`` of an injected transformers model
  writes (``inject`` installs it on the instance), so ``Trainer`` checkpoints hold the adapter and
  ``modules_to_save``, not the frozen base: the adapter folder (``talklora_adapter.json`` + weights,
  see :mod:`talklora_min.io`); ``model.safetensors.index.json``, which tells ``Trainer(resume_from_
  checkpoint=...)`` where each trainable state-dict entry is: in the adapter's weights file (whose
  keys are the state-dict names for every untied adapter tensor, so nothing is stored twice) or in
  ``talklora_resume.safetensors`` (a tied B and ``modules_to_save``, under their state-dict names);
  and a ``config.json`` whose ``model_type`` names :func:`from_pretrained`, so
  ``AutoModel*.from_pretrained(dir)`` refuses the folder with that pointer instead of
  re-initialising the base weights that are not in it.
* :func:`from_pretrained` — base model (a module or a local folder) + adapter folder → adapted model.
* :func:`load_pretrained` — reload such a folder (or a full ``save_pretrained`` folder of an older
  version) into a model already injected with the same config.
* :func:`from_peft` / :func:`to_peft` — PEFT LoRA ↔ :class:`~talklora_min.LoRALinear`, identical outputs
  (:mod:`talklora_min.peft_convert`).
* :class:`RoutingStatsCallback` — per-layer and mean Gini, load entropy, dead experts, top-1 churn and
  the balance loss of every routed layer in the ``Trainer``'s logs (so TensorBoard / W&B show them).
"""
from __future__ import annotations

import json
import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save
from torch import Tensor, nn
from transformers import TrainerCallback

from . import io
from .inject import CONFIG_ATTR, adapter_layers, auxiliary_loss, saved_modules
from .peft_convert import from_peft, to_peft  # noqa: F401  (re-exported)
from .probes.load import dead_experts, gini, load_entropy
from .probes.records import RoutingRecorder, install_hooks, record_routing, routed_layers

RESUME_INDEX = "model.safetensors.index.json"   # transformers' SAFE_WEIGHTS_INDEX_NAME: what Trainer resumes from
RESUME_EXTRA = "talklora_resume.safetensors"     # the trainable entries whose adapter-file key is not their name
ADAPTER_MODEL_TYPE = ("talklora-min-adapter: this folder holds an adapter, not a model; load it with "
                      "talklora_min.hf.from_pretrained(base_model, this_folder)")


# ----------------------------------------------------------------------------- checkpoints
def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The state-dict entries a checkpoint of an injected model needs (CPU copies): the adapter
    parameters (a tied B once) and the full state of every ``modules_to_save`` module."""
    state = model.state_dict()
    keys = [f"{path}.{name}" for path, layer in adapter_layers(model).items()
            for name, _ in layer.named_parameters(recurse=False)]
    keys += [f"{path}.{name}" for path, module in saved_modules(model).items() for name in module.state_dict()]
    return {k: state[k].detach().to("cpu").contiguous().clone() for k in keys}


def save_pretrained(model: nn.Module, save_directory, *args, state_dict=None, is_main_process: bool = True,
                    push_to_hub: bool = False, **kwargs) -> None:
    """Write an injected transformers model's checkpoint: the adapter, not the frozen base (see the
    module doc).  Installed as ``model.save_pretrained`` by ``inject``; the arguments transformers'
    own ``save_pretrained`` takes are accepted (``state_dict``, ``safe_serialization``,
    ``max_shard_size`` … are not needed: only the adapter is written, from the live model)."""
    if push_to_hub:
        raise NotImplementedError("save_pretrained(push_to_hub=True) is not supported for a talklora-min "
                                  "adapter: save to a folder and upload it (huggingface_hub.upload_folder)")
    if not is_main_process:
        return
    config = json.loads(model.config.to_json_string()) if hasattr(model, "config") else {}
    config.update(talklora_base_model_type=config.get("model_type"), model_type=ADAPTER_MODEL_TYPE)
    state = trainable_state(model)
    in_adapter = set(io.adapter_tensors(model))                 # file keys equal to state-dict names
    extra = {k: v for k, v in state.items() if k not in in_adapter}

    def resume_files(weights: str) -> dict[str, bytes]:
        index = {"metadata": {"talklora_format": io.FORMAT},
                 "weight_map": {k: weights if k in in_adapter else RESUME_EXTRA for k in sorted(state)}}
        return {RESUME_INDEX: (json.dumps(index, indent=2) + "\n").encode(),
                RESUME_EXTRA: save(extra, metadata={"format": "pt", "talklora_format": io.FORMAT}),
                "config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    io._save(model, save_directory, None, extra_files=resume_files)


def _model_class(folder: Path):
    """The transformers class named in ``folder/config.json`` (``architectures[0]``), else ``AutoModel``."""
    import transformers
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"base model folder {folder} has no config.json") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a valid JSON config ({type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("model_type") == ADAPTER_MODEL_TYPE:
        raise ValueError(f"{folder} is a talklora-min adapter folder, not a base model: pass the base model "
                         "(a module or its folder) first and the adapter folder second")
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    return cls or transformers.AutoModel


def from_pretrained(base, adapter_dir, *, model_class=None, **kwargs) -> nn.Module:
    """The base model with the adapter of ``adapter_dir`` loaded: one call, as PEFT's
    ``PeftModel.from_pretrained``.

    ``base``: a model (changed in place: it must not have adapter layers yet) or a local folder,
    loaded with ``model_class.from_pretrained(base, **kwargs)`` (default: the class named in its
    config.json, else ``AutoModel``).  ``adapter_dir``: a folder written by ``save_adapter``,
    ``model.save_pretrained`` of an injected model or a ``Trainer`` checkpoint.  The adapter is
    verified and loaded all-or-nothing (:func:`talklora_min.load_adapter`)."""
    if isinstance(base, nn.Module):
        model = base
    elif isinstance(base, (str, os.PathLike)) and str(base):
        folder = Path(base)
        if not folder.is_dir():
            raise FileNotFoundError(f"base model folder not found: {folder} (base must be a model or a local folder)")
        model = (model_class or _model_class(folder)).from_pretrained(folder, **kwargs)
    else:
        raise TypeError(f"base must be a torch.nn.Module or a local folder path, got {type(base).__name__}")
    io.load_adapter(model, adapter_dir)
    return model


def _read_index(index: Path, directory: Path) -> list[str]:
    """The shard files of ``model.safetensors.index.json``: plain names of files inside ``directory``."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a safetensors index (a JSON object with a 'weight_map' of key -> "
                         f"shard file): {type(err).__name__}: {str(err)[:200]}") from err
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    files = sorted(set(weight_map.values()))
    root = directory.resolve()
    for name in files:
        if Path(name).name != name or name in ("", ".", "..") or (directory / name).resolve().parent != root:
            raise ValueError(f"{index}: shard {name!r} is not a file inside {directory}; refusing to read it")
    return files


def load_pretrained(model: nn.Module, directory) -> list[str]:
    """Load a folder written by ``save_pretrained`` (or a ``Trainer`` checkpoint) into ``model``,
    already injected with the same ``AdapterConfig``; returns the loaded keys.

    An adapter folder (this version) loads its verified adapter.  A full-model folder
    (``model.safetensors`` or the shards of ``model.safetensors.index.json``, older versions) must
    hold every model tensor except those tied to one it holds; unknown keys, shapes, dtypes, NaN/Inf,
    values the model's dtype cannot hold and shard paths outside the folder are refused, naming the
    file, before anything is copied."""
    io._check_model(model)
    directory = io._check_path(directory, "directory")
    if (directory / io.MANIFEST_NAME).is_file():
        saved, _ = io.read_adapter(directory)
        ours = model.__dict__.get(CONFIG_ATTR)
        if ours is not None and ours != saved:
            diff = {k: (v, ours.to_dict()[k]) for k, v in saved.to_dict().items() if ours.to_dict()[k] != v}
            raise ValueError(f"{directory}: the saved adapter's config differs from the model's in "
                             f"{ {k: f'{a!r} saved, {b!r} in the model' for k, (a, b) in diff.items()} }; "
                             "was it injected with the same AdapterConfig as the saved one?")
        return io.load_adapter_weights(model, directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = _read_index(index, directory)
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no adapter ({io.MANIFEST_NAME}), model.safetensors or index in {directory}")
    tensors: dict[str, tuple[Tensor, Path]] = {}
    for name in files:
        path = directory / name
        try:
            data = load(io._read_bytes(path))
        except FileNotFoundError:
            raise
        except Exception as err:        # SafetensorError, ...: not a safetensors file
            raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
        tensors.update({k: (v, path) for k, v in data.items()})
    ours = model.state_dict()
    unknown = sorted(set(tensors) - set(ours))
    if unknown:
        raise ValueError(f"{directory}: key(s) {unknown[:6]} (in {tensors[unknown[0]][1].name}) are not in the "
                         "model; was it injected with the same AdapterConfig as the saved one?")
    loaded_ptrs = {ours[k].data_ptr() for k in tensors}
    missing = sorted(k for k in set(ours) - set(tensors) if ours[k].data_ptr() not in loaded_ptrs)
    if missing:
        raise ValueError(f"{directory}: missing key(s) {missing[:6]} in {files}")
    for key, (value, path) in tensors.items():
        io._check_value(key, ours[key], value, path)
    io._copy_plan([(ours[k].detach(), v) for k, (v, _) in tensors.items()])
    return sorted(tensors)


# ----------------------------------------------------------------------------- Trainer callback
class _LoadAccumulator(RoutingRecorder):
    """A recorder that keeps only running per-layer loads (soft ``Σ_t g(t)``, hard top-1 counts)
    of the unmasked tokens — constant memory however long training runs."""

    def __init__(self, layers):
        super().__init__(layers, None, None)
        self.paused = False
        self.soft: dict[str, Tensor] = {}
        self.hard: dict[str, Tensor] = {}

    def _hook(self, name: str):
        def hook(layer, logits: Tensor, gates: Tensor, topk_idx) -> None:
            if self.paused:
                return
            mask = self._token_mask(name, tuple(logits.shape[:-1])).to(gates.device)
            g = gates.detach().reshape(-1, gates.shape[-1])[mask.reshape(-1)].double()
            soft = g.sum(0)
            hard = torch.bincount(g.argmax(-1), minlength=g.shape[-1]).double()
            self.soft[name] = soft if name not in self.soft else self.soft[name] + soft
            self.hard[name] = hard if name not in self.hard else self.hard[name] + hard
        return hook

    def reset(self) -> None:
        self.soft.clear()
        self.hard.clear()


class RoutingStatsCallback(TrainerCallback):
    """Log routing statistics of every routed layer (MoE adapters and MoE base routers).

    Between two training logs (the ``Trainer`` logs with a ``loss``) it accumulates each layer's soft load of the real tokens (padding is
    masked with the batch's ``attention_mask``) and the balance loss of the training forwards; at
    each log it adds

    * ``{prefix}/{layer}/gini``, ``…/entropy`` (normalised load entropy), ``…/dead_experts``
      (per layer, with ``per_layer=True``), and
    * ``{prefix}/gini_mean``, ``{prefix}/entropy_mean``, ``{prefix}/dead_experts_mean``,
    * ``{prefix}/aux_loss``: the mean over those forwards of the mean balance loss of the adapted
      layers, when they have one (``AdapterConfig.balance_loss``),
    * ``{prefix}/churn`` (with ``churn=True``): the share of tokens of a fixed probe batch whose top-1
      expert changed since the previous log (the first log: since training began), mean over layers —
      one extra no-grad forward per log.  The probe batch is the first ``batch size`` examples of the
      training set, collated by the training data loader (random states saved and restored around
      it), so a run resumed from a checkpoint has the same probe and its first churn is measured
      from the checkpoint's routing, as in the uninterrupted run when ``save_steps`` is a multiple of
      ``logging_steps``.

    A model without routed layers (plain LoRA) logs nothing: one ``RuntimeWarning`` says so.  The
    logs dict is updated in place (and the matching ``state.log_history`` entry).  Callbacks run in
    order: pass the callback with ``Trainer(callbacks=[...])`` and call :meth:`attach`
    (``RoutingStatsCallback().attach(trainer)``) to put it first so reporting callbacks
    (TensorBoard, W&B) see the keys.
    """

    def __init__(self, prefix: str = "routing", per_layer: bool = True, churn: bool = True):
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        if not isinstance(per_layer, bool) or not isinstance(churn, bool):
            raise ValueError("per_layer and churn must be booleans")
        self.prefix, self.per_layer, self.churn = prefix, per_layer, churn
        self._acc: _LoadAccumulator | None = None
        self._handles: list = []
        self._probe: dict | None = None
        self._last_top1: dict[str, Tensor] | None = None
        self._aux: list = []
        self._warned = False

    def attach(self, trainer) -> "RoutingStatsCallback":
        """Make this the first callback of ``trainer`` (removing an earlier copy of it)."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    # -- hooks
    def _capture_probe(self, module, args, kwargs) -> None:
        if self._probe is None and not self._acc.paused:
            self._probe = {k: v.detach().clone() for k, v in kwargs.items()
                           if isinstance(v, Tensor) and k != "labels"}

    def _record_aux(self, model, args, output) -> None:
        if model.training and not self._acc.paused:
            aux = auxiliary_loss(model, "mean")
            if isinstance(aux, Tensor):
                self._aux.append(aux.detach())

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._close()
        self._aux, self._probe, self._last_top1 = [], None, None
        try:
            layers = routed_layers(model)
        except ValueError:
            self._acc = None
            if not self._warned:
                self._warned = True
                warnings.warn(f"RoutingStatsCallback: {type(model).__name__} has no routed layer (MoE adapter or "
                              "MoE router; e.g. plain LoRA): no routing statistics are logged", RuntimeWarning,
                              stacklevel=2)
            return
        self._acc = _LoadAccumulator(layers)
        self._handles = install_hooks(self._acc, model)
        self._handles.append(model.register_forward_hook(self._record_aux))
        if self.churn:
            self._probe = _probe_batch(train_dataloader, args, model)
            if self._probe is None:         # e.g. an iterable dataset: the first training batch
                self._handles.append(model.register_forward_pre_hook(self._capture_probe, with_kwargs=True))
            else:
                self._last_top1 = self._top1(model)

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    def _close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- metrics
    def _top1(self, model) -> dict[str, Tensor]:
        self._acc.paused = True
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad(), record_routing(model) as rec:
                model(**self._probe)
            return {n: rec.top1(n) for n in rec.layer_names if rec.num_forwards(n)}
        finally:
            model.train(was_training)
            self._acc.paused = False

    def _churn(self, model) -> float | None:
        if not self._probe:
            return None
        top1 = self._top1(model)
        last, self._last_top1 = self._last_top1, top1
        if last is None:
            return None
        shared = [n for n in top1 if n in last and last[n].shape == top1[n].shape]
        if not shared:
            return None
        return float(sum((top1[n] != last[n]).double().mean() for n in shared) / len(shared))

    def stats(self) -> dict[str, float]:
        """The metrics of the loads accumulated since the last log (does not reset them)."""
        out: dict[str, float] = {}
        per: dict[str, list[float]] = {"gini": [], "entropy": [], "dead_experts": []}
        for name, load in self._acc.soft.items() if self._acc else ():
            if not float(load.sum()) > 0:
                continue
            values = {"gini": gini(load), "entropy": load_entropy(load),
                      "dead_experts": float(len(dead_experts(load)))}
            for key, v in values.items():
                per[key].append(v)
                if self.per_layer:
                    out[f"{self.prefix}/{name}/{key}"] = v
        for key, vs in per.items():
            if vs:
                out[f"{self.prefix}/{key}_mean"] = sum(vs) / len(vs)
        if self._aux:
            out[f"{self.prefix}/aux_loss"] = float(torch.stack(self._aux).double().mean())
        return out

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._acc is None or logs is None or "loss" not in logs:     # training logs only (not eval / summary)
            return
        stats = self.stats()
        if self.churn and model is not None:
            churn = self._churn(model)
            if churn is not None and math.isfinite(churn):
                stats[f"{self.prefix}/churn"] = churn
        self._acc.reset()
        self._aux = []
        logs.update(stats)
        if state.log_history:
            state.log_history[-1].update(stats)


def _probe_batch(dataloader, args, model) -> dict | None:
    """The first ``batch size`` examples of the loader's map-style dataset, collated by its
    ``collate_fn`` with the torch / numpy / Python random states restored afterwards (a collator may
    draw random numbers); ``None`` if the loader does not allow it."""
    dataset, collate = getattr(dataloader, "dataset", None), getattr(dataloader, "collate_fn", None)
    if dataset is None or collate is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return None
    size = getattr(dataloader, "batch_size", None) or getattr(args, "per_device_train_batch_size", None) or 1
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        batch = collate([dataset[i] for i in range(min(size, len(dataset)))])
    except Exception:                          # noqa: BLE001 - any collation problem: fall back to capture
        return None
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
    if not hasattr(batch, "items"):
        return None
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor) and k != "labels"} or None
