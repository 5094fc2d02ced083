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
# *Setup: the figure data is read from `figures/data/` (or `$TALKLORA_FIGURES_DIR/data`); the
# drawing functions are the pipeline's own, so notebook and `python -m analysis figures` agree.*

# %%
from analysis import figures as F

F.set_style()
load = F.figure_data


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
