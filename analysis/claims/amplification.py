"""Claim C5 (communication mitigates perturbation amplification) and figure F2.

Rows: every setting's evaluation sweep (:mod:`analysis.claims.evidence`): the median routing quotient
‖Δg‖/‖δ‖ of every trained router per perturbation kind and ε (MiniLM router probes at ``step = −1``;
planted ``split = amplification``).  **select** per seed the log quotient, averaged over adapted layers,
per (kind, ε) → **compare** log(TalkLoRA / comparator) against the function-matched twin and the
centred-map-matched control (the preregistration's ``[deciding] C5``), each perturbation kind (and ε)
its own comparison, never averaged, one Holm family over the testable settings (P1, P2) → **verdict**
(docs/method.md §5.5) → **render**.  The synthetic sweeps (``perturb_synthetic`` against the
scale-matched controls of ``perturb_controls``) are reported.
"""
from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import methods
from ..plotting import (KIND_LABELS, WIDTH, dedupe, legend_below, line_ci, log_ylim_from, nice_log, order, sel,
                        summarise, talk_colors, talk_label, talk_order)
from ..stats import fmt
from . import evidence as ev
from .assay import assays, deciding_methods, levels, registration
from .base import ClaimSpec, FigureSpec, Outcome
from .decide import Paired, claim_verdict, empirical_outcome, judge_family, pair, why_not_testable

C5_KINDS = ("gaussian_input", "gaussian_block", "adversarial")


# ----------------------------------------------------------------------------- select
def _seed_log_ratio(frame: pd.DataFrame, num: str, den: str, by: list[str]) -> pd.Series:
    """Per replicate (``by``): mean of log(num/den) over the other cells (kinds, ε, grid, layers)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(frame[num] / frame[den])
    ok = np.isfinite(lr)
    return lr[ok].groupby([frame.loc[ok, c] for c in by]).mean()


def c5_log_ratios(syn: pd.DataFrame, controls: pd.DataFrame) -> dict[tuple[str, str], pd.Series]:
    """Synthetic layers, reported: per (talk setting, control) the per-seed mean log ratio of the median
    routing quotient talk / scale-matched control (Gaussian-input and adversarial kinds, ε > 0)."""
    keys = ["E", "r", "talk", "seed", "kind", "eps"]
    kinds = ("gaussian_input", "adversarial")
    q = syn[(syn.metric == "routing_quotient") & (syn.statistic == "median") & syn.kind.isin(kinds) & (syn.eps > 0)]
    c = controls[(controls.metric == "routing_quotient") & (controls.statistic == "median")
                 & controls.kind.isin(kinds) & (controls.eps > 0)]
    out = {}
    for ctrl, g in c.groupby("control"):
        j = q[keys + ["value"]].merge(g[keys + ["value"]], on=keys, suffixes=("_talk", "_control"))
        for talk, h in j.groupby("talk"):
            out[(str(talk), str(ctrl))] = _seed_log_ratio(h, "value_talk", "value_control", ["seed"])
    return out


# ----------------------------------------------------------------------------- compare
def items_c5(data: dict, config: dict | None = None) -> tuple[list[Paired], list]:
    """Per setting, comparator and (kind, ε): per seed log(quotient TalkLoRA / quotient comparator)
    (mean over layers), claimed < 0, margin ``amplification_log``; controls P1, P2."""
    talk, deciding = methods.reference(), deciding_methods("C5")
    others = tuple(m for m in methods.tagged("scale-matched") if m not in deciding)
    items, tested = [], []
    for a in assays(data, config):
        run = a.run
        amp = ev.amplification(run)
        if amp.empty or talk not in set(amp["method"]):
            continue
        controls = a.controls((talk, *deciding), p2=True)
        tested.append((a, controls, f"log ratio ±{fmt(a.margins.get('amplification_log'))}"))
        for (kind, eps), g in amp.groupby(["kind", "eps"]):
            wide = g.pivot_table(index="seed", columns="method", values="value")
            for b in (*deciding, *others):
                p = pair(f"{run.name}: log(quotient TalkLoRA / {methods.label(b)}), {kind}, ε = {fmt(eps)}", wide, talk,
                         b, a.margins.get("amplification_log"), "less", setting=run.name, controls=controls,
                         deciding=b in deciding)
                if p is not None:
                    items.append(p)
    return items, tested


def synthetic_items(data: dict) -> list[Paired]:
    """Reported: the synthetic official-init and uniform-mix talk settings against their scale-matched
    controls (no positive control applies: these layers are not trained)."""
    syn, controls = data.get("perturb_synthetic"), data.get("perturb_controls")
    if syn is None or controls is None or not len(syn) or not len(controls):
        return []
    margin = registration().margin_rule("amplification_log")
    return [Paired(f"synthetic: log({talk} / {ctrl}-matched control)", tuple(v.to_numpy(float)), margin, "less",
                   "synthetic layers (untrained, reported)", "passed", False)
            for (talk, ctrl), v in sorted(c5_log_ratios(syn, controls).items()) if talk != "identity"]


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c5(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C5.rule`` (below) to the saved rows."""
    items, tested = items_c5(data, config)
    conf, power = levels()
    comps = judge_family(items, conf, power) + judge_family(synthetic_items(data), conf, power)
    lines = ["- Effect per seed: log(median routing quotient ‖Δg‖/‖δ‖ of trained TalkLoRA / that of the trained "
             "comparator of the same seed), averaged over adapted layers, one comparison per perturbation kind "
             f"({', '.join(KIND_LABELS.get(k, k) for k in C5_KINDS)}) and ε — never averaged; < 0 = communication "
             "amplifies less. Deciding: the function-matched twin (same function at step 0) and the control matched "
             "on the centred router map (I − J/E) W_eff A; the scale-matched control is reported, as are the "
             "synthetic sweeps (untrained layers: official and uniform-mix T against spectral- and "
             "Frobenius-norm-matched MoELoRA-code controls)."]
    return empirical_outcome(comps, tested, verdict_c5(comps, why_not_testable(tested)), lines=lines)


def verdict_c5(comps, none_testable: str) -> tuple[str, str]:
    """docs/method.md §5.5 over the per-kind comparisons with the twin and the centred-map-matched control."""
    return claim_verdict(comps, none_testable)


# ----------------------------------------------------------------------------- F2 amplification vs eps
def prepare_f2(synthetic: pd.DataFrame, controls: pd.DataFrame) -> pd.DataFrame:
    """``panel = quotient``: routing quotient (median, p95 over tokens) per (E, kind, talk, ε), mean
    and 95 % CI over seeds; ``panel = ratio/<control>``: per seed the geometric mean over (E, r) of
    the median quotient talk / scale-matched control, geometric mean and 95 % CI over seeds."""
    d = sel(synthetic, metric="routing_quotient", statistic=["median", "p95"])
    out = [summarise(d, ["E", "kind", "talk", "statistic", "eps"]).assign(panel="quotient")]
    keys = ["E", "r", "talk", "seed", "kind", "eps"]
    q = sel(synthetic, metric="routing_quotient", statistic="median")
    for ctrl, g in sel(controls, metric="routing_quotient", statistic="median").groupby("control"):
        j = q[keys + ["value"]].merge(g[keys + ["value"]], on=keys, suffixes=("", "_control"))
        j = j[(j["value"] > 0) & (j["value_control"] > 0)]
        j = j.assign(value=np.log(j["value"] / j["value_control"]))
        j = j.groupby(["talk", "kind", "eps", "seed"], as_index=False)["value"].mean()
        r = summarise(j, ["kind", "talk", "eps"])
        r[["mean", "lo", "hi"]] = np.exp(r[["mean", "lo", "hi"]])
        out.append(r.assign(panel=f"ratio/{ctrl}", statistic="median", E=np.nan))
    return pd.concat(out, ignore_index=True)


def draw_f2(data: pd.DataFrame):
    if "panel" not in data:                       # figure data written before the controls existed
        data = data.assign(panel="quotient")
    ratio = data[data["panel"].str.startswith("ratio/")]
    data = data[data["panel"] == "quotient"]
    Es = sorted(data["E"].unique())
    kinds = order(data["kind"], list(KIND_LABELS))
    talks = talk_order(data["talk"])
    colors = talk_colors(talks)
    markers = dict(zip(talks, "osD^vP*X"))
    extra = 1 if len(ratio) else 0
    fig, axes = plt.subplots(len(Es) + extra, len(kinds), figsize=(WIDTH, 2.5 * (len(Es) + extra) + 0.6),
                             squeeze=False, sharex=True, sharey="row")
    for i, E in enumerate(Es):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            for t in talks:
                for stat, ls in (("median", "-"), ("p95", ":")):
                    d = sel(data, E=E, kind=kind, talk=t, statistic=stat)
                    if len(d):
                        line_ci(ax, d, "eps", color=colors[t], ls=ls, marker=markers[t] if stat == "median" else "",
                                label=talk_label(t) if stat == "median" else None, band=stat == "median")
            ax.set_xscale("log")
            ax.set_yscale("log")
            log_ylim_from(ax, sel(data, E=E)["mean"], pad=1.6)
            if i == 0:
                ax.set_title(KIND_LABELS.get(kind, kind), fontsize=9.5)
            if j == 0:
                ax.set_ylabel(f"E = {E}\nrouting quotient ‖Δg‖₂/‖δ‖₂")
            nice_log(ax, "y")
    if extra:
        for j, kind in enumerate(kinds):
            ax = axes[-1, j]
            for t in talks:
                for panel, ls in (("ratio/spectral", "-"), ("ratio/frobenius", "--")):
                    d = ratio[(ratio["panel"] == panel) & (ratio["kind"] == kind) & (ratio["talk"] == t)]
                    if len(d):
                        line_ci(ax, d, "eps", color=colors[t], ls=ls, marker=markers[t], band=panel == "ratio/spectral")
            ax.axhline(1.0, color="0.3", lw=0.9)
            ax.set_xscale("log")
            if j == 0:
                ax.set_ylabel("talk / scale-matched\nMoELoRA-code control")
    fig.supxlabel("ε  (relative perturbation size ‖δ‖/‖x‖, or ‖δh‖/‖h‖ for the block kind)", fontsize=10)
    fig.tight_layout()
    h, lab = dedupe(axes)
    h += [matplotlib.lines.Line2D([], [], color="0.3", ls="-", marker="o"),
          matplotlib.lines.Line2D([], [], color="0.3", ls=":")]
    lab += ["median over tokens", "95th percentile"]
    if extra:
        h += [matplotlib.lines.Line2D([], [], color="0.3", ls="-"), matplotlib.lines.Line2D([], [], color="0.3", ls="--")]
        lab += ["bottom: / spectral-norm-matched control", "bottom: / Frobenius-norm-matched control"]
    legend_below(fig, h, lab, ncol=3, title="talk setting T (shaded: 95% CI over seeds)")
    return fig


# ----------------------------------------------------------------------------- declarations
C5 = ClaimSpec(
    "C5", paper="communication mitigates perturbation amplification",
    statement=("After training, TalkLoRA's router amplifies input perturbations less (lower median routing "
               "quotient ‖Δg‖/‖δ‖) than its function-matched twin and than a MoELoRA-code control matched on the "
               "centred router map (I − J/E) W_eff A, for each perturbation kind, in every testable setting."),
    rule=("per setting passing P1 and P2, comparator (deciding: the function-matched twin and the "
          "centred-map-matched control, preregistration [deciding] C5), perturbation kind and ε: per seed "
          "log(median quotient TalkLoRA / median quotient comparator), mean over adapted layers, claimed < 0, margin "
          "±amplification_log; each kind its own comparison, never averaged; Holm over every deciding comparison of "
          "the testable settings; docs/method.md §5.4 per comparison, §5.5 for the claim. The scale-matched control "
          "and the synthetic sweeps (official / uniform-mix T vs spectral- and Frobenius-matched controls) are "
          "reported."),
    figures=("F2", "F10"),
    tests=(r"tests/test_probes_lipschitz\.py::test_(uniform_mix_column_norm|worked_example_E2_m1|doubly_stochastic_)",
           r"tests/test_probes_amplification\.py::test_fixed_block_and_talk_spreading"),
    experiments=(), optional=(*ev.EXPERIMENTS, "perturb_synthetic", "perturb_controls"), evaluate=evaluate_c5,
    kind="empirical")
F2 = FigureSpec(
    "F2", "amplification_vs_eps", ("perturb_synthetic", "perturb_controls"), prepare_f2, draw_f2,
    notebook="02_smoothness.py", caption_text=
    "Perturbation amplification on synthetic layers ({claims}; reported, not deciding): routing quotient "
    "‖Δg‖₂/‖δ‖₂ (median solid, 95th percentile dotted over tokens) vs relative perturbation size ε, per "
    "perturbation kind (columns) and number of experts (rows), for each talk setting; every setting shares A, C, "
    "B, W_r and differs in T only. Bottom row: the median quotient of each talk setting divided by that of its "
    "scale-matched MoELoRA-code control (same spectral norm, solid, or Frobenius norm, dashed, as W_r(T⊗I)), "
    "geometric mean over the grid (E, r); below 1 = communication reduces amplification beyond the router's "
    "scale. Shaded: 95% CI over seeds (geometric for the ratios). The verdict reads trained routers instead: "
    "TalkLoRA against its function-matched twin and the centred-map-matched control, per kind and ε, in the "
    "settings that pass P1 and P2 (F10).")
CLAIMS = (C5,)
FIGURES = (F2,)
