"""Claim C6 (communication gives more balanced expert load) and figures F1, F4.

Rows: every setting's evaluation sweep (:mod:`analysis.claims.evidence`): per routed layer the soft-load
``gini``, ``load_entropy`` and ``token_entropy`` at step 0 and at the end (MiniLM and planted on the
whole validation split, SmolLM2 on every held-out token, layer ``mean``).  **select** per setting the
layer-mean Gini per seed and method at step 0 and at the last step → **compare** the paired
difference-in-differences TalkLoRA − comparator (end − step 0) against the twin and the scale-matched
control (the preregistration's ``[deciding] C6``), one Holm family over the testable settings (P1, P2)
→ **verdict** (docs/method.md §5.5) → **render**.  MoELoRA-code, MoELoRA-input and the balance-loss
routers are reported; load entropy is reported beside Gini.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import methods
from ..plotting import WIDTH, dedupe, legend_below, line_ci, order, sel, summarise
from ..stats import estimate, fmt
from . import evidence as ev
from .assay import assays, deciding_methods, levels
from .base import ClaimSpec, FigureSpec, Outcome
from .decide import Paired, claim_verdict, empirical_outcome, judge_family, not_run, why_not_testable
from .helpers import md_table


def reported() -> tuple[str, ...]:
    """Other routers, reported: MoELoRA-code, the input router and the balance-loss routers."""
    return tuple(m for m in (*methods.tagged("baseline", "routed"), *methods.tagged("input-router"),
                             *methods.tagged("balance-loss")) if m not in deciding_methods("C6"))


# ----------------------------------------------------------------------------- select / compare
def diff_in_diff(frames: dict, a: str, b: str) -> pd.Series:
    """Per seed: ``[m_a(end) − m_b(end)] − [m_a(0) − m_b(0)]`` (the gap the initialisation makes removed)."""
    start, end = frames["start"], frames["end"]
    if not all(c in f for f in (start, end) for c in (a, b)):
        return pd.Series(dtype=float)
    return ((end[a] - end[b]) - (start[a] - start[b])).dropna()


def items_c6(data: dict, config: dict | None = None) -> tuple[list[Paired], list, list]:
    """Per setting and comparator: the Gini difference-in-differences (claimed < 0, margin gini_fraction ×
    MoELoRA-code's Gini on the tuning runs); controls P1, P2.  Also the raw gaps and load-entropy rows."""
    talk, deciding = methods.reference(), deciding_methods("C6")
    items, tested, raw = [], [], []
    for a in assays(data, config):
        run = a.run
        gini = ev.routing(run, "gini")
        if talk not in gini["end"]:
            continue
        entropy = ev.routing(run, "load_entropy")
        controls = a.controls((talk, *deciding), p2=True)
        tested.append((a, controls, f"Gini ±{fmt(a.margins.get('gini'))}"))
        for b in (*deciding, *reported()):
            name = f"{run.name}: Gini TalkLoRA − {methods.label(b)} (Δend − Δstep 0)"
            if b not in gini["end"]:
                if b in deciding:
                    items.append(not_run(name, a.margins.get("gini"), "less", run.name, controls))
                continue
            d = diff_in_diff(gini, talk, b)
            items.append(Paired(name, tuple(d.to_numpy(float)), a.margins.get("gini"), "less", run.name, controls,
                                b in deciding))
            start, end = gini["start"], gini["end"]
            raw.append([run.name, methods.label(b), estimate(end[talk] - end[b]).text(3),
                        estimate(start[talk] - start[b]).text(3) if b in start and talk in start else "n/a",
                        estimate(diff_in_diff(entropy, talk, b)).text(3)])
    return items, tested, raw


def evaluate_c6(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C6.rule`` (below) to the saved rows."""
    items, tested, raw = items_c6(data, config)
    comps = judge_family(items, *levels())
    lines = ["- Soft-load Gini (0 = equal load, 1 − 1/E = one expert), mean over routed layers per seed; MiniLM "
             "and planted on the whole validation split, SmolLM2 on every held-out token. Each comparison is the "
             "paired difference-in-differences TalkLoRA − comparator at the last step minus the same at step 0 "
             "(the gap the initialisation already makes is removed). Deciding: the function-matched twin and the "
             "scale-matched control; the others reported.",
             "- The raw gaps behind them (paired, 95 % t-interval), and the load-entropy difference-in-differences "
             "(normalised, higher = more balanced; reported, no margin declared):",
             md_table(["setting", "comparator", "ΔGini at the end", "ΔGini at step 0", "Δ load entropy (dd)"], raw)
             if raw else "(no Gini rows)"]
    return empirical_outcome(comps, tested, verdict_c6(comps, why_not_testable(tested)), lines=lines)


def verdict_c6(comps, none_testable: str) -> tuple[str, str]:
    """docs/method.md §5.5 over the Gini comparisons with the twin and the scale-matched control."""
    return claim_verdict(comps, none_testable)


# ----------------------------------------------------------------------------- F1 load balance per layer
F1_METRICS = {"gini": "Gini of expert load\n(0 = balanced)", "load_entropy": "load entropy\n(normalised, 1 = uniform)"}


def f1_methods() -> tuple[str, ...]:
    """The routers F1 and F4 draw: every routed method except the other arms of the twin experiment
    and the communication structures (those are F12's)."""
    twin_arms = set(methods.tagged("twin-arm")) - {methods.reference(), *methods.tagged("function-matched")}
    return tuple(m for m in methods.tagged("routed") if m not in twin_arms and m not in methods.tagged("structure"))


def _routing_rows(frames, metrics, splits=None) -> pd.DataFrame:
    """``source, method, seed, step, layer, metric, value`` of ``metrics`` per routed layer in every
    setting of the evaluation sweeps ``frames`` (planted, train, lm), on the split C6 reads."""
    data = {name: f for name, f in zip(("planted", "train", "lm"), frames) if f is not None}
    parts = []
    for run in ev.runs(data):
        r = run.rows
        split = (splits or {}).get(run.setting.runner, run.routing_split)
        r = r[(r["split"] == split) & r["metric"].isin(metrics) & r["method"].isin(f1_methods()) & (r["seed"] >= 0)]
        r = r[~r["layer"].isin(["all", "mean"])]
        parts.append(r[["method", "seed", "step", "layer", "metric", "value"]].assign(source=run.name, split=split))
    cols = ["source", "split", "method", "seed", "step", "layer", "metric", "value"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def prepare_f1(planted=None, train=None, lm=None) -> pd.DataFrame:
    """Final-step Gini and load entropy per (setting, layer, method) on the split C6 reads (validation;
    SmolLM2: held-out tokens), mean and 95 % CI over seeds."""
    d = _routing_rows((planted, train, lm), list(F1_METRICS))
    d = ev.last_step(d, ("source", "method", "seed"))
    # both metrics live in [0, 1] (Gini at most 1 − 1/E): intervals are clipped to that range
    return summarise(d, ["source", "metric", "layer", "method"], bounds=(0.0, 1.0))


def draw_f1(data: pd.DataFrame):
    sources = order(data["source"], list(ev.ORDER)) or ["no data"]
    names = order(data["method"], list(methods.ORDER))
    fig, axes = plt.subplots(2, len(sources), figsize=(WIDTH, 5.4), sharex="col", squeeze=False)
    width = 0.8 / max(len(names), 1)
    for col, source in enumerate(sources):
        layers = list(dict.fromkeys(sel(data, source=source)["layer"]))
        for ax, (metric, ylabel) in zip(axes[:, col], F1_METRICS.items()):
            for j, m in enumerate(names):
                d = sel(data, source=source, metric=metric, method=m).set_index("layer").reindex(layers)
                x = np.arange(len(layers)) + (j - (len(names) - 1) / 2) * width
                ax.errorbar(x, d["mean"], yerr=[d["mean"] - d["lo"], d["hi"] - d["mean"]], fmt=methods.marker(m),
                            color=methods.color(m), label=methods.label(m), capsize=2, ms=4)
            if col == 0:
                ax.set_ylabel(ylabel)
            for k in range(1, len(layers)):
                ax.axvline(k - 0.5, color="0.9", lw=0.8, zorder=0)
            ax.grid(axis="x", visible=False)
        axes[0, col].set_title(source, fontsize=10)
        axes[1, col].set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=7)
        axes[1, col].set_xlabel("adapted layer")
    fig.suptitle("Expert load per layer after training (mean ± 95% CI over seeds)", fontsize=10.5, fontweight="bold")
    fig.tight_layout()
    legend_below(fig, *dedupe(axes), ncol=4)
    return fig


# ----------------------------------------------------------------------------- F4 balance over training
F4_METRICS = {"gini": "Gini of expert load", "load_entropy": "load entropy (normalised)",
              "token_entropy": "per-token gate entropy\n(normalised)"}


def prepare_f4(planted=None, train=None, lm=None) -> pd.DataFrame:
    """Gini / load entropy / per-token gate entropy (mean over routed layers, then mean and 95 % CI over
    seeds) at every checkpoint per setting and method: MiniLM on the fixed probe set (where it has the
    metric; else the validation split at step 0 and the end), planted on the validation split (step 0 and
    the end), SmolLM2 on every held-out token at every checkpoint."""
    d = _routing_rows((planted, train, lm), list(F4_METRICS))
    probe = _routing_rows((None, train, None), list(F4_METRICS), {"train": "probe"})
    probe_metrics = set(probe["metric"])
    d = pd.concat([d[~((d["source"].isin(set(probe["source"]))) & d["metric"].isin(probe_metrics))], probe])
    d = d.groupby(["source", "split", "method", "seed", "step", "metric"], as_index=False)["value"].mean()
    return summarise(d, ["source", "split", "metric", "method", "step"])


def draw_f4(data: pd.DataFrame):
    sources = order(data["source"], list(ev.ORDER)) or ["no data"]
    metrics = [m for m in F4_METRICS if m in set(data["metric"])] or list(F4_METRICS)
    fig, axes = plt.subplots(len(sources), len(metrics), figsize=(WIDTH, 2.5 * len(sources) + 0.6), squeeze=False)
    for i, source in enumerate(sources):
        for ax, metric in zip(axes[i], metrics):
            for m in order(data["method"], list(methods.ORDER)):
                d = sel(data, source=source, metric=metric, method=m)
                if len(d):
                    line_ci(ax, d, "step", color=methods.color(m), label=methods.label(m), marker=methods.marker(m),
                            ms=3)
            split = ", ".join(sorted(set(sel(data, source=source, metric=metric)["split"])))
            ax.text(0.98, 0.04, split, transform=ax.transAxes, ha="right", fontsize=7, color="0.4")
            if i == 0:
                ax.set_title(F4_METRICS[metric], fontsize=9)
            if i == len(sources) - 1:
                ax.set_xlabel("training step")
        axes[i, 0].set_ylabel(f"{source}\nmean over routed layers", fontsize=8.5)
    fig.tight_layout()
    legend_below(fig, *dedupe(axes), ncol=4, title="shaded: 95% CI over seeds; grey: the split measured")
    return fig


# ----------------------------------------------------------------------------- declarations
C6 = ClaimSpec(
    "C6", paper="communication gives more balanced expert load",
    statement=("After training (same data, steps and seeds, each method at its tuned lr), TalkLoRA-official "
               "spreads the soft expert load more evenly (lower Gini, beyond the gap at step 0) than the "
               "function-matched twin and the scale-matched MoELoRA-code control, in every testable setting."),
    rule=("per setting passing P1 and P2 (every compared router decisive at the end) and comparator (deciding: "
          "the twin and the scale-matched control, preregistration [deciding] C6): the paired (by seed) "
          "difference-in-differences of the soft-load Gini averaged over routed layers, [TalkLoRA − comparator at "
          "the last step] − [the same at step 0], claimed < 0, margin gini_fraction × MoELoRA-code's end-of-training "
          "validation Gini on the tuning runs; Holm over every deciding comparison of the testable settings; "
          "docs/method.md §5.4 per comparison, §5.5 for the claim. MoELoRA-code, MoELoRA-input and the "
          "balance-loss routers reported; load entropy reported beside Gini."),
    figures=("F1", "F4", "F10"), tests=(), experiments=(), optional=ev.EXPERIMENTS, evaluate=evaluate_c6,
    kind="empirical")

F1 = FigureSpec(
    "F1", "load_balance_per_layer", (), prepare_f1, draw_f1, notebook="01_balance.py",
    optional=("planted", "train", "lm"), caption_text=
    "Expert-load balance per routed layer at the end of training ({claims}), one column per setting: Gini of "
    "the soft expert load (top) and normalised load entropy (bottom) at the last step on the split the verdict "
    "reads (validation; SmolLM2: every held-out token), mean ± 95% CI over seeds, for the routed methods of the "
    "evaluation sweeps (the communication structures are in F12). These are final values per layer, not the "
    "verdict's quantity: the verdict reads the paired difference-in-differences of the layer-mean Gini "
    "(TalkLoRA − comparator at the last step minus the same at step 0) against the function-matched twin and "
    "the scale-matched control, in the settings that pass P1 and P2.")
F4 = FigureSpec(
    "F4", "balance_over_training", (), prepare_f4, draw_f4, notebook="01_balance.py",
    optional=("planted", "train", "lm"), caption_text=
    "Load balance during training ({claims}), per setting and method: Gini of the expert load, normalised load "
    "entropy and per-token gate entropy (the P2 quantity) averaged over routed layers, at every checkpoint that "
    "records them (MiniLM: the fixed probe set; planted: the validation split at step 0 and the end; SmolLM2: "
    "every held-out token); shaded: 95% CI over seeds. The checkpoints between step 0 and the end are not in "
    "the verdict, which compares the last step with step 0.")

CLAIMS = (C6,)
FIGURES = (F1, F4)
