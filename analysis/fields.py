"""Field validators and run-time limits of the experiment config sections (:mod:`analysis.sections`).

Every validator raises :class:`ConfigError` with a message that starts with ``section.field:`` and
says what is accepted; the limits keep every cell's tensors and generators within what torch and a
workstation accept, so a config that validates runs.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


class ConfigError(ValueError):
    """An invalid experiment configuration; the message starts with ``section.field:``."""


# ----------------------------------------------------------------------------- run-time limits
# Bounds on what the cells can do, checked here so that a value out of range fails before any
# work instead of in every cell.  Seeds are mixed into torch generator seeds (``1_000_003 * seed +
# offset``), which must fit in 64 bits; sizes are capped where a larger value would only exhaust
# the memory (every bound is far above the profiles).
MAX_SEED = 2**32 - 1
MAX_STEPS = 1_000_000
MAX_WIDTH = 8192                 # perturb.d_in / d_out (a weight matrix of at most 512 MiB in float64)
MAX_TOKEN_ELEMENTS = 2**26       # perturb.n_tokens x max(d_in, d_out): one token matrix of 512 MiB in float64
MAX_EXPERTS = 64
MAX_SYNTHETIC_RANK = 1024
MAX_MC_DRAWS = 200_000           # rows are stored per draw: 400,000 rows per cell at most
MAX_PGD_STEPS = 1000
MAX_SENTENCES = 1024             # perturb.n_sentences, drawn from the 7-way corpus (smallest class ~300)
MAX_BATCH = 4096
MINILM_WIDTH, SMOLLM_WIDTH = 384, 576    # hidden sizes: an adapter rank above them adds nothing
# Examples per class of the two training tasks in the pinned data packs (after deduplication; the
# split draws exactly n_val + n_test of them, stratified, and must leave training examples).
TASK_CLASS_SIZES = {"sentiment": (7368, 5384), "topic": (502, 365, 399, 502, 337)}


# ----------------------------------------------------------------------------- validators
def _fail(name: str, what: str, value: Any) -> None:
    raise ConfigError(f"{name}: must be {what}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(name, v, lo=None, hi=None) -> int:
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        _fail(name, f"an int{rng}", v)
    return v


def _float(name, v, lo=None, hi=None, lo_open=False) -> float:
    ok = _is_num(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
    if not ok:
        rng = ""
        if lo is not None:
            rng = f" {'>' if lo_open else '>='} {lo}"
        if hi is not None:
            rng += f" and <= {hi}"
        _fail(name, f"a finite number{rng}", v)
    return float(v)


def _int_list(name, v, lo=None, unique=True, hi=None) -> list[int]:
    if not isinstance(v, (list, tuple)) or not v or not all(_is_int(x) for x in v):
        _fail(name, "a non-empty list of ints", v)
    if hi is not None and any(x < lo or x > hi for x in v):
        _fail(name, f"a non-empty list of ints in [{lo}, {hi}]", v)
    if lo is not None and any(x < lo for x in v):
        _fail(name, f"a non-empty list of ints >= {lo}", v)
    if unique and len(set(v)) != len(v):
        _fail(name, "a list of distinct ints", v)
    return list(v)


def _float_list(name, v, lo=None, lo_open=False) -> list[float]:
    if not isinstance(v, (list, tuple)) or not v or not all(_is_num(x) for x in v):
        _fail(name, "a non-empty list of finite numbers", v)
    if lo is not None and any((x <= lo) if lo_open else (x < lo) for x in v):
        _fail(name, f"a non-empty list of numbers {'>' if lo_open else '>='} {lo}", v)
    if len(set(v)) != len(v):
        _fail(name, "a list of distinct numbers", v)
    return [float(x) for x in v]


def _seeds(name, v) -> list[int]:
    """Distinct seeds in ``[0, MAX_SEED]`` (they are mixed into 64-bit torch generator seeds)."""
    return _int_list(name, v, lo=0, hi=MAX_SEED)


def _split_fits(name: str, tasks, n_val, n_test) -> None:
    """Every task in ``tasks`` has room for ``n_val`` + ``n_test`` held-out examples, stratified by
    class (each class gives at most ceil(n * class / total) to each), with training examples left."""
    for task in tasks:
        sizes = TASK_CLASS_SIZES.get(task)
        if sizes is None:
            continue
        total = sum(sizes)
        held = [-(-n_val * c // total) - (-n_test * c // total) for c in sizes]
        if any(h >= c for h, c in zip(held, sizes)):
            _fail(name, f"an int with train.n_val + train.n_test small enough to leave training examples in "
                  f"every class of task {task!r} (class sizes {list(sizes)}; train.n_val = {n_val})", n_test)


def _choice_list(name, v, choices) -> list[str]:
    if (not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) for x in v)
            or any(x not in choices for x in v) or len(set(v)) != len(v)):
        _fail(name, f"a non-empty list of distinct values from {list(choices)}", v)
    return list(v)


def _choice(name, v, choices) -> str:
    if v not in choices:
        _fail(name, f"one of {list(choices)}", v)
    return v


def _schedule(section: str, steps, eval_every) -> None:
    """``1 <= steps <= MAX_STEPS`` and ``1 <= eval_every <= steps`` (the training sections share this)."""
    _int(f"{section}.steps", steps, lo=1, hi=MAX_STEPS)
    _int(f"{section}.eval_every", eval_every, lo=1)
    if eval_every > steps:
        _fail(f"{section}.eval_every", f"an int <= {section}.steps ({steps})", eval_every)


def _expert_split(section: str, rank, num_experts, max_rank: int) -> None:
    """``1 <= rank <= max_rank``, ``1 <= num_experts <= MAX_EXPERTS`` and ``rank`` a multiple of
    ``num_experts`` (m = r / E)."""
    _int(f"{section}.rank", rank, lo=1, hi=max_rank)
    _int(f"{section}.num_experts", num_experts, lo=1, hi=MAX_EXPERTS)
    if rank % num_experts:
        _fail(f"{section}.rank", f"a multiple of {section}.num_experts ({num_experts})", rank)


def _talk_setting(name, v) -> str:
    """'identity' | 'official' | 'uniform-mix:<alpha in [0, 1]>' (docs/method.md §1 talk_init)."""
    ok = v in ("identity", "official")
    if isinstance(v, str) and v.startswith("uniform-mix:"):
        try:
            ok = 0.0 <= float(v.split(":", 1)[1]) <= 1.0
        except ValueError:
            ok = False
    if not ok:
        _fail(name, "'identity', 'official' or 'uniform-mix:<alpha in [0, 1]>'", v)
    return v


class _Section:
    """Shared dict/JSON helpers for the section dataclasses."""

    SECTION = ""

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))      # tuples -> lists, deep copy

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ConfigError(f"[{cls.SECTION}]: must be a table, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{cls.SECTION}.{unknown[0]}: unknown key (unknown: {unknown}); "
                              f"accepted keys: {names}")
        return cls(**data)
