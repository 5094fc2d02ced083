"""Claim C4 (router Lipschitz bounds: certified ≥ max local ≥ empirical) and figure F3.

Rows: ``perturb_synthetic`` (synthetic layers per talk setting, w.r.t. the code h and the input x),
``perturb_routers`` (dense and top-k routers on the same weights), the trained routers of ``train``
and the twin runs of ``twins``.  C4 is analytic: **select** the certified / local / empirical
constants per cell, **compare** them as ratios to the certified bound per source, a pure
**verdict** from the ratios, then **render** the evidence.
"""
from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import methods
from ..plotting import (STAT_COLORS, STAT_LABELS, WIDTH, legend_below, log_ylim_from, nice_log, order, sel,
                        summarise, talk_order, talk_short)
from ..stats import fmt
from .base import ClaimSpec, FigureSpec, Outcome
from .helpers import md_table

LIP_REL_TOL = 1e-9                          # local/empirical <= certified * (1 + LIP_REL_TOL)


# ----------------------------------------------------------------------------- select
def sandwich_ratios(df: pd.DataFrame, keys: list[str], certified: str, local: str, empirical: str | None,
                    col: str = "statistic") -> pd.DataFrame:
    """Per cell ``keys``: the certified bound and local_max / certified (and empirical / certified)."""
    piv = df.pivot_table(index=keys, columns=col, values="value", aggfunc="first")
    out = pd.DataFrame(index=piv.index)
    out["certified"] = piv[certified]
    out["local"] = piv[local] / piv[certified]
    if empirical is not None and empirical in piv:
        out["empirical"] = piv[empirical] / piv[certified]
    return out.reset_index()


def select_c4(data: dict) -> tuple[list[tuple[str, pd.DataFrame]], int]:
    """``([(source, ratio frame)], top-k cells)``: the sandwich ratios per source; top-k routers of
    ``perturb_routers`` (no certified bound: gates jump at ties) are only counted."""
    syn = data["perturb_synthetic"]
    routers, train, twins = (data.get(k) for k in ("perturb_routers", "train", "twins"))
    parts = []
    lip = syn[syn.metric == "lipschitz"]
    keys = [c for c in ("E", "r", "talk", "seed", "kind") if c in lip]
    parts.append(("synthetic layers (w.r.t. code and input)", sandwich_ratios(lip, keys, "certified", "local_max", "empirical")))
    topk_cells = 0
    if routers is not None:
        ex = routers[routers.metric == "certified_exists"].groupby("router").value.max()
        topk = set(ex[ex == 0].index)
        lr = routers[(routers.metric == "lipschitz")]
        topk_cells = int(lr[lr.router.isin(topk)].groupby(["router", "seed", "kind"]).ngroups)
        lr = lr[~lr.router.isin(topk)]
        if len(lr):
            parts.append(("dense routers (w.r.t. code)", sandwich_ratios(lr, ["router", "seed", "kind"],
                                                                         "certified", "local_max", None)))
    if train is not None:
        lt = train[train.metric == "lipschitz"]
        if len(lt):
            parts.append(("trained routers (w.r.t. input)", sandwich_ratios(lt, ["method", "seed", "layer", "kind"],
                                                                             "certified", "local_max", "empirical")))
    if twins is not None:
        tw = twins[twins.metric.isin(["lipschitz_certified", "lipschitz_local_max"])]
        if len(tw):
            parts.append(("twin runs over training (w.r.t. code)",
                          sandwich_ratios(tw, ["optimizer", "seed", "step", "model", "layer"],
                                          "lipschitz_certified", "lipschitz_local_max", None, col="metric")))
    return parts, topk_cells


# ----------------------------------------------------------------------------- compare
def compare_c4(parts) -> dict:
    """Per source: cells with a finite certified bound, the largest ratios, the violations
    (ratio > 1 + :data:`LIP_REL_TOL`) and the cells left out (no finite certified bound)."""
    rows, worst, n_cells, violations, excluded = [], {"local": 0.0, "empirical": 0.0}, 0, [], {}
    for name, r in parts:
        finite = np.isfinite(r["certified"]) & (r["certified"] > 0)
        if (~finite).any():
            excluded[name] = int((~finite).sum())
        r = r[finite]
        n_cells += len(r)
        line = [name, len(r)]
        for c in ("local", "empirical"):
            if c in r and r[c].notna().any():
                mx = float(r[c].max())
                worst[c] = max(worst[c], mx)
                nbad = int((~(r[c] <= 1 + LIP_REL_TOL)).sum() - r[c].isna().sum())
                if nbad:
                    violations.append(f"{name}: {nbad} cells with {c}/certified > 1 + 1e-9 (max {fmt(mx, 6)})")
                line.append(f"{fmt(mx, 6)} (min {fmt(float(r[c].min()), 3)})")
            else:
                line.append("—")
        rows.append(line)
    return dict(rows=rows, worst=worst, n_cells=n_cells, violations=violations, excluded=excluded)


# ----------------------------------------------------------------------------- verdict
def verdict_c4(n_cells: int, violations: list[str], worst: dict) -> tuple[str, str]:
    """Holds if no cell violates the sandwich, refuted if one does, inconclusive without cells."""
    if n_cells == 0:
        return "inconclusive", "no Lipschitz cell with a finite certified bound"
    if violations:
        return "refuted", "; ".join(violations)
    return "holds", (f"in all {n_cells} cells local_max/certified ≤ {fmt(worst['local'], 6)} and "
                     f"empirical/certified ≤ {fmt(worst['empirical'], 6)}, both ≤ 1 + 1e-9")


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c4(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C4.rule`` (below) to the saved rows."""
    parts, topk_cells = select_c4(data)
    s = compare_c4(parts)
    verdict, reason = verdict_c4(s["n_cells"], s["violations"], s["worst"])
    worst = s["worst"]
    key = f"max local/certified {fmt(worst['local'], 4)}, max empirical/certified {fmt(worst['empirical'], 4)}"
    apart = [f"top-k routers of perturb_routers (no certified bound: gates jump at ties): {topk_cells} cells"] * bool(topk_cells)
    apart += [f"{name}: {k} cells without a finite certified bound" for name, k in s["excluded"].items()]
    ev = ["- Ratios to the certified bound ½‖W_eff(A)‖₂ (max over cells; ≤ 1 means the bound holds); only "
          "cells with a finite certified bound count:",
          md_table(["source", "cells", "max local_max / certified", "max empirical / certified"], s["rows"]),
          "- Counted apart (not in the sandwich counts): " + ("; ".join(apart) if apart else "none") + ".",
          "- The softmax-Jacobian bound ‖J_s(p)‖₂ ≤ ½ is what makes local_max ≤ certified; it is "
          "tested directly by `test_softmax_jacobian_norm_at_most_half` and its closed forms."]
    return Outcome(verdict, reason, key, ev)


# ----------------------------------------------------------------------------- F3 Lipschitz sandwich
SANDWICH = ["certified", "local_max", "empirical"]


def prepare_f3(synthetic: pd.DataFrame, train: pd.DataFrame | None = None) -> pd.DataFrame:
    """Certified / max local / empirical constants, mean and 95 % CI: synthetic layers per (w.r.t.,
    E, talk setting) over seeds, trained MiniLM routers (where ``train`` ran) per method over seeds and layers."""
    s = sel(synthetic, metric="lipschitz", statistic=SANDWICH)
    s = summarise(s.assign(panel="synthetic, w.r.t. " + s["kind"].str.replace("lipschitz_", ""),
                           group=s["talk"]), ["panel", "E", "group", "statistic"])
    if train is None or "statistic" not in train:
        return s
    t = sel(train, metric="lipschitz", statistic=SANDWICH, step=-1)
    t = summarise(t.assign(panel="trained routers, w.r.t. input", group=t["method"], E=np.nan),
                  ["panel", "E", "group", "statistic"])
    return pd.concat([s, t], ignore_index=True)


def draw_f3(data: pd.DataFrame):
    panels = sorted(data["panel"].unique(), key=lambda p: (p.startswith("trained"), p))
    fig, axes = plt.subplots(1, len(panels), figsize=(WIDTH, 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        d = data[data["panel"] == panel]
        trained = panel.startswith("trained")
        groups = order(d["group"], list(methods.ORDER)) if trained else talk_order(d["group"])
        Es = sorted(d["E"].dropna().unique()) or [np.nan]
        for k, E in enumerate(Es):
            for j, stat in enumerate(SANDWICH):
                dd = d[(d["statistic"] == stat) & ((d["E"] == E) | (np.isnan(E) & d["E"].isna()))]
                dd = dd.set_index("group").reindex(groups)
                off = (j - 1) * 0.12 + (k - (len(Es) - 1) / 2) * 0.04
                x = np.arange(len(groups)) + off
                ax.errorbar(x, dd["mean"], yerr=[dd["mean"] - dd["lo"], dd["hi"] - dd["mean"]],
                            fmt=["o", "s", "^", "D"][k % 4], color=STAT_COLORS[stat], capsize=2, ls="none")
                if not trained:      # connect the α grid (mix … identity); official stands apart
                    on_grid = np.array([g != "official" for g in groups])
                    ax.plot(x[on_grid], dd["mean"].to_numpy()[on_grid], color=STAT_COLORS[stat], lw=1,
                            ls=["-", "--", ":", "-."][k % 4])
        labels = [methods.label(g) for g in groups] if trained else [talk_short(g) for g in groups]
        ax.set_xticks(range(len(groups)), labels, rotation=25, ha="right")
        ax.set_yscale("log")
        log_ylim_from(ax, d["mean"], pad=1.5)
        nice_log(ax, "y")
        if not trained and "official" in groups:
            ax.axvline(groups.index("official") - 0.5, color="0.6", lw=0.8, ls="--")
        ax.set_title(panel, fontsize=9.5)
        ax.set_xlabel("method" if trained else "talk setting T")
    axes[0, 0].set_ylabel("router Lipschitz constant\n‖Δg‖₂ / ‖Δ·‖₂")
    fig.tight_layout()
    Line2D = matplotlib.lines.Line2D
    handles = [Line2D([], [], color=STAT_COLORS[st], marker="o", ls="none") for st in SANDWICH]
    labels = [STAT_LABELS[st] for st in SANDWICH]
    Es = sorted(data["E"].dropna().unique())
    if len(Es) > 1:
        handles += [Line2D([], [], color="0.35", marker=["o", "s", "^", "D"][k % 4], ls=["-", "--", ":", "-."][k % 4])
                    for k in range(len(Es))]
        labels += [f"E = {E:g} (synthetic)" for E in Es]
    legend_below(fig, handles, labels, ncol=3, title="certified ≥ max local ≥ empirical; T = αI + (1−α)J/E;\n"
                  "mean ± 95% CI over seeds (trained: over seeds and layers)")
    return fig


# ----------------------------------------------------------------------------- declarations
C4 = ClaimSpec(
    "C4", paper="router Lipschitz bounds (softmax ½; certified ≥ local max; certified ≥ empirical)",
    statement=("For dense softmax routers, ‖J_s(p)‖₂ ≤ ½; the certified bound ½‖W_eff‖₂ "
               "(w.r.t. h) or ½‖W_eff A‖₂ (w.r.t. x) is ≥ the maximal local Lipschitz constant over "
               "tokens and ≥ the empirical (PGD) lower bound."),
    rule=("over the cells with a finite certified bound (synthetic layers, dense routers, trained routers, "
          "twins; top-k routers and any cell without a finite certified bound are counted apart, not as "
          "passing): holds if local_max ≤ certified·(1+1e-9) and empirical ≤ certified·(1+1e-9) in every "
          "cell; refuted if any cell violates it; inconclusive if there is no such cell or a backing test "
          "failed."),
    figures=("F3",),
    tests=(r"tests/test_probes_lipschitz\.py::test_(softmax_jacobian|sandwich_ordering|certified_values"
           r"|generic_|huge_logits|wide_layer)",
           r"tests/test_probes_amplification\.py::test_adversarial_dominates_gaussian_and_everything_below_certified"),
    experiments=("perturb_synthetic",), optional=("perturb_routers", "train", "twins"), evaluate=evaluate_c4)
F3 = FigureSpec(
    "F3", "lipschitz_sandwich", ("perturb_synthetic",), prepare_f3, draw_f3, notebook="02_smoothness.py",
    optional=("train",),
    caption_text=
    "Router Lipschitz sandwich ({claims}): certified bound (½‖W_eff‖₂ w.r.t. h, ½‖W_eff A‖₂ w.r.t. x) ≥ max "
    "local Jacobian norm ≥ empirical "
    "(PGD) quotient, across talk strength α (T = αI + (1−α)J/E; α = 1 is the identity) and the "
    "official init on synthetic layers (w.r.t. the code h and the input x; mean ± 95% CI over seeds), and "
    "for every trained router of the training sweep (w.r.t. x; mean ± 95% CI over seeds and layers). The "
    "verdict is not read off these means: it checks local/certified and empirical/certified ≤ 1 + 1e-9 in "
    "every single cell, here and in the dense routers of perturb_routers and the twin runs (not drawn).")
CLAIMS = (C4,)
FIGURES = (F3,)
