"""Claim C7 (higher parameter efficiency under comparable parameter budgets) and figure F5.

Rows: every setting's evaluation sweep (the main rank) and its C7 budget cells (``planted_budget`` /
``train_budget``: TalkLoRA at rank r, every other method at the rank whose exact count is closest,
each at its tuned lr), with the measured ``trainable_parameters`` and the ``closed_form_parameters`` of
the cell's adapter config.  **select** one row per (budget, method, seed) → **compare** the counts with
the closed form, and held-out loss (and accuracy for classification) TalkLoRA − LoRA / MoELoRA-code at
every budget whose counts are within ±2 % → **verdict** (a setting needs ≥ 3 matched budgets per
baseline, and P1; docs/method.md §5.5) → **render**.
"""
from __future__ import annotations


import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from .. import methods
from ..plotting import WIDTH, dedupe, legend_below, nice_log, order, sel, summarise
from ..stats import fmt
from . import evidence as ev
from .assay import assays, deciding_methods, levels
from .base import ClaimSpec, FigureSpec, Outcome
from .decide import Paired, claim_verdict, empirical_outcome, judge_family, why_not_testable
from .helpers import md_table

C7_GAP = 0.02                               # a budget is matched when |count / TalkLoRA's − 1| ≤ 2 %
C7_MIN_BUDGETS = 3
MAIN = "main sweep"
METRICS = {"trainable_parameters": "params", "closed_form_parameters": "closed"}


# ----------------------------------------------------------------------------- select
def cells(run: ev.Run) -> pd.DataFrame:
    """One row per (budget, method, seed): ``params`` (measured), ``closed`` (closed form), ``loss``,
    ``accuracy`` at the last step; ``budget`` is :data:`MAIN` for the evaluation sweep, else TalkLoRA's rank."""
    parts = []
    for budget, rows in ((MAIN, run.rows), (None, run.budget)):
        if rows is None or not len(rows):
            continue
        t = rows[(rows["split"] == "test") & (rows["layer"] == "all") & (rows["step"] >= 0) & (rows["seed"] >= 0)]
        if "domain" in t:
            t = t[t["domain"] == "all"]
        t = t[t["metric"].isin(["loss", "accuracy", *METRICS])]
        t = t.assign(budget=budget if budget is not None else t["budget"].astype(int).astype(str))
        t = ev.last_step(t, ("budget", "method", "seed"))
        parts.append(t.pivot_table(index=["budget", "method", "seed"], columns="metric", values="value",
                                   aggfunc="mean").reset_index())
    cols = ["budget", "method", "seed", "params", "closed", "loss", "accuracy"]
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True).rename(columns=METRICS)
    return out.reindex(columns=list(dict.fromkeys([*out.columns, *cols])))


def count_check(c: pd.DataFrame) -> tuple[list[list], list[str]]:
    """``(table rows, mismatches)``: per (budget, method) the measured count (the same for every seed)
    against its closed form; a missing closed form is a mismatch too."""
    rows, bad = [], []
    for (budget, m), g in c.dropna(subset=["params"]).groupby(["budget", "method"]):
        measured, closed = g["params"], g["closed"].dropna()
        ok = len(closed) and measured.min() == measured.max() == closed.min() == closed.max()
        if not ok:
            bad.append(f"{m} at {budget}: measured {fmt(measured.max())} vs closed form "
                       f"{fmt(closed.max()) if len(closed) else 'missing'}")
        rows.append([budget, methods.label(m), fmt(measured.max()), fmt(closed.max()) if len(closed) else "n/a",
                     "✓" if ok else "✗"])
    return rows, bad


def budgets(c: pd.DataFrame, baselines) -> list[dict]:
    """Per budget and baseline: TalkLoRA's count, the baseline's, the gap and whether it is matched."""
    talk, out = methods.reference(), []
    for budget, g in c.groupby("budget", sort=False):
        params = g.groupby("method")["params"].median()
        if talk not in params:
            continue
        for b in baselines:
            if b in params:
                gap = float(params[b] / params[talk] - 1)
                out.append(dict(budget=budget, baseline=b, talk=params[talk], params=params[b], gap=gap,
                                matched=abs(gap) <= C7_GAP))
    return out


# ----------------------------------------------------------------------------- compare
def items_c7(data: dict, config: dict | None = None) -> tuple[list[Paired], list, list, list]:
    """Per setting, budget and baseline: loss (claimed < 0) and accuracy (claimed > 0) TalkLoRA − baseline;
    deciding at matched budgets; a baseline with fewer than :data:`C7_MIN_BUDGETS` matched budgets in a
    setting is not testable there (control ``budgets``).  Also the count and budget table rows, and mismatches."""
    talk, deciding = methods.reference(), deciding_methods("C7")
    reported = methods.tagged("input-router")
    items, tested, table, bad = [], [], [], []
    for a in assays(data, config):
        run = a.run
        c = cells(run)
        if c.empty or talk not in set(c["method"]):
            continue
        counts, mismatch = count_check(c)
        bad += [f"{run.name}: {x}" for x in mismatch]
        found = budgets(c, (*deciding, *reported))
        n_matched = {b: sum(x["matched"] for x in found if x["baseline"] == b) for b in deciding}
        base = a.controls((talk, *deciding))
        controls = {b: a.controls((talk, *deciding), extra={"budgets": n >= C7_MIN_BUDGETS})
                    for b, n in n_matched.items()}
        detail = "; ".join(f"{methods.label(b)}: {v} ({n_matched[b]} matched budgets)" for b, v in controls.items())
        tested.append((a, "passed" if all(v == "passed" for v in controls.values()) else detail or base,
                       f"loss ±{fmt(a.margins.get('loss'))}" + (f", accuracy ±{fmt(a.margins.get('accuracy'))}"
                                                                if run.classification else "")))
        for x in found:
            b, budget = x["baseline"], x["budget"]
            table.append([run.name, budget, methods.label(b), fmt(x["params"]), fmt(x["talk"]), f"{100 * x['gap']:+.2f} %",
                          "yes" if x["matched"] else "no (reported)"])
            for metric, side in (("loss", "less"), ("accuracy", "greater"))[:1 + run.classification]:
                wide = c[c["budget"] == budget].pivot_table(index="seed", columns="method", values=metric)
                d = (wide[talk] - wide[b]).dropna() if talk in wide and b in wide else pd.Series(dtype=float)
                items.append(Paired(f"{run.name}: budget {budget}, {metric} TalkLoRA − {methods.label(b)}",
                                    tuple(d.to_numpy(float)), a.margins.get(metric), side, run.name,
                                    controls.get(b, base), b in deciding and x["matched"]))
        table += [[run.name, "counts", *r] for r in counts]
    return items, tested, table, bad


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c7(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C7.rule`` (below) to the saved rows."""
    items, tested, table, bad = items_c7(data, config)
    comps = judge_family(items, *levels())
    verdict = verdict_c7(comps, bad, why_not_testable(tested, "no setting with TalkLoRA and a baseline at a budget"))
    budget_rows = [r for r in table if r[1] != "counts"]
    count_rows = [[r[0], *r[2:]] for r in table if r[1] == "counts"]
    lines = ["- Trainable adapter parameters (classifier head excluded; tied tensors once), measured vs the closed "
             "form the runner records for the cell's adapter config (A r·d_in + C E·m² + B d_out·r + T + W_r per "
             "adapted layer; MoELoRA-input: W_g instead of W_r; LoRA: A + B):",
             md_table(["setting", "budget", "method", "measured", "closed form", "match"], count_rows)
             if count_rows else "(no counts)",
             f"- Budgets (TalkLoRA at rank r; each baseline at the rank whose count is closest, matched when within "
             f"±{100 * C7_GAP:g} %; a baseline needs ≥ {C7_MIN_BUDGETS} matched budgets in a setting, otherwise its "
             "comparisons there are not testable); held-out loss (and accuracy for classification) paired by seed, "
             "each method at its tuned lr:",
             md_table(["setting", "TalkLoRA rank (budget)", "baseline", "its params", "TalkLoRA params", "gap",
                       "deciding"], budget_rows) if budget_rows else "(no budgets)"]
    return empirical_outcome(comps, tested, verdict, lines=lines)


def verdict_c7(comps, mismatches: list[str], none_testable: str) -> tuple[str, str]:
    """Inconclusive when a measured count differs from its closed form (the budgets are then not known);
    else docs/method.md §5.5 over the comparisons at matched budgets."""
    if mismatches:
        return "inconclusive", "parameter accounting does not match the closed form: " + "; ".join(mismatches[:4])
    return claim_verdict(comps, none_testable)


# ----------------------------------------------------------------------------- F5 held-out loss vs parameters
F5_METRICS = {"loss": "held-out loss", "accuracy": "test accuracy (fraction)"}


def f5_methods() -> tuple[str, ...]:
    """The methods F5 draws: the reference, the baselines and the input router."""
    return (methods.reference(), *methods.tagged("baseline"), *methods.tagged("input-router"))


def prepare_f5(planted=None, planted_budget=None, train=None, train_budget=None) -> pd.DataFrame:
    """Held-out loss and accuracy (mean ± 95 % CI over seeds) and the exact trainable-parameter count per
    (setting, budget, method): the main sweep and the C7 budget cells (:func:`cells`)."""
    data = {k: v for k, v in (("planted", planted), ("planted_budget", planted_budget), ("train", train),
                              ("train_budget", train_budget)) if v is not None}
    parts = []
    for run in ev.runs(data):
        c = cells(run)
        c = c[c["method"].isin(f5_methods())]
        long = c.melt(id_vars=["budget", "method", "seed", "params"], value_vars=["loss", "accuracy"],
                      var_name="metric").dropna(subset=["value"])
        if long.empty:
            continue
        s = summarise(long, ["budget", "method", "metric"])
        params = c.groupby(["budget", "method"])["params"].median().rename("trainable_parameters").reset_index()
        parts.append(s.merge(params, on=["budget", "method"]).assign(source=run.name))
    cols = ["source", "budget", "method", "metric", "mean", "lo", "hi", "n", "trainable_parameters"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def draw_f5(data: pd.DataFrame):
    sources = order(data["source"], list(ev.ORDER)) or ["no data"]
    metrics = [m for m in F5_METRICS if m in set(data["metric"])] or ["loss"]
    fig, axes = plt.subplots(len(metrics), len(sources), figsize=(WIDTH, 3.2 * len(metrics)), squeeze=False)
    for col, source in enumerate(sources):
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            for m in order(data["method"], list(methods.ORDER)):
                d = sel(data, source=source, method=m, metric=metric).sort_values("trainable_parameters")
                if len(d):
                    ax.errorbar(d["trainable_parameters"], d["mean"], yerr=[d["mean"] - d["lo"], d["hi"] - d["mean"]],
                                fmt=methods.marker(m) + "-", ms=7, mfc="none", mew=1.5, capsize=3,
                                color=methods.color(m), label=methods.label(m))
            d = sel(data, source=source, metric=metric)
            if not len(d):
                ax.set_axis_off()
                continue
            lo, hi = d["trainable_parameters"].agg(["min", "max"])
            if hi / max(lo, 1) > 1.5:
                ax.set_xscale("log")
                nice_log(ax, "x")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e3:g}k"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(source, fontsize=10)
            ax.set_xlabel("trainable adapter parameters")
            ax.set_ylabel(F5_METRICS[metric])          # on every drawn panel: a setting may lack a metric
    fig.tight_layout()
    legend_below(fig, *dedupe(axes), ncol=4, title="mean ± 95% CI over seeds; one point per budget")
    return fig


# ----------------------------------------------------------------------------- declarations
C7 = ClaimSpec(
    "C7", paper="higher parameter efficiency under comparable parameter budgets",
    statement=("At matched trainable-parameter budgets (LoRA / MoELoRA-code at the rank whose exact count is within "
               "±2 % of TalkLoRA's, at three budgets or more, each at its tuned lr), TalkLoRA-official reaches a "
               "lower held-out loss (and, for classification, a higher accuracy) in every testable setting."),
    rule=("measured trainable counts must equal the closed form per method and budget (else inconclusive). Per "
          "setting passing P1, budget and baseline (LoRA, MoELoRA-code; preregistration [deciding] C7) at a matched "
          "budget (|count gap| ≤ 2 %): held-out loss TalkLoRA − baseline (claimed < 0, the setting's loss margin) "
          "and, for classification, accuracy (claimed > 0), paired by seed; a baseline with fewer than 3 matched "
          "budgets in a setting is not testable there; Holm over every deciding comparison of the testable "
          "settings; docs/method.md §5.4 per comparison, §5.5 for the claim. MoELoRA-input and unmatched budgets "
          "reported."),
    figures=("F5", "F10"), tests=(r"tests/test_inject\.py::test_(count_parameters|share_B_across_layers)",),
    experiments=(), optional=ev.EXPERIMENTS, evaluate=evaluate_c7, kind="empirical")
F5 = FigureSpec(
    "F5", "loss_vs_parameters", (), prepare_f5, draw_f5, notebook="01_balance.py",
    optional=("planted", "planted_budget", "train", "train_budget"), caption_text=
    "Parameter efficiency ({claims}): held-out loss (top; every test example) and, for classification, test "
    "accuracy (bottom) vs the exact trainable adapter parameters, per setting, for TalkLoRA, LoRA, MoELoRA-code "
    "and MoELoRA-input at each budget (the main sweep, and TalkLoRA at rank r with the others at the rank whose "
    "count is closest); mean ± 95% CI over seeds. The verdict pairs the values by seed and counts only LoRA and "
    "MoELoRA-code at budgets whose count is within ±2 % of TalkLoRA's, and only where a baseline has three such "
    "budgets; MoELoRA-input and unmatched budgets are drawn but only reported.")

CLAIMS = (C7,)
FIGURES = (F5,)
