"""Claim C10 (dense softmax vs hard–soft top-k routing, LoRA-Mixer: stability under perturbation)
and figure F9.

Rows: ``perturb_routers`` (dense and top-k routers on the same MoELoRA-code weights and tokens; one
row per router, kind, ε, metric, statistic; top-k routers have ``certified_exists = 0`` and no
certified row).  **select** per seed the relative difference of the routing quotient top-k vs dense
→ **compare** one Holm family per statistic (median token, worst token) → **verdict** → **render**.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plotting import (KIND_LABELS, ROUTER_COLORS, ROUTER_MARKERS, STAT_COLORS, STAT_LABELS, WIDTH, dedupe,
                        legend_below, line_ci, order, sel, summarise)
from ..stats import Family, combine, fmt
from .base import ClaimSpec, FigureSpec, Outcome, margin
from .helpers import md_table

C10_STATS = {"max": "worst case (max over tokens)", "median": "typical token (median)"}


# ----------------------------------------------------------------------------- select
def c10_relative_differences(routers: pd.DataFrame) -> pd.DataFrame:
    """Per (router, kind, ε, statistic, seed): ``(q_topk − q_dense) / q_dense`` of the routing quotient
    ‖Δg‖/‖δ‖ on the same weights and tokens (mean over layers within a seed); > 0 = top-k less stable."""
    q = routers[(routers.metric == "routing_quotient") & (routers.eps > 0) & routers.statistic.isin(list(C10_STATS))]
    cols = ["router", "kind", "eps", "statistic", "seed", "value"]
    if not len(q):
        return pd.DataFrame(columns=cols)
    piv = q.pivot_table(index=["seed", "layer", "kind", "eps", "statistic"], columns="router", values="value",
                        aggfunc="first")
    if "dense" not in piv:
        raise ValueError("C10 needs perturb_routers rows with router = 'dense' (the reference)")
    out = []
    for k in [c for c in piv.columns if c != "dense"]:
        rel = ((piv[k] - piv["dense"]) / piv["dense"]).rename("value").reset_index()
        rel = rel.groupby(["kind", "eps", "statistic", "seed"], as_index=False)["value"].mean()
        out.append(rel.assign(router=k))
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


# ----------------------------------------------------------------------------- compare
def compare_c10(rel: pd.DataFrame, margin_: float) -> dict[str, Family]:
    """Per statistic, one Holm family: a comparison per (top-k router, kind, ε), claimed > 0 (top-k
    less stable), no averaging over ε or kinds."""
    out = {}
    for stat, label in C10_STATS.items():
        out[stat] = Family.of_differences(
            [(f"{label}: ({r} − dense)/dense, {kind}, ε = {fmt(eps)}", g.sort_values("seed")["value"].to_numpy(),
              margin_, "greater")
             for (r, kind, eps), g in rel[rel.statistic == stat].groupby(["router", "kind", "eps"])])
    return out


# ----------------------------------------------------------------------------- verdict
def verdict_c10(families: dict[str, Family]) -> tuple[str, str]:
    """Per statistic and over both: holds if every comparison holds, refuted if any is refuted."""
    verdicts = [v for fam in families.values() for v in fam.verdicts]
    if not verdicts:
        return "inconclusive", "no top-k routers with routing quotients"
    verdict = combine(verdicts)
    return verdict, "; ".join(f"{C10_STATS[s]}: **{v}** ({why})" for s, (v, why) in
                              ((s, fam.decide()) for s, fam in families.items())) + f" — overall {verdict}"


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c10(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C10.rule`` (below) to the saved rows."""
    ro = data["perturb_routers"]
    rel = c10_relative_differences(ro)
    families = compare_c10(rel, margin("c10_relative"))
    verdict, reason = verdict_c10(families)
    comps = [c for fam in families.values() for c in fam]
    per_stat = {s: (fam.decide(), list(fam)) for s, fam in families.items()}
    counts = {s: {v: sum(c.verdict == v for c in fc) for v in ("holds", "refuted", "inconclusive")}
              for s, (_, fc) in per_stat.items()}
    key = "; ".join(f"{C10_STATS[s].split(' (')[0]}: {v} ({counts[s]['holds']} of {len(fc)} cells top-k less stable, "
                    f"{counts[s]['refuted']} refuted)" for s, ((v, _), fc) in per_stat.items())
    ex = ro[ro.metric == "certified_exists"].groupby("router").value.agg(["min", "max"])
    topk = sorted(set(rel["router"]))
    cert = (f"certified bound exists for dense: {'yes' if 'dense' in ex.index and ex.loc['dense', 'min'] == 1 else 'no'}; "
            + ", ".join(f"{k}: {'no' if k in ex.index and ex.loc[k, 'max'] == 0 else 'yes'}" for k in topk))
    flips = ro[ro.metric.isin(["top1_flip_rate", "topk_set_flip_rate"]) & (ro.kind == "gaussian_input")]
    fpiv = flips.pivot_table(index=["metric", "eps"], columns="router", values="value", aggfunc="mean")
    flip_rows = [[m, fmt(eps)] + [fmt(fpiv.loc[(m, eps), c]) if c in fpiv else "n/a" for c in ["dense", *topk]]
                 for (m, eps) in fpiv.index]
    ev = ["- Same MoELoRA-code weights and tokens for every router. Effect per (router, kind, ε, statistic): "
          "per seed (q_topk − q_dense)/q_dense of the routing quotient ‖Δg‖/‖δ‖ (> 0 = top-k less stable), "
          "no averaging over ε or kinds; intervals at Holm-ordered levels within each statistic's family; "
          "margin ±the preregistered margin c10_relative. Comparison verdicts per statistic:",
          md_table(["statistic", "verdict", "cells holding", "refuted", "inconclusive"],
                   [[C10_STATS[s], f"**{v}**", counts[s]["holds"], counts[s]["refuted"], counts[s]["inconclusive"]]
                    for s, ((v, _), _) in per_stat.items()]),
          f"- Certified Lipschitz bound: {cert}. Top-k gates jump when the k-th and (k+1)-th logits cross "
          "(a tie), so no finite global bound exists; away from ties the local constant is finite "
          "(top-1 gates are locally constant: local constant 0, hence a median quotient near 0).",
          "- Flip rates under Gaussian input perturbations (mean over seeds; the top-1 flip rate is the same "
          "for every router under the same δ since they share the argmax):",
          md_table(["metric", "ε", "dense", *topk], flip_rows)]
    return Outcome(verdict, reason, key, ev, comparisons=comps)


# ----------------------------------------------------------------------------- F9 dense vs top-k per ε and statistic
F9_PANELS = {"quotient_rel/median": "(top-k − dense)/dense quotient, median token",
             "quotient_rel/max": "(top-k − dense)/dense quotient, worst token",
             "topk_set_flip_rate/gaussian_input": "top-k set flip rate, Gaussian δ"}
KIND_STYLES = {"gaussian_input": "-", "adversarial": "--", "gaussian_block": ":"}


def prepare_f9(routers: pd.DataFrame) -> pd.DataFrame:
    rel = c10_relative_differences(routers)
    rel = summarise(rel.assign(panel="quotient_rel/" + rel["statistic"]), ["panel", "router", "kind", "eps"]) \
        if len(rel) else None
    d = sel(routers, metric="topk_set_flip_rate", statistic="mean", kind="gaussian_input")
    flips = summarise(d.assign(panel="topk_set_flip_rate/gaussian_input"), ["panel", "router", "kind", "eps"])
    lip = sel(routers, metric="lipschitz", kind="lipschitz_code")
    lip = summarise(lip.assign(panel="lipschitz", eps=np.nan), ["panel", "router", "statistic"])
    ex = sel(routers, metric="certified_exists").groupby("router")["value"].min()
    lip = lip.assign(certified_exists=lip["router"].map(ex))
    return pd.concat([rel, flips, lip], ignore_index=True)


def draw_f9(data: pd.DataFrame):
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH, 5.8))
    if "kind" not in data:                        # figure data written before the per-ε comparisons
        data = data.assign(kind="gaussian_input")
    routers = order(data["router"], list(ROUTER_COLORS))
    for ax, (panel, title) in zip(axes.ravel(), F9_PANELS.items()):
        d = data[data["panel"] == panel]
        for r in routers:
            for kind in order(d["kind"].dropna(), list(KIND_STYLES)):
                dd = sel(d, router=r, kind=kind)
                if len(dd):
                    line_ci(ax, dd, "eps", color=ROUTER_COLORS.get(r), ls=KIND_STYLES.get(kind, "-"),
                            marker=ROUTER_MARKERS.get(r, "o"), label=f"{r}, {KIND_LABELS.get(kind, kind)}")
        ax.set_xscale("log")
        if panel.startswith("quotient_rel"):
            ax.axhline(0, color="0.3", lw=0.9)
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylabel("relative difference (symlog)\n(> 0: top-k less stable)")
        else:
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("fraction of tokens")
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("ε (relative, ‖δ‖/‖x‖)")
    ax = axes[1, 1]
    lip = data[data["panel"] == "lipschitz"]
    stats = [s for s in ("local_median", "local_max", "certified") if s in set(lip["statistic"])]
    w = 0.8 / max(len(stats), 1)
    for j, s in enumerate(stats):
        d = lip[lip["statistic"] == s].set_index("router").reindex(routers)
        x = np.arange(len(routers)) + (j - (len(stats) - 1) / 2) * w
        ax.bar(x, d["mean"], width=w, color=STAT_COLORS[s], label=STAT_LABELS[s],
               yerr=[d["mean"] - d["lo"], d["hi"] - d["mean"]], capsize=2)
        for xi, r in zip(x, routers):
            if s == "certified" and np.isnan(d.loc[r, "mean"]):
                ax.text(xi, 0.02, "none\n(jumps)", ha="center", va="bottom", fontsize=7, rotation=90,
                        transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(routers)), routers)
    ax.set_xlim(-0.5, len(routers) - 0.5)
    ax.set_title("router Lipschitz w.r.t. code h", fontsize=9.5)
    ax.set_ylabel("‖Δg‖₂ / ‖Δh‖₂")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    ax.set_ylim(0, max(lip["hi"].max() * 1.45, 1e-3) if len(lip) and np.isfinite(lip["hi"].max()) else 1)
    fig.tight_layout()
    h, lab = dedupe(axes.ravel()[:3])
    legend_below(fig, h, lab, ncol=2, title="router, perturbation kind (shaded: 95% CI over seeds)")
    return fig


# ----------------------------------------------------------------------------- declarations
C10 = ClaimSpec(
    "C10", paper="dense softmax vs hard–soft top-k routing (LoRA-Mixer): stability under perturbation",
    statement=("On the same weights, dense softmax routing is more stable under input perturbations than "
               "hard–soft top-k routing, both in the worst case (max over tokens) and at the typical token "
               "(median); top-k has no certified bound across ties."),
    rule=("claim read as 'dense softmax is more stable under perturbation than top-k'. One comparison per "
          "(top-k router, kind, ε, statistic ∈ {max, median}): per seed (q_topk − q_dense)/q_dense of the "
          "routing quotient on the same weights and tokens, claimed side > 0, margin ±the preregistered margin c10_relative, "
          "intervals at Holm-ordered levels within each statistic's family; no averaging over ε or kinds. "
          "Each comparison's verdict is docs/method.md §5's. Per statistic: holds if every cell holds, refuted if any "
          "cell is refuted, else inconclusive; C10 (both statistics together): holds if every comparison "
          "holds, refuted if any is refuted, else inconclusive. (Top-1 flip rates are not compared: dense and "
          "top-k routers share the argmax.)"),
    figures=("F9",),
    tests=(r"tests/test_probes_lipschitz\.py::test_topk_router_has_no_certified_bound",
           r"tests/test_probes_amplification\.py::test_topk_layer_flips_grow_with_eps",
           r"tests/test_properties\.py::test_top_k_"),
    experiments=("perturb_routers",), evaluate=evaluate_c10)
F9 = FigureSpec(
    "F9", "router_flip_rates", ("perturb_routers",), prepare_f9, draw_f9, notebook="02_smoothness.py", caption_text=
    "Dense softmax vs hard–soft top-k routing ({claims}) on identical weights and tokens, per ε: relative "
    "difference of the routing quotient (top-k − dense)/dense at the median token (top left) and the worst "
    "token (top right), per perturbation kind (line style), > 0 means top-k is less stable; these are the "
    "quantities the verdict compares (one comparison per router, kind, ε and statistic, Holm within each "
    "statistic; here mean ± 95% CI over seeds). Bottom left: top-k set flip rate under Gaussian δ (dense: "
    "the set is all experts, never flips); bottom right: local Lipschitz constants away from ties and the "
    "certified bound, which does not exist for top-k (reported, not judged).")

CLAIMS = (C10,)
FIGURES = (F9,)
