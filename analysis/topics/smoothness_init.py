"""Evidence topic **smoothness**, part 2: the official initialisation of the Talking Module — claim
C8 (how often ‖T‖₂ > 1 lets communication raise the certified router bound) and figure F7.

Part of the smoothness topic (:mod:`analysis.topics.smoothness` collects it; notebook
``notebooks/02_smoothness.py``).  Rows: ``talk_norms`` (Monte Carlo over independent official-init
draws per E).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ..evidence import ClaimSpec, FigureSpec, Outcome, md_table
from ..plotting import WIDTH
from ..stats import fmt, pct, wilson


# C8 -------------------------------------------------------------------------
def evaluate_c8(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C8.rule`` (below) to the saved rows."""
    tn = data["talk_norms"]
    rows, fr = [], {}
    for E, g in tn.groupby("E"):
        norm = g[g.metric == "talk_norm"].value
        ratio = g[g.metric == "certified_ratio"].value
        kn, n = int((norm > 1).sum()), len(norm)
        kr, nr = int((ratio > 1).sum()), len(ratio)
        p, lo, hi = wilson(kn, n)
        q, qlo, qhi = wilson(kr, nr)
        fr[int(E)] = dict(p=p, lo=lo, hi=hi, q=q, qlo=qlo, qhi=qhi, n=n, kr=kr, nr=nr)
        rows.append([int(E), n, f"{pct(p)} [{pct(lo)}, {pct(hi)}]", fmt(float(norm.median())),
                     f"{pct(q)} [{pct(qlo)}, {pct(qhi)}]", fmt(float(ratio.median())), fmt(float(ratio.max()))])
    raises = [E for E, f in fr.items() if f["qlo"] > 0]
    if not fr:
        verdict, reason = "inconclusive", "no talk_norms rows"
    elif raises:
        verdict = "holds"
        reason = ("the official init raises the certified router bound in a resolved fraction of draws at E ∈ "
                  + ", ".join(f"{E} ({pct(fr[E]['q'])}, Wilson lower {pct(fr[E]['qlo'])})" for E in raises))
    elif all(f["kr"] == 0 for f in fr.values()):
        verdict = "refuted"
        reason = ("no draw at any E raised the certified bound (upper Wilson bounds: "
                  + ", ".join(f"E={E} {pct(f['qhi'])}" for E, f in fr.items()) + ")")
    else:
        verdict = "inconclusive"
        reason = "some draws raise the bound but no Wilson lower bound is above 0"
    key = ("‖T‖₂ > 1: " + ", ".join(f"E={E} {pct(f['p'])}" for E, f in fr.items())
           + "; bound raised: " + ", ".join(f"E={E} {pct(f['q'])}" for E, f in fr.items()))
    statement = ("Under the official initialisation T ~ U(±1/√E), ‖T‖₂ > 1 in "
                 + ", ".join(f"{pct(f['p'])} (E = {E})" for E, f in fr.items())
                 + " of draws, but communication raises the certified router bound ½‖W_r(T⊗I)‖₂ above "
                 "½‖W_r‖₂ (same W_r ~ U(±1/√r), m = 8) in only "
                 + ", ".join(f"{pct(f['q'])} [{pct(f['qlo'])}, {pct(f['qhi'])}] (E = {E})" for E, f in fr.items())
                 + ". ‖T‖₂ > 1 does not imply a raised bound: the bound depends on ‖W_r(T⊗I)‖₂, and a "
                 "random T shrinks most directions.")
    ev = ["- Monte Carlo over independent draws per E (Wilson 95 % intervals):",
          md_table(["E", "draws", "P(‖T‖₂ > 1)", "median ‖T‖₂", "P(certified ratio > 1)",
                    "median ratio", "max ratio"], rows)]
    return Outcome(verdict, reason, key, ev, statement=statement)


# ----------------------------------------------------------------------------- F7 ||T||_2 under official init
F7_METRICS = {"talk_norm": "‖T‖₂ under the official init U(±1/√E)",
              "certified_ratio": "certified bound ratio  ‖W_r(T⊗I)‖₂ / ‖W_r‖₂"}


def prepare_f7(talk_norms: pd.DataFrame) -> pd.DataFrame:
    """Box-plot statistics per (metric, E): 2.5/25/50/75/97.5 % quantiles, mean, P(value > 1)."""
    out = []
    for (metric, E), v in talk_norms.groupby(["metric", "E"])["value"]:
        q = v.quantile([0.025, 0.25, 0.5, 0.75, 0.975]).to_numpy()
        out.append(dict(metric=metric, E=int(E), q025=q[0], q25=q[1], median=q[2], q75=q[3], q975=q[4],
                        mean=float(v.mean()), frac_gt_1=float((v > 1).mean()), n=len(v)))
    return pd.DataFrame(out)


def draw_f7(data: pd.DataFrame):
    metrics = [m for m in F7_METRICS if m in set(data["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(WIDTH, 3.4), squeeze=False)
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
        ax.set_title(F7_METRICS[metric], fontsize=9.5)
        ax.set_xlabel("number of experts E")
        ax.set_ylabel("spectral norm (dimensionless)" if metric == "talk_norm" else "ratio (dimensionless)")
    fig.suptitle("Official Talking-Module init: box 25–75%, whiskers 2.5–97.5%, ◇ mean;\n"
                 "red numbers: % of draws > 1 (dashed line)",
                 fontsize=9.5, y=1.0)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- declarations
C8 = ClaimSpec(
    "C8", paper=("(ours) how often the official initialisation gives ‖T‖₂ > 1, i.e. lets communication "
                 "raise the router bound"),
    statement=("Under the official initialisation T ~ U(±1/√E), ‖T‖₂ > 1 in some draws; how often "
               "communication raises the certified router bound ½‖W_r(T⊗I)‖₂ above ½‖W_r‖₂."),
    rule=("fractions of official-init draws with ‖T‖₂ > 1 and with certified ratio "
          "½‖W_r(T⊗I)‖₂ / ½‖W_r‖₂ > 1, per E, Wilson 95 % intervals. Holds (communication can raise "
          "the router bound under the official init) if the Wilson lower bound of the certified-ratio "
          "fraction is > 0 for some E; refuted if no draw at any E raises it."),
    figures=("F7",), tests=(), experiments=("talk_norms",), evaluate=evaluate_c8)
F7 = FigureSpec(
    "F7", "talk_norm_official_init", ("talk_norms",), prepare_f7, draw_f7,
    "Distribution of ‖T‖₂ under the official init U(±1/√E) (left) and of the ratio of certified router "
    "bounds with that T vs T = I for the same W_r (right), per number of experts E ({claims}). "
    "Red numbers: share of draws above 1, i.e. where communication raises the bound.")
