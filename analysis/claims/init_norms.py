"""Claim C8 (ours: two separate quantities under the official initialisation — how often ‖T‖₂ > 1, and
how often communication raises the certified router bound; the verdict is on the second) and figure F7.

Rows: ``talk_norms`` (Monte Carlo over independent official-init draws per E: ‖T‖₂, the certified
ratio ½‖W_r(T⊗I)‖₂ / ½‖W_r‖₂ and the per-E shares).  **select** the per-E shares → **compare**
each share where the bound rises with the declared share (Wilson interval, shifted) → **verdict**
(holds at some E, refuted at every E) → **render**.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
from scipy import stats

from ..plotting import WIDTH
from ..stats import Comparison, Family, fmt, pct, wilson
from .base import ClaimSpec, FigureSpec, Outcome, margin
from .helpers import md_table


# ----------------------------------------------------------------------------- select
def c8_shares(tn: pd.DataFrame) -> pd.DataFrame:
    """Per E: ``k`` of ``n`` independent official-init draws with ‖T‖₂ > 1 (``norm``) and with a raised
    certified bound (``rises``: ½‖W_r(T⊗I)‖₂ > ½‖W_r‖₂), from the ``share_*`` rows when present,
    else counted from the per-draw rows; with Wilson 95 % intervals."""
    out = []
    for E, g in tn.groupby("E"):
        row = dict(E=int(E))
        for name, share, metric in (("norm", "share_talk_norm_gt_1", "talk_norm"),
                                    ("rises", "share_bound_rises", "certified_ratio")):
            s = g[g.metric == share]
            if len(s) and {"k", "n"} <= set(s.columns):
                k, n = int(s["k"].iloc[0]), int(s["n"].iloc[0])
            else:
                v = g[(g.metric == metric) & (g.draw >= 0)].value if "draw" in g else g[g.metric == metric].value
                k, n = int((v > 1).sum()), len(v)
            p, lo, hi = wilson(k, n)
            row.update({f"{name}_k": k, f"{name}_n": n, name: p, f"{name}_lo": lo, f"{name}_hi": hi})
        draws = g[g.metric == "talk_norm"]
        draws = draws[draws.draw >= 0] if "draw" in draws else draws
        ratios = g[(g.metric == "certified_ratio") & ((g.draw >= 0) if "draw" in g else True)].value
        row.update(median_norm=float(draws.value.median()) if len(draws) else math.nan,
                   median_ratio=float(ratios.median()) if len(ratios) else math.nan,
                   max_ratio=float(ratios.max()) if len(ratios) else math.nan)
        out.append(row)
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- compare
def compare_c8(shares: pd.DataFrame, share: float) -> Family:
    """Per E: share of draws where the bound rises − the declared share, with the Wilson interval
    shifted by it; margin 0 (the declared share is the threshold), claimed > 0, no multiplicity
    correction (the rule asks whether it happens at some E)."""
    return Family.of([Comparison(f"E = {r.E}: share of draws where the bound rises − declared share {pct(share)}",
                                 r.rises_n, r.rises - share, r.rises_lo - share, r.rises_hi - share, 0.0,
                                 _binomial_mde(r.rises, r.rises_n), "greater") for r in shares.itertuples()],
                     holm=False)


# ----------------------------------------------------------------------------- verdict
def verdict_c8(family: Family, share: float, upper: dict) -> tuple[str, str]:
    """Holds if the interval lies above the declared share at some E, refuted if it lies below it at
    every E (``upper``: E -> Wilson upper bound, for the reason), else inconclusive."""
    holds = [c for c in family if c.verdict == "holds"]
    if not len(family):
        return "inconclusive", "no talk_norms rows"
    if holds:
        return "holds", ("the Wilson lower bound of the share of draws where the bound rises exceeds the declared "
                         f"share {pct(share)} at " + ", ".join(c.name.split(":")[0] for c in holds))
    if all(c.verdict == "refuted" for c in family):
        return "refuted", (f"at every E the Wilson upper bound of the share is below the declared share {pct(share)} ("
                           + ", ".join(f"E = {E} {pct(hi)}" for E, hi in upper.items()) + ")")
    return "inconclusive", f"no E has its interval above {pct(share)}, and at some E it includes {pct(share)}"


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c8(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C8.rule`` (below) to the saved rows."""
    share = margin("c8_share")
    sh = c8_shares(data["talk_norms"])
    family = compare_c8(sh, share)
    verdict, reason = verdict_c8(family, share, {r.E: r.rises_hi for r in sh.itertuples()})
    comps = list(family)
    rows = [[r.E, r.norm_n, f"{pct(r.norm)} [{pct(r.norm_lo)}, {pct(r.norm_hi)}]", fmt(r.median_norm),
             f"{pct(r.rises)} [{pct(r.rises_lo)}, {pct(r.rises_hi)}]", fmt(r.median_ratio), fmt(r.max_ratio)]
            for r in sh.itertuples()]
    key = ("bound raised in " + ", ".join(f"E={r.E} {pct(r.rises)} [{pct(r.rises_lo)}, {pct(r.rises_hi)}]"
                                          for r in sh.itertuples()) + f" of draws (declared share {pct(share)})")
    statement = ("Under the official initialisation T ~ U(±1/√E), communication raises the certified router bound "
                 "½‖W_r(T⊗I)‖₂ above ½‖W_r‖₂ (same W_r) in a practically relevant share of independent draws "
                 f"(more than the preregistered margin c8_share = {pct(share)}) at some E. Measured: ‖T‖₂ > 1 in "
                 + ", ".join(f"{pct(r.norm)} (E = {r.E})" for r in sh.itertuples())
                 + " of draws; the bound rises in "
                 + ", ".join(f"{pct(r.rises)} (E = {r.E})" for r in sh.itertuples())
                 + ". ‖T‖₂ > 1 does not imply a raised bound: the bound depends on ‖W_r(T⊗I)‖₂.")
    ev = ["- Two separate quantities, never merged (Monte Carlo over independent draws per E, Wilson 95 % "
          "intervals): (1) the share of draws with ‖T‖₂ > 1 — reported; (2) the share where the certified router "
          "bound ½‖W_r(T⊗I)‖₂ exceeds ½‖W_r‖₂ — the verdict's quantity. (1) does not imply (2): the bound depends "
          "on ‖W_r(T⊗I)‖₂, not on ‖T‖₂ alone.",
          md_table(["E", "draws", "(1) P(‖T‖₂ > 1)", "median ‖T‖₂", "(2) P(bound rises)", "median ratio",
                    "max ratio"], rows),
          "- Comparisons: effect = share where the bound rises − the declared share (interval: Wilson, shifted); "
          "holds above 0, refuted below 0; MDE = (z₀.₉₇₅ + z₀.₈)·√(p(1−p)/n)."]
    return Outcome(verdict, reason, key, ev, statement=statement, comparisons=comps)


def _binomial_mde(p: float, n: int, conf: float = 0.95, power: float = 0.8) -> float:
    """Smallest share difference a two-sided test at ``1 − conf`` detects with ``power``: (z + z_power)·√(p(1−p)/n)."""
    if n < 1 or not math.isfinite(p):
        return math.nan
    z = stats.norm.ppf((1 + conf) / 2) + stats.norm.ppf(power)
    return float(z * math.sqrt(max(p * (1 - p), 1 / n ** 2) / n))


# ----------------------------------------------------------------------------- F7 ||T||_2 under official init
F7_METRICS = {"talk_norm": "‖T‖₂ under the\nofficial init U(±1/√E)",
              "certified_ratio": "certified bound ratio\n‖W_r(T⊗I)‖₂ / ‖W_r‖₂"}


def prepare_f7(talk_norms: pd.DataFrame) -> pd.DataFrame:
    """Box-plot statistics per (metric, E) of the per-draw rows: 2.5/25/50/75/97.5 % quantiles, mean,
    P(value > 1) with its Wilson 95 % interval (``share, share_lo, share_hi``)."""
    draws = talk_norms[talk_norms.metric.isin(list(F7_METRICS))]
    if "draw" in draws:
        draws = draws[draws.draw >= 0]
    out = []
    for (metric, E), v in draws.groupby(["metric", "E"])["value"]:
        q = v.quantile([0.025, 0.25, 0.5, 0.75, 0.975]).to_numpy()
        share, lo, hi = wilson(int((v > 1).sum()), len(v))
        out.append(dict(metric=metric, E=int(E), q025=q[0], q25=q[1], median=q[2], q75=q[3], q975=q[4],
                        mean=float(v.mean()), frac_gt_1=float((v > 1).mean()), share=share, share_lo=lo,
                        share_hi=hi, n=len(v)))
    return pd.DataFrame(out)


def draw_f7(data: pd.DataFrame):
    metrics = [m for m in F7_METRICS if m in set(data["metric"])]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(WIDTH, 3.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1.2] * len(metrics) + [1]})
    ax = axes[0, -1]
    for metric, color, label in (("talk_norm", "#9ecae1", "‖T‖₂ > 1"), ("certified_ratio", "#d62728", "bound rises")):
        d = data[data["metric"] == metric].sort_values("E")
        if len(d) and "share" in d:
            ax.errorbar(d["E"], 100 * d["share"], yerr=[100 * (d["share"] - d["share_lo"]), 100 * (d["share_hi"] - d["share"])],
                        color=color, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    Es = sorted(data["E"].unique())
    ax.set_xticks(Es, [str(int(E)) for E in Es])
    ax.set_xlabel("number of experts E")
    ax.set_ylabel("share of draws (%)")
    ax.set_ylim(bottom=0)
    ax.set_title("share of draws > 1\n(Wilson 95 %)", fontsize=9)
    ax.legend(fontsize=8, framealpha=0.9)
    for ax, metric in zip(axes[0], metrics):
        d = data[data["metric"] == metric].sort_values("E")
        stats = [dict(med=r.median, q1=r.q25, q3=r.q75, whislo=r.q025, whishi=r.q975, mean=r.mean,
                      label=str(r.E), fliers=[]) for r in d.itertuples()]
        ax.bxp(stats, showmeans=True, widths=0.55, patch_artist=True,
               boxprops=dict(facecolor="#9ecae1", edgecolor="0.2"), medianprops=dict(color="0.1"),
               meanprops=dict(marker="D", markerfacecolor="white", markeredgecolor="0.1", ms=4))
        ax.axhline(1.0, color="#d62728", ls="--", lw=1)
        top = max(d["q975"].max(), 1.0)
        ax.set_ylim(0, top * 1.22)
        for k, r in enumerate(d.itertuples(), 1):
            ax.text(k, top * 1.08, f"{100 * r.frac_gt_1:.0f}%", ha="center", fontsize=8.5, color="#d62728")
        ax.set_title(F7_METRICS[metric], fontsize=9)
        ax.set_xlabel("number of experts E")
        ax.set_ylabel("spectral norm (dimensionless)" if metric == "talk_norm" else "ratio (dimensionless)")
    fig.suptitle("Official Talking-Module init: box 25–75%, whiskers 2.5–97.5%, ◇ mean;\n"
                 "red numbers: % of draws > 1 (dashed line)",
                 fontsize=9.5, y=1.0)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- declarations
C8 = ClaimSpec(
    "C8", paper=("(ours) two separate quantities under the official initialisation: the share of draws with "
                 "‖T‖₂ > 1, and the share where the certified router bound rises"),
    statement=("Under the official initialisation T ~ U(±1/√E), communication raises the certified router "
               "bound ½‖W_r(T⊗I)‖₂ above ½‖W_r‖₂ (same W_r) in a practically relevant share of draws at some E."),
    rule=("two quantities per E, reported side by side: (1) the share of independent official-init draws "
          "(≥ 20,000 per E) with ‖T‖₂ > 1 (reported, not judged) and (2) the share whose certified ratio "
          "½‖W_r(T⊗I)‖₂ / ½‖W_r‖₂ exceeds 1, with its Wilson 95 % interval, against the preregistered share "
          "c8_share (the verdict's quantity). Holds (the official init lets communication raise the router bound in a "
          "practically relevant share of draws) if the interval lies above the declared share at some E; "
          "refuted if at every E it lies below it; otherwise inconclusive."),
    figures=("F7",), tests=(), experiments=("talk_norms",), evaluate=evaluate_c8)
F7 = FigureSpec(
    "F7", "talk_norm_official_init", ("talk_norms",), prepare_f7, draw_f7, notebook="02_smoothness.py", caption_text=
    "The official init U(±1/√E) over independent draws per number of experts E ({claims}). Left: distribution "
    "of ‖T‖₂; middle: distribution of the certified-bound ratio ‖W_r(T⊗I)‖₂ / ‖W_r‖₂ (the same W_r with that T "
    "vs T = I); boxes 25–75 %, whiskers 2.5–97.5 %, ◇ mean; red numbers: share of draws above 1. Right: both "
    "shares with Wilson 95 % intervals. The verdict reads only the share where the bound rises (ratio > 1) "
    "against the preregistered share c8_share: it holds if that share's interval lies above it at some "
    "E; ‖T‖₂ > 1 is reported, not judged.")

CLAIMS = (C8,)
FIGURES = (F7,)
