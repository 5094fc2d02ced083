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
from ..stats import Comparison, fmt
from .efficiency import at_last_step, compare, comparison_table, every, inside_margin, margins

C9_ROUTER_MOVE = 1e-2                       # an optimiser arm counts only if its routers move this much
TWIN_IDENTICAL_ATOL = 1e-5                  # = analysis.twins.MATCH_ATOL: twins agree to this at step 0
TWIN = "moelora-twin"


# C9 -------------------------------------------------------------------------
def router_movement(tw: pd.DataFrame) -> pd.Series:
    """Median over seeds and layers of ``router_rel_change`` = ‖ΔW_eff‖_F/‖W_eff(0)‖_F of TalkLoRA and
    its twin, per (task, optimizer); NaN where no ``weights`` rows exist."""
    w = tw[(tw["metric"] == "router_rel_change") & tw["model"].isin(["talklora", TWIN])]
    keys = [k for k in ("task", "optimizer") if k in tw]
    return w.groupby(keys)["value"].median() if len(w) else pd.Series(dtype=float)


def c9_cell(loss: Comparison | None, acc: Comparison | None) -> str:
    """One task × optimiser: holds if one metric holds and neither lies entirely on the wrong side;
    refuted if both are refuted (no advantage); otherwise inconclusive."""
    comps = [c for c in (loss, acc) if c is not None]
    wrong = any(c.verdict == "refuted" and not inside_margin(c) for c in comps)
    if comps and all(c.verdict == "refuted" for c in comps):
        return "refuted"
    return "holds" if any(c.verdict == "holds" for c in comps) and not wrong else "inconclusive"


def evaluate_c9(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C9.rule`` (below) to the saved rows."""
    tw = data["twins"]
    tw = tw if "task" in tw else tw.assign(task="task")
    mg = margins(config)
    cfg = config.get("twins") or {}
    moved = router_movement(tw)
    comps, cells, rows = [], {}, []
    test = tw[(tw["split"] == "test") & (tw["layer"] == "all")] if "split" in tw else tw.iloc[:0]
    for (task, opt), g in tw.groupby(["task", "optimizer"]):
        move = moved.get((task, opt), math.nan) if isinstance(moved.index, pd.MultiIndex) else moved.get(opt, math.nan)
        included = math.isfinite(move) and move >= C9_ROUTER_MOVE
        t = at_last_step(test[(test["task"] == task) & (test["optimizer"] == opt)], ["model", "seed"])
        wide = {m: t[t["metric"] == m].pivot_table(index="seed", columns="model", values="value")
                for m in ("loss", "accuracy")}
        lr = cfg.get("lr_adamw" if opt == "adamw" else "lr_sgd")
        name = f"MiniLM {task}, {opt}" + (f" (lr {lr:g})" if lr is not None else "")
        cl = compare(f"{name}: test loss TalkLoRA − twin", wide["loss"], "talklora", TWIN, mg["c9_loss"], "less")
        ca = compare(f"{name}: test accuracy TalkLoRA − twin", wide["accuracy"], "talklora", TWIN,
                     mg["c9_accuracy"], "greater")
        dv = g[(g["metric"] == "logit_maxabs_diff") & (g["model"] == TWIN)]
        dv = at_last_step(dv, ["seed"])["value"] if len(dv) else dv["value"]
        v = c9_cell(cl, ca) if included else "excluded (routers do not move)"
        if included:
            cells[name] = v
            comps += [c for c in (cl, ca) if c is not None]
        rows.append([name, fmt(move), "yes" if included else "no", cl.row()[2] + " " + cl.row()[3] if cl else "n/a",
                     ca.row()[2] + " " + ca.row()[3] if ca else "n/a",
                     fmt(float(dv.max())) if len(dv) else "n/a", v])
    verdict = every(cells.values())
    if not cells:
        verdict, reason = "inconclusive", (f"no optimiser arm whose routers move (median ‖ΔW_eff‖/‖W_eff‖ ≥ "
                                           f"{C9_ROUTER_MOVE:g}) with test rows")
    elif verdict == "holds":
        reason = "TalkLoRA ahead of its function-matched twin in every included arm: " + ", ".join(cells)
    elif verdict == "refuted":
        reason = "no advantage over the function-matched twin in " + ", ".join(k for k, v in cells.items() if v == "refuted")
    else:
        reason = "undecided in " + ", ".join(k for k, v in cells.items() if v == "inconclusive")
    key = "; ".join(f"{c.name}: {fmt(c.effect)} [{fmt(c.ci_low)}, {fmt(c.ci_high)}]" for c in comps[:2]) or "n/a"
    wd = cfg.get("weight_decay")
    ev = ["- Per task × optimiser, paired by seed: held-out loss (nats) and accuracy on every test example "
          "at the last step, TalkLoRA − its MoELoRA-code twin (same function at step 0, same batches"
          + (f", weight decay {wd:g} for AdamW" if wd is not None else "") + "). An arm enters the rule only "
          f"if the median router movement ‖W_eff(end) − W_eff(0)‖_F/‖W_eff(0)‖_F ≥ {C9_ROUTER_MOVE:g}:",
          md_table(["arm", "router movement (median)", "included", "Δloss [95 %]", "Δacc [95 %]",
                    "max |Δlogit| at the end", "cell verdict"], rows) if rows else "(no twin rows)",
          comparison_table(comps) if comps else ""]
    return Outcome(verdict, reason, key, [e for e in ev if e], comparisons=comps)


# ----------------------------------------------------------------------------- F8 twin divergence
F8_ROWS = {"logit_diff": "logit distance to TalkLoRA\n(max |Δ| solid, mean |Δ| dashed)",
           "accuracy_gap": "accuracy − TalkLoRA's\n(probe set; test at the end)",
           "gini_gap": "Gini − TalkLoRA's\n(mean over layers)"}


def prepare_f8(twins: pd.DataFrame) -> pd.DataFrame:
    """Logit distance and accuracy / Gini gaps to TalkLoRA per (optimizer, model, step): the probe set
    at every checkpoint, accuracy on every test example at the last step."""
    if "split" in twins:
        twins = twins[twins["split"].isin(["probe", "test"])]
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
    statement=("Starting from the same function (MoELoRA-code twin with W' = W_r(T⊗I)) and trained on the "
               "same batches, TalkLoRA's parameterisation alone gives a lower held-out loss or a higher "
               "held-out accuracy (AdamW at the official settings; SGD only where its routers move)."),
    rule=("per task and optimiser arm whose routers move (median over seeds and layers of "
          "‖W_eff(end) − W_eff(0)‖_F/‖W_eff(0)‖_F ≥ 1e-2; other arms are reported and excluded): paired by "
          "seed over every test example at the last step, loss TalkLoRA − twin (margin ±margins.c9_loss "
          "nats, claimed < 0) and accuracy (margin ±margins.c9_accuracy, claimed > 0), SPEC §5 verdict "
          "each; a cell holds if one metric holds and neither lies entirely on the wrong side, is refuted "
          "if both are refuted, else inconclusive. The claim holds if every included cell holds, is "
          "refuted if any is refuted, else inconclusive (also when no arm is included)."),
    figures=("F8",), tests=(), experiments=("twins",), evaluate=evaluate_c9)

F8 = FigureSpec(
    "F8", "twin_divergence", ("twins",), prepare_f8, draw_f8,
    "Function-matched twins ({claims}): models that compute TalkLoRA's function at step 0 "
    "(MoELoRA-code with the absorbed router, TalkLoRA with frozen T, identity-T TalkLoRA) trained "
    "on the same batches. Top: logit distance to TalkLoRA on the fixed probe set (log scale; geometric mean "
    "and interval over seeds); below: accuracy gap (probe set at the checkpoints, every test example at the "
    "last step) and Gini gap to TalkLoRA. Columns: optimizer. "
    "Shaded: 95% CI over seeds.")

TOPIC = Topic("twins", "04_twins.py", claims=(C9,), figures=(F8,))
