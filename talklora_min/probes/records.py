"""Routing records (SPEC §4, "Routing record").

``with record_routing(model) as rec: model(**batch)`` stores, for every MoE adapter layer (MoELoRA
or TalkLoRA; plain LoRA has no router and is skipped) and every forward:

* ``logits``  router logits ``W_r h~`` / ``W_g x``      (float32, detached)
* ``gates``   routing weights after softmax / top-k    (float32, detached; *before* any training
  gate dropout — the layer's hook fires between the softmax and the dropout)
* ``topk``    top-k indices when the layer uses top-k routing (int64), else nothing
* ``mask``    boolean token mask; tokens with ``False`` (padding) are excluded from every accessor

Storage: on the CPU by default (``device="cpu"``); ``device=None`` keeps the layer's device.
The token mask has the *leading* shape of the layer input (e.g. ``(batch, seq)`` for an input of
shape ``(batch, seq, d_in)``); set it for the following forwards with :meth:`RoutingRecorder.set_mask`
or pass ``attention_mask=`` to :func:`record_routing`.  No mask = every token counts.
Records of several forwards are concatenated in call order, exactly (no averaging, no copies
beyond the fp32 cast).  Hooks are removed when the ``with`` block exits, also on an exception.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from .load import hard_load, soft_load

SINGLE_LAYER_NAME = "layer"  # the name under which a bare layer (not a model) is recorded


def routed_layers(model_or_layer: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of every adapter layer with a router (``add_routing_hook``), in module order.

    A bare MoE layer is returned as ``{"layer": layer}``.  Raises if there is none.
    """
    if not isinstance(model_or_layer, nn.Module):
        raise TypeError(f"model_or_layer must be a torch.nn.Module, got {type(model_or_layer).__name__}")
    if hasattr(model_or_layer, "add_routing_hook"):
        return {SINGLE_LAYER_NAME: model_or_layer}
    layers = {n: m for n, m in model_or_layer.named_modules() if hasattr(m, "add_routing_hook")}
    if not layers:
        raise ValueError(f"{type(model_or_layer).__name__} has no routed adapter layer "
                         "(MoELoRALinear / TalkLoRALinear); inject one first")
    return layers


def _as_mask(mask) -> Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask)
    if m.dtype != torch.bool:
        if m.is_floating_point() and not torch.isfinite(m).all():
            raise ValueError("mask must contain only 0/1 or booleans, got NaN/Inf")
        if not ((m == 0) | (m == 1)).all():
            raise ValueError("mask must contain only 0/1 or booleans (1/True = real token, 0 = padding)")
        m = m != 0
    return m


class RoutingRecorder:
    """Per-layer routing records; created by :func:`record_routing`."""

    def __init__(self, layers: dict[str, nn.Module], attention_mask=None, device="cpu"):
        self._layers = dict(layers)
        self._device = None if device is None else torch.device(device)
        self._mask = _as_mask(attention_mask)
        self._chunks: dict[str, dict[str, list[Tensor]]] = {
            n: {"logits": [], "gates": [], "topk": [], "mask": []} for n in self._layers}

    # -- recording
    def set_mask(self, mask) -> None:
        """Token mask for the following forwards (leading shape of the layer input); ``None`` = all."""
        self._mask = _as_mask(mask)

    def _store(self, t: Tensor) -> Tensor:
        t = t.detach()
        return t if self._device is None else t.to(self._device)

    def _hook(self, name: str):
        def hook(layer, logits: Tensor, gates: Tensor, topk_idx: Tensor | None) -> None:
            lead = tuple(logits.shape[:-1])
            if self._mask is None:
                mask = torch.ones(lead, dtype=torch.bool)
            elif tuple(self._mask.shape) != lead:
                raise ValueError(f"record_routing: the token mask has shape {tuple(self._mask.shape)} "
                                 f"but layer {name!r} received inputs with leading shape {lead}; "
                                 "set_mask() a mask of the input's leading shape (e.g. (batch, seq))")
            else:
                mask = self._mask
            E = logits.shape[-1]
            rec = self._chunks[name]
            rec["logits"].append(self._store(logits.reshape(-1, E).float()))
            rec["gates"].append(self._store(gates.reshape(-1, E).float()))
            if topk_idx is not None:
                rec["topk"].append(self._store(topk_idx.reshape(-1, topk_idx.shape[-1])))
            rec["mask"].append(mask.reshape(-1).to(rec["gates"][-1].device))
        return hook

    # -- access
    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    def _name(self, name: str | None) -> str:
        if name is None:
            if len(self._layers) != 1:
                raise ValueError(f"name is required when several layers were recorded: {self.layer_names}")
            return next(iter(self._layers))
        if name not in self._layers:
            raise KeyError(f"no routed layer named {name!r}; recorded layers: {self.layer_names}")
        return name

    def num_forwards(self, name: str | None = None) -> int:
        return len(self._chunks[self._name(name)]["gates"])

    def mask(self, name: str | None = None) -> Tensor:
        """Concatenated boolean token mask (all tokens, including padding), shape ``(N_all,)``."""
        chunks = self._chunks[self._name(name)]["mask"]
        return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.bool)

    def _masked(self, name: str | None, key: str) -> Tensor:
        name = self._name(name)
        chunks = self._chunks[name][key]
        if not chunks:
            if key == "topk" and self._chunks[name]["gates"]:
                raise ValueError(f"layer {name!r} uses dense routing: there are no top-k indices")
            raise ValueError(f"layer {name!r} has no records: run a forward inside record_routing()")
        return torch.cat(chunks)[self.mask(name).to(chunks[0].device)]

    def gates(self, name: str | None = None) -> Tensor:
        """Gates of the unmasked tokens of all forwards, ``(N_tokens, E)`` float32."""
        return self._masked(name, "gates")

    def logits(self, name: str | None = None) -> Tensor:
        """Router logits of the unmasked tokens, ``(N_tokens, E)`` float32."""
        return self._masked(name, "logits")

    def topk_indices(self, name: str | None = None) -> Tensor:
        """Top-k expert indices of the unmasked tokens, ``(N_tokens, k)`` (top-k layers only)."""
        return self._masked(name, "topk")

    def top1(self, name: str | None = None) -> Tensor:
        """Top-1 expert of each unmasked token (argmax of the gates, ties → lowest), ``(N_tokens,)``."""
        return self.gates(name).argmax(-1)

    def load(self, name: str | None = None, kind: str = "soft") -> Tensor:
        """Soft (``Σ_t g(t)``) or hard (top-1 counts) load of one layer, float64 ``(E,)``."""
        if kind not in ("soft", "hard"):
            raise ValueError(f"kind must be one of ('soft', 'hard'), got {kind!r}")
        return (soft_load if kind == "soft" else hard_load)(self.gates(name))

    def pooled_gates(self, names: list[str] | None = None) -> Tensor:
        """Gates of all (or the given) layers stacked along the token axis, ``(Σ N_tokens, E)``.

        All pooled layers must have the same number of experts."""
        names = self.layer_names if names is None else [self._name(n) for n in names]
        parts = [self.gates(n) for n in names]
        widths = {p.shape[-1] for p in parts}
        if len(widths) > 1:
            raise ValueError(f"cannot pool layers with different numbers of experts {sorted(widths)}")
        return torch.cat(parts)

    def clear(self) -> None:
        """Forget every record (hooks stay installed inside the ``with`` block)."""
        for rec in self._chunks.values():
            for chunks in rec.values():
                chunks.clear()


@contextmanager
def record_routing(model_or_layer: nn.Module, attention_mask=None, *,
                   device="cpu") -> Iterator[RoutingRecorder]:
    """Record the routing of every MoE adapter layer of ``model_or_layer`` (or of one layer).

    ``attention_mask`` (optional) is the initial token mask, 1/True for real tokens; change it
    between forwards with ``recorder.set_mask``.  ``device``: where records are stored
    (``"cpu"`` default, ``None`` = the layer's device).  Hooks are removed on exit, also on error.
    """
    layers = routed_layers(model_or_layer)
    recorder = RoutingRecorder(layers, attention_mask, device)
    handles = []
    try:
        for name, layer in layers.items():
            handles.append(layer.add_routing_hook(recorder._hook(name)))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
