"""Claim C6 (communication gives more balanced expert load) and figures F1, F4.

Rows: ``train`` (MiniLM adapters per task, method, seed, step, split and adapted layer), ``twins``
(the function-matched twin experiment) and ``lm`` (SmolLM2, layer ``mean``).  **select** per setting
the layer-mean Gini (and load entropy) per seed and method at step 0 and at the last step →
**compare** the paired difference-in-differences TalkLoRA − baseline as one Holm family →
**verdict** from the communication-isolating baselines' Holm verdicts → **render**.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import methods
from ..plotting import WIDTH, dedupe, legend_below, line_ci, order, sel, summarise
from ..stats import Comparison, Family, combine, estimate, fmt
from .base import ClaimSpec, FigureSpec, Outcome, margin
from .helpers import at_last_step, comparison_table, md_table, with_task

C6_SPLIT = "val"                            # the split of the C6 verdict, and the one F1 draws
C6_METRICS = ("gini", "load_entropy")


def deciding() -> tuple[str, ...]:
    """The baselines that decide C6: those that differ from the reference only by communication."""
    return methods.tagged("isolates-communication")


def reported() -> tuple[str, ...]:
    """Other routers in the family, reported: the input router and the balance-loss routers."""
    return methods.tagged("input-router") + methods.tagged("balance-loss")


# ----------------------------------------------------------------------------- select
def _step0_and_end(rows: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per metric (gini, load_entropy): seed × method frames at step 0 and at the last step, mean over layers."""
    out = {}
    for metric in C6_METRICS:
        v = rows[rows["metric"] == metric]
        end = at_last_step(v, ["method", "seed"])
        out[metric] = tuple(x.groupby(["seed", "method"])["value"].mean().unstack("method")
                            for x in (v[v["step"] == 0], end))
    return out


def select_c6(data: dict) -> list[tuple[str, dict]]:
    """``(setting, {metric: (step-0 frame, final frame)})``: MiniLM per task (``train`` val split),
    MiniLM per task against the function-matched twin (``twins`` val split, AdamW), SmolLM2 (``lm``,
    held-out tokens, layer ``mean``)."""
    out = []
    tr = data.get("train")
    if tr is not None and len(tr):
        v = tr[(tr["split"] == C6_SPLIT) & (tr["layer"] != "all")]
        for task, g in (v.groupby("task") if "task" in v else [("", v)]):
            out.append((f"MiniLM {task}".strip(), _step0_and_end(g)))
    tw = data.get("twins")
    if tw is not None and len(tw) and "split" in tw:
        v = tw[(tw["split"] == "val") & (tw["layer"] != "all") & (tw["optimizer"] == "adamw")]
        v = v.assign(method=v["model"])
        for task, g in (v.groupby("task") if "task" in v else [("", v)]):
            out.append((f"MiniLM {task} twins/AdamW".replace("  ", " ").strip(), _step0_and_end(g)))
    lm = data.get("lm")
    if lm is not None and len(lm):
        v = lm[(lm["split"] == "test") & (lm["layer"] == "mean") & (lm["seed"] >= 0)]
        if len(v):
            out.append(("SmolLM2 LM", _step0_and_end(v)))
    return out


# ----------------------------------------------------------------------------- compare
def compare_c6(settings, margin_: float, metric: str = "gini",
               duplicates: list | None = None) -> list[tuple[Comparison, bool]]:
    """``[(comparison at 95 %, deciding?)]``: per setting and baseline, the paired
    difference-in-differences ``[m_T(end) − m_b(end)] − [m_T(0) − m_b(0)]`` of ``metric`` (step-0 gap
    removed; claimed < 0 for Gini, > 0 for load entropy).  A twin run whose per-seed differences equal,
    exactly, those of an earlier setting of the same task (the ``twins`` AdamW arm when it uses the
    training sweep's settings) is the same experiment: it is left out of the family once, and its
    name is appended to ``duplicates``."""
    side = "less" if metric == "gini" else "greater"
    talk, isolating = methods.reference(), deciding()
    out, seen = [], {}
    for setting, frames in settings:
        start, end = frames[metric]
        for b in (*isolating, *reported()):
            if not all(c in f for f in (start, end) for c in (talk, b)):
                continue
            d = ((end[talk] - end[b]) - (start[talk] - start[b])).dropna()
            same = (setting.split(" twins/")[0], b, tuple(d.index), tuple(d.to_numpy()))
            if same in seen:
                if duplicates is not None:
                    duplicates.append(f"{setting} = {seen[same]} ({b})")
                continue
            seen[same] = setting
            if len(d):
                label = "Gini" if metric == "gini" else "load entropy"
                out.append((Comparison.from_differences(f"{setting}: {label} TalkLoRA − {b} (Δend − Δstep0)", d,
                                                        margin_, side), b in isolating))
    return out


# ----------------------------------------------------------------------------- verdict
def verdict_c6(family: Family, decides: list[bool]) -> tuple[str, str]:
    """From the Holm verdicts of the deciding comparisons: holds if every one holds, refuted if one
    is refuted, else inconclusive (also without any)."""
    pairs = [(c, v) for c, v, d in zip(family, family.verdicts, decides) if d]
    if not pairs:
        return "inconclusive", "no Gini rows for TalkLoRA-official and a communication-isolating baseline"
    verdict = combine(v for _, v in pairs)
    if verdict == "holds":
        return verdict, f"TalkLoRA's load is more balanced than every communication-isolating baseline ({len(pairs)} comparisons)"
    if verdict == "refuted":
        return verdict, "no relevant balance gain from communication against " + ", ".join(
            c.name.split(" (")[0] for c, v in pairs if v == "refuted")
    return verdict, "undecided against " + ", ".join(c.name.split(" (")[0] for c, v in pairs if v != "holds")


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c6(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C6.rule`` (below) to the saved rows."""
    settings = select_c6(data)
    duplicates: list[str] = []
    pairs = compare_c6(settings, margin(config, "c6_gini"), duplicates=duplicates)
    family = Family.of(c for c, _ in pairs)               # reported at their Holm-ordered levels
    decides = [d for _, d in pairs]
    verdict, reason = verdict_c6(family, decides)
    comps = list(family)
    entropy = [c for c, _ in compare_c6(settings, margin(config, "c6_entropy"), "load_entropy")]
    talk = methods.reference()
    raw = []
    for setting, frames in settings:
        start, end = frames["gini"]
        for b in (*deciding(), *reported()):
            if all(c in f for f in (start, end) for c in (talk, b)):
                raw.append([setting, b, estimate(end[talk] - end[b]).text(3), estimate(start[talk] - start[b]).text(3)])
    key = f"{comps[0].name}: {fmt(comps[0].effect)} [{fmt(comps[0].ci_low)}, {fmt(comps[0].ci_high)}]" if comps else "n/a"
    ev = ["- Soft-load Gini (0 = equal load, 0.75 = one expert for E = 4), mean over adapted layers per seed; "
          "MiniLM on the whole validation split, SmolLM2 on every held-out token. Each comparison is the "
          "paired difference-in-differences TalkLoRA − baseline at the last step minus the same at step 0 "
          "(the gap the initialisation already makes is removed). Holm over the whole family; "
          "'isolating' baselines decide:",
          comparison_table(comps, family.verdicts, {"Holm p": [fmt(p) for p in family.adjusted_p],
                                                    "decides": ["yes" if d else "reported" for d in decides]}),
          "- The raw gaps behind them (paired, 95 % t-interval):",
          md_table(["setting", "baseline", "ΔGini at the end", "ΔGini at step 0"], raw) if raw else "(none)",
          "- Load entropy (normalised; higher = more balanced), the same difference-in-differences, reported:",
          comparison_table(entropy) if entropy else "(none)"]
    if duplicates:
        ev.append("- The same runs counted once (identical per-seed differences: the twin runs used the training "
                  "sweep's settings): " + "; ".join(duplicates))
    return Outcome(verdict, reason, key, ev, comparisons=comps)


# ----------------------------------------------------------------------------- F1 load balance per layer
F1_METRICS = {"gini": "Gini of expert load\n(0 = balanced)", "load_entropy": "load entropy\n(normalised, 1 = uniform)"}


def f1_methods() -> tuple[str, ...]:
    """The routers F1 draws: every routed method except the other arms of the twin experiment (their
    load is F8's) and the communication structures."""
    twin_arms = set(methods.tagged("twin-arm")) - {methods.reference()}
    return tuple(m for m in methods.tagged("routed") if m not in twin_arms and m not in methods.tagged("structure"))


def prepare_f1(train: pd.DataFrame) -> pd.DataFrame:
    """Final-step Gini and load entropy per (task, layer, method) on the validation split (the split
    C6 reads), mean and 95 % CI over seeds."""
    d = with_task(sel(train, split=C6_SPLIT, metric=list(F1_METRICS), method=list(f1_methods())))
    d = at_last_step(d[d["layer"] != "all"], ["task", "method", "seed"])
    # both metrics live in [0, 1] (Gini at most 1 − 1/E): intervals are clipped to that range
    return summarise(d, ["task", "metric", "layer", "method"], bounds=(0.0, 1.0))


def draw_f1(data: pd.DataFrame):
    data = with_task(data)
    tasks = list(dict.fromkeys(data["task"]))
    names = order(data["method"], list(methods.ORDER))
    fig, axes = plt.subplots(2, len(tasks), figsize=(WIDTH, 5.4), sharex="col", squeeze=False)
    width = 0.8 / max(len(names), 1)
    for col, task in enumerate(tasks):
        layers = list(dict.fromkeys(sel(data, task=task)["layer"]))
        for ax, (metric, ylabel) in zip(axes[:, col], F1_METRICS.items()):
            for j, m in enumerate(names):
                d = sel(data, task=task, metric=metric, method=m).set_index("layer").reindex(layers)
                x = np.arange(len(layers)) + (j - (len(names) - 1) / 2) * width
                ax.errorbar(x, d["mean"], yerr=[d["mean"] - d["lo"], d["hi"] - d["mean"]], fmt=methods.marker(m),
                            color=methods.color(m), label=methods.label(m), capsize=2, ms=4)
            if col == 0:
                ax.set_ylabel(ylabel)
            for k in range(1, len(layers)):
                ax.axvline(k - 0.5, color="0.9", lw=0.8, zorder=0)
            ax.grid(axis="x", visible=False)
        axes[0, col].set_title(f"{task}", fontsize=10)
        axes[1, col].set_xticks(range(len(layers)), layers, rotation=30, ha="right")
        axes[1, col].set_xlabel("adapted layer (MiniLM layer.projection)")
    fig.suptitle("Expert load per layer after training (validation split; mean ± 95% CI over seeds)",
                 fontsize=10.5, fontweight="bold")
    fig.tight_layout()
    legend_below(fig, *dedupe(axes), ncol=4)
    return fig


# ----------------------------------------------------------------------------- F4 balance over training
F4_METRICS = {"gini": "Gini of expert load", "load_entropy": "load entropy (normalised)",
              "token_entropy": "per-token gate entropy\n(normalised)"}


def prepare_f4(train: pd.DataFrame) -> pd.DataFrame:
    """Gini / load entropy / per-token gate entropy (mean over adapted layers, then mean and 95 % CI
    over seeds) at every probe checkpoint, per task and method; the ``val`` split (step 0 and the end)
    when there are no probe rows."""
    split = "probe" if len(sel(train, split="probe", metric="gini")) else "val"
    d = with_task(sel(train, split=split, metric=list(F4_METRICS)))
    d = d[(d["layer"] != "all") & (d["step"] >= 0)]
    d = d.groupby(["task", "method", "seed", "step", "metric"], as_index=False)["value"].mean()   # mean over layers
    return summarise(d, ["task", "metric", "method", "step"]).assign(split=split)


def draw_f4(data: pd.DataFrame):
    data = with_task(data)
    tasks = list(dict.fromkeys(data["task"]))
    metrics = [m for m in F4_METRICS if m in set(data["metric"])]
    fig, axes = plt.subplots(len(tasks), len(metrics), figsize=(WIDTH, 2.7 * len(tasks) + 0.4), squeeze=False,
                             sharex=True)
    for i, task in enumerate(tasks):
        for ax, metric in zip(axes[i], metrics):
            for m in order(data["method"], list(methods.ORDER)):
                d = sel(data, task=task, metric=metric, method=m)
                if len(d):
                    line_ci(ax, d, "step", color=methods.color(m), label=methods.label(m), marker=methods.marker(m),
                            ms=3)
            ax.set_title(f"{task}: {F4_METRICS[metric]}", fontsize=9)
            if i == len(tasks) - 1:
                ax.set_xlabel("training step")
        axes[i, 0].set_ylabel("mean over adapted layers")
    fig.tight_layout()
    split = data["split"].iloc[0] if "split" in data and len(data) else "val"
    legend_below(fig, *dedupe(axes), ncol=4, title=f"{split} split; shaded: 95% CI over seeds")
    return fig


# ----------------------------------------------------------------------------- declarations
C6 = ClaimSpec(
    "C6", paper="communication gives more balanced expert load",
    statement=("After training (same data, steps and seeds), TalkLoRA-official spreads the soft expert "
               "load more evenly (lower Gini) than the baselines that differ from it only by the "
               "communication: MoELoRA-code, the scale-matched control and the function-matched twin."),
    rule=("per setting (MiniLM per task on the whole validation split; SmolLM2 on every held-out token) and "
          "baseline: the paired (by seed) difference-in-differences of the soft-load Gini averaged over "
          "adapted layers, [TalkLoRA − baseline at the last step] − [the same at step 0] (the step-0 gap is "
          "removed), 95 % t-interval, margin ±margins.c6_gini; docs/method.md §5 verdict per comparison, where an "
          "interval excluding 0 counts only if its Holm-adjusted p < 0.05 over the whole family (otherwise "
          "it is refuted when it lies inside ±margin, else inconclusive; the family: every "
          "setting × baseline: MoELoRA-code, the scale-matched control, the twin (AdamW), MoELoRA-input, "
          "Switch, top-k+entropy). The communication-isolating baselines decide (MoELoRA-code, "
          "scale-matched control, twin): holds if every such comparison holds, refuted if any is refuted, "
          "else inconclusive. MoELoRA-input and the balance-loss routers are reported; load entropy "
          "(margins.c6_entropy) is reported beside Gini."),
    figures=("F1", "F4", "F10"), tests=(), experiments=("train",), optional=("twins", "lm"), evaluate=evaluate_c6)

F1 = FigureSpec(
    "F1", "load_balance_per_layer", ("train",), prepare_f1, draw_f1, notebook="01_balance.py", caption_text=
    "Expert-load balance per adapted layer at the end of the training sweep ({claims}), per task: Gini of the "
    "soft expert load (top) and normalised load entropy (bottom) on the validation split at the last step, "
    "mean ± 95% CI over seeds, for the routed methods of the sweep (the twin experiment's arms are in F8). "
    "These are final values per layer, not the verdict's quantity: the verdict reads the paired "
    "difference-in-differences of the layer-mean Gini (TalkLoRA − baseline at the last step minus the same "
    "at step 0) against the communication-isolating baselines (MoELoRA-code, the scale-matched control, "
    "the function-matched twin) across the MiniLM tasks, the twin runs and SmolLM2.")
F4 = FigureSpec(
    "F4", "balance_over_training", ("train",), prepare_f4, draw_f4, notebook="01_balance.py", caption_text=
    "Load balance during training ({claims}), per task and method of the training sweep: Gini of the expert "
    "load, normalised load entropy and per-token gate entropy on the fixed probe set at every checkpoint "
    "(validation split at step 0 and the end when no probe rows exist), averaged over adapted layers; "
    "shaded: 95% CI over seeds. The checkpoints between step 0 and the end are not in the verdict, which "
    "compares the last step with step 0 on the whole validation split.")

CLAIMS = (C6,)
FIGURES = (F1, F4)
