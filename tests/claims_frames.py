"""Hand-built result rows of the settings the empirical claims read (analysis.claims.evidence), for the
table tests: an evaluation sweep, its tuning sweep and C7 budget cells, with the schema the runners
write (analysis/planted.py, analysis/train.py, analysis/lm.py) and every value chosen here.

``setting(runner, means)``: ``means`` maps a method to the mean of each quantity over seeds (``loss``,
``accuracy``, ``gini``, ``gini0`` (step 0), ``entropy`` (gate entropy / log E at the end), ``churn``,
``quotient`` (median routing quotient per kind), ``ratio`` (certified ratio)); per seed a deterministic
normal deviate of size ``sd`` is added (a different one per method, metric and seed).  The tuning sweep
holds the validation values ``tuning`` per method at the best lr (no noise), worse at the other lrs, so
the margins are known exactly.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from analysis import methods

SEEDS = tuple(range(8))
TUNING_SEEDS = (100, 101)
GRID = (1e-3, 1e-2, 1e-1)
BEST_LR = 1e-2
STEPS = 100
KINDS = ("gaussian_input", "gaussian_block", "adversarial")
DEFAULT = dict(loss=0.5, accuracy=0.8, gini=0.3, gini0=0.1, entropy=0.5, churn=0.1, quotient=1.0, ratio=1.0,
               params=1000)


def z(*key) -> float:
    """A deterministic standard normal deviate per key."""
    h = int(hashlib.sha256(repr(key).encode()).hexdigest()[:12], 16)
    return float(np.random.default_rng(h).standard_normal())


def _value(means, method, metric, seed, sd):
    return means[method].get(metric, DEFAULT[metric]) + (sd * z(method, metric, seed) if sd else 0.0)


def _rows(runner, method, seed, means, sd, lr, tuning=False, classification=False, layer="L0"):
    spec = methods.METHODS.get(method)
    routed = spec is not None and spec.routed
    trains = spec is not None and (spec.adapter is not None or runner == "train")   # planted head-only: nothing
    sd = sd if trains else 0.0
    v = lambda m: _value(means, method, m, seed, sd)              # noqa: E731
    loss = v("loss")
    start = means.get("_base", {}).get("loss", 1.0) if trains else loss
    out = [dict(step=0, split="val", layer="all", metric="loss", value=start),
           dict(step=75, split="val", layer="all", metric="loss", value=loss * (1.01 if trains else 1.0)),
           dict(step=STEPS, split="val", layer="all", metric="loss", value=loss)]
    if classification:
        out += [dict(step=STEPS, split="val", layer="all", metric="accuracy", value=v("accuracy"))]
    routing_split = "test" if runner == "lm" else "val"
    layers = ["L0.q_proj", "mean"] if runner == "lm" else [layer]      # the LM: per layer and their mean
    if routed:
        for lay in layers:
            out += [dict(step=0, split=routing_split, layer=lay, metric="gini", value=v("gini0")),
                    dict(step=STEPS, split=routing_split, layer=lay, metric="gini", value=v("gini")),
                    dict(step=0, split=routing_split, layer=lay, metric="load_entropy", value=1 - v("gini0")),
                    dict(step=STEPS, split=routing_split, layer=lay, metric="load_entropy", value=1 - v("gini")),
                    dict(step=STEPS, split=routing_split, layer=lay, metric="token_entropy", value=v("entropy"))]
            churn_split = ("val" if tuning else "test") if runner == "lm" else "probe"
            out += [dict(step=s, split=churn_split, layer=lay, metric=m, value=v("churn") * k)
                    for s in (50, STEPS) for m, k in (("churn", 1.0), ("churn_all", 1.5))]
    if tuning:
        return out
    out.append(dict(step=STEPS, split="test", layer="all", metric="loss", value=loss + 0.01))
    params = means[method].get("params", 1000)
    out += [dict(step=STEPS, split="test", layer="all", metric="trainable_parameters", value=params),
            dict(step=STEPS, split="test", layer="all", metric="closed_form_parameters",
                 value=means[method].get("closed", params))]
    if classification:
        acc = v("accuracy")
        out.append(dict(step=STEPS, split="test", layer="all", metric="accuracy", value=acc))
    if routed:
        for kind in KINDS:
            q = float(np.exp(np.log(means[method].get("quotient", 1.0)) + (sd * z(method, kind, seed) if sd else 0)))
            if runner == "planted":
                out.append(dict(step=STEPS, split="amplification", layer=layer, metric=f"quotient_{kind}", eps=0.1,
                                value=q))
            else:
                out.append(dict(step=-1, split="test", layer=layer, metric="routing_quotient", kind=kind, eps=0.1,
                                statistic="median", value=q))
        if spec.kind == "talklora":
            out.append(dict(step=STEPS, split="test" if runner == "planted" else "weights", layer=layer,
                            metric="certified_ratio", value=means[method].get("ratio", 1.0)))
    return out


def setting(runner: str, means: dict, *, sd: float = 0.01, tuning: dict | None = None, task: str = "topic",
            seeds=SEEDS, examples: dict | None = None, budgets: dict | None = None) -> dict[str, pd.DataFrame]:
    """The experiments of one setting: ``{runner: rows, runner_tuning: rows[, runner_budget: rows]}``.
    ``tuning``: method -> validation values at the best lr (default: the evaluation means);
    ``examples``: method -> per-example correctness probability (classification: ``example_correct`` rows
    drawn deterministically); ``budgets``: {rank: {method: means}} C7 budget cells."""
    classification = runner == "train"
    no_adapter = "base" if runner == "lm" else "head-only"
    rows = []
    for m in means:
        if m == no_adapter and runner == "lm":
            continue
        for s in seeds:
            rows += [dict(r, method=m, seed=s, lr=BEST_LR) for r in _rows(runner, m, s, means, sd, BEST_LR,
                                                                            classification=classification)]
            if examples and m in examples:
                rng = np.random.default_rng(s)                      # the same examples per seed for every method
                u = rng.random(200)
                rows += [dict(step=STEPS, split="test", layer="all", metric="example_correct", example=i, method=m,
                              seed=s, lr=BEST_LR, value=float(u[i] < examples[m])) for i in range(200)]
    if runner == "lm":
        base = means.get(no_adapter, {}).get("loss", 1.0)
        rows += [dict(step=0, split=sp, layer="all", metric="loss", value=base, method="base", seed=-1)
                 for sp in ("val", "test")]
    tun = []
    for m, values in (tuning or {k: v for k, v in means.items() if not (runner == "lm" and k == no_adapter)}).items():
        for lr in GRID:
            worse = 0.0 if lr == BEST_LR else 0.5
            vals = {m: {k: (x + worse if k == "loss" else x) for k, x in values.items()}, "_base": means.get("_base", {})}
            for s in TUNING_SEEDS:
                tun += [dict(r, method=m, seed=s, lr=lr) for r in _rows(runner, m, s, vals, 0.0, lr, tuning=True,
                                                                        classification=classification)]
    out = {runner: pd.DataFrame(rows), f"{runner}_tuning": pd.DataFrame(tun)}
    if budgets:
        b = []
        for rank, per in budgets.items():
            for m in per:
                for s in seeds:
                    b += [dict(r, method=m, seed=s, lr=BEST_LR, budget=rank)
                          for r in _rows(runner, m, s, per, sd, BEST_LR, classification=classification)
                          if r["split"] == "test" and r["layer"] == "all"]
        out[f"{runner}_budget"] = pd.DataFrame(b)
    for name, frame in out.items():
        if runner in ("train", "lm") and len(frame):
            frame["domain"] = "all"
        if runner == "train" and len(frame):
            frame["task"] = task
    return out
