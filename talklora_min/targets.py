"""Which modules an :class:`~talklora_min.AdapterConfig` adapts (PEFT-style target matching):
pattern modes, the per-architecture defaults of ``target_modules=None``, ``"all-linear"``, and the
projection types that ``share_B_across_layers`` ties (docs/method.md §2, §8)."""
from __future__ import annotations

import re

from torch import nn

from .layers import AdapterLayer, is_conv1d

TARGET_MATCHES = ("exact", "suffix", "regex")
OFFICIAL_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
# target_modules=None: the first row with a match in the model, restricted to the names that match.
DEFAULT_TARGETS = (
    OFFICIAL_TARGETS,                                    # Llama, Mistral, Qwen2, Gemma, SmolLM2, Mixtral
    ("c_attn", "c_proj", "c_fc"),                        # GPT-2 family (transformers Conv1D)
    ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),    # T5
    ("query", "key", "value"),                           # BERT, RoBERTa, ViT
    ("q_lin", "k_lin", "v_lin"),                         # DistilBERT
)
ALL_LINEAR = "all-linear"        # every nn.Linear / Conv1D except the output head (as PEFT)


def target_matches(name: str, pattern: str, mode: str) -> bool:
    if mode == "exact":
        return name == pattern
    if mode == "suffix":
        return name == pattern or name.endswith("." + pattern)
    if mode == "regex":
        return re.fullmatch(pattern, name) is not None
    raise ValueError(f"target_match must be one of {TARGET_MATCHES}, got {mode!r}")


def projection_type(name: str) -> str:
    """The module path with every layer index replaced by ``*``: ``model.layers.3.self_attn.q_proj``
    -> ``model.layers.*.self_attn.q_proj``.  ``share_B_across_layers`` ties B within a type.

    One layer stack = an index in the *middle* of the path (``layers.3.``).  A final index is kept:
    the members of ``nn.Sequential(Linear, Linear)`` (``0``, ``1``) are unrelated projections and
    are different types."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)



def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every ``nn.Linear`` / transformers ``Conv1D`` and every adapter layer
    (which stands for the linear it wraps; its own ``base`` is not listed), first name of shared ones."""
    out: dict[str, nn.Module] = {}
    inside: tuple[str, ...] = ()
    for n, m in model.named_modules():
        if inside and n.startswith(inside):
            continue
        if isinstance(m, AdapterLayer):
            inside += (n + ".",)
        if isinstance(m, (nn.Linear, AdapterLayer)) or is_conv1d(m):
            out[n] = m
    return out


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """All names of every module, by ``id`` (a module shared by two parents has two names)."""
    out: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(name)
    return out


def _output_head(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()`` (transformers' LM head), if the model has one."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def resolve_targets(model: nn.Module, config: AdapterConfig) -> dict[str, list[str]]:
    """``{pattern: [module names]}`` of the modules ``config`` adapts in ``model`` (a fresh model, or an
    injected one: an adapter layer counts as the linear it wraps).

    ``target_modules=None``: the first :data:`DEFAULT_TARGETS` row with a match (its matching names,
    suffix match); ``"all-linear"``: every linear except the output head.  Raises ``ValueError`` for a
    pattern that matches nothing (listing the linear layers)."""
    candidates = adaptable_modules(model)
    aliases = _aliases(model)
    if config.target_modules == ALL_LINEAR:
        head = _output_head(model)
        hits = [n for n, m in candidates.items() if head is None or head not in (m, getattr(m, "base", None))]
        if not hits:
            raise ValueError(f"target_modules='all-linear': {type(model).__name__} has no nn.Linear / Conv1D "
                             "besides its output head")
        return {ALL_LINEAR: hits}
    patterns, mode = config.target_modules, config.target_match
    if patterns is None:
        mode = "suffix"
        names = [a for m in candidates.values() for a in aliases[id(m)]]
        patterns = next((tuple(p for p in row if any(target_matches(n, p, mode) for n in names))
                         for row in DEFAULT_TARGETS
                         if any(target_matches(n, p, mode) for n in names for p in row)), None)
        if patterns is None:
            listing = ", ".join(repr(n) for n in list(candidates)[:12]) or "none"
            raise ValueError(f"target_modules=None: no default target of {DEFAULT_TARGETS} is in "
                             f"{type(model).__name__}; name the layers to adapt in AdapterConfig.target_modules "
                             f"(or use 'all-linear'). Its linear layers: {listing}")
    by_pattern = {p: [n for n, m in candidates.items() if any(target_matches(a, p, mode) for a in aliases[id(m)])]
                  for p in patterns}
    for pattern, hits in by_pattern.items():
        if not hits:
            examples = ", ".join(repr(n) for n in list(candidates)[:8]) or "none"
            raise ValueError(f"target pattern {pattern!r} ({mode} match) matched no "
                             f"nn.Linear / Conv1D in {type(model).__name__}; its linear layers include: {examples}")
    return by_pattern
