"""The helpers every claim module shares — and the only ones: row selection, paired-difference
frames and comparisons, and report tables.

Every paired comparison is a difference over seeds (common random numbers: every method of one seed
draws the same initial tensors and data order), ``Comparison.from_differences``: n, mean effect,
95 % t-interval, declared margin and minimum detectable effect (docs/method.md §5).
"""
from __future__ import annotations

import math

import pandas as pd

from ..report import md_table  # noqa: F401  (the report's table format, shared by the claims' evidence)
from ..stats import Comparison


# ----------------------------------------------------------------------------- row selection
def at_last_step(rows: pd.DataFrame, keys) -> pd.DataFrame:
    """The rows at the last step of each group ``keys`` (e.g. method and seed)."""
    if rows.empty:
        return rows
    return rows[rows["step"] == rows.groupby(list(keys))["step"].transform("max")]


def with_task(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``task`` column (``"task"`` when the experiment ran a single unnamed task)."""
    return rows if "task" in rows else rows.assign(task="task")


# ----------------------------------------------------------------------------- paired differences
def by_seed(rows: pd.DataFrame, column: str = "method") -> pd.DataFrame:
    """Mean ``value`` per seed (rows) and ``column`` (columns): the frame paired differences read."""
    return rows.groupby(["seed", column])["value"].mean().unstack(column)


def paired(name: str, wide: pd.DataFrame, a: str, b: str, margin: float, side: str) -> Comparison | None:
    """Paired comparison ``wide[a] − wide[b]`` (rows: seeds); ``None`` when a column is missing."""
    if a not in wide or b not in wide:
        return None
    d = (wide[a] - wide[b]).dropna()
    return Comparison.from_differences(name, d, margin, side) if len(d) else None


def inside_margin(c: Comparison) -> bool:
    """The comparison's interval lies entirely inside ±margin (no practically relevant difference)."""
    return math.isfinite(c.ci_low) and -c.margin < c.ci_low and c.ci_high < c.margin


# ----------------------------------------------------------------------------- tables
def comparison_table(comps, verdicts=None, extra: dict | None = None) -> str:
    """Markdown table of comparisons (``verdicts``: the verdicts that count, e.g. after Holm)."""
    header = ["paired difference", "n", "effect", "95 % interval", "margin", "MDE", "verdict"]
    rows = [c.row() for c in comps]
    if verdicts is not None:
        rows = [r[:-1] + [v] for r, v in zip(rows, verdicts)]
    for col, values in (extra or {}).items():
        header.append(col)
        rows = [r + [v] for r, v in zip(rows, values)]
    return md_table(header, rows)


def interval_text(c: Comparison | None) -> str:
    """``effect [lo, hi]`` of a comparison as report cells show it (``n/a`` without one)."""
    return c.row()[2] + " " + c.row()[3] if c is not None else "n/a"
