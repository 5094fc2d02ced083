"""Claim C9 (any TalkLoRA advantage over MoELoRA-code persists from a function-matched start) and
figure F8.

Rows: every setting's evaluation sweep (:mod:`analysis.claims.evidence`) — the reference
(TalkLoRA-official) and its function-matched twin (MoELoRA-code with the absorbed router
W' = W_r(T⊗I): the same function at step 0), each at its tuned lr.  **select** per setting the held-out
loss (and accuracy for classification) by seed → **compare** TalkLoRA − twin, paired by seed, one Holm
family over the testable settings (P1, P2 and P3: the twins measurably diverge) → **verdict**
(docs/method.md §5.5) → **render**.  The ``twins`` experiment (MiniLM twins trained at one common lr,
AdamW and SGD, with the other function-matched arms) is reported and drawn in F8.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import methods
from ..plotting import WIDTH, ZERO_FLOOR, dedupe, legend_below, line_ci, order, sel, summarise
from ..stats import fmt
from . import evidence as ev
from .assay import assays, deciding_methods, levels, registration
from .base import ClaimSpec, FigureSpec, Outcome
from .decide import Paired, claim_verdict, empirical_outcome, judge_family, pair, why_not_testable
from .helpers import at_last_step


def twin() -> str:
    """The function-matched twin of the reference (MoELoRA-code with W' = W_r(T⊗I))."""
    (name,) = methods.tagged("function-matched")
    return name


# ----------------------------------------------------------------------------- select / compare
def divergence(a, name: str) -> float:
    """P3: mean over seeds of |held-out loss(reference) − loss(``name``)| / the no-adapter loss."""
    loss = ev.heldout(a.run.rows, "loss")
    if methods.reference() not in loss or name not in loss or not a.no_adapter_loss > 0:
        return math.nan
    return float((loss[methods.reference()] - loss[name]).abs().mean() / a.no_adapter_loss)


def items_c9(data: dict, config: dict | None = None) -> tuple[list[Paired], list]:
    """Per setting: loss (claimed < 0) and, for classification, accuracy (claimed > 0) of the reference
    − each deciding method of C9 (the twin); controls P1, P2 (both routers decisive), P3."""
    talk, deciding = methods.reference(), deciding_methods("C9")
    limit = registration().control("p3_min_relative_divergence")
    items, tested = [], []
    for a in assays(data, config):
        run = a.run
        p3 = {m: divergence(a, m) for m in deciding if m in run.methods()}
        controls = a.controls((talk, *deciding), p2=True, extra={"P3": all(v >= limit for v in p3.values())})
        tested.append((a, controls, f"loss ±{fmt(a.margins.get('loss'))}" + (
            f", accuracy ±{fmt(a.margins.get('accuracy'))}" if run.classification else "") + "; P3 divergence "
            + ", ".join(f"{methods.label(m)} {fmt(v)} (≥ {limit:g})" for m, v in p3.items())))
        for metric, side in (("loss", "less"), ("accuracy", "greater"))[:1 + run.classification]:
            wide = ev.heldout(run.rows, metric)
            for b in deciding:
                p = pair(f"{run.name}: {metric} TalkLoRA − {methods.label(b)}", wide, talk, b, a.margins.get(metric),
                         side, setting=run.name, controls=controls, deciding=True,
                         discordant=ev.discordant(run, talk, b) if metric == "accuracy" else None)
                if p is not None:
                    items.append(p)
    return items, tested


def twin_runs(data: dict, config: dict | None = None) -> list[Paired]:
    """Reported: the ``twins`` experiment (MiniLM, one common lr per optimiser), test loss and accuracy
    TalkLoRA − twin per task × optimiser (95 %; the margins of that MiniLM task's setting)."""
    tw = data.get("twins")
    if tw is None or not len(tw) or "split" not in tw:
        return []
    by_task = {a.run.setting.task: a for a in assays(data, config) if a.run.setting.runner == "train"}
    out = []
    test = tw[(tw["split"] == "test") & (tw["layer"] == "all")]
    gone = tw[(tw["metric"] == "diverged") & (tw["value"] > 0)] if "metric" in tw else tw.iloc[:0]
    key = "task" if "task" in test else "optimizer"
    for (task, opt), g in test.groupby([key, "optimizer"]):
        a = by_task.get(task)
        lost = sorted(set(gone[(gone[key] == task) & (gone["optimizer"] == opt)]["seed"]))
        note = f" ({len(lost)} seed(s) diverged and are left out: {', '.join(map(str, lost))})" if lost else ""
        for metric, side in (("loss", "less"), ("accuracy", "greater")):
            wide = at_last_step(g[g["metric"] == metric], ["model", "seed"]).pivot_table(
                index="seed", columns="model", values="value")
            margin = a.margins.get(metric) if a is not None else math.nan
            p = pair(f"twin runs {task}, {opt}: {metric} TalkLoRA − twin{note}", wide, methods.reference(), twin(), margin,
                     side, setting=f"twins ({task}, {opt}, common lr)", controls="passed", deciding=False)
            if p is not None:
                out.append(p)
    return out


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c9(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C9.rule`` (below) to the saved rows."""
    items, tested = items_c9(data, config)
    conf, power = levels()
    comps = judge_family(items, conf, power) + judge_family(twin_runs(data, config), conf, power)
    lines = ["- Held-out loss on every test example at the last step (and accuracy for classification), TalkLoRA − "
             "its function-matched twin (the same function at step 0), paired by seed, each at its tuned lr. P3: the "
             "twins must measurably diverge (mean |Δ held-out loss| / no-adapter loss at least the preregistered "
             "threshold), else there is nothing to compare. The `twins` experiment (MiniLM twins at one common lr, "
             "F8) is reported, not deciding."]
    return empirical_outcome(comps, tested, verdict_c9(comps, why_not_testable(tested)), lines=lines)


def verdict_c9(comps, none_testable: str) -> tuple[str, str]:
    """docs/method.md §5.5 over the twin comparisons of the settings passing P1, P2 and P3."""
    return claim_verdict(comps, none_testable)


# ----------------------------------------------------------------------------- F8 twin divergence
F8_ROWS = {"logit_diff": "logit distance to TalkLoRA\n(max |Δ| solid, mean |Δ| dashed)",
           "accuracy_gap": "accuracy − TalkLoRA's\n(probe set; test at the end)",
           "gini_gap": "Gini − TalkLoRA's\n(mean over layers)"}


def prepare_f8(twins: pd.DataFrame) -> pd.DataFrame:
    """Logit distance and accuracy / Gini gaps to the reference (TalkLoRA-official) per (optimizer,
    model, step), mean and 95 % CI over seeds (the logit distance geometric): the probe set at every
    checkpoint, accuracy on every test example at the last step."""
    talk = methods.reference()
    if "split" in twins:
        twins = twins[twins["split"].isin(["probe", "test"])]
    parts = []
    diff = sel(twins, metric=["logit_maxabs_diff", "logit_meanabs_diff"])
    diff = diff[diff["model"] != talk]
    parts.append(summarise(diff.assign(panel="logit_diff"), ["panel", "optimizer", "model", "metric", "step"],
                           log_floor=ZERO_FLOOR))        # geometric mean and interval (log axis)
    for metric, panel in (("accuracy", "accuracy_gap"), ("gini", "gini_gap")):
        d = sel(twins, metric=metric)
        d = d[d["layer"] == "all"] if metric == "accuracy" else d[d["layer"] != "all"]
        d = d.groupby(["optimizer", "seed", "step", "model"], as_index=False)["value"].mean()
        ref = d[d["model"] == talk].set_index(["optimizer", "seed", "step"])["value"]
        d = d[d["model"] != talk]
        d = d.assign(value=d["value"].to_numpy() - ref.reindex(pd.MultiIndex.from_frame(
            d[["optimizer", "seed", "step"]])).to_numpy(), metric=metric + "_gap", panel=panel)
        parts.append(summarise(d, ["panel", "optimizer", "model", "metric", "step"]))
    return pd.concat(parts, ignore_index=True)


def draw_f8(data: pd.DataFrame):
    opts = order(data["optimizer"], ["adamw", "sgd"])
    panels = [p for p in F8_ROWS if p in set(data["panel"])]
    fig, axes = plt.subplots(len(panels), len(opts), figsize=(WIDTH, 2.3 * len(panels) + 0.5),
                             squeeze=False, sharex=True, sharey="row")
    for i, panel in enumerate(panels):
        for j, opt in enumerate(opts):
            ax = axes[i, j]
            for model in order(data["model"], list(methods.tagged("twin-arm"))):
                for metric in sorted(set(sel(data, panel=panel)["metric"])):
                    d = sel(data, panel=panel, optimizer=opt, model=model, metric=metric)
                    if len(d):
                        log = panel == "logit_diff"
                        line_ci(ax, d, "step", color=methods.color(model),
                                marker=methods.marker(model) if "mean" not in metric else "",
                                ls="--" if "meanabs" in metric else "-", floor=ZERO_FLOOR if log else None,
                                label=methods.label(model) if "mean" not in metric else None)
            if panel == "logit_diff":
                ax.set_yscale("log")
                ax.axhline(ZERO_FLOOR, color="0.5", ls=":", lw=0.8)
                ax.set_ylim(bottom=ZERO_FLOOR / 3)
            else:
                ax.axhline(0, color="0.3", lw=0.8)
                vals = sel(data, panel=panel)[["lo", "hi"]].to_numpy(float)
                span = np.nanmax(np.abs(vals)) if vals.size else 0.0
                if not span > 1e-12:
                    ax.set_ylim(-0.05, 0.05)   # identical to TalkLoRA throughout
            if i == 0:
                ax.set_title(f"optimizer: {opt}", fontsize=10)
            if j == 0:
                ax.set_ylabel(F8_ROWS[panel], fontsize=9)
            if i == len(panels) - 1:
                ax.set_xlabel("training step")
    if "logit_diff" in panels:
        axes[0, 0].text(0.02, 0.09, "dotted: exact 0 (drawn at 1e-9)", transform=axes[0, 0].transAxes,
                        fontsize=7.5, color="0.4")
    fig.tight_layout()
    legend_below(fig, *dedupe(axes), ncol=4, title="model (twin of TalkLoRA; shaded: 95% CI over seeds)")
    return fig



# ----------------------------------------------------------------------------- declarations
C9 = ClaimSpec(
    "C9", paper="any TalkLoRA advantage over MoELoRA-code persists from a function-matched start",
    statement=("Starting from the same function (the MoELoRA-code twin with W' = W_r(T⊗I)), trained on the same "
               "batches at its own tuned learning rate, TalkLoRA's parameterisation alone gives a lower held-out "
               "loss (and, for classification, a higher accuracy) in every testable setting."),
    rule=("per setting passing P1, P2 (TalkLoRA and the twin route decisively) and P3 (the twins measurably "
          "diverge: mean |Δ held-out loss| / no-adapter loss ≥ controls.p3_min_relative_divergence): paired by "
          "seed, held-out loss TalkLoRA − twin (claimed < 0, the setting's loss margin) and, for classification, "
          "accuracy (claimed > 0; zero seed-level variance: exact McNemar per example); Holm over every deciding "
          "comparison of the testable settings; docs/method.md §5.4 per comparison, §5.5 for the claim. The "
          "common-lr twin runs (`twins`, F8) are reported."),
    figures=("F8", "F10"), tests=(), experiments=(), optional=(*ev.EXPERIMENTS, "twins"), evaluate=evaluate_c9,
    kind="empirical")

F8 = FigureSpec(
    "F8", "twin_divergence", ("twins",), prepare_f8, draw_f8, notebook="04_twins.py", caption_text=
    "Function-matched twins ({claims}): the models of the twin experiment that compute TalkLoRA's function at "
    "step 0 (MoELoRA-code with the absorbed router; where run, TalkLoRA with frozen T and TalkLoRA with T = I "
    "and the absorbed router), trained on the same batches at one common lr per optimiser. Top: logit distance "
    "to TalkLoRA on the fixed probe set (max |Δ| solid, mean |Δ| dashed; log scale; geometric mean and interval "
    "over seeds); below: accuracy gap (probe set at the checkpoints, every test example at the last step) and "
    "Gini gap to TalkLoRA (mean over layers). Columns: optimizer. Shaded: 95% CI over seeds. These runs are "
    "reported, not deciding: the verdict reads TalkLoRA − twin in every testable setting's evaluation sweep, "
    "each at its own tuned lr, with P3 (the twins diverge) required.")

CLAIMS = (C9,)
FIGURES = (F8,)
