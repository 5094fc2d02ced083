"""The settings an empirical claim is judged in, read from the saved results (docs/method.md §5.2, §7),
and the quantities the claims and controls read from each.

A :class:`Run` is one setting's rows: its evaluation sweep, its tuning sweep (the lr selection, where
the margins come from) and its C7 budget cells.  :func:`runs` finds every setting present:

=============  ==========================  ==============================================
experiment     setting                     tuning / budget sweeps
=============  ==========================  ==============================================
``planted``    ``planted-teacher``         ``planted_tuning`` / ``planted_budget``
``train``      per ``task``: ``for_task``  ``train_tuning`` / ``train_budget`` (same task)
``lm``         ``smollm2-lm``              ``lm_tuning``
``custom``     per ``setting`` column      ``custom_tuning`` (same setting) / none
=============  ==========================  ==============================================

A setting absent from the results is simply absent.  The selectors return per-seed frames (rows:
evaluation seeds, columns: methods), the shape every paired comparison reads.  Pure pandas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from .. import methods, settings

SWEEPS = {"planted": ("planted", "planted_tuning", "planted_budget"),
          "train": ("train", "train_tuning", "train_budget"),
          "lm": ("lm", "lm_tuning", None),
          "custom": ("custom", "custom_tuning", None)}
EXPERIMENTS = tuple(dict.fromkeys(e for sweeps in SWEEPS.values() for e in sweeps if e))
ORDER = tuple(s.name for runner in SWEEPS for s in settings.SETTINGS.values() if s.runner == runner)   # for plots
LM_BASE = "base"                      # the frozen-base cell of the lm experiment (seed −1)


@dataclass(frozen=True)
class Run:
    """One setting's rows.  ``rows``: the evaluation sweep; ``tuning`` / ``budget``: its tuning sweep
    and C7 budget cells (``None`` when absent); ``steps``: the training length that ran."""
    setting: settings.Setting
    rows: pd.DataFrame
    tuning: Optional[pd.DataFrame] = None
    budget: Optional[pd.DataFrame] = None

    @property
    def name(self) -> str:
        return self.setting.name

    @property
    def steps(self) -> int:
        s = self.rows[self.rows["split"] == "val"]["step"]
        return int(s.max()) if len(s) else int(self.rows["step"].max())

    @property
    def wording(self) -> str:
        """How the report names the setting, e.g. ``MiniLM-L6, top layer(s), q/k/v/up/down, 200 steps, BBC topics``."""
        return self.setting.wording(self.steps)

    @property
    def classification(self) -> bool:
        return self.setting.objective == "classification"

    @property
    def routing_split(self) -> str:
        """Where the end-of-training routing is measured (C6, P2): held-out tokens for the LM
        (its cells measure routing on ``test`` at every checkpoint), the validation split otherwise."""
        return "test" if self.setting.runner == "lm" else "val"

    @property
    def churn_split(self) -> str:
        return "test" if self.setting.runner == "lm" else "probe"

    @property
    def no_adapter(self) -> str:
        """The P1 reference: the frozen base cell for the LM, the registry's no-adapter entry otherwise."""
        return LM_BASE if self.setting.runner == "lm" else methods.tagged("no-adapter")[0]

    def methods(self) -> list[str]:
        return [m for m in dict.fromkeys(self.rows["method"]) if m != LM_BASE]


def _custom_setting(name: str, objective: str, config: dict | None) -> settings.Setting:
    user = (config or {}).get("setting") or {}
    if user.get("name") == name:
        return settings.UserSetting(**user).as_setting(objective)
    return settings.Setting(name, "custom", name, "user model", objective, f"user setting {name}",
                            "user-chosen layers", description="user setting (its [setting] table was not given)")


def runs(data: dict, config: dict | None = None) -> list[Run]:
    """Every setting present in ``data`` (experiment name -> rows), in the order planted, MiniLM tasks,
    SmolLM2, user settings."""
    out = []
    for runner, (evaluation, tuning, budget) in SWEEPS.items():
        rows = data.get(evaluation)
        if rows is None or not len(rows):
            continue
        extra = {k: data.get(e) for k, e in (("tuning", tuning), ("budget", budget))}
        if runner == "train":
            for task, g in rows.groupby("task", sort=False):
                part = {k: (v[v["task"] == task] if v is not None and "task" in v else None) for k, v in extra.items()}
                out.append(Run(settings.for_task("train", str(task)), g, **part))
        elif runner == "custom":
            for name, g in rows.groupby("setting", sort=False):
                objective = str(g["objective"].iloc[0]) if "objective" in g else "classification"
                t = extra["tuning"]
                t = t[t["setting"] == name] if t is not None and "setting" in t else None
                out.append(Run(_custom_setting(str(name), objective, config), g,
                               tuning=t if t is not None and len(t) else None))
        else:
            out.append(Run(settings.for_task(runner, runner if runner == "planted" else "three-domain"), rows,
                           **{k: v if v is not None and len(v) else None for k, v in extra.items()}))
    return out


# ----------------------------------------------------------------------------- selectors
def _model_level(rows: pd.DataFrame) -> pd.DataFrame:
    """Model-level rows (``layer = all``; ``domain = all`` where the column exists)."""
    r = rows[rows["layer"] == "all"]
    return r[r["domain"] == "all"] if "domain" in r else r


def last_step(rows: pd.DataFrame, keys=("method", "seed")) -> pd.DataFrame:
    """The rows at the last step of each group ``keys``."""
    if rows.empty:
        return rows
    return rows[rows["step"] == rows.groupby(list(keys))["step"].transform("max")]


def wide(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ``value`` per seed (rows) and method (columns)."""
    if rows.empty:
        return pd.DataFrame()
    return rows.groupby(["seed", "method"])["value"].mean().unstack("method")


def heldout(rows: pd.DataFrame, metric: str = "loss") -> pd.DataFrame:
    """Seed × method: held-out ``metric`` at the last step (``split = test``, model level; evaluation
    and budget rows alike).  The LM's frozen-base cell (seed −1) is left out (see :func:`no_adapter_heldout`)."""
    r = _model_level(rows[(rows["split"] == "test") & (rows["metric"] == metric) & (rows["step"] >= 0)])
    return wide(last_step(r[r["seed"] >= 0]))


def no_adapter_heldout(run: Run) -> float:
    """Mean held-out loss of the no-adapter reference over the evaluation seeds (the LM's frozen base:
    its one cell)."""
    r = _model_level(run.rows[(run.rows["split"] == "test") & (run.rows["metric"] == "loss")
                              & (run.rows["method"] == run.no_adapter)])
    r = last_step(r)
    return float(r["value"].mean()) if len(r) else math.nan


def routed_layers(rows: pd.DataFrame, run: Run) -> pd.DataFrame:
    """Per-layer routing rows: the LM's layer-mean rows, every routed layer elsewhere."""
    if run.setting.runner == "lm":
        return rows[rows["layer"] == "mean"]
    return rows[~rows["layer"].isin(["all", "mean"])]


def routing(run: Run, metric: str, rows: pd.DataFrame | None = None, split: str | None = None) -> dict[str, pd.DataFrame]:
    """``{"start": …, "end": …}`` seed × method frames of ``metric`` (gini, load_entropy, token_entropy)
    averaged over routed layers, at step 0 and at the last step, on :attr:`Run.routing_split`."""
    rows = run.rows if rows is None else rows
    r = routed_layers(rows[(rows["split"] == (split or run.routing_split)) & (rows["metric"] == metric)
                           & (rows["step"] >= 0) & (rows["seed"] >= 0)], run)
    return {"start": wide(r[r["step"] == 0]), "end": wide(last_step(r))}


def churn(run: Run, rows: pd.DataFrame | None = None, split: str | None = None, metric: str = "churn") -> pd.DataFrame:
    """Seed × method: ``metric`` (churn among decided tokens) averaged over checkpoints and routed layers."""
    rows = run.rows if rows is None else rows
    r = routed_layers(rows[(rows["split"] == (split or run.churn_split)) & (rows["metric"] == metric)], run)
    return wide(r)


def amplification(run: Run) -> pd.DataFrame:
    """Long frame ``method, seed, kind, eps, value``: log of the median routing quotient of the trained
    routers, averaged over adapted layers (MiniLM router probes at ``step = −1``; planted
    ``split = amplification``, ``metric = quotient_<kind>``)."""
    rows = run.rows
    if run.setting.runner == "planted":
        r = rows[(rows["split"] == "amplification") & rows["metric"].astype(str).str.startswith("quotient_")]
        r = r.assign(kind=r["metric"].str.slice(len("quotient_")))
    elif {"kind", "statistic", "eps"} <= set(rows.columns):
        r = rows[(rows["step"] == -1) & (rows["metric"] == "routing_quotient") & (rows["statistic"] == "median")]
    else:
        r = rows.iloc[:0].assign(kind=[])
    if "eps" not in r or r.empty:
        return pd.DataFrame(columns=["method", "seed", "kind", "eps", "value"])
    r = r[(r["value"] > 0) & (r["eps"] > 0)]
    r = r.assign(value=np.log(r["value"].astype(float)))
    return r.groupby(["method", "seed", "kind", "eps"], as_index=False)["value"].mean()


def certified(run: Run) -> pd.DataFrame:
    """Long frame ``method, seed, layer, value``: the certified ratio ‖W_r(T⊗I)‖₂/‖W_r‖₂ of every
    trained talk layer (planted: ``split = test``; MiniLM / LM: ``split = weights``)."""
    split = "test" if run.setting.runner == "planted" else "weights"
    r = run.rows[(run.rows["split"] == split) & (run.rows["metric"] == "certified_ratio")]
    return r[["method", "seed", "layer", "value"]]


def discordant(run: Run, a: str, b: str) -> tuple[int, int, int] | None:
    """Pooled over seeds and test examples: ``(#a right and b wrong, #b right and a wrong, #pairs)``
    from the per-example rows (``example_correct``); ``None`` without them."""
    rows = run.rows
    if "example" not in rows:
        return None
    r = rows[(rows["metric"] == "example_correct") & rows["method"].isin([a, b])]
    if r.empty:
        return None
    piv = r.pivot_table(index=["seed", "example"], columns="method", values="value", aggfunc="first")
    if a not in piv or b not in piv:
        return None
    piv = piv[[a, b]].dropna()
    return (int(((piv[a] == 1) & (piv[b] == 0)).sum()), int(((piv[a] == 0) & (piv[b] == 1)).sum()), len(piv))


def tuned_lrs(run: Run) -> dict[str, float]:
    """The lr each method trained at in the evaluation sweep (its ``lr`` key column; a method that
    trains nothing, e.g. planted head-only at lr 0, has none)."""
    if "lr" not in run.rows:
        return {}
    lr = run.rows[run.rows["seed"] >= 0].groupby("method")["lr"].first()
    return {m: float(v) for m, v in lr.items() if pd.notna(v) and v > 0}


def val_loss(rows: pd.DataFrame) -> pd.DataFrame:
    """Long frame ``method, seed, step, value``: the validation loss (model level) at every recorded step."""
    r = _model_level(rows[(rows["split"] == "val") & (rows["metric"] == "loss")])
    return r[["method", "seed", "step", "value"] + (["lr"] if "lr" in r else [])]
