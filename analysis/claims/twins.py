"""Claim C9 (any TalkLoRA advantage over MoELoRA-code persists from a function-matched start) and
figure F8.

Rows: the ``twins`` experiment — the reference (TalkLoRA-official) and models that compute its
function at step 0 (its MoELoRA-code twin with the absorbed router, TalkLoRA with frozen T, TalkLoRA
with T = I and the absorbed router), trained on the same batches, per optimiser and seed; column
``model`` holds registry names.  **select** per task × optimiser the test loss / accuracy by seed and
the router movement → **compare** TalkLoRA − twin (paired by seed) → **verdict** per arm and for the
claim → **render**.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import methods
from ..plotting import WIDTH, ZERO_FLOOR, dedupe, legend_below, line_ci, order, sel, summarise
from ..stats import Comparison, Family, combine, fmt
from .base import ClaimSpec, FigureSpec, Outcome, margin
from .helpers import at_last_step, comparison_table, inside_margin, interval_text, md_table, paired

C9_ROUTER_MOVE = 1e-2                       # an optimiser arm counts only if its routers move this much


def twin() -> str:
    """The function-matched twin of the reference (MoELoRA-code with W' = W_r(T⊗I))."""
    (name,) = methods.tagged("function-matched")
    return name


# ----------------------------------------------------------------------------- select
def router_movement(tw: pd.DataFrame) -> pd.Series:
    """Median over seeds and layers of ``router_rel_change`` = ‖ΔW_eff‖_F/‖W_eff(0)‖_F of the reference
    and its twin, per (task, optimizer); empty where no ``weights`` rows exist."""
    w = tw[(tw["metric"] == "router_rel_change") & tw["model"].isin([methods.reference(), twin()])]
    keys = [k for k in ("task", "optimizer") if k in tw]
    return w.groupby(keys)["value"].median() if len(w) else pd.Series(dtype=float)


def select_c9(tw: pd.DataFrame) -> list[dict]:
    """Per (task, optimizer) arm: the router movement, test loss and accuracy by seed × model at the
    last step, and the twin's logit distance to the reference at its last step."""
    tw = tw if "task" in tw else tw.assign(task="task")
    moved = router_movement(tw)
    test = tw[(tw["split"] == "test") & (tw["layer"] == "all")] if "split" in tw else tw.iloc[:0]
    arms = []
    for (task, opt), g in tw.groupby(["task", "optimizer"]):
        move = moved.get((task, opt), math.nan) if isinstance(moved.index, pd.MultiIndex) else moved.get(opt, math.nan)
        t = at_last_step(test[(test["task"] == task) & (test["optimizer"] == opt)], ["model", "seed"])
        wide = {m: t[t["metric"] == m].pivot_table(index="seed", columns="model", values="value")
                for m in ("loss", "accuracy")}
        dv = g[(g["metric"] == "logit_maxabs_diff") & (g["model"] == twin())]
        dv = at_last_step(dv, ["seed"])["value"] if len(dv) else dv["value"]
        arms.append(dict(task=task, optimizer=opt, move=move, wide=wide,
                         logit_diff=float(dv.max()) if len(dv) else math.nan))
    return arms


# ----------------------------------------------------------------------------- compare
def compare_c9(wide: dict, name: str, margins: tuple[float, float]) -> tuple[Comparison | None, Comparison | None]:
    """Test loss (claimed < 0) and accuracy (claimed > 0) of the reference − its twin, paired by seed."""
    talk, other = methods.reference(), twin()
    return (paired(f"{name}: test loss TalkLoRA − twin", wide["loss"], talk, other, margins[0], "less"),
            paired(f"{name}: test accuracy TalkLoRA − twin", wide["accuracy"], talk, other, margins[1], "greater"))


# ----------------------------------------------------------------------------- verdict
def c9_cell(loss: Comparison | None, acc: Comparison | None) -> str:
    """One task × optimiser: holds if one metric holds and neither lies entirely on the wrong side;
    refuted if both are refuted (no advantage); otherwise inconclusive."""
    comps = [c for c in (loss, acc) if c is not None]
    wrong = any(c.verdict == "refuted" and not inside_margin(c) for c in comps)
    if comps and all(c.verdict == "refuted" for c in comps):
        return "refuted"
    return "holds" if any(c.verdict == "holds" for c in comps) and not wrong else "inconclusive"


def verdict_c9(cells: dict[str, str]) -> tuple[str, str]:
    """``cells``: arm -> cell verdict of the arms whose routers move."""
    verdict = combine(cells.values())
    if not cells:
        return "inconclusive", (f"no optimiser arm whose routers move (median ‖ΔW_eff‖/‖W_eff‖ ≥ "
                                f"{C9_ROUTER_MOVE:g}) with test rows")
    if verdict == "holds":
        return verdict, "TalkLoRA ahead of its function-matched twin in every included arm: " + ", ".join(cells)
    if verdict == "refuted":
        return verdict, "no advantage over the function-matched twin in " + ", ".join(
            k for k, v in cells.items() if v == "refuted")
    return verdict, "undecided in " + ", ".join(k for k, v in cells.items() if v == "inconclusive")


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c9(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C9.rule`` (below) to the saved rows."""
    margins = (margin(config, "c9_loss"), margin(config, "c9_accuracy"))
    cfg = config.get("twins") or {}
    comps, cells, rows = [], {}, []
    for arm in select_c9(data["twins"]):
        opt, move = arm["optimizer"], arm["move"]
        included = math.isfinite(move) and move >= C9_ROUTER_MOVE
        lr = cfg.get("lr_adamw" if opt == "adamw" else "lr_sgd")
        name = f"MiniLM {arm['task']}, {opt}" + (f" (lr {lr:g})" if lr is not None else "")
        cl, ca = compare_c9(arm["wide"], name, margins)
        v = c9_cell(cl, ca) if included else "excluded (routers do not move)"
        if included:
            cells[name] = v
            comps += [c for c in (cl, ca) if c is not None]
        rows.append([name, fmt(move), "yes" if included else "no", interval_text(cl), interval_text(ca),
                     fmt(arm["logit_diff"]), v])
    family = Family.of(comps, holm=False)
    verdict, reason = verdict_c9(cells)
    key = "; ".join(f"{c.name}: {fmt(c.effect)} [{fmt(c.ci_low)}, {fmt(c.ci_high)}]" for c in family.comparisons[:2]) or "n/a"
    wd = cfg.get("weight_decay")
    ev = ["- Per task × optimiser, paired by seed: held-out loss (nats) and accuracy on every test example "
          "at the last step, TalkLoRA − its MoELoRA-code twin (same function at step 0, same batches"
          + (f", weight decay {wd:g} for AdamW" if wd is not None else "") + "). An arm enters the rule only "
          f"if the median router movement ‖W_eff(end) − W_eff(0)‖_F/‖W_eff(0)‖_F ≥ {C9_ROUTER_MOVE:g}:",
          md_table(["arm", "router movement (median)", "included", "Δloss [95 %]", "Δacc [95 %]",
                    "max |Δlogit| at the end", "cell verdict"], rows) if rows else "(no twin rows)",
          comparison_table(family) if len(family) else ""]
    return Outcome(verdict, reason, key, [e for e in ev if e], comparisons=list(family))


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
    statement=("Starting from the same function (MoELoRA-code twin with W' = W_r(T⊗I)) and trained on the "
               "same batches, TalkLoRA's parameterisation alone gives a lower held-out loss or a higher "
               "held-out accuracy (AdamW at the official settings; SGD only where its routers move)."),
    rule=("per task and optimiser arm whose routers move (median over seeds and layers of "
          "‖W_eff(end) − W_eff(0)‖_F/‖W_eff(0)‖_F ≥ 1e-2; other arms are reported and excluded): paired by "
          "seed over every test example at the last step, loss TalkLoRA − twin (margin ±margins.c9_loss "
          "nats, claimed < 0) and accuracy (margin ±margins.c9_accuracy, claimed > 0), docs/method.md §5 verdict "
          "each; a cell holds if one metric holds and neither lies entirely on the wrong side, is refuted "
          "if both are refuted, else inconclusive. The claim holds if every included cell holds, is "
          "refuted if any is refuted, else inconclusive (also when no arm is included)."),
    figures=("F8", "F10"), tests=(), experiments=("twins",), evaluate=evaluate_c9)

F8 = FigureSpec(
    "F8", "twin_divergence", ("twins",), prepare_f8, draw_f8, notebook="04_twins.py", caption_text=
    "Function-matched twins ({claims}): the models of the twin experiment that compute TalkLoRA's function at "
    "step 0 (MoELoRA-code with the absorbed router; where run, TalkLoRA with frozen T and TalkLoRA with T = I "
    "and the absorbed router) trained on the same batches as TalkLoRA. Top: logit distance to TalkLoRA on "
    "the fixed probe set (max |Δ| solid, mean |Δ| dashed; log scale; geometric mean and interval over "
    "seeds); below: accuracy gap (probe set at the checkpoints, every test example at the last step) and "
    "Gini gap to TalkLoRA (mean over layers). Columns: optimizer. Shaded: 95% CI over seeds. The verdict "
    "reads only the last step: test loss and accuracy of TalkLoRA − the MoELoRA-code twin, paired by seed, "
    "in the optimiser arms whose routers move.")

CLAIMS = (C9,)
FIGURES = (F8,)
