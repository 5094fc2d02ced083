"""The helpers every claim module shares: row selection and the report's table format.

The paired comparisons of the empirical claims are built and judged in :mod:`analysis.claims.decide`
(from the settings of :mod:`analysis.claims.evidence` and the controls of :mod:`analysis.claims.assay`);
the analytic claims use :class:`analysis.stats.Family` directly.
"""
from __future__ import annotations

import pandas as pd

from ..report import md_table  # noqa: F401  (the report's table format, shared by the claims' evidence)


def at_last_step(rows: pd.DataFrame, keys) -> pd.DataFrame:
    """The rows at the last step of each group ``keys`` (e.g. method and seed)."""
    if rows.empty:
        return rows
    return rows[rows["step"] == rows.groupby(list(keys))["step"].transform("max")]
