"""Evidence topic **twins**: claim C9 (function-matched twin runs) and figure F8.

Notebook: ``notebooks/04_twins.py``.  Rows: the ``twins`` experiment (TalkLoRA and three models
that compute its function at step 0, trained on the same batches, per optimiser and seed).
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..evidence import ClaimSpec, FigureSpec, Outcome, Topic, md_table
from ..plotting import (TWIN_COLORS, TWIN_MARKERS, WIDTH, ZERO_FLOOR, dedupe, legend_below, line_ci, order,
                        sel, summarise)
from ..stats import fmt, paired

C9_MARGIN = 0.01                            # accuracy difference that counts as "no advantage"
TWIN_IDENTICAL_ATOL = 1e-5                  # = analysis.twins.MATCH_ATOL: twins agree to this at step 0


# C9 -------------------------------------------------------------------------
def evaluate_c9(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C9.rule`` (below) to the saved rows."""
    tw = data["twins"]
    cfg = config.get("twins") or {}
    per_opt, rows, div_rows = {}, [], []
    for opt, g in tw.groupby("optimizer"):
        a = g[(g.metric == "accuracy") & (g.layer == "all")]
        last = int(a.step.max())
        aw = a[a.step == last].groupby(["seed", "model"]).value.mean().unstack("model")
        d = paired(aw, "talklora", "moelora-twin")
        dv = g[(g.metric == "logit_maxabs_diff") & (g.step == last) & (g.model == "moelora-twin")].value
        identical = len(dv) > 0 and float(dv.max()) <= TWIN_IDENTICAL_ATOL
        within = d.n >= 2 and math.isfinite(d.lo) and -C9_MARGIN < d.lo and d.hi < C9_MARGIN
        if d.direction == "above":
            v, why = "holds", f"TalkLoRA ahead of its twin by {d.text()}"
        elif d.direction == "below":
            v, why = "refuted", f"the MoELoRA twin is ahead: {d.text()}"
        elif identical:
            v, why = "refuted", (f"the twins still compute the same function at the last step (max |Δlogit| "
                                 f"{fmt(float(dv.max()))} ≤ {TWIN_IDENTICAL_ATOL:g}, the step-0 matching "
                                 f"tolerance): no advantage can exist")
        elif within:
            v, why = "refuted", f"no advantage: interval {d.text()} inside ±{C9_MARGIN:g}"
        else:
            v, why = "inconclusive", f"interval includes 0 and exceeds ±{C9_MARGIN:g}: {d.text()}"
        lr = cfg.get("lr_adamw" if opt == "adamw" else "lr_sgd")
        name = f"{opt} (lr {lr:g})" if lr is not None else str(opt)
        per_opt[name] = (v, why, d)
        rows.append([name, last, d.text(), paired(aw, "talklora", "talklora-frozen-T").text(),
                     paired(aw, "talklora", "talklora-identity").text(), v])
        div_rows.append([name, fmt(float(dv.mean())) if len(dv) else "n/a", fmt(float(dv.max())) if len(dv) else "n/a"])
    vs = [v for v, _, _ in per_opt.values()]
    if not vs:
        verdict, reason = "inconclusive", "no twin rows"
    elif all(v == "holds" for v in vs):
        verdict, reason = "holds", "; ".join(f"{k}: {w}" for k, (_, w, _) in per_opt.items())
    elif "holds" in vs:
        verdict = "holds under stated conditions"
        reason = "only with " + ", ".join(k for k, (v, _, _) in per_opt.items() if v == "holds") + "; " + \
                 "; ".join(f"{k}: {w}" for k, (_, w, _) in per_opt.items())
    elif all(v == "refuted" for v in vs):
        verdict, reason = "refuted", "; ".join(f"{k}: {w}" for k, (_, w, _) in per_opt.items())
    else:
        verdict, reason = "inconclusive", "; ".join(f"{k}: {v} — {w}" for k, (v, w, _) in per_opt.items())
    key = "; ".join(f"{k}: Δacc {d.text()}" for k, (_, _, d) in per_opt.items())
    wd = cfg.get("weight_decay")
    ev = ["- Final-step validation accuracy differences (paired by seed, 95 % t-interval). All four "
          "models compute the same function at step 0 and see the same batches; only the "
          "parameterisation differs" + (f" (weight decay {wd:g} for AdamW)" if wd is not None else "") + ":",
          md_table(["optimiser", "last step", "TalkLoRA − MoELoRA-twin", "TalkLoRA − TalkLoRA(frozen T)",
                    "TalkLoRA − TalkLoRA(T=I, W_r=W')", "verdict"], rows),
          "- Divergence of the MoELoRA twin from TalkLoRA at the last step (max |Δlogit| on a fixed "
          "held-out batch):",
          md_table(["optimiser", "mean over seeds", "max over seeds"], div_rows)]
    return Outcome(verdict, reason, key, ev)


# ----------------------------------------------------------------------------- F8 twin divergence
F8_ROWS = {"logit_diff": "logit distance to TalkLoRA\n(max |Δ| solid, mean |Δ| dashed)",
           "accuracy_gap": "val accuracy − TalkLoRA's\n(fraction)",
           "gini_gap": "Gini − TalkLoRA's\n(mean over layers)"}


def prepare_f8(twins: pd.DataFrame) -> pd.DataFrame:
    parts = []
    diff = sel(twins, metric=["logit_maxabs_diff", "logit_meanabs_diff"])
    diff = diff[diff["model"] != "talklora"]
    parts.append(summarise(diff.assign(panel="logit_diff"), ["panel", "optimizer", "model", "metric", "step"],
                           log_floor=ZERO_FLOOR))        # geometric mean and interval (log axis)
    for metric, panel in (("accuracy", "accuracy_gap"), ("gini", "gini_gap")):
        d = sel(twins, metric=metric)
        d = d[d["layer"] == "all"] if metric == "accuracy" else d[d["layer"] != "all"]
        d = d.groupby(["optimizer", "seed", "step", "model"], as_index=False)["value"].mean()
        ref = d[d["model"] == "talklora"].set_index(["optimizer", "seed", "step"])["value"]
        d = d[d["model"] != "talklora"]
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
            for model in order(data["model"], list(TWIN_COLORS)):
                for metric in sorted(set(sel(data, panel=panel)["metric"])):
                    d = sel(data, panel=panel, optimizer=opt, model=model, metric=metric)
                    if len(d):
                        log = panel == "logit_diff"
                        line_ci(ax, d, "step", color=TWIN_COLORS.get(model),
                                 marker=TWIN_MARKERS.get(model, "o") if "mean" not in metric else "",
                                 ls="--" if "meanabs" in metric else "-", floor=ZERO_FLOOR if log else None,
                                 label=model if "mean" not in metric else None)
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
    statement=("Starting from the same function (MoELoRA-code twin with W' = W_r(T⊗I)), "
               "TalkLoRA's parameterisation alone gives a final accuracy advantage, per optimiser "
               "(AdamW at the official lr 3e-4; plain SGD)."),
    rule=("per optimiser, final-step validation accuracy TalkLoRA − MoELoRA-twin (paired by seed, "
          "95 % t-interval): holds if > 0 (resolved); refuted if < 0 (resolved), if the interval lies "
          "inside ±0.01 (no advantage), or if the twins' logits still agree within 1e-5 (their step-0 "
          "matching tolerance) at the end; otherwise inconclusive. Overall: holds if it holds for every "
          "optimiser, holds under stated conditions if for some, refuted if refuted for all, else "
          "inconclusive."),
    figures=("F8",), tests=(), experiments=("twins",), evaluate=evaluate_c9)

F8 = FigureSpec(
    "F8", "twin_divergence", ("twins",), prepare_f8, draw_f8,
    "Function-matched twins ({claims}): models that compute TalkLoRA's function at step 0 "
    "(MoELoRA-code with the absorbed router, TalkLoRA with frozen T, identity-T TalkLoRA) trained "
    "on the same batches. Top: logit distance to TalkLoRA on a held-out batch (log scale; geometric mean "
    "and interval over seeds); below: validation-accuracy and Gini gaps to TalkLoRA. Columns: optimizer. "
    "Shaded: 95% CI over seeds.")

TOPIC = Topic("twins", "04_twins.py", claims=(C9,), figures=(F8,))
