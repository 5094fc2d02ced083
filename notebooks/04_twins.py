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
# # Function-matched twins (F8)
#
# Claim C9: does any TalkLoRA advantage over MoELoRA-code persist from a function-matched start?
# Four models compute the same function at step 0 and train on identical batches (AdamW with the
# official settings, and SGD); we follow their logit distance to TalkLoRA and their metric gaps.

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
# ## F8 — divergence and metric gaps over training
# Under SGD the absorbed twin follows TalkLoRA only to first order; under AdamW the per-parameter
# scaling differs between parameterisations.  Gaps near 0 mean no persistent advantage.

# %%
f8 = load("F8")
f8[f8["step"] == f8["step"].max()].pivot_table(index=["optimizer", "model"], columns="metric", values="mean")

# %%
fig = F.draw_f8(f8)
