"""Routing records (docs/method.md §4, "Routing record").

``with record_routing(model) as rec: model(**batch)`` stores, for every MoE adapter layer (MoELoRA
or TalkLoRA; plain LoRA has no router and is skipped) and every forward:

* ``logits``  router logits ``W_r h~`` / ``W_g x``      (float32, detached)
* ``gates``   routing weights after softmax / top-k    (float32, detached; *before* any training
  gate dropout — the layer's hook fires between the softmax and the dropout)
* ``topk``    top-k indices when the layer uses top-k routing (int64), else nothing
* ``mask``    boolean token mask; tokens with ``False`` (padding) are excluded from every accessor

Routers of the base model are recorded too: the routers of transformers' MoE models (Mixtral,
Qwen-MoE, OLMoE …: modules whose class name ends in ``Router``, and ``nn.Linear`` children named
``gate`` / ``router`` of a ``…MoE…`` / ``…Moe…`` block) and any module named in ``routers=``.  Such
a router's output is its logits or a tuple starting with them (``(logits, scores, indices)``); the
record stores ``gates = softmax(logits)`` over *all* experts (so the soft load sums to the number of
tokens) and the integer indices of the third element as ``topk``.  Their input is often flattened to
``(tokens, d)``: a mask of the same number of elements is accepted when one of the two is flat (a mask
``(2, 6)`` for inputs ``(3, 4, d)`` is refused: the same count, other tokens).

When a whole model is recorded, the ``attention_mask=`` keyword of each model call is followed
automatically: the mask of a forward is its last ``q`` columns (``q`` = length of ``input_ids`` /
``inputs_embeds``), so during ``generate`` the prefill and every decode step (with the KV cache) are
masked correctly (not for encoder-decoder models, whose decoder tokens the mask does not
describe: use ``set_mask`` there).  A mask given to :func:`record_routing` / ``set_mask`` takes precedence for
forwards whose shape it fits.  If the model ran but a layer recorded nothing (a module compiled with
``torch.compile`` before the recorder opened does not call hooks added later), a ``RuntimeWarning``
says so on exit.

Storage: on the CPU by default (``device="cpu"``); ``device=None`` keeps the layer's device.
The token mask has the *leading* shape of the layer input (e.g. ``(batch, seq)`` for an input of
shape ``(batch, seq, d_in)``); set it for the following forwards with :meth:`RoutingRecorder.set_mask`
or pass ``attention_mask=`` to :func:`record_routing`.  No mask = every token counts.
Records of several forwards are concatenated in call order, exactly (no averaging, no copies
beyond the fp32 cast).  Hooks are removed when the ``with`` block exits, also on an exception.
"""
from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from .load import hard_load, soft_load

SINGLE_LAYER_NAME = "layer"  # the name under which a bare layer (not a model) is recorded


def _is_base_router(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """A transformers MoE router: class name ending in ``Router`` with a 2-D ``weight (E, d)``, or an
    ``nn.Linear`` named ``gate`` / ``router`` inside a MoE block."""
    if hasattr(module, "add_routing_hook"):
        return False
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or w.ndim != 2 or w.shape[0] < 2:
        return False
    if type(module).__name__.endswith("Router"):
        return True
    leaf = name.rpartition(".")[2]
    return (isinstance(module, nn.Linear) and leaf in ("gate", "router") and parent is not None
            and re.search("moe", type(parent).__name__, re.IGNORECASE) is not None)


def routed_layers(model_or_layer: nn.Module, routers=None) -> dict[str, nn.Module]:
    """``{name: module}`` of every routed module, in module order: adapter layers with a router
    (``add_routing_hook``), the routers of transformers' MoE base models, and the modules named in
    ``routers`` (a module name or a list of names; their output must be logits or start with them).

    A bare MoE layer is returned as ``{"layer": layer}``.  Raises if there is none.
    """
    if not isinstance(model_or_layer, nn.Module):
        raise TypeError(f"model_or_layer must be a torch.nn.Module, got {type(model_or_layer).__name__}")
    if routers is not None:
        routers = (routers,) if isinstance(routers, str) else routers
        if not isinstance(routers, (list, tuple)) or not all(isinstance(r, str) and r for r in routers):
            raise ValueError(f"routers must be None, a module name or a list of module names, got {routers!r}")
    if hasattr(model_or_layer, "add_routing_hook") and not routers:
        return {SINGLE_LAYER_NAME: model_or_layer}
    modules = dict(model_or_layer.named_modules())
    layers = {}
    for n, m in modules.items():
        parent = modules.get(n.rpartition(".")[0]) if n else None
        if hasattr(m, "add_routing_hook") or (n and _is_base_router(n, m, parent)):
            layers[n] = m
    for r in routers or ():
        if r not in modules:
            raise ValueError(f"routers: {type(model_or_layer).__name__} has no module named {r!r}")
        layers[r] = modules[r]
    if not layers:
        raise ValueError(f"{type(model_or_layer).__name__} has no routed adapter layer "
                         "(MoELoRALinear / TalkLoRALinear) and no MoE router; inject one first or "
                         "name the router modules with routers=[...]")
    return layers


def _as_mask(mask, name: str = "attention_mask") -> Tensor | None:
    if mask is None:
        return None
    if type(mask).__module__ == "numpy":
        mask = torch.as_tensor(mask)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be None, a torch.Tensor or a numpy array of 0/1 or booleans, "
                        f"got {type(mask).__name__}")
    m = mask.detach()
    if m.dtype != torch.bool:
        if m.is_floating_point() and not torch.isfinite(m).all():
            raise ValueError(f"{name} must contain only 0/1 or booleans, got NaN/Inf")
        if not ((m == 0) | (m == 1)).all():
            raise ValueError(f"{name} must contain only 0/1 or booleans (1/True = real token, 0 = padding)")
        m = m != 0
    return m


def _fits(mask: Tensor, lead: tuple[int, ...]) -> bool:
    """The mask describes inputs of leading shape ``lead``: the same shape, or the same tokens with
    one side flattened (a router fed ``(tokens, d)`` by a model masked per ``(batch, seq)``).  Two
    different multi-axis shapes with equal sizes ((2, 6) vs (3, 4)) are different token layouts."""
    if tuple(mask.shape) == lead:
        return True
    return mask.numel() == math.prod(lead) and (mask.ndim == 1 or len(lead) == 1)


def _router_output(output) -> tuple[Tensor, Tensor | None]:
    """``(logits, topk indices or None)`` from a router's output."""
    if isinstance(output, Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        index = output[2] if len(output) > 2 and isinstance(output[2], Tensor) else None
        if index is not None and (index.is_floating_point() or index.shape[:-1] != output[0].shape[:-1]):
            index = None
        return output[0], index
    raise TypeError(f"a router must return its logits or a tuple starting with them, got {type(output).__name__}")


def _forward_tokens(args, kwargs) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        t = kwargs.get(key)
        if isinstance(t, Tensor):
            return t.shape[1] if t.ndim >= 2 else None
    if args and isinstance(args[0], Tensor) and args[0].ndim >= 2:
        return args[0].shape[1]
    return None


class RoutingRecorder:
    """Per-layer routing records; created by :func:`record_routing`."""

    def __init__(self, layers: dict[str, nn.Module], attention_mask=None, device="cpu"):
        self._layers = dict(layers)
        self._device = None if device is None else torch.device(device)
        self._mask = _as_mask(attention_mask)
        self._forward_mask: Tensor | None = None     # from the model call's attention_mask kwarg
        self.model_forwards = 0
        self._chunks: dict[str, dict[str, list[Tensor]]] = {
            n: {"logits": [], "gates": [], "topk": [], "mask": []} for n in self._layers}

    # -- recording
    def set_mask(self, mask) -> None:
        """Token mask for the following forwards (leading shape of the layer input); ``None`` = all."""
        self._mask = _as_mask(mask, "mask")

    def _model_pre_hook(self, module, args, kwargs) -> None:
        self.model_forwards += 1
        mask, q = kwargs.get("attention_mask"), _forward_tokens(args, kwargs)
        if getattr(getattr(module, "config", None), "is_encoder_decoder", False):
            mask = None             # the encoder's mask does not describe the decoder's tokens
        if isinstance(mask, Tensor) and mask.ndim == 2 and q is not None and mask.shape[1] >= q:
            self._forward_mask = _as_mask(mask[:, -q:])
        else:
            self._forward_mask = None

    def _model_post_hook(self, module, args, kwargs, output) -> None:
        self._forward_mask = None

    def _token_mask(self, name: str, lead: tuple[int, ...]) -> Tensor:
        for mask in (self._mask, self._forward_mask):
            if mask is not None and _fits(mask, lead):
                return mask.reshape(lead)
        if self._mask is not None:
            raise ValueError(f"record_routing: the token mask has shape {tuple(self._mask.shape)} "
                             f"but layer {name!r} received inputs with leading shape {lead}; "
                             "set_mask() a mask of the input's leading shape (e.g. (batch, seq))")
        return torch.ones(lead, dtype=torch.bool)

    def _router_hook(self, name: str):
        record = self._hook(name)

        def hook(module, args, output) -> None:
            logits, index = _router_output(output)
            record(module, logits, torch.softmax(logits.detach().float(), -1), index)
        return hook

    def _store(self, t: Tensor) -> Tensor:
        t = t.detach()
        return t if self._device is None else t.to(self._device)

    def _hook(self, name: str):
        def hook(layer, logits: Tensor, gates: Tensor, topk_idx: Tensor | None) -> None:
            mask = self._token_mask(name, tuple(logits.shape[:-1]))
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


def install_hooks(recorder: RoutingRecorder, model_or_layer: nn.Module) -> list:
    """Hook ``recorder`` into its layers (routing hooks / forward hooks on base routers) and, for a
    model, into the model call (to follow ``attention_mask``).  Returns the handles to ``.remove()``."""
    handles = []
    try:
        for name, layer in recorder._layers.items():
            if hasattr(layer, "add_routing_hook"):
                handles.append(layer.add_routing_hook(recorder._hook(name)))
            else:
                handles.append(layer.register_forward_hook(recorder._router_hook(name)))
        if not any(layer is model_or_layer for layer in recorder._layers.values()):
            handles.append(model_or_layer.register_forward_pre_hook(recorder._model_pre_hook, with_kwargs=True))
            handles.append(model_or_layer.register_forward_hook(recorder._model_post_hook, with_kwargs=True))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


@contextmanager
def record_routing(model_or_layer: nn.Module, attention_mask=None, *, device="cpu",
                   routers=None) -> Iterator[RoutingRecorder]:
    """Record the routing of every MoE adapter layer and MoE router of ``model_or_layer``.

    ``attention_mask`` (optional) is the initial token mask, 1/True for real tokens; change it
    between forwards with ``recorder.set_mask``; the ``attention_mask=`` of each model call is
    followed automatically (see the module doc).  ``device``: where records are stored (``"cpu"``
    default, ``None`` = the layer's device).  ``routers``: extra module names to record as routers.
    Hooks are removed on exit, also on error.
    """
    layers = routed_layers(model_or_layer, routers)
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be None, a string or a torch.device, got {type(device).__name__}")
    recorder = RoutingRecorder(layers, attention_mask, device)
    handles = []
    try:
        handles = install_hooks(recorder, model_or_layer)
        yield recorder
        silent = [n for n in recorder.layer_names if not recorder._chunks[n]["gates"]]
        if recorder.model_forwards and silent:
            warnings.warn(f"record_routing: the model ran {recorder.model_forwards} forward(s) but "
                          f"{len(silent)} routed layer(s) recorded nothing (e.g. {silent[:3]}); a module "
                          "compiled with torch.compile before record_routing opened does not run hooks "
                          "added later: open record_routing before compiling (or torch._dynamo.reset())",
                          RuntimeWarning, stacklevel=3)
    finally:
        for handle in handles:
            handle.remove()
