# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Equivalence maps and the official init (F6, F7)
#
# Claims C1–C3 (TalkLoRA with T = I is MoELoRA; a linear T is absorbed by the router; a code router
# is an input router, not conversely) and C8 (how often the official init has ‖T‖₂ > 1).

# %% [markdown]
# *Setup: find the repository root from the working directory (notebooks/ or the root), put it on
# the path, and read the figure data from `figures/data/` (or `$TALKLORA_FIGURES_DIR/data`).*

# %%
import os
import sys
from pathlib import Path

import pandas as pd

ROOT = Path.cwd().resolve()
while not (ROOT / "analysis" / "figures.py").is_file():
    if ROOT.parent == ROOT:
        raise RuntimeError("run this notebook from inside the talklora-min repository")
    ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("TALKLORA_FIGURES_DIR", ROOT / "figures")) / "data"
if not DATA.is_dir():
    raise FileNotFoundError(f"{DATA} does not exist: run `python -m analysis figures` first")

from analysis import figures as F  # noqa: E402  (the same drawing code as the pipeline)

F.set_style()


def load(fig_id: str) -> pd.DataFrame:
    """The saved data of figure ``fig_id`` (exactly the numbers drawn)."""
    return pd.read_csv(DATA / f"{F.FIGURE_BY_ID[fig_id].name}.csv")
# %% [markdown]
# ## F6 — residuals of the exact maps
# Relative max-abs output residuals on random configurations: they should sit at the dtype's
# rounding level.  The counterexample's row-space residual must be clearly positive.

# %%
f6 = load("F6")
f6.groupby(["metric", "dtype"])["value"].agg(["count", "median", "max"])

# %%
fig = F.draw_f6(f6)

# %% [markdown]
# ## F7 — ‖T‖₂ under the official initialisation
# Monte Carlo over E: box statistics of ‖T‖₂ and of the certified-bound ratio (official T vs
# T = I with the same W_r), and the share of draws above 1.

# %%
f7 = load("F7")
f7[["metric", "E", "median", "mean", "frac_gt_1", "n"]]

# %%
fig = F.draw_f7(f7)
