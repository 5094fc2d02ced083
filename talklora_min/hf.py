"""Hugging Face integration: PEFT conversion, checkpoint reload and a Trainer callback (SPEC §8).

This module needs ``transformers`` (imported here) and, for :func:`from_peft`, ``peft`` (imported
inside it).  The core package (``import talklora_min``) does not import either.

* :func:`from_peft` — PEFT LoRA ``Linear`` / ``Conv1D`` layers → :class:`~talklora_min.LoRALinear`
  with the same ``A``, ``B`` and scaling ``s = lora_alpha / r`` (``/ √r`` with rsLoRA): identical outputs.
* :func:`load_pretrained` — reload what ``model.save_pretrained(dir)`` (or a ``Trainer`` checkpoint)
  wrote for an injected model into a fresh model injected with the same config.  A ``B`` tied across
  layers is registered in its first layer only (``AdapterLayer.tie_B``), so the state dict holds it
  once and safetensors sees no shared tensors.
* :class:`RoutingStatsCallback` — per-layer and mean Gini, load entropy, dead experts and top-1
  churn of every routed layer in the ``Trainer``'s logs (so TensorBoard / W&B show them).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import TrainerCallback

from .inject import adapter_layers
from .layers import LoRALinear, is_conv1d
from .probes.load import dead_experts, gini, load_entropy
from .probes.records import RoutingRecorder, install_hooks, record_routing, routed_layers


# ----------------------------------------------------------------------------- PEFT → toolkit
def from_peft(peft_model: nn.Module) -> nn.Module:
    """Replace every PEFT LoRA layer (``nn.Linear`` or ``Conv1D`` base, one adapter) by a
    :class:`LoRALinear` holding the same ``A (r, d_in)``, ``B (d_out, r)``, scaling and dropout, and
    every ``modules_to_save`` wrapper by its trained copy.  Returns the underlying base model
    (changed in place): adapters trainable, everything else frozen, outputs identical.

    Raises ``ValueError`` (before changing anything) for what ``LoRALinear`` cannot express: DoRA,
    LoRA bias, several adapters in one layer, merged layers, or a base that is not Linear/Conv1D.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be a torch.nn.Module, got {type(peft_model).__name__}")
    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    if not lora:
        raise ValueError(f"{type(peft_model).__name__} has no PEFT LoRA layer to convert")
    plans = {}
    for name, m in lora.items():
        adapters = list(m.lora_A)
        base = m.get_base_layer()
        reason = None
        if len(adapters) != 1:
            reason = f"it has {len(adapters)} adapters {adapters} (LoRALinear holds one)"
        elif not (isinstance(base, nn.Linear) or is_conv1d(base)):
            reason = f"its base is a {type(base).__name__} (only nn.Linear / Conv1D are supported)"
        elif getattr(m, "merged", False):
            reason = "it is merged (call unmerge_adapter() first)"
        elif m.use_dora.get(adapters[0], False) or getattr(m, "lora_bias", {}).get(adapters[0], False):
            reason = "it uses DoRA or a LoRA bias"
        if reason:
            raise ValueError(f"from_peft: cannot convert {name!r}: {reason}")
        a = adapters[0]
        drop = m.lora_dropout[a]
        plans[name] = (base, m.r[a], m.scaling[a], drop.p if isinstance(drop, nn.Dropout) else 0.0,
                       m.lora_A[a].weight, m.lora_B[a].weight)
    model.requires_grad_(False)
    for name, (base, r, scaling, p, A, B) in plans.items():
        layer = LoRALinear(base, r, alpha=scaling * r, dropout=p, dtype=A.dtype)
        layer.set_weights(A=A.detach(), B=B.detach())
        layer.requires_grad_(True)
        layer.base.requires_grad_(False)
        _replace(model, name, layer)
    for name, w in wrappers.items():
        trained = w.modules_to_save[w.active_adapters[0]] if w.modules_to_save else w.original_module
        trained.requires_grad_(True)
        _replace(model, name, trained)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


# ----------------------------------------------------------------------------- checkpoints
def load_pretrained(model: nn.Module, directory) -> list[str]:
    """Load ``model.safetensors`` (or the shards listed in ``model.safetensors.index.json``) written
    by ``save_pretrained`` / a ``Trainer`` checkpoint into ``model`` (already injected with the same
    ``AdapterConfig``).  Every model tensor must be in the files, except tensors tied to one that is
    (e.g. ``lm_head.weight`` = the embedding); unknown keys or shape mismatches raise before anything
    is copied.  Returns the loaded keys."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or index) in {directory}")
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(load_file(directory / f))
    ours = model.state_dict()
    unknown = sorted(set(tensors) - set(ours))
    if unknown:
        raise ValueError(f"{directory}: key(s) {unknown[:6]} are not in the model; was it injected "
                         "with the same AdapterConfig as the saved one?")
    loaded_ptrs = {ours[k].data_ptr() for k in tensors}
    missing = sorted(k for k in set(ours) - set(tensors) if ours[k].data_ptr() not in loaded_ptrs)
    if missing:
        raise ValueError(f"{directory}: missing key(s) {missing[:6]}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ValueError(f"{directory}: shape mismatch for {key!r}: expected "
                             f"{tuple(ours[key].shape)}, got {tuple(value.shape)}")
    with torch.no_grad():
        for key, value in tensors.items():
            ours[key].copy_(value)
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

    Between two logging steps it accumulates each layer's soft load of the real tokens (padding is
    masked with the batch's ``attention_mask``); at each log it adds

    * ``{prefix}/{layer}/gini``, ``…/entropy`` (normalised load entropy), ``…/dead_experts``
      (per layer, with ``per_layer=True``), and
    * ``{prefix}/gini_mean``, ``{prefix}/entropy_mean``, ``{prefix}/dead_experts_mean``,
    * ``{prefix}/churn`` (with ``churn=True``): the share of tokens of a fixed probe batch (the first
      training batch) whose top-1 expert changed since the previous log, mean over layers — one
      extra no-grad forward of that batch per log.

    The logs dict is updated in place (and the matching ``state.log_history`` entry).  Callbacks
    run in order: pass the callback with ``Trainer(callbacks=[...])`` and call :meth:`attach`
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

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._close()
        self._acc = _LoadAccumulator(routed_layers(model))
        self._handles = install_hooks(self._acc, model)
        if self.churn:
            self._handles.append(model.register_forward_pre_hook(self._capture_probe, with_kwargs=True))

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    def _close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- metrics
    def _churn(self, model) -> float | None:
        if not self._probe:
            return None
        self._acc.paused = True
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad(), record_routing(model) as rec:
                model(**self._probe)
            top1 = {n: rec.top1(n) for n in rec.layer_names if rec.num_forwards(n)}
        finally:
            model.train(was_training)
            self._acc.paused = False
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
        return out

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._acc is None or logs is None:
            return
        stats = self.stats()
        if self.churn and model is not None:
            churn = self._churn(model)
            if churn is not None and math.isfinite(churn):
                stats[f"{self.prefix}/churn"] = churn
        self._acc.reset()
        logs.update(stats)
        if state.log_history:
            state.log_history[-1].update(stats)
