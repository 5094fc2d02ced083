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
# # Load balance and parameter efficiency (F1, F4, F5)
#
# Claims C6 (communication gives more balanced expert load) and C7 (parameter efficiency), on
# MiniLM adapters trained for two-domain classification of real text (movie-review snippets and
# news headlines), several seeds per method.  Every figure is redrawn from its saved data file
# with the pipeline's own drawing function, so this notebook and `figures/` cannot drift.
# Intervals are 95% t-intervals over seeds.

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
# ## F1 — expert load per layer after training
# Gini of the soft expert load (0 = perfectly balanced; at most (E−1)/E) and its normalised
# entropy (1 = uniform) on the test split, for the routed methods.  If TalkLoRA balanced load
# better, its points would sit lower in Gini and higher in entropy than MoELoRA's.

# %%
f1 = load("F1")
f1.pivot_table(index="layer", columns=["metric", "method"], values="mean", sort=False).round(3)

# %%
fig = F.draw_f1(f1)

# %% [markdown]
# ## F4 — balance over training
# The same load metrics on the validation split at every evaluation step, averaged over the
# adapted layers, plus the mean per-token gate entropy (how soft the routing is per token).

# %%
f4 = load("F4")
fig = F.draw_f4(f4)

# %% [markdown]
# ## F5 — accuracy vs trainable parameters
# Exact trainable-parameter counts (tied tensors once, head excluded) against test accuracy.

# %%
f5 = load("F5")
f5[["method", "trainable_parameters", "mean", "lo", "hi", "n"]]

# %%
fig = F.draw_f5(f5)
