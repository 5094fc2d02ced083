"""Claim C7 (higher parameter efficiency under comparable parameter budgets) and figure F5.

Rows: ``train`` (the main sweep at the profile's rank) and ``train_budget`` (C7's budgets: TalkLoRA
at rank r, every other method at the rank whose exact count is closest), each cell with its measured
``trainable_parameters`` and the ``closed_form_parameters`` of its adapter config
(:func:`talklora_min.budget.closed_form_parameters`, written by the experiment).  **select** one row per
(task, budget, method, seed) → **compare** the counts with the closed form and the accuracy at every
matched budget → **verdict** → **render**.
"""
from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from .. import methods
from ..plotting import WIDTH, dedupe, legend_below, nice_log, order, sel, summarise
from ..stats import Comparison, Family, combine, fmt, pct
from .base import ClaimSpec, FigureSpec, Outcome, margin
from .helpers import at_last_step, comparison_table, interval_text, md_table, paired, with_task

C7_GAP = 0.02                               # a budget is matched when |count / TalkLoRA's − 1| ≤ 2 %
C7_MIN_BUDGETS = 3
COUNTS = {"trainable_parameters": "params", "closed_form_parameters": "closed"}


# ----------------------------------------------------------------------------- select
def c7_cells(data: dict, default_rank=None) -> pd.DataFrame:
    """One row per (task, budget, method, seed) at the last step: ``rank``, ``params`` (measured),
    ``closed`` (closed form), ``accuracy``, ``loss``; ``budget`` = TalkLoRA's rank (the main sweep's
    rank for ``train``, ``budget`` for ``train_budget``)."""
    talk = methods.reference()
    parts = []
    for name in ("train", "train_budget"):
        tr = data.get(name)
        if tr is None or not len(tr):
            continue
        t = tr[(tr["split"] == "test") & (tr["layer"] == "all") & (tr["step"] >= 0)]
        if "domain" in t:
            t = t[t["domain"] == "all"]
        t = t.assign(task=t["task"] if "task" in t else "task",
                     rank=t["rank"] if "rank" in t else default_rank)
        if name == "train" or "budget" not in t:
            talk_rank = t[t["method"] == talk]["rank"].max() if "rank" in tr else default_rank
            t = t.assign(budget=talk_rank if talk_rank is not None and pd.notna(talk_rank) else 0)
        t = at_last_step(t, ["task", "budget", "method", "seed"])
        t = t[t["metric"].isin(["accuracy", "loss", *COUNTS])]
        parts.append(t.pivot_table(index=["task", "budget", "method", "seed"], columns="metric", values="value",
                                   aggfunc="mean").reset_index()
                     .merge(t.groupby(["task", "budget", "method", "seed"])["rank"].first().reset_index()))
    if not parts:
        return pd.DataFrame(columns=["task", "budget", "method", "seed", "rank", "params", "closed", "accuracy"])
    out = pd.concat(parts, ignore_index=True).rename(columns=COUNTS)
    return out.reindex(columns=list(dict.fromkeys([*out.columns, "params", "closed", "accuracy", "loss"])))


# ----------------------------------------------------------------------------- compare
def count_check(cells: pd.DataFrame) -> tuple[list[list], list[str], list[str]]:
    """``(table rows, mismatches, missing)``: per (method, rank) the measured count (the same for
    every seed and task) against its closed form."""
    rows, mismatch, missing = [], [], []
    for (m, r), g in cells.dropna(subset=["params"]).groupby(["method", "rank"]):
        measured, closed = g["params"], g["closed"].dropna()
        if measured.min() != measured.max():
            mismatch.append(f"{m} r={r}: count differs across seeds")
        if not len(closed):
            missing.append(f"{m} r={fmt(r)}")
            match, cf = "no closed form", math.nan
        else:
            cf = float(closed.max())
            match = "✓" if closed.min() == closed.max() == measured.max() else "✗"
            if match == "✗":
                mismatch.append(f"{m} r={r}: measured {fmt(measured.max())} ≠ closed form {fmt(cf)}")
        rows.append([m, fmt(r), fmt(measured.max()), fmt(cf), match])
    return rows, mismatch, missing


def compare_c7(cells: pd.DataFrame, margin_: float) -> list[dict]:
    """Per (task, budget) and baseline / reported router: the count gap to TalkLoRA, whether the budget
    is matched (|gap| ≤ :data:`C7_GAP`), whether it decides (a baseline at a matched budget) and the
    paired accuracy comparison TalkLoRA − baseline (``None`` without paired rows)."""
    talk = methods.reference()
    baselines = methods.tagged("baseline")
    out = []
    for (task, budget), g in cells.groupby(["task", "budget"]):
        params = g.groupby("method")["params"].median()
        acc = g.pivot_table(index="seed", columns="method", values="accuracy")
        if talk not in params:
            continue
        for b in (*baselines, *methods.tagged("input-router")):
            if b not in params:
                continue
            gap = params[b] / params[talk] - 1
            c = paired(f"MiniLM {task}, budget {fmt(params[talk])} (TalkLoRA r={fmt(budget)}): accuracy "
                       f"TalkLoRA − {b}", acc, talk, b, margin_, "greater")
            out.append(dict(task=task, budget=budget, baseline=b, rank=g[g.method == b]["rank"].max(),
                            params=params[b], gap=gap, matched=bool(abs(gap) <= C7_GAP),
                            decides=bool(abs(gap) <= C7_GAP and b in baselines), comparison=c))
    return out


# ----------------------------------------------------------------------------- verdict
def verdict_c7(decide: list[Comparison], n_budgets: int, mismatch: list[str], missing: list[str]) -> tuple[str, str]:
    """Inconclusive if the counts do not match their closed form; refuted if a matched comparison is
    refuted; holds with ≥ :data:`C7_MIN_BUDGETS` matched budgets on a task where every one holds;
    otherwise inconclusive."""
    verdict = combine(c.verdict for c in decide)
    if mismatch:
        return "inconclusive", "parameter accounting does not match the closed form: " + "; ".join(mismatch)
    if missing:
        return "inconclusive", ("no closed-form parameter count (metric closed_form_parameters) for "
                                + ", ".join(missing))
    if verdict == "refuted":
        return verdict, "at a matched budget TalkLoRA is not more accurate: " + "; ".join(
            f"{c.name} {fmt(c.effect)} [{fmt(c.ci_low)}, {fmt(c.ci_high)}]" for c in decide if c.verdict == "refuted")
    if n_budgets < C7_MIN_BUDGETS:
        return "inconclusive", f"only {n_budgets} matched budget(s) on one task (the rule needs ≥ {C7_MIN_BUDGETS})"
    if verdict == "holds":
        return verdict, f"TalkLoRA more accurate than LoRA and MoELoRA-code at all {n_budgets} matched budgets"
    return verdict, "undecided at some matched budget: " + "; ".join(c.name for c in decide if c.verdict == "inconclusive")


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c7(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C7.rule`` (below) to the saved rows."""
    cfg = config.get("train") or {}
    cells = c7_cells(data, cfg.get("rank"))
    count_rows, mismatch, missing = count_check(cells)
    budgets = compare_c7(cells, margin(config, "c7_accuracy"))
    family = Family.of((b["comparison"] for b in budgets), holm=False)       # 95 %: no multiplicity correction
    decide = [b["comparison"] for b in budgets if b["comparison"] is not None and b["decides"]]
    matched = {(b["task"], b["budget"]) for b in budgets if b["comparison"] is not None and b["decides"]}
    n_budgets = max((sum(1 for t, _ in matched if t == task) for task, _ in matched), default=0)
    verdict, reason = verdict_c7(decide, n_budgets, mismatch, missing)
    budget_rows = [[b["task"], fmt(b["budget"]), b["baseline"], fmt(b["rank"]), fmt(b["params"]),
                    f"{100 * b['gap']:+.2f} %", "yes" if b["matched"] else "no (reported)",
                    interval_text(b["comparison"]), b["comparison"].verdict if b["comparison"] else "n/a"]
                   for b in budgets]
    talk, (code,) = methods.reference(), methods.tagged("baseline", "isolates-communication")
    overhead = rel = math.nan
    main_rank = cfg.get("rank", cells[cells["method"] == talk]["rank"].min() if len(cells) else math.nan)
    p = cells[cells["rank"] == main_rank].groupby("method")["params"].median()
    if talk in p and code in p:
        overhead, rel = p[talk] - p[code], p[talk] / p[code] - 1
    ev = ["- Trainable adapter parameters (classifier head excluded; tied tensors once), measured vs the closed "
          "form the experiment records for the cell's adapter config, A r·d_in + C E·m² + B d_out·r + T E² + "
          "W_r E·r per adapted layer (MoELoRA-input: W_g E·d_in instead of W_r; LoRA: A + B):",
          md_table(["method", "rank", "measured", "closed form", "match"], count_rows) if count_rows else "(no counts)",
          f"- TalkLoRA − MoELoRA-code at the same rank r = {fmt(main_rank)}: {fmt(overhead)} parameters ({pct(rel)}) — "
          f"the E² entries of T per adapted layer.",
          f"- Matched budgets (baseline at the rank whose count is closest to TalkLoRA's; matched when within "
          f"±{100 * C7_GAP:g} %), test accuracy on every test example, paired by seed:",
          md_table(["task", "TalkLoRA rank", "baseline", "its rank", "its params", "gap", "matched", "Δacc [95 %]",
                    "verdict"], budget_rows) if budget_rows else "(no budgets)",
          comparison_table(family) if len(family) else ""]
    key = f"{n_budgets} matched budgets; T adds {fmt(overhead)} params ({pct(rel)}) over MoELoRA-code"
    return Outcome(verdict, reason, key, [e for e in ev if e], comparisons=list(family))


# ----------------------------------------------------------------------------- F5 accuracy vs parameters
def f5_methods() -> tuple[str, ...]:
    """The methods F5 draws: the reference, the baselines and the input router."""
    return (methods.reference(), *methods.tagged("baseline"), *methods.tagged("input-router"))


def prepare_f5(train: pd.DataFrame, train_budget: pd.DataFrame | None = None) -> pd.DataFrame:
    """Test accuracy (mean ± 95 % CI over seeds) and the exact trainable-parameter count per (task,
    budget, method): the main sweep's rank and the C7 budget cells (:func:`c7_cells`)."""
    cells = c7_cells({"train": train, "train_budget": train_budget})
    cells = cells[cells["method"].isin(f5_methods())].dropna(subset=["accuracy"])
    acc = summarise(cells, ["task", "budget", "method"], value="accuracy")
    params = cells.groupby(["task", "budget", "method"])["params"].median().rename("trainable_parameters")
    return acc.merge(params.reset_index(), on=["task", "budget", "method"])


def draw_f5(data: pd.DataFrame):
    data = with_task(data)
    tasks = list(dict.fromkeys(data["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(WIDTH, 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for m in order(data["method"], list(methods.ORDER)):
            d = sel(data, task=task, method=m).sort_values("trainable_parameters")
            if not len(d):
                continue
            ax.errorbar(d["trainable_parameters"], d["mean"], yerr=[d["mean"] - d["lo"], d["hi"] - d["mean"]],
                        fmt=methods.marker(m) + "-", ms=7, mfc="none", mew=1.5, capsize=3,
                        color=methods.color(m), label=methods.label(m))
        lo, hi = sel(data, task=task)["trainable_parameters"].agg(["min", "max"])
        if hi / max(lo, 1) > 1.5:
            ax.set_xscale("log")
            nice_log(ax, "x")
        else:
            pad = max(hi - lo, 0.1 * hi) * 0.12
            ax.set_xlim(lo - pad, hi + pad)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e3:g}k"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{task}", fontsize=10)
        ax.set_xlabel("trainable adapter parameters")
    axes[0, 0].set_ylabel("test accuracy (fraction)")
    fig.tight_layout()
    legend_below(fig, *dedupe(axes), ncol=4, title="mean ± 95% CI over seeds; one point per matched budget")
    return fig


# ----------------------------------------------------------------------------- declarations
C7 = ClaimSpec(
    "C7", paper="higher parameter efficiency under comparable parameter budgets",
    statement=("At matched trainable-parameter budgets (LoRA / MoELoRA-code at the rank whose exact count is "
               "within ±2 % of TalkLoRA's), TalkLoRA-official is more accurate on held-out data."),
    rule=("measured trainable counts must equal the closed form per method and rank (else inconclusive). Per "
          "task and budget (TalkLoRA rank r; baseline at its matched rank, |count gap| ≤ 2 %) and baseline (LoRA, "
          "MoELoRA-code): test accuracy TalkLoRA − baseline on every test example, paired by seed, 95 % "
          "t-interval, margin ±margins.c7_accuracy, docs/method.md §5 verdict. Refuted if any matched comparison "
          "is refuted; holds if there are ≥ 3 matched budgets on a task and every matched comparison holds; "
          "otherwise inconclusive. MoELoRA-input and unmatched budgets are reported only."),
    figures=("F5", "F10"), tests=(r"tests/test_inject\.py::test_(count_parameters|share_B_across_layers)",),
    experiments=("train",), optional=("train_budget",), evaluate=evaluate_c7)
F5 = FigureSpec(
    "F5", "accuracy_vs_parameters", ("train", "train_budget"), prepare_f5, draw_f5, notebook="01_balance.py",
    caption_text=
    "Parameter efficiency ({claims}): test accuracy (every test example; mean ± 95% CI over seeds) vs the exact "
    "trainable adapter parameters, per task, for TalkLoRA, LoRA, MoELoRA-code and MoELoRA-input at each budget "
    "(TalkLoRA at rank r, the others at the rank whose count is closest to TalkLoRA's). The verdict pairs "
    "accuracies by seed and counts only LoRA and MoELoRA-code at budgets whose count is within ±2 % of "
    "TalkLoRA's; MoELoRA-input and unmatched budgets are drawn but only reported.")

CLAIMS = (C7,)
FIGURES = (F5,)
