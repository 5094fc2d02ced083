"""F13 (docs/method.md §6): the cost of communication against the number of experts.

Drawn by ``make bench`` (``benchmarks/cost_vs_experts.py`` measures and writes
``figures/data/F13_cost_vs_experts.csv``) and redrawn by ``notebooks/05_cost.py`` from that file.
pandas / matplotlib only (no torch): the drawing needs nothing but the data file.

Data (tidy, one row per method × E × metric × statistic): ``method`` (``lora``, ``moelora-code``,
``talklora-<structure>``), ``label``, ``num_experts``, ``metric`` — ``time_ratio`` (forward +
backward time over LoRA's in the same round; statistics ``median`` over rounds and ``ci95_lo`` /
``ci95_hi``, its ~95 % order-statistic interval),
``memory_ratio`` (peak bytes held during one step over LoRA's; ``value``), ``time_s`` and
``peak_bytes_per_token`` (absolute) — ``statistic``, ``value``, and the setting (``rank``, ``d``,
``tokens``, ``threads``, ``clock``, ``repeats``).
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from . import methods as registry

F13_NAME = "F13_cost_vs_experts"
CAPTION = ("Cost of communication vs the number of experts E at a fixed rank budget (r = {rank}, so m = r/E "
           "down to {m_min}; one layer around a frozen {d}×{d} base, {tokens} tokens, input requiring grad), "
           "relative to LoRA of the same rank measured in the same rounds: (a) forward + backward time "
           "(median of paired ratios over ≥ {repeats} interleaved rounds, band: its ~95% interval; "
           "{threads} thread, {clock} clock), (b) peak bytes held during one forward + backward, per token. "
           "MoELoRA-code is TalkLoRA without T; TalkLoRA's communication structures: full (the paper's T), "
           "broadcast, doubly-stochastic, block (2 groups), banded (bandwidth 1, 0 at E = 2), low-rank "
           "(rank 2). The paper does not report this cost; a published commentary names it as the open "
           "question.")


def f13_data(figures_dir=None) -> pd.DataFrame:
    """The saved F13 data: ``<figures_dir>/data/F13_cost_vs_experts.csv`` (default
    ``$TALKLORA_FIGURES_DIR``, else ``figures/`` at the repository root)."""
    root = figures_dir or os.environ.get("TALKLORA_FIGURES_DIR", Path(__file__).resolve().parents[1] / "figures")
    path = Path(root) / "data" / f"{F13_NAME}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `make bench` (benchmarks/cost_vs_experts.py) first")
    return pd.read_csv(path)


def caption(data: pd.DataFrame) -> str:
    """F13's caption with the setting of ``data`` filled in."""
    first = data.iloc[0]
    return CAPTION.format(rank=int(first["rank"]), m_min=int(first["rank"]) // int(data["num_experts"].max()),
                          d=int(first["d"]), tokens=int(first["tokens"]), repeats=int(data["repeats"].min()),
                          threads=int(first["threads"]), clock=first["clock"])


def _series(data: pd.DataFrame, method: str, metric: str) -> pd.DataFrame:
    rows = data[(data["method"] == method) & (data["metric"] == metric)]
    return rows.pivot_table(index="num_experts", columns="statistic", values="value").sort_index()


def draw_f13(data: pd.DataFrame) -> plt.Figure:
    """Time (a) and peak memory per token (b) relative to LoRA against E, one line per method."""
    methods = list(dict.fromkeys(data.loc[data["metric"] == "time_ratio", "method"]))   # the bench's order
    labels = data.drop_duplicates("method").set_index("method")["label"]
    colors = plt.get_cmap("tab10")
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10.5, 3.9), sharex=True)
    for i, method in enumerate(methods):
        # a registry method (the mixture without T) keeps its colour and marker, dashed; structures: tab10
        known = method in registry.METHODS
        style = dict(color=registry.color(method, colors(i)), ls="--" if known else "-",
                     marker=registry.marker(method, "o"))
        t = _series(data, method, "time_ratio")
        ax_time.plot(t.index, t["median"], label=labels[method], ms=4, lw=1.4, **style)
        ax_time.fill_between(t.index, t["ci95_lo"], t["ci95_hi"], color=style["color"], alpha=0.12, lw=0)
        mem = _series(data, method, "memory_ratio")
        ax_mem.plot(mem.index, mem["value"], label=labels[method], ms=4, lw=1.4, **style)
    ratios = data.loc[data["metric"] == "memory_ratio", "value"]
    ax_mem.set_ylim(min(0.95, ratios.min() - 0.01), max(1.15, ratios.max() + 0.01))    # at least ±5 % around 1
    experts = sorted(data["num_experts"].unique())
    for ax, title in ((ax_time, "(a) forward + backward time / LoRA"),
                      (ax_mem, "(b) peak memory per token / LoRA")):
        ax.axhline(1.0, color="k", lw=0.8, ls=":", label="LoRA (same rank)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(experts, [str(e) for e in experts])
        ax.set_xlabel(f"experts E (rank r = {int(data['rank'].iloc[0])} fixed)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, names = ax_time.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    return fig
