"""Model-level helpers of an injected model (docs/method.md §8): its config, merging, disabling, and
a PEFT-style trainable-parameter summary.  ``inject`` / ``unload`` live in :mod:`talklora_min.inject`."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .inject import (CONFIG_ATTR, AdapterConfig, AdapterLayer, adapter_layers, count_parameters, saved_modules,
                     unload)
from .layers import LoRALinear


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The :class:`AdapterConfig` the model was injected with (``inject``, ``load_adapter``,
    ``talklora_min.hf.from_peft``); a copy.  Raises ``ValueError`` for a model without one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = model.__dict__.get(CONFIG_ATTR)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no adapter config: it was not injected with "
                         "talklora_min.inject (or was unloaded); pass the AdapterConfig explicitly")
    return copy.deepcopy(config)



def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight (``W0 += s·BA``), then :func:`unload`.

    All or nothing: every layer is checked first — MoE layers (their gates depend on the input, no
    single merged weight), NaN/Inf in ``A`` / ``B``, and a merged weight the base's dtype cannot hold
    (e.g. an fp16 base overflowing to Inf) raise ``ValueError`` before any layer is merged."""
    layers = adapter_layers(model)
    moe = [n for n, m in layers.items() if not isinstance(m, LoRALinear)]
    if moe:
        raise ValueError(f"merge_and_unload needs LoRA layers; {moe[:4]} are mixtures whose gates g(x) "
                         "depend on the input and have no single merged weight (use unload())")
    with torch.no_grad():
        for name, layer in layers.items():
            if layer.merged:
                continue
            delta = layer.delta_weight()
            if not torch.isfinite(delta).all():
                raise ValueError(f"cannot merge {name!r}: its adapter weights A or B contain NaN or Inf; "
                                 "nothing was merged")
            w = layer.base.weight
            merged = w + (delta.t() if layer.fan_in_fan_out else delta).to(w.dtype)
            if (torch.isfinite(w) & ~torch.isfinite(merged)).any():
                raise ValueError(f"cannot merge {name!r}: W0 + s·BA overflows the base's {w.dtype} (values up "
                                 f"to {merged[torch.isfinite(merged)].abs().max().item():.3g} and Inf); nothing "
                                 "was merged. Merge into a float32 copy of the model (model.float())")
        for layer in layers.values():
            if not layer.merged:
                layer.merge()
    return unload(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every adapter layer returns its base output only (merged LoRA layers are
    unmerged for the block and merged again after it)."""
    layers = list(adapter_layers(model).values())
    before = [layer.adapter_enabled for layer in layers]
    merged = [layer for layer in layers if getattr(layer, "merged", False)]
    try:
        for layer in merged:
            layer.unmerge()
        for layer in layers:
            layer.adapter_enabled = False
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.adapter_enabled = flag
        for layer in merged:
            layer.merge()


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
