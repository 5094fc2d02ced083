"""PEFT LoRA ↔ :class:`~talklora_min.LoRALinear` (docs/method.md §8), re-exported by ``talklora_min.hf``.

Both directions keep ``A (r, d_in)``, ``B (d_out, r)`` and the scaling ``s`` exactly (``lora_alpha / r``,
``lora_alpha / √r`` with rsLoRA, per-module ``rank_pattern`` / ``alpha_pattern``), so outputs are
identical, and both leave their input usable: they work on a deep copy unless ``inplace=True``.
``from_peft`` keeps an :class:`~talklora_min.AdapterConfig` describing the result on the model, so
``save_adapter(model, dir)`` needs no config; ``to_peft`` gives a ``PeftModel`` that PEFT's own
``save_pretrained`` / ``PeftModel.from_pretrained`` round-trip.  ``peft`` is imported inside them.
"""
from __future__ import annotations

import copy
import math
import re
from collections import Counter

from torch import nn

from .inject import (SAVED_MODULE_FLAG, AdapterConfig, _keep_state_dict_unmerged, _pattern_value, adapter_layers,
                     remember_config, saved_modules, unload)
from .io import _check_config_describes
from .layers import LoRALinear, is_conv1d
from .lifecycle import adapter_config


# ----------------------------------------------------------------------------- PEFT → toolkit
def _unsupported(name: str, layer, adapters: list[str]) -> str | None:
    """Why PEFT layer ``name`` cannot become a ``LoRALinear`` (None if it can)."""
    if getattr(layer, "lora_embedding_A", None):
        return ("it is a LoRA on an nn.Embedding (lora_embedding_A / lora_embedding_B); only LoRA on "
                "nn.Linear / Conv1D converts: leave embeddings out of target_modules, or merge the "
                "adapter into the model first (peft_model.merge_and_unload())")
    if len(adapters) != 1:
        return (f"it has {len(adapters)} adapters {adapters}; LoRALinear holds one: delete the others "
                "(peft_model.delete_adapter(name)) or convert a model with one adapter")
    base = layer.get_base_layer()
    if not (isinstance(base, nn.Linear) or is_conv1d(base)):
        return f"its base is a {type(base).__name__} (only nn.Linear / Conv1D are supported)"
    if getattr(layer, "merged", False):
        return "it is merged (call peft_model.unmerge_adapter() first)"
    if layer.use_dora.get(adapters[0], False):
        return ("it uses DoRA (use_dora=True): LoRALinear has no magnitude vector; merge it "
                "(peft_model.merge_and_unload()) or train without DoRA")
    if getattr(layer, "lora_bias", {}).get(adapters[0], False):
        return "it has a LoRA bias (lora_bias=True), which LoRALinear does not hold"
    return None


def from_peft(peft_model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain model whose PEFT LoRA layers (``nn.Linear`` or ``Conv1D`` base, one adapter) are
    :class:`LoRALinear` layers with the same ``A``, ``B``, scaling and dropout, and whose
    ``modules_to_save`` wrappers are replaced by their trained copies: outputs identical, adapters
    trainable, everything else frozen, the describing ``AdapterConfig`` kept on it.

    Works on a deep copy (``peft_model`` stays a working PEFT model) unless ``inplace=True`` (no copy;
    ``peft_model`` is then consumed).  Raises ``ValueError`` before changing anything for what
    ``LoRALinear`` cannot express: LoRA on embeddings, several adapters, DoRA, LoRA bias, merged
    layers, a base that is not Linear / Conv1D."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be a torch.nn.Module, got {type(peft_model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    if not lora:
        raise ValueError(f"{type(peft_model).__name__} has no PEFT LoRA layer to convert")
    for name, m in lora.items():
        reason = _unsupported(name, m, list(m.lora_A))
        if reason:
            raise ValueError(f"from_peft: cannot convert {name!r}: {reason}")
    if not inplace:
        peft_model = copy.deepcopy(peft_model)
        model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    adapter = next(iter(next(iter(lora.values())).lora_A))
    peft_configs = getattr(peft_model, "peft_config", None)
    peft_config = peft_configs.get(adapter) if isinstance(peft_configs, dict) and len(peft_configs) == 1 else None
    layers = {}
    for name, m in lora.items():
        a = next(iter(m.lora_A))
        drop = m.lora_dropout[a]
        layer = LoRALinear(m.get_base_layer(), m.r[a], alpha=m.scaling[a] * m.r[a],
                           dropout=drop.p if isinstance(drop, nn.Dropout) else 0.0, dtype=m.lora_A[a].weight.dtype)
        layer.scaling = m.scaling[a]                           # PEFT's value, bit for bit
        layer.set_weights(A=m.lora_A[a].weight.detach(), B=m.lora_B[a].weight.detach())
        layers[name] = layer
    config = _described_by(layers, list(wrappers), peft_config)
    model.requires_grad_(False)
    for name, layer in layers.items():
        layer.requires_grad_(True)
        layer.base.requires_grad_(False)
        _keep_state_dict_unmerged(layer)
        _replace(model, name, layer)
    for name, w in wrappers.items():
        trained = w.modules_to_save[w.active_adapters[0]] if w.modules_to_save else w.original_module
        trained.requires_grad_(True)
        _replace(model, name, trained)
    for name in wrappers:
        setattr(model.get_submodule(name), SAVED_MODULE_FLAG, True)
    remember_config(model, config)
    _check_config_describes(model, config)
    return model


def _described_by(layers: dict[str, LoRALinear], saved: list[str], peft_config) -> AdapterConfig:
    """The AdapterConfig that rebuilds ``layers``: PEFT's r, lora_alpha, use_rslora and patterns when
    they give each layer its rank and scaling exactly, plus exact per-module patterns where not."""
    ranks = Counter(layer.rank for layer in layers.values())
    first = next(iter(layers.values()))
    settings = dict(kind="lora", rank=ranks.most_common(1)[0][0], alpha=None, dropout=first.dropout,
                    target_modules=list(layers), target_match="exact", modules_to_save=saved)
    if peft_config is not None:
        settings.update(rank=int(peft_config.r), alpha=float(peft_config.lora_alpha),
                        use_rslora=bool(peft_config.use_rslora),
                        rank_pattern={k: int(v) for k, v in (peft_config.rank_pattern or {}).items()},
                        alpha_pattern={k: float(v) for k, v in (peft_config.alpha_pattern or {}).items()})
    config = AdapterConfig(**settings)
    fix_rank = {re.escape(n): layer.rank for n, layer in layers.items() if config.layer_rank(n) != layer.rank}
    config = AdapterConfig(**{**settings, "rank_pattern": {**fix_rank, **config.rank_pattern}})
    root = math.sqrt if config.use_rslora else float
    fix_alpha = {re.escape(n): layer.scaling * root(layer.rank) for n, layer in layers.items()
                 if config.layer_scaling(n) != layer.scaling}
    return AdapterConfig(**{**config.to_dict(), "alpha_pattern": {**fix_alpha, **config.alpha_pattern}})


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


# ----------------------------------------------------------------------------- toolkit → PEFT
def to_peft(model: nn.Module, inplace: bool = False, adapter_name: str = "default"):
    """A ``peft.PeftModel`` (LoRA) with the same ``A``, ``B`` and scaling as the model's
    :class:`LoRALinear` layers and its ``modules_to_save``: identical outputs.

    Works on a deep copy unless ``inplace=True`` (then ``model`` becomes the PEFT model's base).
    Raises ``ValueError`` for what PEFT LoRA cannot hold: MoELoRA / TalkLoRA layers, a B tied across
    layers, merged layers."""
    import peft

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers to convert: inject() first")
    problems = {n: f"is a {type(m).__name__} (a mixture of experts: PEFT has no such layer)"
                for n, m in layers.items() if not isinstance(m, LoRALinear)}
    problems.update({n: "ties its B to other layers (share_B_across_layers): PEFT has one B per layer"
                     for n, m in layers.items() if isinstance(m, LoRALinear) and m.B_is_tied})
    problems.update({n: "is merged: unmerge() it first" for n, m in layers.items() if getattr(m, "merged", False)})
    if problems:
        raise ValueError("to_peft: " + "; ".join(f"{n!r} {why}" for n, why in list(problems.items())[:4]))
    try:
        config = adapter_config(model)
    except ValueError:
        config = None
    work = model if inplace else copy.deepcopy(model)
    layers = adapter_layers(work)
    weights = {n: (m.A.detach().clone(), m.B.detach().clone(), m.scaling) for n, m in layers.items()}
    lora_config = peft.LoraConfig(**_lora_settings(layers, config, list(saved_modules(work))))
    unload(work)                              # the plain base (modules_to_save keep their values)
    peft_model = peft.get_peft_model(work, lora_config, adapter_name=adapter_name)
    base = peft_model.get_base_model()
    for name, (A, B, scaling) in weights.items():
        layer = base.get_submodule(name)
        layer.lora_A[adapter_name].weight.data.copy_(A)
        layer.lora_B[adapter_name].weight.data.copy_(B)
        if layer.scaling[adapter_name] != scaling:    # _lora_settings makes them equal; a bug otherwise
            raise RuntimeError(f"to_peft: PEFT's scaling of {name!r} is {layer.scaling[adapter_name]!r}, "
                               f"ours {scaling!r}")
    return peft_model


def _lora_settings(layers: dict[str, LoRALinear], config: AdapterConfig | None, saved: list[str]) -> dict:
    """``peft.LoraConfig`` arguments giving every layer its rank and scaling exactly: the model's
    AdapterConfig when it has a number alpha, else ``lora_alpha = s · r`` per layer."""
    ranks = Counter(m.rank for m in layers.values())
    first = next(iter(layers.values()))
    out = dict(r=ranks.most_common(1)[0][0], lora_alpha=first.scaling * ranks.most_common(1)[0][0],
               use_rslora=False, rank_pattern={}, alpha_pattern={}, lora_dropout=first.dropout,
               target_modules="|".join(re.escape(n) for n in layers), modules_to_save=saved or None,
               fan_in_fan_out=any(m.fan_in_fan_out for m in layers.values()), bias="none")
    if config is not None and config.alpha is not None:
        out.update(r=config.rank, lora_alpha=config.alpha, use_rslora=config.use_rslora,
                   rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern))
    scale = {True: lambda a, r: a / math.sqrt(r), False: lambda a, r: a / r}[out["use_rslora"]]
    root = math.sqrt if out["use_rslora"] else float
    for name, m in layers.items():
        rank = _pattern_value(out["rank_pattern"], name, out["r"])
        if rank != m.rank:
            out["rank_pattern"] = {re.escape(name): m.rank, **out["rank_pattern"]}
        alpha = _pattern_value(out["alpha_pattern"], name, out["lora_alpha"])
        if scale(alpha, m.rank) != m.scaling:
            out["alpha_pattern"] = {re.escape(name): m.scaling * root(m.rank), **out["alpha_pattern"]}
    return out
