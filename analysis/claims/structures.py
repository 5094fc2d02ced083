"""Claim C13 (ours: a doubly-stochastic T keeps TalkLoRA's effect and certifies a non-rising bound) and
figure F12 (the communication structures side by side).

Rows: every setting's evaluation sweep (:mod:`analysis.claims.evidence`) with the structure the
preregistration names (``[deciding] C13``: ``talklora-doubly-stochastic``) beside the reference
(TalkLoRA with the full T).  **select** per setting the held-out loss by seed, and the certified ratio
‖W_r(T⊗I)‖₂ / ‖W_r‖₂ of every trained doubly-stochastic layer → **compare** (a) DS − reference held-out
loss as a non-inferiority comparison (Holm over the testable settings: P1, P2), (b) the largest
certified ratio against 1 → **verdict** → **render**.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import methods
from ..plotting import WIDTH, dedupe, legend_below, order, summarise
from ..stats import fmt
from . import evidence as ev
from .assay import assays, deciding_methods, levels
from .base import ClaimSpec, FigureSpec, Outcome
from .decide import Paired, claim_verdict, empirical_outcome, judge_family, why_not_testable

RATIO_TOL = 1e-9                    # ‖T‖₂ ≤ 1 in exact arithmetic; float rounding above 1 up to this


# ----------------------------------------------------------------------------- select / compare
def items_c13(data: dict, config: dict | None = None) -> tuple[list[Paired], list, dict]:
    """Per setting: held-out loss DS − reference (non-inferiority, margin = the setting's loss margin);
    controls P1, P2.  Also ``{setting: (largest certified ratio of a DS layer, layers × seeds)}``."""
    talk, deciding = methods.reference(), deciding_methods("C13")
    items, tested, ratios = [], [], {}
    for a in assays(data, config):
        run = a.run
        present = [m for m in deciding if m in run.methods()]
        if not present:
            continue
        controls = a.controls((talk, *present), p2=True)
        tested.append((a, controls, f"loss non-inferiority margin {fmt(a.margins.get('loss'))}"))
        wide = ev.heldout(run.rows, "loss")
        cert = ev.certified(run)
        for m in present:
            d = (wide[m] - wide[talk]).dropna() if talk in wide and m in wide else pd.Series(dtype=float)
            items.append(Paired(f"{run.name}: loss {methods.label(m)} − TalkLoRA", tuple(d.to_numpy(float)),
                                a.margins.get("loss"), "less", run.name, controls, True, "non-inferiority"))
            c = cert[cert["method"] == m]["value"]
            ratios[f"{run.name}: {methods.label(m)}"] = (float(c.max()) if len(c) else math.nan, len(c))
    return items, tested, ratios


def verdict_c13(comps, ratios: dict, none_testable: str) -> tuple[str, str]:
    """Contradicted if a trained DS layer's certified ratio exceeds 1 + :data:`RATIO_TOL` (part b);
    otherwise part (a)'s verdict over the non-inferiority comparisons (:func:`claim_verdict`), where
    "supported" also needs the ratio measured in every setting."""
    if not ratios:
        return "not-testable", "no setting ran the doubly-stochastic structure"
    above = {k: v for k, (v, _) in ratios.items() if v > 1 + RATIO_TOL}
    worst = max((v for v, _ in ratios.values() if math.isfinite(v)), default=math.nan)
    part_b = f"(b) largest certified ratio of a trained doubly-stochastic layer {fmt(worst, 10)}"
    if above:
        return "contradicted", part_b + " > 1 in " + ", ".join(f"{k} ({fmt(v, 10)})" for k, v in above.items())
    verdict, reason = claim_verdict(comps, none_testable)
    missing = [k for k, (v, n) in ratios.items() if not n]
    if verdict == "supported" and missing:
        return "inconclusive", f"(a) {reason}; (b) no certified-ratio rows for {', '.join(missing)}"
    return verdict, f"(a) {reason}; {part_b} ≤ 1" + (f" (not measured: {', '.join(missing)})" if missing else "")


def evaluate_c13(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C13.rule`` (below) to the saved rows."""
    items, tested, ratios = items_c13(data, config)
    comps = judge_family(items, *levels())
    verdict = verdict_c13(comps, ratios, why_not_testable(tested))
    lines = ["- (a) Non-inferiority: held-out loss of the doubly-stochastic structure − TalkLoRA with the full T, "
             "paired by seed, each at its tuned lr: supported if the interval's upper end is below the setting's "
             "loss margin, contradicted if its lower end is above it, else inconclusive (Holm over the testable "
             "settings). (b) The certified router bound w.r.t. the code, ‖W_r(T⊗I)‖₂ / ‖W_r‖₂, of every trained "
             f"doubly-stochastic layer is at most 1 (+{RATIO_TOL:g}): ‖T‖₂ ≤ 1 for any doubly-stochastic T "
             "(deterministic, so the largest value over layers and seeds is reported, not an interval):",
             "| setting: structure | largest certified ratio | layers × seeds |", "|---|---|---|",
             *[f"| {k} | {fmt(v, 10)} | {n} |" for k, (v, n) in ratios.items()]]
    worst = max((v for v, _ in ratios.values() if math.isfinite(v)), default=math.nan)
    first = next((c for c in comps if c.verdict != "not-testable"), None)
    key = (f"{first.name}: {fmt(first.effect)} {first.interval_text()} (margin {fmt(first.margin)})" if first
           else "no testable comparison") + f"; max certified ratio {fmt(worst, 10)}"
    return empirical_outcome(comps, tested, verdict, lines=lines, key=key)


# ----------------------------------------------------------------------------- F12 structures side by side
F12_METRICS = {"loss": "held-out loss", "token_entropy": "gate entropy / log E\n(end; P2)",
               "gini": "load Gini (end)", "certified_ratio": "certified ratio\n‖W_r(T⊗I)‖₂/‖W_r‖₂"}


def f12_methods() -> tuple[str, ...]:
    """MoELoRA-code, the reference and every communication structure of the registry."""
    return (*methods.tagged("baseline", "routed"), methods.reference(), *methods.tagged("structure"))


def prepare_f12(planted=None, train=None, lm=None) -> pd.DataFrame:
    """Per setting that ran a structure and method of :func:`f12_methods`: held-out loss, end-of-training
    gate entropy and load Gini (mean over routed layers), certified ratio (largest over talk layers),
    each mean and 95 % CI over seeds."""
    data = {k: v for k, v in (("planted", planted), ("train", train), ("lm", lm)) if v is not None}
    parts = []
    for run in ev.runs(data):
        keep = [m for m in f12_methods() if m in run.methods()]
        if not set(keep) & set(methods.tagged("structure")):
            continue
        frames = {"loss": ev.heldout(run.rows, "loss"), "token_entropy": ev.routing(run, "token_entropy")["end"],
                  "gini": ev.routing(run, "gini")["end"]}
        cert = ev.certified(run).groupby(["method", "seed"])["value"].max()
        frames["certified_ratio"] = cert.unstack("method") if len(cert) else pd.DataFrame()
        for metric, wide in frames.items():
            long = wide.reindex(columns=[m for m in keep if m in wide]).melt(ignore_index=False, var_name="method")
            long = long.dropna(subset=["value"]).reset_index()
            if len(long):
                parts.append(summarise(long, ["method"]).assign(source=run.name, metric=metric))
    cols = ["source", "metric", "method", "mean", "lo", "hi", "n"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def draw_f12(data: pd.DataFrame):
    sources = order(data["source"], list(ev.ORDER)) or ["no data"]
    names = [m for m in f12_methods() if m in set(data["method"])]
    fig, axes = plt.subplots(len(F12_METRICS), len(sources), figsize=(WIDTH, 2.1 * len(F12_METRICS) + 0.8),
                             squeeze=False, sharex="col")
    for col, source in enumerate(sources):
        for row, (metric, ylabel) in enumerate(F12_METRICS.items()):
            ax = axes[row, col]
            d = data[(data["source"] == source) & (data["metric"] == metric)].set_index("method").reindex(names)
            x = np.arange(len(names))
            for i, m in enumerate(names):
                if np.isfinite(d.loc[m, "mean"]):
                    ax.errorbar(x[i], d.loc[m, "mean"], yerr=[[d.loc[m, "mean"] - d.loc[m, "lo"]],
                                                               [d.loc[m, "hi"] - d.loc[m, "mean"]]],
                                fmt=methods.marker(m), color=methods.color(m), label=methods.label(m), capsize=3, ms=6)
            if metric == "certified_ratio":
                ax.axhline(1.0, color="0.3", lw=0.9, ls="--")
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=8.5)
            if row == 0:
                ax.set_title(source, fontsize=10)
            ax.set_xticks(x, [methods.label(m) for m in names], rotation=35, ha="right", fontsize=7)
    fig.tight_layout()
    legend_below(fig, *dedupe(axes), ncol=3, title="mean ± 95% CI over seeds; dashed: certified ratio 1 (T = I)")
    return fig


# ----------------------------------------------------------------------------- declarations
C13 = ClaimSpec(
    "C13", paper="(ours) a doubly-stochastic T keeps TalkLoRA's effect and certifies a non-rising bound",
    statement=("TalkLoRA with a doubly-stochastic T (Sinkhorn) is non-inferior to TalkLoRA with the full T in "
               "held-out loss (worse by less than the setting's loss margin) in every testable setting, and every "
               "trained doubly-stochastic layer has a certified router bound w.r.t. the code no larger than that "
               "of T = I with the same W_r (certified ratio ≤ 1)."),
    rule=("(a) per setting passing P1 and P2 (both routers decisive): held-out loss DS − TalkLoRA paired by seed, "
          "interval at its Holm level over the testable settings; supported if its upper end < the loss margin, "
          "contradicted if its lower end > the margin, else inconclusive. (b) the certified ratio "
          "‖W_r(T⊗I)‖₂/‖W_r‖₂ of every trained DS layer ≤ 1 + 1e-9 (the maximum is reported). The claim is "
          "contradicted if (b) fails, else (a) combined by docs/method.md §5.5 (supported only with (b) measured "
          "in every setting that ran DS); not-testable if no setting ran DS or none passes its controls."),
    figures=("F10", "F12"), tests=(r"tests/test_structures\.py::test_doubly_stochastic",),
    experiments=(), optional=ev.EXPERIMENTS, evaluate=evaluate_c13, kind="empirical")
F12 = FigureSpec(
    "F12", "communication_structures", (), prepare_f12, draw_f12, notebook="05_structures.py",
    optional=("planted", "train", "lm"), caption_text=
    "Communication structures side by side ({claims}), one column per setting that ran them: held-out loss, "
    "end-of-training per-token gate entropy / log E (the P2 quantity) and load Gini (mean over routed layers), "
    "and the certified router ratio ‖W_r(T⊗I)‖₂/‖W_r‖₂ (largest over talk layers; dashed: 1, the bound of T = I) "
    "for MoELoRA-code, TalkLoRA with the full T and every constrained structure (broadcast, doubly stochastic, "
    "block, banded, low-rank); mean ± 95% CI over seeds. The verdict reads the doubly-stochastic structure "
    "only: its held-out loss against the full T's (non-inferiority, paired by seed) and its certified ratio ≤ 1 "
    "in every trained layer; the other structures are reported.")

CLAIMS = (C13,)
FIGURES = (F12,)
