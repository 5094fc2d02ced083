"""Figure F10: every paired comparison behind the claims that cite it, as a forest plot.

F10 draws no claim of its own: it evaluates the claims that list ``"F10"`` among their figures
(handed over by the registry, :mod:`analysis.claims`) on the same rows, settings, controls and margins
as the report, and plots each returned comparison relative to its margin, coloured by its verdict;
comparisons that are not testable (a positive control of their setting failed) are drawn hollow on a
grey band, and reported (non-deciding) ones with a thinner line.  Adding a claim to the forest is
adding ``"F10"`` to its ``figures``.
"""
from __future__ import annotations

import functools
import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plotting import WIDTH
from .base import ClaimSpec, FigureSpec, experiments_of

COLUMNS = ["claim", "comparison", "setting", "controls", "deciding", "n", "effect", "ci_low", "ci_high", "margin",
           "mde", "claimed_side", "rule", "verdict"]


def prepare_f10(*rows: pd.DataFrame, config: dict | None = None, claims: tuple[ClaimSpec, ...] = (),
                names: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Every comparison ``claims`` return (``Outcome.comparisons``), evaluated on ``rows`` (one frame
    per experiment of ``names``, default :func:`experiments_of`; ``None`` where absent) exactly as the
    report does.  A claim
    whose required experiments are missing contributes nothing, and a claim whose rule cannot read the
    rows contributes one row naming the error (drawn without a point).  Claims whose verdict uses other
    claims' verdicts see them as inconclusive (F10 draws comparisons, not verdicts)."""
    data = {e: r for e, r in zip(names or experiments_of(claims), rows) if r is not None and len(r)}
    out = []
    for spec in claims:
        if any(e not in data for e in spec.experiments):
            continue
        used = {u: "inconclusive" for u in spec.uses_verdicts}
        try:
            comps = spec.evaluate(data, config or {}, used).comparisons
        except (KeyError, ValueError) as err:     # rows the rule cannot read: one row naming why, drawn empty
            out.append(dict(claim=spec.id, comparison=f"not evaluated: {type(err).__name__} {err}", setting="",
                            controls="", deciding=False, n=0, effect=math.nan, ci_low=math.nan, ci_high=math.nan,
                            margin=math.nan, mde=math.nan, claimed_side="", rule="", verdict="inconclusive"))
            continue
        for c in comps:
            out.append(dict(claim=spec.id, comparison=c.name, setting=c.setting, controls=c.controls,
                            deciding=c.deciding, n=c.n, effect=c.effect, ci_low=c.ci_low, ci_high=c.ci_high,
                            margin=c.margin, mde=c.mde, claimed_side=c.claimed_side, rule=c.rule, verdict=c.verdict))
    return pd.DataFrame(out, columns=COLUMNS)


VERDICT_COLORS = {"supported": "#2ca02c", "supported-below-relevance": "#98df8a", "no-relevant-effect": "#1f77b4",
                  "contradicted": "#d62728", "inconclusive": "#7f7f7f", "not-testable": "#bbbbbb",
                  "holds": "#2ca02c", "refuted": "#d62728"}
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
        # non-inferiority (C13): drawn as (margin − effect) / margin, so "better than the margin" points right
        nonin = (d["rule"] == "non-inferiority").to_numpy() if "rule" in d else np.zeros(len(d), bool)
        scale = np.where(np.isfinite(m) & (m > 0), m, 1.0) * np.where(d["claimed_side"] == "less", -1.0, 1.0)
        y = np.arange(len(d))[::-1]
        ax.axvspan(-1, 1, color="0.92", zorder=0)
        ax.axvline(0, color="0.3", lw=0.8)
        for i, r in d.iterrows():
            col = VERDICT_COLORS.get(r["verdict"], "k")
            hollow = r["verdict"] == "not-testable"
            if hollow:
                ax.axhspan(y[i] - 0.45, y[i] + 0.45, color="0.85", zorder=0, lw=0)
            shift = m[i] if nonin[i] else 0.0
            lo, hi, eff = ((r[k] - shift) / (-abs(scale[i]) if nonin[i] else scale[i])
                           for k in ("ci_low", "ci_high", "effect"))
            lo, hi = min(lo, hi), max(lo, hi)
            width = 1.8 if r.get("deciding", True) else 0.9
            if np.isfinite(lo) and np.isfinite(hi):
                ax.plot([max(lo, -F10_CLIP), min(hi, F10_CLIP)], [y[i]] * 2, color=col, lw=width,
                        ls=":" if hollow else "-")
            if np.isfinite(eff):
                face = "white" if hollow else col
                if abs(eff) > F10_CLIP:         # off the scale: a triangle at the edge pointing outwards
                    ax.plot(np.sign(eff) * F10_CLIP, y[i], ">" if eff > 0 else "<", color=col, mfc=face, ms=6)
                else:
                    ax.plot(eff, y[i], "o", color=col, mfc=face, ms=4.5)
        ax.set_xlim(-F10_CLIP - 0.5, F10_CLIP + 0.5)
        ax.set_yticks(y, [f"{c}  (n={n})" + ("" if r else "  [reported]")
                          for c, n, r in zip(d["comparison"], d["n"], d.get("deciding", [True] * len(d)))], fontsize=7)
        ax.set_ylim(-0.7, len(d) - 0.3)
        ax.set_title(f"{cid}", fontsize=9.5, loc="left")
        ax.grid(axis="y", visible=False)
    handles = [matplotlib.lines.Line2D([], [], color=c, marker="o", lw=1.8, label=v)
               for v, c in VERDICT_COLORS.items() if v in set(data["verdict"]) and v != "not-testable"]
    handles.append(matplotlib.lines.Line2D([], [], color=VERDICT_COLORS["not-testable"], marker="o", mfc="white",
                                           ls=":", label="not testable (a positive control failed; grey band)"))
    axes[-1, 0].set_xlabel("paired difference / its margin, claimed direction → (shaded: ±margin; non-inferiority: "
                           "(margin − effect) / margin, right of 0 = within the margin; thin line: reported, not deciding)")
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    return fig


def figure(claims) -> FigureSpec:
    """F10 for ``claims`` (the registry passes the claims that cite it, in id order)."""
    claims = tuple(claims)
    required = tuple(e for e in experiments_of(claims) if any(e in c.experiments for c in claims))
    optional = tuple(e for e in experiments_of(claims) if e not in required)
    return FigureSpec(
        "F10", "forest_of_comparisons", required,
        functools.partial(prepare_f10, claims=claims, names=(*required, *optional)),
        draw_f10, notebook="01_balance.py", needs_config=True, optional=optional, caption_text=
        "Every comparison behind the verdicts of {claims}: mean paired difference over seeds and its interval, "
        "each divided by its setting's margin and signed so that the claimed direction points right (the shaded "
        "band ±1 is ±margin in every row; values beyond ±6 margins are drawn at the edge as triangles; "
        "non-inferiority rows show (margin − effect) / margin, right of 0 = within the margin); colour: the "
        "comparison's verdict (docs/method.md §5.4) as CLAIMS.md reports it. Comparisons that are not testable "
        "(their setting failed a positive control) are drawn hollow and dotted on a grey band: they never count. "
        "Deciding comparisons are at their Holm-ordered level over the claim's testable settings; reported ones "
        "(thin lines, marked [reported]: MoELoRA-input, balance-loss routers, scale-matched controls where not "
        "deciding, synthetic sweeps, common-lr twin runs) at 95 %. Labels name the setting.")
