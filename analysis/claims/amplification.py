"""Claim C5 (communication mitigates perturbation amplification) and figure F2.

Rows: ``perturb_synthetic`` (synthetic layers per talk setting: same A, C, B, W_r, different T),
``perturb_controls`` (their scale-matched MoELoRA-code controls W_r' = c·W_r, spectral or Frobenius
norm matched) and the trained routers of ``train``.  **select** per-seed log ratios of the median
routing quotient talk / control → **compare** them as one Holm family → **verdict** (every
comparison holds / one refuted) → **render**.
"""
from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import methods
from ..plotting import (KIND_LABELS, WIDTH, dedupe, legend_below, line_ci, log_ylim_from, nice_log, order, sel,
                        summarise, talk_colors, talk_label, talk_order)
from ..stats import Comparison, Family, fmt
from .base import ClaimSpec, FigureSpec, Outcome, margin
from .helpers import md_table

C5_KINDS = ("gaussian_input", "adversarial")
C5_CONTROLS = ("spectral", "frobenius")      # scale-matched MoELoRA-code controls (primary, second)
C5_PRIMARY_TALK = "official"


# ----------------------------------------------------------------------------- select
def _seed_log_ratio(frame: pd.DataFrame, num: str, den: str, by: list[str]) -> pd.Series:
    """Per replicate (``by``): mean of log(num/den) over the other cells (kinds, ε, grid, layers)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(frame[num] / frame[den])
    ok = np.isfinite(lr)
    return lr[ok].groupby([frame.loc[ok, c] for c in by]).mean()


def c5_log_ratios(syn: pd.DataFrame, controls: pd.DataFrame) -> dict[tuple[str, str], pd.Series]:
    """Per (talk setting, control) the per-seed mean log ratio of the median routing quotient
    talk / scale-matched control (kinds :data:`C5_KINDS`, ε > 0; joined on E, r, talk, seed, kind, ε)."""
    keys = ["E", "r", "talk", "seed", "kind", "eps"]
    q = syn[(syn.metric == "routing_quotient") & (syn.statistic == "median") & syn.kind.isin(C5_KINDS) & (syn.eps > 0)]
    c = controls[(controls.metric == "routing_quotient") & (controls.statistic == "median")
                 & controls.kind.isin(C5_KINDS) & (controls.eps > 0)]
    out = {}
    for ctrl, g in c.groupby("control"):
        j = q[keys + ["value"]].merge(g[keys + ["value"]], on=keys, suffixes=("_talk", "_control"))
        for talk, h in j.groupby("talk"):
            out[(str(talk), str(ctrl))] = _seed_log_ratio(h, "value_talk", "value_control", ["seed"])
    return out


def c5_trained_log_ratios(train: pd.DataFrame | None) -> dict[str, pd.Series]:
    """Per task: per-seed mean log ratio of the median routing quotient, trained reference (TalkLoRA-
    official) / its trained scale-matched control (same seed: same init, data order), over layers,
    kinds and ε."""
    if train is None or "kind" not in train:
        return {}
    talk, (scaled,) = methods.reference(), methods.tagged("scale-matched")
    t = train[(train.step == -1) & (train.metric == "routing_quotient") & (train.statistic == "median")
              & train.kind.isin(C5_KINDS)]
    if "budget" in t:
        t = t[t["budget"].isna()]
    if "task" not in t:
        t = t.assign(task="task")
    piv = t.pivot_table(index=["task", "seed", "layer", "kind", "eps"], columns="method", values="value",
                        aggfunc="first").reset_index()
    if not {talk, scaled} <= set(piv.columns):
        return {}
    return {str(task): _seed_log_ratio(g, talk, scaled, ["seed"]) for task, g in piv.groupby("task")}


# ----------------------------------------------------------------------------- compare
def compare_c5(ratios: dict, trained: dict, margin_: float) -> Family:
    """The deciding family: the official init against each control (synthetic), and trained
    TalkLoRA-official against its scale-matched control per task; claimed < 0, Holm over the family."""
    primary = [(f"log(official / {ctrl}-matched control), synthetic", ratios[(C5_PRIMARY_TALK, ctrl)].to_numpy(),
                margin_, "less") for ctrl in C5_CONTROLS if (C5_PRIMARY_TALK, ctrl) in ratios]
    primary += [(f"log(TalkLoRA-official / scale-matched MoELoRA-code), trained, {task}", v.to_numpy(), margin_,
                 "less") for task, v in trained.items()]
    return Family.of_differences(primary)


def secondary_c5(ratios: dict, margin_: float) -> list[Comparison]:
    """The uniform-mix settings against their controls (95 %, reported beside the verdict)."""
    return [Comparison.from_differences(f"log({talk} / {ctrl}-matched control)", v.to_numpy(), margin_, "less")
            for (talk, ctrl), v in sorted(ratios.items()) if talk not in (C5_PRIMARY_TALK, "identity")]


# ----------------------------------------------------------------------------- verdict
def verdict_c5(family: Family) -> tuple[str, str]:
    """Inconclusive unless the official setting has both controls; else every comparison holds →
    holds, one refuted → refuted, otherwise inconclusive."""
    if len([c for c in family if "synthetic" in c.name]) < len(C5_CONTROLS):
        return "inconclusive", f"the official setting lacks a control among {list(C5_CONTROLS)} in perturb_controls"
    return family.decide()


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c5(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C5.rule`` (below) to the saved rows."""
    margin_ = margin(config, "c5_ratio")
    controls = data["perturb_controls"]
    ratios = c5_log_ratios(data["perturb_synthetic"], controls)
    trained = c5_trained_log_ratios(data.get("train"))
    family = compare_c5(ratios, trained, margin_)
    verdict, reason = verdict_c5(family)
    comps = list(family)
    secondary = secondary_c5(ratios, margin_)
    norms = controls[controls.metric == "router_norm"].pivot_table(
        index=["talk", "statistic"], columns="control", values="value", aggfunc="mean")
    norm_rows = [[f"`{t}`", st] + [fmt(float(norms.loc[(t, st), c])) if c in norms else "n/a"
                                   for c in ("talk", *C5_CONTROLS)] for t, st in norms.index]
    official = next((c for c in comps if c.name.startswith("log(official / spectral")), None)
    key = ("official / spectral-matched control ×" + (f"{fmt(math.exp(official.effect))} "
           f"[{fmt(math.exp(official.ci_low))}, {fmt(math.exp(official.ci_high))}]" if official else "n/a"))
    frob = next((c for c in comps if c.name.startswith("log(official / frobenius")), None)
    if frob is not None:
        key += f"; Frobenius-matched ×{fmt(math.exp(frob.effect))}"
    ev = ["- Effect: per seed, the mean over kinds "
          f"{list(C5_KINDS)}, ε > 0 and grid (E, r) of log(median routing quotient ‖Δg‖/‖δ‖ of the talk "
          "setting / that of its scale-matched MoELoRA-code control W_r' = c·W_r with the same A, C, B); "
          "< 0 = communication reduces amplification beyond what the router's scale explains. Intervals at "
          "Holm-ordered levels over the verdict's family; margin ±margins.c5_ratio (log scale).",
          "- Secondary (not in the verdict): the uniform-mix settings T = αI + (1−α)J/E against their "
          "controls (95 % intervals):",
          md_table(["secondary comparison", "n", "effect", "95 % interval", "margin", "MDE", "verdict"],
                   [c.row() for c in secondary]) if secondary else "- (no uniform-mix settings)",
          "- Router norms (mean over seeds and grid; the controls match the talk router's spectral resp. "
          "Frobenius norm):",
          md_table(["talk setting", "norm", "talk W_r(T⊗I)", *(f"{c} control" for c in C5_CONTROLS)], norm_rows),
          "- The spectral match gives the same certified bound ½‖W_eff‖₂ (the router's Lipschitz scale, "
          "its temperature in docs/method.md §5); the Frobenius match gives the same overall weight size. A "
          "communication effect must survive both."]
    if not trained:
        ev.append(f"- No trained comparison: the `train` rows have no `{methods.tagged('scale-matched')[0]}` "
                  "routing quotients.")
    return Outcome(verdict, reason, key, ev, comparisons=comps)


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
    statement=("A Talking Module lowers the router's perturbation amplification (median routing quotient "
               "‖Δg‖/‖δ‖ under Gaussian-input and adversarial perturbations) below that of a scale-matched "
               "MoELoRA-code control — the same A, C, B and W_r' = c·W_r with c chosen so the control has "
               "the same router norm, i.e. the same router temperature — so the effect is communication, "
               "not a smaller router."),
    rule=("comparisons (effect: per seed, mean over kinds {gaussian_input, adversarial}, ε > 0, grid and "
          "layers of log(quotient of TalkLoRA / quotient of its scale-matched control); claimed side < 0; "
          "margin ±margins.c5_ratio; intervals at Holm-ordered levels over the family): the official init "
          "on synthetic layers against the spectral-norm-matched control (primary: same certified bound) and "
          "against the Frobenius-norm-matched control (second), and, where `train` has them, trained "
          "TalkLoRA-official vs trained `moelora-code-scaled` per task. Each comparison's verdict is docs/method.md §5's "
          "(holds: interval below 0; refuted: interval inside ±margin or above 0; else inconclusive). C5 "
          "holds if every comparison holds, is refuted if any comparison is refuted, else inconclusive. "
          "Uniform-mix settings are reported beside it, not in the verdict."),
    figures=("F2", "F10"),
    tests=(r"tests/test_probes_lipschitz\.py::test_(uniform_mix_column_norm|worked_example_E2_m1|doubly_stochastic_)",
           r"tests/test_probes_amplification\.py::test_fixed_block_and_talk_spreading"),
    experiments=("perturb_synthetic", "perturb_controls"), optional=("train",), evaluate=evaluate_c5)
F2 = FigureSpec(
    "F2", "amplification_vs_eps", ("perturb_synthetic", "perturb_controls"), prepare_f2, draw_f2,
    notebook="02_smoothness.py", caption_text=
    "Perturbation amplification ({claims}): routing quotient ‖Δg‖₂/‖δ‖₂ (median solid, 95th "
    "percentile dotted over tokens) vs relative perturbation size ε, per perturbation kind (columns) "
    "and number of experts (rows), for each talk setting; every setting shares A, C, B, W_r and "
    "differs in T only. Bottom row: the median quotient of each talk setting divided by that of its "
    "scale-matched MoELoRA-code control (W_r' = c·W_r with the same spectral norm, solid, or Frobenius "
    "norm, dashed, as W_r(T⊗I)), geometric mean over the grid (E, r); below 1 = communication reduces "
    "amplification beyond the router's scale. Shaded: 95% CI over seeds (geometric for the ratios). The "
    "verdict reads the official setting's ratio to each control averaged per seed over the Gaussian-input "
    "and adversarial kinds, every ε > 0 and the grid (one comparison per control, Holm-ordered levels), "
    "plus trained TalkLoRA against its trained scale-matched control (not drawn); the uniform-mix settings "
    "are reported, not judged.")
CLAIMS = (C5,)
FIGURES = (F2,)
