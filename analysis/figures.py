"""Figures F1–F9 (SPEC §6), their data files and the manifest ``figures/README.md``.

``run(config, results_dir=..., figures_dir=...)`` first makes sure every experiment's results exist
(``analysis.perturb.run``, ``analysis.train.run``, ``analysis.twins.run`` skip finished cells), then
:func:`draw_all` reads the tidy ``rows.csv`` files and writes, per figure ``F<n>_<slug>``:

* ``<figures_dir>/F<n>_<slug>.png`` (150 dpi) and ``.pdf``;
* ``<figures_dir>/data/F<n>_<slug>.csv`` — exactly the numbers drawn (summaries: ``mean, lo, hi, n``
  with a 95 % interval ``mean ± t₀.₉₇₅,n−1 · se`` over seeds; ``lo = hi = mean`` when n = 1);
* an entry in ``<figures_dir>/README.md`` (image, caption, data file, notebook).

Every figure is split in two functions so that the pipeline and the notebooks cannot drift:
``prepare_f<n>(rows…) -> DataFrame`` (the data drawn) and ``draw_f<n>(data) -> Figure``; the
notebooks in ``notebooks/`` call ``draw_f<n>`` on the saved CSV.  ``FIGURE_BY_ID["F<n>"].make(rows…)``
returns ``(fig, data)``.  One style for all figures is set by :func:`set_style`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .results import atomic_path, atomic_write_csv, atomic_write_text, read_rows, update_marked_section

# ----------------------------------------------------------------------------- style & helpers
DPI = 150
WIDTH = 7.5                     # inches: ~1100 px at 150 dpi, readable scaled to ~800 px
ZERO_FLOOR = 1e-9               # exact zeros are drawn here on log axes (marked in the figure)
METHOD_ORDER = ["lora", "moelora-code", "moelora-input", "talklora-official", "talklora-identity",
                "topk-entropy", "switch"]
METHOD_COLORS = dict(zip(METHOD_ORDER, ["#7f7f7f", "#1f77b4", "#17becf", "#d62728", "#9467bd",
                                        "#8c564b", "#bcbd22"]))
METHOD_MARKERS = dict(zip(METHOD_ORDER, ["o", "s", "^", "D", "v", "P", "X"]))
TWIN_COLORS = {"talklora": "#d62728", "moelora-twin": "#1f77b4", "talklora-frozen-T": "#ff7f0e",
               "talklora-identity": "#9467bd"}
TWIN_MARKERS = {"moelora-twin": "s", "talklora-frozen-T": "^", "talklora-identity": "o"}
ROUTER_COLORS = {"dense": "#1f77b4", "top2": "#ff7f0e", "top1": "#d62728"}
ROUTER_MARKERS = {"dense": "o", "top2": "s", "top1": "^"}
STAT_COLORS = {"certified": "#d62728", "local_max": "#1f77b4", "empirical": "#2ca02c",
               "local_median": "#17becf"}
STAT_LABELS = {"certified": "certified bound", "local_max": "max local ‖J‖", "empirical": "empirical (PGD)",
               "local_median": "median local ‖J‖"}
KIND_LABELS = {"gaussian_input": "Gaussian δ in x", "gaussian_block": "Gaussian δ in one block of h",
               "adversarial": "adversarial (PGD) δ in x"}
EXPERIMENT_COMMAND = {"perturb_synthetic": "perturb", "perturb_routers": "perturb", "talk_norms": "perturb",
                      "equivalence": "perturb", "perturb_real": "perturb", "train": "train", "twins": "twins"}
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def set_style() -> None:
    """The one style of every figure (seaborn whitegrid, paper context, 150 dpi)."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.15,
                  rc={"figure.dpi": 100, "savefig.dpi": DPI, "savefig.bbox": "tight",
                      "axes.titlesize": 10.5, "axes.labelsize": 10, "legend.fontsize": 9,
                      "legend.title_fontsize": 9.5, "xtick.labelsize": 9, "ytick.labelsize": 9,
                      "axes.titleweight": "bold", "lines.linewidth": 1.6, "lines.markersize": 5,
                      "pdf.fonttype": 42})


def t975(df: int) -> float:
    """Two-sided 95 % Student-t quantile with ``df`` degrees of freedom."""
    return _T975[df - 1] if 1 <= df <= 30 else 1.96 + 2.4 / df


def summarise(df: pd.DataFrame, by: list[str], value: str = "value", *, log_floor: float | None = None,
              bounds: tuple[float, float] | None = None) -> pd.DataFrame:
    """``mean, lo, hi, n`` per group: 95 % interval ``mean ± t · sd/√n`` (``lo = hi`` for n = 1).

    ``log_floor``: summarise ``log10(max(v, log_floor))`` and transform back (geometric mean and
    interval, for positive quantities spanning decades).  ``bounds``: clip the interval to the
    quantity's feasible range (a t-interval over 3 seeds can leave it, e.g. a Gini below 0)."""
    def one(v: pd.Series) -> pd.Series:
        v = v.dropna().astype(float)
        if log_floor is not None:
            v = np.log10(np.maximum(v, log_floor))
        n, mean = len(v), float(v.mean()) if len(v) else math.nan
        half = t975(n - 1) * float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
        lo, hi = mean - half, mean + half
        if log_floor is not None:
            mean, lo, hi = 10 ** mean, 10 ** lo, 10 ** hi
        if bounds is not None:
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        return pd.Series({"mean": mean, "lo": lo, "hi": hi, "n": n})
    out = df.groupby(by, sort=False, dropna=False)[value].apply(one).unstack().reset_index()
    out["n"] = out["n"].astype(int)
    return out


def _sel(df: pd.DataFrame, **eq) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for col, v in eq.items():
        mask &= df[col].isin(v).to_numpy() if isinstance(v, (list, tuple, set)) else (df[col] == v).to_numpy()
    return df[mask]


def _order(values, preferred: list) -> list:
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def _line_ci(ax, d: pd.DataFrame, x: str, *, color, label=None, ls="-", marker="o", floor=None, band=True,
             ms=None):
    """Mean line with a shaded 95 % interval (``d`` has ``mean, lo, hi``)."""
    d = d.sort_values(x)
    y, lo, hi = d["mean"].to_numpy(float), d["lo"].to_numpy(float), d["hi"].to_numpy(float)
    if floor is not None:
        y, lo, hi = (np.maximum(a, floor) for a in (y, lo, hi))
    ax.plot(d[x], y, ls=ls, marker=marker, color=color, label=label, ms=ms)
    if band and (hi > lo).any():
        ax.fill_between(d[x], lo, hi, color=color, alpha=0.18, lw=0)


def _legend_below(fig, handles, labels, ncol=4, title=None, y=-0.01):
    """One legend for the whole figure, centred below the axes (never over the data)."""
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, y), ncol=ncol, frameon=False,
               title=title)


def _dedupe(axes) -> tuple[list, list]:
    seen = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    return list(seen.values()), list(seen.keys())


def _talk_order(talks) -> list[str]:
    """uniform-mix α ascending, then identity (α = 1), then official."""
    def key(t):
        if t.startswith("uniform-mix:"):
            return (0, float(t.split(":")[1]))
        return (1, 0.0) if t == "identity" else (2, 0.0)
    return sorted(dict.fromkeys(talks), key=key)


def _talk_label(t: str) -> str:
    if t.startswith("uniform-mix:"):
        return f"mix α={float(t.split(':')[1]):g}"
    return {"identity": "identity (α=1)", "official": "official U(±1/√E)"}.get(t, t)


def _talk_short(t: str) -> str:
    if t.startswith("uniform-mix:"):
        return f"α={float(t.split(':')[1]):g}"
    return {"identity": "I (α=1)"}.get(t, t)


def _talk_colors(talks) -> dict:
    talks = _talk_order(talks)
    mixes = [t for t in talks if t.startswith("uniform-mix:")]
    blues = sns.color_palette("crest", max(len(mixes), 1) + 1)
    colors = {t: blues[i] for i, t in enumerate(mixes)}
    colors.update({"identity": "#222222", "official": "#d62728"})
    return {t: colors.get(t, "#8c564b") for t in talks}


def nice_log(ax, axis: str = "y") -> None:
    """Readable log ticks: plain numbers, 1-2-5 steps when the range spans less than two decades."""
    lim = ax.get_ylim() if axis == "y" else ax.get_xlim()
    a = ax.yaxis if axis == "y" else ax.xaxis
    if not lim[0] > 0 or lim[1] / lim[0] >= 100:
        return
    if lim[1] / lim[0] < 8:        # under a decade: evenly spaced round numbers
        ticks = [t for t in matplotlib.ticker.MaxNLocator(nbins=5).tick_values(*lim) if lim[0] <= t <= lim[1]]
        a.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    else:
        a.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _log_ylim_from(ax, values, pad: float = 2.0) -> None:
    """Log y-limits around the drawn means (wide intervals from few seeds are clipped, not allowed
    to squash the lines); the full intervals are in the data file."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size:
        ax.set_ylim(v.min() / pad, v.max() * pad)


def _empty(ax, text="no data"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


# ----------------------------------------------------------------------------- F1 load balance per layer
ROUTED = ["moelora-code", "moelora-input", "talklora-official", "talklora-identity"]
F1_METRICS = {"gini": "Gini of expert load\n(0 = balanced)", "load_entropy": "load entropy\n(normalised, 1 = uniform)"}


def prepare_f1(train: pd.DataFrame) -> pd.DataFrame:
    d = _sel(train, split="test", metric=list(F1_METRICS), method=ROUTED)
    d = d[d["layer"] != "all"]
    d = d[d["step"] == d["step"].max()]
    # both metrics live in [0, 1] (Gini at most 1 − 1/E): intervals are clipped to that range
    return summarise(d, ["metric", "layer", "method"], bounds=(0.0, 1.0))


def draw_f1(data: pd.DataFrame):
    layers = list(dict.fromkeys(data["layer"]))
    methods = _order(data["method"], METHOD_ORDER)
    fig, axes = plt.subplots(2, 1, figsize=(WIDTH, 5.2), sharex=True)
    width = 0.8 / max(len(methods), 1)
    for ax, (metric, ylabel) in zip(axes, F1_METRICS.items()):
        for j, m in enumerate(methods):
            d = _sel(data, metric=metric, method=m).set_index("layer").reindex(layers)
            x = np.arange(len(layers)) + (j - (len(methods) - 1) / 2) * width
            ax.errorbar(x, d["mean"], yerr=[d["mean"] - d["lo"], d["hi"] - d["mean"]], fmt="o",
                        color=METHOD_COLORS.get(m), label=m, capsize=2, ms=5)
        ax.set_ylabel(ylabel)
        for k in range(1, len(layers)):
            ax.axvline(k - 0.5, color="0.9", lw=0.8, zorder=0)
        ax.grid(axis="x", visible=False)
    axes[0].set_ylim(bottom=0)
    axes[1].set_xticks(range(len(layers)), layers, rotation=30, ha="right")
    axes[1].set_xlabel("adapted layer (MiniLM layer.projection)")
    axes[0].set_title("Expert load per layer after training (test split; mean ± 95% CI over seeds)")
    fig.tight_layout()
    _legend_below(fig, *_dedupe(axes), ncol=4)
    return fig



# ----------------------------------------------------------------------------- F2 amplification vs eps
def prepare_f2(synthetic: pd.DataFrame) -> pd.DataFrame:
    d = _sel(synthetic, metric="routing_quotient", statistic=["median", "p95"])
    return summarise(d, ["E", "kind", "talk", "statistic", "eps"])


def draw_f2(data: pd.DataFrame):
    Es = sorted(data["E"].unique())
    kinds = _order(data["kind"], list(KIND_LABELS))
    talks = _talk_order(data["talk"])
    colors = _talk_colors(talks)
    markers = dict(zip(talks, "osD^vP*X"))
    fig, axes = plt.subplots(len(Es), len(kinds), figsize=(WIDTH, 2.5 * len(Es) + 0.6), squeeze=False,
                             sharex=True, sharey="row")
    for i, E in enumerate(Es):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            for t in talks:
                for stat, ls in (("median", "-"), ("p95", ":")):
                    d = _sel(data, E=E, kind=kind, talk=t, statistic=stat)
                    if len(d):
                        _line_ci(ax, d, "eps", color=colors[t], ls=ls, marker=markers[t] if stat == "median" else "",
                                 label=_talk_label(t) if stat == "median" else None, band=stat == "median")
            ax.set_xscale("log")
            ax.set_yscale("log")
            _log_ylim_from(ax, _sel(data, E=E)["mean"], pad=1.6)
            if i == 0:
                ax.set_title(KIND_LABELS.get(kind, kind), fontsize=9.5)
            if j == 0:
                ax.set_ylabel(f"E = {E}\nrouting quotient ‖Δg‖₂/‖δ‖₂")
            nice_log(ax, "y")
    fig.supxlabel("ε  (relative perturbation size ‖δ‖/‖x‖, or ‖δh‖/‖h‖ for the block kind)", fontsize=10)
    fig.tight_layout()
    h, lab = _dedupe(axes)
    h += [matplotlib.lines.Line2D([], [], color="0.3", ls="-", marker="o"),
          matplotlib.lines.Line2D([], [], color="0.3", ls=":")]
    lab += ["median over tokens", "95th percentile"]
    _legend_below(fig, h, lab, ncol=4, title="talk setting T (shaded: 95% CI of the median over seeds)")
    return fig



# ----------------------------------------------------------------------------- F3 Lipschitz sandwich
SANDWICH = ["certified", "local_max", "empirical"]


def prepare_f3(synthetic: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    s = _sel(synthetic, metric="lipschitz", statistic=SANDWICH)
    s = summarise(s.assign(panel="synthetic, w.r.t. " + s["kind"].str.replace("lipschitz_", ""),
                           group=s["talk"]), ["panel", "E", "group", "statistic"])
    t = _sel(train, metric="lipschitz", statistic=SANDWICH, step=-1)
    t = summarise(t.assign(panel="trained routers, w.r.t. input", group=t["method"], E=np.nan),
                  ["panel", "E", "group", "statistic"])
    return pd.concat([s, t], ignore_index=True)


def draw_f3(data: pd.DataFrame):
    panels = sorted(data["panel"].unique(), key=lambda p: (p.startswith("trained"), p))
    fig, axes = plt.subplots(1, len(panels), figsize=(WIDTH, 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        d = data[data["panel"] == panel]
        trained = panel.startswith("trained")
        groups = _order(d["group"], METHOD_ORDER) if trained else _talk_order(d["group"])
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
        labels = groups if trained else [_talk_short(g) for g in groups]
        ax.set_xticks(range(len(groups)), labels, rotation=25, ha="right")
        ax.set_yscale("log")
        _log_ylim_from(ax, d["mean"], pad=1.5)
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
    _legend_below(fig, handles, labels, ncol=3, title="certified ≥ max local ≥ empirical; T = αI + (1−α)J/E;\n"
                  "mean ± 95% CI over seeds (trained: over seeds and layers)")
    return fig



# ----------------------------------------------------------------------------- F4 balance over training
F4_METRICS = {"gini": "Gini of expert load", "load_entropy": "load entropy (normalised)",
              "token_entropy": "per-token gate entropy\n(normalised)"}


def prepare_f4(train: pd.DataFrame) -> pd.DataFrame:
    d = _sel(train, split="val", metric=list(F4_METRICS))
    d = d[d["layer"] != "all"]
    d = d.groupby(["method", "seed", "step", "metric"], as_index=False)["value"].mean()   # mean over layers
    return summarise(d, ["metric", "method", "step"])


def draw_f4(data: pd.DataFrame):
    metrics = [m for m in F4_METRICS if m in set(data["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(WIDTH, 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for m in _order(data["method"], METHOD_ORDER):
            d = _sel(data, metric=metric, method=m)
            if len(d):
                _line_ci(ax, d, "step", color=METHOD_COLORS.get(m), label=m, marker="o")
        ax.set_title(F4_METRICS[metric], fontsize=9.5)
        ax.set_xlabel("training step")
    axes[0, 0].set_ylabel("value (mean over adapted layers)")
    fig.tight_layout()
    _legend_below(fig, *_dedupe(axes), ncol=4, title="validation split; shaded: 95% CI over seeds")
    return fig



# ----------------------------------------------------------------------------- F5 accuracy vs parameters
def prepare_f5(train: pd.DataFrame) -> pd.DataFrame:
    acc = _sel(train, split="test", layer="all", domain="all", metric="accuracy")
    acc = summarise(acc, ["method"])
    params = _sel(train, metric="trainable_parameters").groupby("method")["value"].median()
    return acc.assign(trainable_parameters=acc["method"].map(params))


def draw_f5(data: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(WIDTH * 0.8, 3.4))
    for m in _order(data["method"], METHOD_ORDER):
        d = data[data["method"] == m]
        ax.errorbar(d["trainable_parameters"], d["mean"], yerr=[d["mean"] - d["lo"], d["hi"] - d["mean"]],
                    fmt=METHOD_MARKERS.get(m, "o"), ms=9, mfc="none", mew=1.8, capsize=3,
                    color=METHOD_COLORS.get(m), label=m)
    lo, hi = data["trainable_parameters"].min(), data["trainable_parameters"].max()
    if hi / lo > 4:
        ax.set_xscale("log")
    else:
        pad = max(hi - lo, 0.1 * hi) * 0.12
        ax.set_xlim(lo - pad, hi + pad)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e3:g}k"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("trainable adapter parameters (head excluded, tied tensors once)")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_title("Accuracy vs trainable parameters (mean ± 95% CI over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig



# ----------------------------------------------------------------------------- F6 equivalence residuals
F6_LABELS = {"C1_identity_talk": "C1\nT = I ⇒ MoELoRA", "C2_absorption": "C2\nabsorb T into W_r",
             "C3_inclusion": "C3\ncode ⊆ input router"}
F6_COUNTER = "C3_counterexample_rowspace_residual"


def prepare_f6(equivalence: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("seed", "config", "E", "m", "d_in", "d_out", "dtype", "metric", "value") if c in equivalence]
    return equivalence[cols].reset_index(drop=True)


F6_ZERO = 1e-18       # exact zeros only; every non-zero residual is drawn at its value


def draw_f6(data: pd.DataFrame):
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(WIDTH, 3.4), gridspec_kw={"width_ratios": [3, 1.1]})
    metrics = [m for m in F6_LABELS if m in set(data["metric"])]
    dtypes = sorted(data["dtype"].unique())
    pal = {"float32": "#ff7f0e", "float64": "#1f77b4"}
    rng = np.random.default_rng(0)
    for i, metric in enumerate(metrics):
        for j, dt in enumerate(dtypes):
            v = _sel(data, metric=metric, dtype=dt)["value"].to_numpy(float)
            x = i + (j - 0.5) * 0.35 + rng.uniform(-0.08, 0.08, len(v))
            ax.scatter(x, np.where(v > 0, v, F6_ZERO), s=14, alpha=0.7, color=pal.get(dt),
                       label=f"{dt}" if i == 0 else None, edgecolor="none")
    for dt, eps in (("float32", np.finfo(np.float32).eps), ("float64", np.finfo(np.float64).eps)):
        ax.axhline(eps, color=pal[dt], ls="--", lw=0.9, label=f"{dt} machine ε")
    ax.set_yscale("log")
    ax.set_ylim(F6_ZERO / 3, 1e-3)
    ax.set_xticks(range(len(metrics)), [F6_LABELS[m] for m in metrics])
    ax.set_ylabel("relative max-abs output residual\nmax|Δy| / max|y|")
    ax.set_title("Exact reparameterisations (random configs)", fontsize=9.5)
    if ((data["value"] == 0) & data["metric"].isin(metrics)).any():
        ax.axhline(F6_ZERO, color="0.5", ls=":", lw=0.8, label=f"exact 0 (drawn at {F6_ZERO:g})")
    c = data[data["metric"] == F6_COUNTER]
    if len(c):
        # seeded jitter: the same data always gives the same image
        ax2.scatter(rng.uniform(-0.15, 0.15, len(c)), c["value"], color="#2ca02c", s=16)
        ax2.set_xlim(-0.5, 0.5)
        ax2.axhline(0, color="0.3", lw=0.8)
        ax2.set_ylim(bottom=-0.02)
        ax2.set_ylabel("row-space residual of W_g in A\n(> 0: not representable)")
    else:
        _empty(ax2)
    ax2.set_xticks([0], ["C3 counter-\nexample"])
    ax2.set_title("input ⊄ code (float64)", fontsize=9.5)
    fig.tight_layout()
    h, lab = ax.get_legend_handles_labels()
    _legend_below(fig, h, lab, ncol=3)
    return fig



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



# ----------------------------------------------------------------------------- F8 twin divergence
F8_ROWS = {"logit_diff": "logit distance to TalkLoRA\n(max |Δ| solid, mean |Δ| dashed)",
           "accuracy_gap": "val accuracy − TalkLoRA's\n(fraction)",
           "gini_gap": "Gini − TalkLoRA's\n(mean over layers)"}


def prepare_f8(twins: pd.DataFrame) -> pd.DataFrame:
    parts = []
    diff = _sel(twins, metric=["logit_maxabs_diff", "logit_meanabs_diff"])
    diff = diff[diff["model"] != "talklora"]
    parts.append(summarise(diff.assign(panel="logit_diff"), ["panel", "optimizer", "model", "metric", "step"],
                           log_floor=ZERO_FLOOR))        # geometric mean and interval (log axis)
    for metric, panel in (("accuracy", "accuracy_gap"), ("gini", "gini_gap")):
        d = _sel(twins, metric=metric)
        d = d[d["layer"] == "all"] if metric == "accuracy" else d[d["layer"] != "all"]
        d = d.groupby(["optimizer", "seed", "step", "model"], as_index=False)["value"].mean()
        ref = d[d["model"] == "talklora"].set_index(["optimizer", "seed", "step"])["value"]
        d = d[d["model"] != "talklora"]
        d = d.assign(value=d["value"].to_numpy() - ref.reindex(pd.MultiIndex.from_frame(
            d[["optimizer", "seed", "step"]])).to_numpy(), metric=metric + "_gap", panel=panel)
        parts.append(summarise(d, ["panel", "optimizer", "model", "metric", "step"]))
    return pd.concat(parts, ignore_index=True)


def draw_f8(data: pd.DataFrame):
    opts = _order(data["optimizer"], ["adamw", "sgd"])
    panels = [p for p in F8_ROWS if p in set(data["panel"])]
    fig, axes = plt.subplots(len(panels), len(opts), figsize=(WIDTH, 2.3 * len(panels) + 0.5),
                             squeeze=False, sharex=True, sharey="row")
    for i, panel in enumerate(panels):
        for j, opt in enumerate(opts):
            ax = axes[i, j]
            for model in _order(data["model"], list(TWIN_COLORS)):
                for metric in sorted(set(_sel(data, panel=panel)["metric"])):
                    d = _sel(data, panel=panel, optimizer=opt, model=model, metric=metric)
                    if len(d):
                        log = panel == "logit_diff"
                        _line_ci(ax, d, "step", color=TWIN_COLORS.get(model),
                                 marker=TWIN_MARKERS.get(model, "o") if "mean" not in metric else "",
                                 ls="--" if "meanabs" in metric else "-", floor=ZERO_FLOOR if log else None,
                                 label=model if "mean" not in metric else None)
            if panel == "logit_diff":
                ax.set_yscale("log")
                ax.axhline(ZERO_FLOOR, color="0.5", ls=":", lw=0.8)
                ax.set_ylim(bottom=ZERO_FLOOR / 3)
            else:
                ax.axhline(0, color="0.3", lw=0.8)
                vals = _sel(data, panel=panel)[["lo", "hi"]].to_numpy(float)
                span = np.nanmax(np.abs(vals)) if vals.size else 0.0
                if not span > 1e-12:
                    ax.set_ylim(-0.05, 0.05)   # identical to TalkLoRA throughout
            if i == 0:
                ax.set_title(f"optimizer: {opt}", fontsize=10)
            if j == 0:
                ax.set_ylabel(F8_ROWS[panel], fontsize=9)
            if i == len(panels) - 1:
                ax.set_xlabel("training step")
    if "logit_diff" in panels:
        axes[0, 0].text(0.02, 0.09, "dotted: exact 0 (drawn at 1e-9)", transform=axes[0, 0].transAxes,
                        fontsize=7.5, color="0.4")
    fig.tight_layout()
    _legend_below(fig, *_dedupe(axes), ncol=4, title="model (twin of TalkLoRA; shaded: 95% CI over seeds)")
    return fig



# ----------------------------------------------------------------------------- F9 flip rates dense vs top-k
F9_PANELS = {"top1_flip_rate/gaussian_input": "top-1 flip rate, Gaussian δ",
             "top1_flip_rate/adversarial": "top-1 flip rate, adversarial δ",
             "topk_set_flip_rate/gaussian_input": "top-k set flip rate, Gaussian δ"}


def prepare_f9(routers: pd.DataFrame) -> pd.DataFrame:
    d = _sel(routers, metric=["top1_flip_rate", "topk_set_flip_rate"], statistic="mean")
    d = d.assign(panel=d["metric"] + "/" + d["kind"])
    d = d[d["panel"].isin(list(F9_PANELS))]
    flips = summarise(d, ["panel", "router", "eps"])
    lip = _sel(routers, metric="lipschitz", kind="lipschitz_code")
    lip = summarise(lip.assign(panel="lipschitz", eps=np.nan), ["panel", "router", "statistic"])
    ex = _sel(routers, metric="certified_exists").groupby("router")["value"].min()
    lip = lip.assign(certified_exists=lip["router"].map(ex))
    return pd.concat([flips, lip], ignore_index=True)


def draw_f9(data: pd.DataFrame):
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH, 5.6))
    routers = _order(data["router"], list(ROUTER_COLORS))
    for ax, (panel, title) in zip(axes.ravel(), F9_PANELS.items()):
        for r in routers:
            d = _sel(data, panel=panel, router=r)
            if len(d):
                _line_ci(ax, d, "eps", color=ROUTER_COLORS.get(r), label=r, marker=ROUTER_MARKERS.get(r, "o"),
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
    h, lab = _dedupe(axes[0])
    _legend_below(fig, h, lab, ncol=len(routers), title="router (shaded: 95% CI over seeds)")
    return fig



# ----------------------------------------------------------------------------- registry, manifest
@dataclass(frozen=True)
class Figure:
    id: str
    slug: str
    experiments: tuple
    prepare: Callable      # rows of each experiment -> the data frame drawn (saved as the data file)
    draw: Callable         # data frame -> matplotlib figure (the notebooks call this too)
    notebook: str
    caption: str

    @property
    def name(self) -> str:
        return f"{self.id}_{self.slug}"

    def make(self, *rows: pd.DataFrame):
        """``(figure, data)`` from the experiments' rows."""
        data = self.prepare(*rows)
        return self.draw(data), data


FIGURES = [
    Figure("F1", "load_balance_per_layer", ("train",), prepare_f1, draw_f1, "01_load_balance.py",
           "Expert-load balance per adapted layer after training on real text (claim C6): Gini of the soft "
           "expert load (top) and normalised load entropy (bottom) on the test split, for MoELoRA "
           "(code / input router) and TalkLoRA (official / identity T). Mean ± 95% CI over seeds. "
           "Per-expert load shares are not stored; Gini and entropy summarise them."),
    Figure("F2", "amplification_vs_eps", ("perturb_synthetic",), prepare_f2, draw_f2, "02_perturbation.py",
           "Perturbation amplification (claim C5): routing quotient ‖Δg‖₂/‖δ‖₂ (median solid, 95th "
           "percentile dotted over tokens) vs relative perturbation size ε, per perturbation kind (columns) "
           "and number of experts (rows), for each talk setting; every setting shares A, C, B, W_r and "
           "differs in T only. Shaded: 95% CI over seeds."),
    Figure("F3", "lipschitz_sandwich", ("perturb_synthetic", "train"), prepare_f3, draw_f3, "02_perturbation.py",
           "Router Lipschitz sandwich (claim C4/C5): certified bound ≥ max local Jacobian norm ≥ empirical "
           "(PGD) quotient, across talk strength α (T = αI + (1−α)J/E; α = 1 is the identity) and the "
           "official init on synthetic layers (w.r.t. the code h and the input x), and for every trained "
           "router (w.r.t. x; mean over seeds and layers)."),
    Figure("F4", "balance_over_training", ("train",), prepare_f4, draw_f4, "01_load_balance.py",
           "Load balance during training (claim C6): Gini of the expert load, normalised load entropy and "
           "mean per-token gate entropy on the validation split, averaged over adapted layers, vs step. "
           "Shaded: 95% CI over seeds."),
    Figure("F5", "accuracy_vs_parameters", ("train",), prepare_f5, draw_f5, "01_load_balance.py",
           "Parameter efficiency (claim C7): test accuracy vs exact trainable adapter parameters (shared B "
           "and tied tensors counted once, classification head excluded). Mean ± 95% CI over seeds."),
    Figure("F6", "equivalence_residuals", ("equivalence",), prepare_f6, draw_f6, "03_equivalence_and_init.py",
           "Equivalence maps (claims C1–C3) on random configurations: relative output residual of "
           "identity-T TalkLoRA vs MoELoRA (C1), absorbing T into the router (C2), code router as input "
           "router (C3) in float32/float64, with machine ε for reference (exact zeros drawn at 1e-18). "
           "Right: the C3 counterexample's row-space residual, > 0 means the input router is not "
           "representable by any code router."),
    Figure("F7", "talk_norm_official_init", ("talk_norms",), prepare_f7, draw_f7, "03_equivalence_and_init.py",
           "Claim C8: distribution of ‖T‖₂ under the official init U(±1/√E) (left) and of the ratio of "
           "certified router bounds with that T vs T = I for the same W_r (right), per number of experts E. "
           "Red numbers: share of draws above 1, i.e. where communication raises the bound."),
    Figure("F8", "twin_divergence", ("twins",), prepare_f8, draw_f8, "04_twins.py",
           "Function-matched twins (claim C9): models that compute TalkLoRA's function at step 0 "
           "(MoELoRA-code with the absorbed router, TalkLoRA with frozen T, identity-T TalkLoRA) trained "
           "on the same batches. Top: logit distance to TalkLoRA on a held-out batch (log scale; geometric mean and interval over seeds); below: "
           "validation-accuracy and Gini gaps to TalkLoRA. Columns: optimizer. Shaded: 95% CI over seeds."),
    Figure("F9", "router_flip_rates", ("perturb_routers",), prepare_f9, draw_f9, "02_perturbation.py",
           "Dense softmax vs hard–soft top-k routing (claim C10) on identical weights: top-1 flip rate "
           "under Gaussian and adversarial perturbations (under the same Gaussian δ all routers share the "
           "logits and hence the top-1 flips; PGD targets each router's own gates) and top-k set flip rate "
           "vs ε (for dense routing the 'set' is all experts and never flips); bottom right: local Lipschitz constants away from "
           "ties and the certified bound, which does not exist for top-k (gates jump at ties)."),
]
FIGURE_BY_ID = {f.id: f for f in FIGURES}


def default_figures_dir() -> Path:
    """``$TALKLORA_FIGURES_DIR`` if set, else ``figures/`` at the repository root."""
    return Path(os.environ.get("TALKLORA_FIGURES_DIR", Path(__file__).resolve().parents[1] / "figures"))


def figure_data(fig_id: str, figures_dir=None) -> pd.DataFrame:
    """The saved data of figure ``fig_id`` (exactly the numbers drawn), for the notebooks."""
    path = Path(figures_dir or default_figures_dir()) / "data" / f"{FIGURE_BY_ID[fig_id].name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python -m analysis figures` first")
    return pd.read_csv(path)


def load_experiment(experiment: str, results_dir="results") -> pd.DataFrame:
    """``rows.csv`` of ``experiment``, or a clear error naming the command that produces it."""
    try:
        return read_rows(experiment, results_dir)
    except FileNotFoundError:
        cmd = EXPERIMENT_COMMAND.get(experiment, experiment)
        raise FileNotFoundError(
            f"figures need the '{experiment}' results, but {Path(results_dir) / experiment / 'rows.csv'} "
            f"does not exist: run `python -m analysis {cmd} --results-dir {results_dir}` first") from None


def save_figure(fig, data: pd.DataFrame, name: str, figures_dir) -> dict:
    """``<name>.png`` / ``.pdf`` and ``data/<name>.csv``, all written atomically; closes ``fig``."""
    figures_dir = Path(figures_dir)
    out = {}
    for ext in ("png", "pdf"):
        path = figures_dir / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=DPI, bbox_inches="tight",   # no timestamp: reproducible files
                        metadata={"CreationDate": None} if ext == "pdf" else {"Software": None})
        out[ext] = path
    out["csv"] = atomic_write_csv(data, figures_dir / "data" / f"{name}.csv")
    for path in out.values():
        os.chmod(path, 0o644)             # mkstemp creates 0600; figures are meant to be shared
    plt.close(fig)
    return out


def manifest(figures: list[Figure], sources: dict | None = None) -> str:
    lines = ["# Figures", "",
             "Generated by `python -m analysis figures` (`analysis/figures.py`); do not edit by hand.",
             "Each figure's data file holds exactly the numbers drawn; the notebook redraws the figure from it",
             "with the same drawing function (`analysis.figures.draw_f<n>`).", ""]
    if sources:
        lines += ["Source results: " + ", ".join(f"`{k}`" for k in sources) + ".", ""]
    for f in figures:
        lines += [f"## {f.id}: {f.slug.replace('_', ' ')}", "",
                  f"![{f.id}]({f.name}.png)", "",
                  f"{f.caption}", "",
                  f"- image: [`{f.name}.png`]({f.name}.png) · [`{f.name}.pdf`]({f.name}.pdf)",
                  f"- data: [`data/{f.name}.csv`](data/{f.name}.csv)",
                  f"- notebook: [`notebooks/{f.notebook}`](../notebooks/{f.notebook})",
                  f"- drawn from: " + ", ".join(f"`{e}`" for e in f.experiments), ""]
    return "\n".join(lines)


def draw_all(results_dir="results", figures_dir="figures", only: list[str] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Draw every figure (or those in ``only``) from saved results; write the manifest."""
    set_style()
    figures = [f for f in FIGURES if only is None or f.id in only]
    needed = list(dict.fromkeys(e for f in figures for e in f.experiments))
    rows = {e: load_experiment(e, results_dir) for e in needed}      # fail early, before drawing
    written = {}
    for f in figures:
        fig, data = f.make(*(rows[e] for e in f.experiments))
        written[f.id] = save_figure(fig, data, f.name, figures_dir)
        log(f"[figures] {f.id} -> {written[f.id]['png']} ({len(data)} data rows)")
    readme = atomic_write_text(Path(figures_dir) / "README.md", manifest(figures, rows))
    os.chmod(readme, 0o644)
    root = Path(__file__).resolve().parents[1]
    if Path(figures_dir).resolve() == root / "figures" and only is None:
        gallery = [f"**{f.id}.** {f.caption}\n\n![{f.id}](figures/{f.name}.png)\n" for f in figures]
        update_marked_section(root / "README.md", "figures", "\n".join(gallery))
    return written


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        figures_dir="figures"):
    """Make sure every experiment has results (finished cells are skipped), then draw F1–F9."""
    from . import perturb, train, twins

    for module in (perturb, train, twins):
        module.run(config, results_dir=results_dir, workers=workers, executor=executor, force=force)
    return draw_all(results_dir, figures_dir)
