"""Figure F10: every paired comparison behind the claims that cite it, as a forest plot.

F10 draws no claim of its own: it evaluates the claims that list ``"F10"`` among their figures
(handed over by the registry, :mod:`analysis.claims`) on the same rows and margins as the report,
and plots each returned comparison relative to its margin.  Adding a claim to the forest is adding
``"F10"`` to its ``figures``.
"""
from __future__ import annotations

import functools
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plotting import WIDTH
from .base import ClaimSpec, FigureSpec, experiments_of

COLUMNS = ["claim", "comparison", "n", "effect", "ci_low", "ci_high", "margin", "mde", "claimed_side", "verdict"]


def prepare_f10(*rows: pd.DataFrame, config: dict | None = None, claims: tuple[ClaimSpec, ...] = ()) -> pd.DataFrame:
    """Every paired comparison ``claims`` return (``Outcome.comparisons``), evaluated on ``rows`` (one
    frame per experiment of :func:`experiments_of`) with the margins declared in ``config["margins"]``
    (a missing margin is an error).  A claim whose experiments are missing (empty frame) contributes
    nothing, and a claim whose rule cannot read the rows contributes one row naming the error (drawn
    without a point).  Claims whose verdict uses other claims' verdicts see them as inconclusive (F10
    draws comparisons, not verdicts)."""
    if not (config or {}).get("margins"):
        raise ValueError("F10 needs config with the profile's declared margins (config['margins']); got none")
    data = {e: r for e, r in zip(experiments_of(claims), rows) if r is not None and len(r)}
    out = []
    for spec in claims:
        if any(e not in data for e in spec.experiments):
            continue
        used = {u: "inconclusive" for u in spec.uses_verdicts}
        try:
            comps = spec.evaluate(data, config, used).comparisons
        except (KeyError, ValueError) as err:     # rows the rule cannot read: one row naming why, drawn empty
            out.append(dict(claim=spec.id, comparison=f"not evaluated: {type(err).__name__} {err}", n=0,
                            effect=math.nan, ci_low=math.nan, ci_high=math.nan, margin=math.nan, mde=math.nan,
                            claimed_side="", verdict="inconclusive"))
            continue
        for c in comps:
            out.append(dict(claim=spec.id, comparison=c.name, n=c.n, effect=c.effect, ci_low=c.ci_low,
                            ci_high=c.ci_high, margin=c.margin, mde=c.mde, claimed_side=c.claimed_side,
                            verdict=c.verdict))
    return pd.DataFrame(out, columns=COLUMNS)


VERDICT_COLORS = {"holds": "#2ca02c", "refuted": "#d62728", "inconclusive": "#7f7f7f"}
F10_CLIP = 6.0                                # x range of F10 in margins (beyond: a triangle at the edge)


def draw_f10(data: pd.DataFrame):
    """One panel per claim (rows: comparisons); each difference is drawn relative to its margin and
    signed so that the claimed direction is positive (``±effect / margin``, − for a claimed decrease),
    so the ±margin band is [−1, 1] and "better as claimed" is to the right in every row."""
    claims = list(dict.fromkeys(data["claim"])) if len(data) else []
    heights = [max(len(data[data["claim"] == c]), 1) for c in claims] or [1]
    fig, axes = plt.subplots(len(heights), 1, figsize=(1.5 * WIDTH, 0.9 + 0.24 * sum(heights) + 0.5 * len(heights)),
                             gridspec_kw=dict(height_ratios=heights), squeeze=False)
    if not claims:
        axes[0, 0].text(0.5, 0.5, "no paired comparisons", ha="center", va="center", transform=axes[0, 0].transAxes)
        axes[0, 0].set_axis_off()
        return fig
    for ax, cid in zip(axes[:, 0], claims):
        d = data[data["claim"] == cid].reset_index(drop=True)
        m = d["margin"].to_numpy(float)
        scale = np.where(m > 0, m, 1.0) * np.where(d["claimed_side"] == "less", -1.0, 1.0)
        y = np.arange(len(d))[::-1]
        ax.axvspan(-1, 1, color="0.9", zorder=0)
        ax.axvline(0, color="0.3", lw=0.8)
        for i, r in d.iterrows():
            col = VERDICT_COLORS.get(r["verdict"], "k")
            lo, hi, eff = (r[k] / scale[i] for k in ("ci_low", "ci_high", "effect"))
            lo, hi = min(lo, hi), max(lo, hi)
            if np.isfinite(lo) and np.isfinite(hi):
                ax.plot([max(lo, -F10_CLIP), min(hi, F10_CLIP)], [y[i]] * 2, color=col, lw=1.8)
            if np.isfinite(eff):
                if abs(eff) > F10_CLIP:         # off the scale: a triangle at the edge pointing outwards
                    ax.plot(np.sign(eff) * F10_CLIP, y[i], ">" if eff > 0 else "<", color=col, ms=6)
                else:
                    ax.plot(eff, y[i], "o", color=col, ms=4.5)
        ax.set_xlim(-F10_CLIP - 0.5, F10_CLIP + 0.5)
        ax.set_yticks(y, [f"{c}  (n={n})" for c, n in zip(d["comparison"], d["n"])], fontsize=7)
        ax.set_ylim(-0.7, len(d) - 0.3)
        ax.set_title(f"{cid}", fontsize=9.5, loc="left")
        ax.grid(axis="y", visible=False)
    axes[-1, 0].set_xlabel("paired difference / its margin, claimed direction → (shaded: ±margin; green holds, "
                           "red refuted, grey inconclusive)")
    fig.tight_layout()
    return fig


def figure(claims) -> FigureSpec:
    """F10 for ``claims`` (the registry passes the claims that cite it, in id order)."""
    claims = tuple(claims)
    return FigureSpec(
        "F10", "forest_of_comparisons", experiments_of(claims), functools.partial(prepare_f10, claims=claims),
        draw_f10, notebook="01_balance.py", needs_config=True, caption_text=
        "Every paired comparison behind the verdicts of {claims}: mean paired difference over seeds and its "
        "interval, each divided by its declared margin and signed so that the claimed direction points right "
        "(the shaded band ±1 is ±margin in every row; values beyond ±6 margins are drawn at the edge as "
        "triangles); colour: the comparison's verdict (docs/method.md §5) as CLAIMS.md reports it. Intervals "
        "are 95 % t-intervals, except where a claim corrects for multiplicity: there they are at the "
        "comparison's Holm-ordered level. Rows include the comparisons a claim only reports (e.g. "
        "MoELoRA-input and the balance-loss routers for load balance, the scale-matched control for "
        "outperformance); the claims report says which decide the verdict. Labels name the task and model.")
