"""Evidence topic **smoothness**: router Lipschitz bounds (C4), perturbation amplification (C5),
dense vs top-k routing (C10) with figures F2, F3, F9, and — declared in
:mod:`analysis.topics.smoothness_init` — the official initialisation's ‖T‖₂ (C8, F7).

Notebook: ``notebooks/02_smoothness.py``.  Rows: ``perturb_synthetic`` (synthetic layers per talk
setting), ``perturb_routers`` (dense vs top-k on the same weights), ``talk_norms`` (Monte Carlo of
the official init), ``perturb_real`` (supplementary) and the trained routers of ``train``/``twins``.
"""
from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..evidence import ClaimSpec, FigureSpec, Outcome, Topic, md_table
from ..plotting import (KIND_LABELS, METHOD_ORDER, ROUTER_COLORS, ROUTER_MARKERS, STAT_COLORS, STAT_LABELS, WIDTH,
                        dedupe, legend_below, line_ci, log_ylim_from, nice_log, order, sel, summarise,
                        talk_colors, talk_label, talk_order, talk_short)
from ..stats import Est, estimate, fmt
from .smoothness_init import C8, F7, draw_f7, prepare_f7  # noqa: F401  (draw_f7/prepare_f7: notebook)

LIP_REL_TOL = 1e-9                          # local/empirical <= certified * (1 + LIP_REL_TOL)
C5_KINDS = ("gaussian_input", "adversarial")


# C4 -------------------------------------------------------------------------
def _sandwich_ratios(df: pd.DataFrame, keys: list[str], certified: str, local: str, empirical: str | None,
                     col: str = "statistic") -> pd.DataFrame:
    piv = df.pivot_table(index=keys, columns=col, values="value", aggfunc="first")
    out = pd.DataFrame(index=piv.index)
    out["local"] = piv[local] / piv[certified]
    if empirical is not None and empirical in piv:
        out["empirical"] = piv[empirical] / piv[certified]
    return out.reset_index()


def evaluate_c4(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C4.rule`` (below) to the saved rows."""
    syn = data["perturb_synthetic"]
    routers, train, twins = (data.get(k) for k in ("perturb_routers", "train", "twins"))
    parts = []
    lip = syn[syn.metric == "lipschitz"]
    keys = [c for c in ("E", "r", "talk", "seed", "kind") if c in lip]
    parts.append(("synthetic layers (w.r.t. code and input)", _sandwich_ratios(lip, keys, "certified", "local_max", "empirical")))
    if routers is not None:
        lr = routers[(routers.metric == "lipschitz")]
        lr = lr[lr.groupby(["router", "seed"]).statistic.transform(lambda s: (s == "certified").any())]
        if len(lr):
            parts.append(("dense routers (w.r.t. code)", _sandwich_ratios(lr, ["router", "seed", "kind"],
                                                                          "certified", "local_max", None)))
    if train is not None:
        lt = train[train.metric == "lipschitz"]
        if len(lt):
            parts.append(("trained routers (w.r.t. input)", _sandwich_ratios(lt, ["method", "seed", "layer", "kind"],
                                                                              "certified", "local_max", "empirical")))
    if twins is not None:
        tw = twins[twins.metric.isin(["lipschitz_certified", "lipschitz_local_max"])]
        if len(tw):
            parts.append(("twin runs over training (w.r.t. code)",
                          _sandwich_ratios(tw, ["optimizer", "seed", "step", "model", "layer"],
                                           "lipschitz_certified", "lipschitz_local_max", None, col="metric")))
    rows, worst, n_cells, violations = [], {"local": 0.0, "empirical": 0.0}, 0, []
    for name, r in parts:
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
    if n_cells == 0:
        verdict, reason = "inconclusive", "no Lipschitz rows"
    elif violations:
        verdict, reason = "refuted", "; ".join(violations)
    else:
        verdict = "holds"
        reason = (f"in all {n_cells} cells local_max/certified ≤ {fmt(worst['local'], 6)} and "
                  f"empirical/certified ≤ {fmt(worst['empirical'], 6)}, both ≤ 1 + 1e-9")
    key = f"max local/certified {fmt(worst['local'], 4)}, max empirical/certified {fmt(worst['empirical'], 4)}"
    ev = ["- Ratios to the certified bound ½‖W_eff(A)‖₂ (max over cells; ≤ 1 means the bound holds):",
          md_table(["source", "cells", "max local_max / certified", "max empirical / certified"], rows),
          "- The softmax-Jacobian bound ‖J_s(p)‖₂ ≤ ½ is what makes local_max ≤ certified; it is "
          "tested directly by `test_softmax_jacobian_norm_at_most_half` and its closed forms."]
    return Outcome(verdict, reason, key, ev)


# C5 -------------------------------------------------------------------------
def _per_seed_log_ratio(frame: pd.DataFrame, num: str, den: str, seed_col: str = "seed") -> pd.Series:
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(frame[num] / frame[den])
    ok = np.isfinite(lr)
    return pd.Series(lr[ok].to_numpy(), index=frame.loc[ok, seed_col].to_numpy()).groupby(level=0).mean()


def _est_from_logs(per_seed: pd.Series) -> Est:
    return estimate(np.exp(per_seed.to_numpy()), log=True)


def evaluate_c5(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C5.rule`` (below) to the saved rows."""
    syn = data["perturb_synthetic"]
    tr = data["train"]
    real = data.get("perturb_real")
    q = syn[(syn.metric == "routing_quotient") & (syn.statistic == "median") & syn.kind.isin(C5_KINDS) & (syn.eps > 0)]
    piv = q.pivot_table(index=["E", "r", "seed", "kind", "eps"], columns="talk", values="value", aggfunc="first")
    if "identity" not in piv:
        raise ValueError("C5 needs perturb_synthetic cells with talk = 'identity' (the MoELoRA-code reference)")
    norms = syn[syn.metric == "talk_norm"].groupby("talk").value.agg(["mean", "max"])
    settings, table, breakdown = {}, [], []
    flat = piv.reset_index()
    for talk in [c for c in piv.columns if c != "identity"]:
        est = _est_from_logs(_per_seed_log_ratio(flat, talk, "identity"))
        settings[talk] = est
        nmax = float(norms.loc[talk, "max"]) if talk in norms.index else math.nan
        table.append([f"`{talk}`", fmt(float(norms.loc[talk, "mean"]) if talk in norms.index else math.nan),
                      est.text(), est.direction])
        for (kind, eps), g in flat.groupby(["kind", "eps"]):
            e = _est_from_logs(_per_seed_log_ratio(g, talk, "identity"))
            breakdown.append([f"`{talk}`", kind, fmt(eps), e.text()])
    contractive = [t for t in settings if t.startswith("uniform-mix")
                   and t in norms.index and float(norms.loc[t, "max"]) <= 1 + 1e-9]
    # trained: TalkLoRA-official vs MoELoRA-code, same seed (same data order, same A/C/B/W_r init seed)
    tq = tr[(tr.step == -1) & (tr.metric == "routing_quotient") & (tr.statistic == "median") & tr.kind.isin(C5_KINDS)]
    tpiv = tq.pivot_table(index=["seed", "layer", "kind", "eps"], columns="method", values="value", aggfunc="first")
    trained = None
    if {"talklora-official", "moelora-code"} <= set(tpiv.columns):
        trained = _est_from_logs(_per_seed_log_ratio(tpiv.reset_index(), "talklora-official", "moelora-code"))
        settings["trained talklora-official vs moelora-code"] = trained
        table.append(["trained TalkLoRA-official vs trained MoELoRA-code", "—", trained.text(), trained.direction])
    official = settings.get("official")
    increased = [k for k in ("official", "trained talklora-official vs moelora-code")
                 if k in settings and settings[k].direction == "above"]
    reducing = [k for k, e in settings.items() if e.direction == "below"]
    if not settings:
        verdict, reason = "inconclusive", "no talk setting besides identity"
    elif increased:
        verdict = "refuted"
        reason = "; ".join(f"`{k}` increases the median routing quotient by ×{settings[k].text()}" for k in increased)
    elif len(reducing) == len(settings):
        verdict, reason = "holds", "every setting reduces it (interval below 1)"
    elif contractive and all(settings[t].direction == "below" for t in contractive):
        verdict = "holds under stated conditions"
        others = [k for k in settings if k not in contractive]
        reason = ("the contractive uniform-mix settings (" + ", ".join(f"`{t}`" for t in contractive)
                  + ") resolve a reduction"
                  + "".join(f", and so does `{k}` ×{settings[k].text()}" for k in others if k in reducing)
                  + "; unresolved or not reducing: "
                  + ", ".join(f"`{k}` ×{settings[k].text()}" for k in others if k not in reducing))
    else:
        verdict = "inconclusive"
        reason = ("no rule condition met: reductions resolved for "
                  + (", ".join(f"`{k}`" for k in reducing) or "no setting")
                  + "; the other intervals include 1 or are missing (a single seed gives no interval)")
    key = "official/identity ×" + (official.text() if official else "n/a")
    if trained is not None:
        key += f"; trained ×{fmt(trained.mean)}"
    ev = ["- Ratio of the median routing quotient ‖Δg‖/‖δ‖ to T = I (geometric mean over kinds "
          f"{list(C5_KINDS)}, ε ∈ {sorted(flat.eps.unique().tolist())} and grid (E, r) within a seed; "
          "95 % t-interval over seeds; < 1 = communication reduces amplification):",
          md_table(["setting", "mean ‖T‖₂", "ratio to T = I", "direction"], table),
          "- Per kind and ε (synthetic layers):",
          md_table(["setting", "kind", "ε", "ratio to T = I"], breakdown),
          "- Why uniform-mix reduces it: T = αI + (1−α)J/E is doubly stochastic (‖T‖₂ = 1), and "
          "T⊗I = P + α(I − P) with P the orthogonal projector onto block-constant codes, so "
          "W_eff = W_r[P + α(I − P)] shrinks the router on every code direction with zero block mean "
          "(a logit temperature α on those directions). By C2 the same W_eff is an ordinary "
          "MoELoRA-code router: the reduction comes from a smaller router, which MoELoRA-code can "
          "have without communication.",
          "- The trained comparison is between two independently trained models (same seed, data "
          "order and init seed), not the same weights."]
    if real is not None and len(real):
        rq = real[(real.metric == "routing_quotient") & (real.statistic == "median") & real.kind.isin(C5_KINDS)]
        rp = rq.pivot_table(index=["model", "seed", "layer", "kind", "eps"], columns="talk", values="value", aggfunc="first")
        if "identity" in rp:
            lines = []
            for talk in [c for c in rp.columns if c != "identity"]:
                with np.errstate(divide="ignore", invalid="ignore"):
                    r = (rp[talk] / rp["identity"]).replace([np.inf, -np.inf], np.nan).dropna()
                if len(r):
                    lines.append([f"`{talk}`", fmt(float(np.exp(np.log(r).mean()))), fmt(float(r.min())),
                                  fmt(float(r.max())), r.index.get_level_values("layer").nunique()])
            ev += ["- Supplementary (not in the verdict; one seed, layers are not independent replicates): "
                   "real pretrained model, official-layout TalkLoRA, ratio to T = I per layer:",
                   md_table(["setting", "geometric mean", "min over layers", "max over layers", "layers"], lines)]
    return Outcome(verdict, reason, key, ev)



def evaluate_c10(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C10.rule`` (below) to the saved rows."""
    ro = data["perturb_routers"]
    q = ro[(ro.metric == "routing_quotient") & (ro.eps > 0)]
    piv = q.pivot_table(index=["seed", "kind", "eps", "statistic"], columns="router", values="value", aggfunc="first")
    topk = [c for c in piv.columns if c != "dense"]
    res, rows = {}, []
    for k in topk:
        e = {}
        for stat in ("max", "median"):
            sub = piv.xs(stat, level="statistic")
            diff = (sub[k] - sub["dense"]).groupby(level="seed").mean()
            e[stat] = estimate(diff.to_numpy())
        res[k] = e
        rows.append([k, e["max"].text(4), e["max"].direction, e["median"].text(4), e["median"].direction])
    ex = ro[ro.metric == "certified_exists"].groupby("router").value.agg(["min", "max"])
    no_cert = [k for k in topk if k in ex.index and ex.loc[k, "max"] == 0]
    dense_cert = "dense" in ex.index and ex.loc["dense", "min"] == 1
    flips = ro[ro.metric.isin(["top1_flip_rate", "topk_set_flip_rate"]) & (ro.kind == "gaussian_input")]
    fpiv = flips.pivot_table(index=["metric", "eps"], columns="router", values="value", aggfunc="mean")
    tv = ro[(ro.metric == "total_variation") & (ro.statistic == "max")]
    tpiv = tv.pivot_table(index=["kind", "eps"], columns="router", values="value", aggfunc="mean")
    worse_worst = [k for k in topk if res[k]["max"].direction == "above"]
    better_worst = [k for k in topk if res[k]["max"].direction == "below"]
    if not topk:
        verdict, reason = "inconclusive", "no top-k routers"
    elif better_worst:
        verdict, reason = "refuted", f"top-k router(s) {better_worst} have a LOWER worst-case routing quotient than dense"
    elif len(worse_worst) == len(topk) and all(res[k]["median"].direction == "above" for k in topk):
        verdict, reason = "holds", "every top-k router is less stable than dense at both the worst and the typical token"
    elif len(worse_worst) == len(topk):
        verdict = "holds under stated conditions"
        reason = ("dense is more stable in the worst case (max over tokens, near ties), but not at the typical "
                  "token: median difference " + ", ".join(f"{k} {res[k]['median'].text(3)}" for k in topk))
    else:
        verdict = "inconclusive"
        reason = "worst-case differences unresolved: " + ", ".join(f"{k} {res[k]['max'].text(3)}" for k in topk)
    key = "; ".join(f"{k} − dense max quotient {res[k]['max'].text(3)}" for k in topk)
    cert = (f"certified bound exists for dense: {'yes' if dense_cert else 'no'}; for "
            + ", ".join(f"{k}: {'no' if k in no_cert else 'yes'}" for k in topk))
    flip_rows = [[m, fmt(eps)] + [fmt(fpiv.loc[(m, eps), c]) if c in fpiv else "n/a" for c in ["dense", *topk]]
                 for (m, eps) in fpiv.index]
    tv_rows = [[kind, fmt(eps)] + [fmt(tpiv.loc[(kind, eps), c]) if c in tpiv else "n/a" for c in ["dense", *topk]]
               for (kind, eps) in tpiv.index]
    ev = ["- Same MoELoRA-code weights and tokens for every router; paired difference top-k − dense of the "
          "routing quotient ‖Δg‖/‖δ‖ (mean over kinds {gaussian_input, adversarial} and ε within a seed, "
          "95 % t-interval over seeds; > 0 = top-k less stable):",
          md_table(["router", "Δ max over tokens", "direction", "Δ median", "direction"], rows),
          f"- Certified Lipschitz bound: {cert}. Top-k gates jump when the k-th and (k+1)-th logits cross "
          "(a tie), so no finite global bound exists; away from ties the local constant is finite "
          "(top-1 gates are locally constant: local constant 0).",
          "- Flip rates under Gaussian input perturbations (mean over seeds). The top-1 flip rate is the "
          "same for every router under the same δ (they share the argmax), so it cannot separate them; "
          "the top-k set flip rate is the fraction of tokens whose gates jump discontinuously (dense: "
          "the set is all experts, never flips):",
          md_table(["metric", "ε", "dense", *topk], flip_rows),
          "- Worst-token total variation ½‖Δg‖₁ (mean over seeds):",
          md_table(["kind", "ε", "dense", *topk], tv_rows)]
    return Outcome(verdict, reason, key, ev)


# ----------------------------------------------------------------------------- F2 amplification vs eps
def prepare_f2(synthetic: pd.DataFrame) -> pd.DataFrame:
    d = sel(synthetic, metric="routing_quotient", statistic=["median", "p95"])
    return summarise(d, ["E", "kind", "talk", "statistic", "eps"])


def draw_f2(data: pd.DataFrame):
    Es = sorted(data["E"].unique())
    kinds = order(data["kind"], list(KIND_LABELS))
    talks = talk_order(data["talk"])
    colors = talk_colors(talks)
    markers = dict(zip(talks, "osD^vP*X"))
    fig, axes = plt.subplots(len(Es), len(kinds), figsize=(WIDTH, 2.5 * len(Es) + 0.6), squeeze=False,
                             sharex=True, sharey="row")
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
    fig.supxlabel("ε  (relative perturbation size ‖δ‖/‖x‖, or ‖δh‖/‖h‖ for the block kind)", fontsize=10)
    fig.tight_layout()
    h, lab = dedupe(axes)
    h += [matplotlib.lines.Line2D([], [], color="0.3", ls="-", marker="o"),
          matplotlib.lines.Line2D([], [], color="0.3", ls=":")]
    lab += ["median over tokens", "95th percentile"]
    legend_below(fig, h, lab, ncol=4, title="talk setting T (shaded: 95% CI of the median over seeds)")
    return fig


# ----------------------------------------------------------------------------- F3 Lipschitz sandwich
SANDWICH = ["certified", "local_max", "empirical"]


def prepare_f3(synthetic: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    s = sel(synthetic, metric="lipschitz", statistic=SANDWICH)
    s = summarise(s.assign(panel="synthetic, w.r.t. " + s["kind"].str.replace("lipschitz_", ""),
                           group=s["talk"]), ["panel", "E", "group", "statistic"])
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
        groups = order(d["group"], METHOD_ORDER) if trained else talk_order(d["group"])
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
        labels = groups if trained else [talk_short(g) for g in groups]
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


# ----------------------------------------------------------------------------- F9 flip rates dense vs top-k
F9_PANELS = {"top1_flip_rate/gaussian_input": "top-1 flip rate, Gaussian δ",
             "top1_flip_rate/adversarial": "top-1 flip rate, adversarial δ",
             "topk_set_flip_rate/gaussian_input": "top-k set flip rate, Gaussian δ"}


def prepare_f9(routers: pd.DataFrame) -> pd.DataFrame:
    d = sel(routers, metric=["top1_flip_rate", "topk_set_flip_rate"], statistic="mean")
    d = d.assign(panel=d["metric"] + "/" + d["kind"])
    d = d[d["panel"].isin(list(F9_PANELS))]
    flips = summarise(d, ["panel", "router", "eps"])
    lip = sel(routers, metric="lipschitz", kind="lipschitz_code")
    lip = summarise(lip.assign(panel="lipschitz", eps=np.nan), ["panel", "router", "statistic"])
    ex = sel(routers, metric="certified_exists").groupby("router")["value"].min()
    lip = lip.assign(certified_exists=lip["router"].map(ex))
    return pd.concat([flips, lip], ignore_index=True)


def draw_f9(data: pd.DataFrame):
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH, 5.6))
    routers = order(data["router"], list(ROUTER_COLORS))
    for ax, (panel, title) in zip(axes.ravel(), F9_PANELS.items()):
        for r in routers:
            d = sel(data, panel=panel, router=r)
            if len(d):
                line_ci(ax, d, "eps", color=ROUTER_COLORS.get(r), label=r, marker=ROUTER_MARKERS.get(r, "o"),
                         ms={"dense": 8, "top2": 6}.get(r, 4.5))
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("ε (relative, ‖δ‖/‖x‖)")
        ax.set_ylabel("fraction of tokens")
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
            v = d.loc[r, "mean"]
            if s == "certified" and np.isnan(v):
                ax.text(xi, 0.02, "none\n(jumps)", ha="center", va="bottom", fontsize=7, rotation=90,
                        transform=ax.get_xaxis_transform())
            elif v == 0:
                ax.text(xi, 0.01, "0", ha="center", va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(routers)), routers)
    ax.set_xlim(-0.5, len(routers) - 0.5)
    ax.set_title("router Lipschitz w.r.t. code h", fontsize=9.5)
    ax.set_ylabel("‖Δg‖₂ / ‖Δh‖₂")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    ax.set_ylim(0, max(lip["hi"].max() * 1.45, 1e-3) if len(lip) else 1)
    fig.tight_layout()
    h, lab = dedupe(axes[0])
    legend_below(fig, h, lab, ncol=len(routers), title="router (shaded: 95% CI over seeds)")
    return fig


# ----------------------------------------------------------------------------- declarations
C4 = ClaimSpec(
    "C4", paper="router Lipschitz bounds (softmax ½; certified ≥ local max; certified ≥ empirical)",
    statement=("For dense softmax routers, ‖J_s(p)‖₂ ≤ ½; the certified bound ½‖W_eff‖₂ "
               "(w.r.t. h) or ½‖W_eff A‖₂ (w.r.t. x) is ≥ the maximal local Lipschitz constant over "
               "tokens and ≥ the empirical (PGD) lower bound."),
    rule=("holds if local_max ≤ certified·(1+1e-9) and empirical ≤ certified·(1+1e-9) in every "
          "cell (synthetic layers, dense routers, trained routers, twins); refuted if any cell "
          "violates it; inconclusive if a backing test failed."),
    figures=("F3",),
    tests=(r"tests/test_probes_lipschitz\.py::test_(softmax_jacobian|sandwich_ordering|certified_values"
           r"|generic_|huge_logits|wide_layer)",
           r"tests/test_probes_amplification\.py::test_adversarial_dominates_gaussian_and_everything_below_certified"),
    experiments=("perturb_synthetic",), optional=("perturb_routers", "train", "twins"), evaluate=evaluate_c4)
C5 = ClaimSpec(
    "C5", paper="communication mitigates perturbation amplification",
    statement=("Relative to T = I (exactly MoELoRA-code with the same A, C, B, W_r), a Talking "
               "Module lowers the router's perturbation amplification, measured as the median "
               "routing quotient ‖Δg‖/‖δ‖ under Gaussian-input and adversarial perturbations."),
    rule=("per talk setting, the ratio of the median routing quotient to that of T = I "
          "(same A, C, B, W_r; trained: TalkLoRA-official vs MoELoRA-code of the same seed), "
          "geometric mean over kinds {gaussian_input, adversarial}, ε and layers within a seed, "
          "95 % t-interval over seeds. Refuted if the official init or the trained TalkLoRA "
          "increases it (interval above 1); holds if every setting reduces it (interval below 1); "
          "holds under stated conditions if the contractive uniform-mix settings (‖T‖₂ ≤ 1) "
          "reduce it but not all others do; otherwise inconclusive."),
    figures=("F2",),
    tests=(r"tests/test_probes_lipschitz\.py::test_(uniform_mix_column_norm|worked_example_E2_m1|doubly_stochastic_)",
           r"tests/test_probes_amplification\.py::test_fixed_block_and_talk_spreading"),
    experiments=("perturb_synthetic", "train"), optional=("perturb_real",), evaluate=evaluate_c5)
C10 = ClaimSpec(
    "C10", paper="dense softmax vs hard–soft top-k routing (LoRA-Mixer): stability under perturbation",
    statement=("On the same weights, dense softmax routing is more stable under input "
               "perturbations than hard–soft top-k routing: it has a certified Lipschitz bound and a "
               "smaller worst-case routing change; top-k has no certified bound across ties."),
    rule=("claim read as 'dense softmax is more stable under perturbation than top-k'. Per top-k "
          "router, paired difference (top-k − dense, same weights and seed) of the routing quotient, "
          "averaged over kinds and ε within a seed, 95 % t-interval over seeds, for the max over "
          "tokens (worst case) and the median (typical token). Refuted if some top-k router has a "
          "resolved lower worst case; holds if every top-k router is resolved worse in both; holds "
          "under stated conditions if worse in the worst case only; otherwise inconclusive. "
          "(Top-1 flip rates are not compared: dense and top-k routers share the argmax.)"),
    figures=("F9",),
    tests=(r"tests/test_probes_lipschitz\.py::test_topk_router_has_no_certified_bound",
           r"tests/test_probes_amplification\.py::test_topk_layer_flips_grow_with_eps",
           r"tests/test_properties\.py::test_top_k_"),
    experiments=("perturb_routers",), evaluate=evaluate_c10)

F2 = FigureSpec(
    "F2", "amplification_vs_eps", ("perturb_synthetic",), prepare_f2, draw_f2,
    "Perturbation amplification ({claims}): routing quotient ‖Δg‖₂/‖δ‖₂ (median solid, 95th "
    "percentile dotted over tokens) vs relative perturbation size ε, per perturbation kind (columns) "
    "and number of experts (rows), for each talk setting; every setting shares A, C, B, W_r and "
    "differs in T only. Shaded: 95% CI over seeds.")
F3 = FigureSpec(
    "F3", "lipschitz_sandwich", ("perturb_synthetic", "train"), prepare_f3, draw_f3,
    "Router Lipschitz sandwich ({claims}): certified bound ≥ max local Jacobian norm ≥ empirical "
    "(PGD) quotient, across talk strength α (T = αI + (1−α)J/E; α = 1 is the identity) and the "
    "official init on synthetic layers (w.r.t. the code h and the input x), and for every trained "
    "router (w.r.t. x; mean over seeds and layers).")
F9 = FigureSpec(
    "F9", "router_flip_rates", ("perturb_routers",), prepare_f9, draw_f9,
    "Dense softmax vs hard–soft top-k routing ({claims}) on identical weights: top-1 flip rate "
    "under Gaussian and adversarial perturbations (under the same Gaussian δ all routers share the "
    "logits and hence the top-1 flips; PGD targets each router's own gates) and top-k set flip rate "
    "vs ε (for dense routing the 'set' is all experts and never flips); bottom right: local Lipschitz "
    "constants away from ties and the certified bound, which does not exist for top-k (gates jump at ties).")

TOPIC = Topic("smoothness", "02_smoothness.py", claims=(C4, C5, C8, C10), figures=(F2, F3, F7, F9))
