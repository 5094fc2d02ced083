"""The training protocol shared by every runner (docs/method.md §5, training protocol).

Each method trains at its own learning rate, chosen on the validation split from a declared grid
with tuning seeds disjoint from the evaluation seeds:

1. the **tuning sweep** (experiment ``<runner>_tuning``) trains every (task, method, lr, tuning
   seed) and records the validation loss (``tuning=True`` cells skip the test split and the probes);
2. :func:`select_lr` picks, per (task, method), the lr with the lowest mean final validation loss
   over the tuning seeds (ties: the smaller lr);
3. the **evaluation sweep** trains every (task, method, evaluation seed) at its selected lr.

The learning rate decays with a cosine schedule to 0 over the run (:func:`cosine_schedule`), so the
validation loss flattens by the end; the cells record it at three quarters of the run and at the
end, and the report shows the last-quarter change of the best method.
"""
from __future__ import annotations

import math

import pandas as pd

TUNING_SUFFIX = "_tuning"


def cosine_schedule(optimizer, steps: int):
    """``lr(t) = lr₀ · ½ (1 + cos(π t / steps))``, stepped once per optimiser step (a torch
    ``LambdaLR``; torch is imported here only, so the claims layer can use this module)."""
    import torch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))


def quarter_steps(steps: int) -> set[int]:
    """The steps at which the validation loss is recorded for the flattening check: 3/4 and the end."""
    return {max(1, math.ceil(0.75 * steps)), steps}


def check_disjoint(tuning_seeds, seeds, section: str) -> None:
    from .sections import ConfigError
    both = sorted(set(tuning_seeds) & set(seeds))
    if both:
        raise ConfigError(f"{section}.tuning_seeds: must be disjoint from {section}.seeds, both contain {both}")


def select_lr(rows: pd.DataFrame, by=("task", "method"), metric: str = "loss") -> dict[tuple, float]:
    """``{key: lr}``: per ``by`` group, the lr whose mean final validation ``metric`` over the tuning
    seeds is lowest (ties broken towards the smaller lr).  ``rows``: a tuning sweep's rows."""
    by = [b for b in by if b in rows]
    val = rows[(rows["split"] == "val") & (rows["metric"] == metric) & (rows["layer"] == "all")]
    if "domain" in val:
        val = val[val["domain"] == "all"]
    last = val[val["step"] == val.groupby([*by, "lr", "seed"])["step"].transform("max")]
    mean = last.groupby([*by, "lr"])["value"].mean().reset_index()
    if mean["value"].isna().any():
        bad = mean[mean["value"].isna()].iloc[0].to_dict()
        raise ValueError(f"tuning produced no finite validation {metric} for {bad}")
    mean = mean.sort_values([*by, "value", "lr"], kind="stable")
    best = mean.groupby(by, sort=False).head(1)
    return {tuple(r[b] for b in by): float(r["lr"]) for _, r in best.iterrows()}


def run_tuning(runner: str, fn, keys, tuning_seeds, params: dict, *, results_dir, workers, executor, force,
               config, by=("task", "method")) -> dict[tuple, float]:
    """Run the tuning sweep ``<runner>_tuning`` — ``keys``: ``(cell key, lr grid)`` pairs; every key ×
    lr × tuning seed with ``tuning=True`` — and return :func:`select_lr` of its rows."""
    from .results import Cell, run_sweep

    cells = [Cell(fn, {**key, "lr": float(lr), "seed": seed}, {**params, "tuning": True})
             for key, grid in keys for lr in grid for seed in tuning_seeds]
    result = run_sweep(runner + TUNING_SUFFIX, cells, results_dir=results_dir, workers=workers, executor=executor,
                       force=force, config=config)
    return select_lr(result.rows, by)
