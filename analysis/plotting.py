"""The one style and the shared drawing helpers of every figure (the claim modules' ``draw_f<n>``).

Methods are drawn with their registry label, colour and marker (:func:`analysis.methods.label` /
``color`` / ``marker``, in :data:`analysis.methods.ORDER`); this module holds what is not a method:
the perturbation routers of C10, the Lipschitz statistics, the perturbation kinds and the talk settings.

:func:`summarise` gives the ``mean, lo, hi, n`` rows every figure draws: a 95 % Student-t interval
``mean ± t₀.₉₇₅,n−1 · sd/√n`` over seeds (:func:`analysis.stats.t_quantile`; ``lo = hi = mean``
when n = 1).
"""
from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns

from .stats import t_quantile

DPI = 150
WIDTH = 7.5                     # inches: ~1100 px at 150 dpi, readable scaled to ~800 px
ZERO_FLOOR = 1e-9               # exact zeros are drawn here on log axes (marked in the figure)
ROUTER_COLORS = {"dense": "#1f77b4", "top2": "#ff7f0e", "top1": "#d62728"}
ROUTER_MARKERS = {"dense": "o", "top2": "s", "top1": "^"}
STAT_COLORS = {"certified": "#d62728", "local_max": "#1f77b4", "empirical": "#2ca02c",
               "local_median": "#17becf"}
STAT_LABELS = {"certified": "certified bound", "local_max": "max local ‖J‖", "empirical": "empirical (PGD)",
               "local_median": "median local ‖J‖"}
KIND_LABELS = {"gaussian_input": "Gaussian δ in x", "gaussian_block": "Gaussian δ in one block of h",
               "adversarial": "adversarial (PGD) δ in x"}


def set_style() -> None:
    """The one style of every figure (seaborn whitegrid, paper context, 150 dpi)."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.15,
                  rc={"figure.dpi": 100, "savefig.dpi": DPI, "savefig.bbox": "tight",
                      "axes.titlesize": 10.5, "axes.labelsize": 10, "legend.fontsize": 9,
                      "legend.title_fontsize": 9.5, "xtick.labelsize": 9, "ytick.labelsize": 9,
                      "axes.titleweight": "bold", "lines.linewidth": 1.6, "lines.markersize": 5,
                      "pdf.fonttype": 42})



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
        half = t_quantile(n - 1) * float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
        lo, hi = mean - half, mean + half
        if log_floor is not None:
            mean, lo, hi = 10 ** mean, 10 ** lo, 10 ** hi
        if bounds is not None:
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        return pd.Series({"mean": mean, "lo": lo, "hi": hi, "n": n})
    out = df.groupby(by, sort=False, dropna=False)[value].apply(one).unstack().reset_index()
    out["n"] = out["n"].astype(int)
    return out



def sel(df: pd.DataFrame, **eq) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for col, v in eq.items():
        mask &= df[col].isin(v).to_numpy() if isinstance(v, (list, tuple, set)) else (df[col] == v).to_numpy()
    return df[mask]


def order(values, preferred: list) -> list:
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def line_ci(ax, d: pd.DataFrame, x: str, *, color, label=None, ls="-", marker="o", floor=None, band=True,
             ms=None):
    """Mean line with a shaded 95 % interval (``d`` has ``mean, lo, hi``)."""
    d = d.sort_values(x)
    y, lo, hi = d["mean"].to_numpy(float), d["lo"].to_numpy(float), d["hi"].to_numpy(float)
    if floor is not None:
        y, lo, hi = (np.maximum(a, floor) for a in (y, lo, hi))
    ax.plot(d[x], y, ls=ls, marker=marker, color=color, label=label, ms=ms)
    if band and (hi > lo).any():
        ax.fill_between(d[x], lo, hi, color=color, alpha=0.18, lw=0)


def legend_below(fig, handles, labels, ncol=4, title=None, y=-0.01):
    """One legend for the whole figure, centred below the axes (never over the data)."""
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, y), ncol=ncol, frameon=False,
               title=title)


def dedupe(axes) -> tuple[list, list]:
    seen = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    return list(seen.values()), list(seen.keys())


def talk_order(talks) -> list[str]:
    """uniform-mix α ascending, then identity (α = 1), then official."""
    def key(t):
        if t.startswith("uniform-mix:"):
            return (0, float(t.split(":")[1]))
        return (1, 0.0) if t == "identity" else (2, 0.0)
    return sorted(dict.fromkeys(talks), key=key)


def talk_label(t: str) -> str:
    if t.startswith("uniform-mix:"):
        return f"mix α={float(t.split(':')[1]):g}"
    return {"identity": "identity (α=1)", "official": "official U(±1/√E)"}.get(t, t)


def talk_short(t: str) -> str:
    if t.startswith("uniform-mix:"):
        return f"α={float(t.split(':')[1]):g}"
    return {"identity": "I (α=1)"}.get(t, t)


def talk_colors(talks) -> dict:
    talks = talk_order(talks)
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


def log_ylim_from(ax, values, pad: float = 2.0) -> None:
    """Log y-limits around the drawn means (wide intervals from few seeds are clipped, not allowed
    to squash the lines); the full intervals are in the data file."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size:
        ax.set_ylim(v.min() / pad, v.max() * pad)


def empty(ax, text="no data"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
