# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Evidence: equivalence (F6)
#
# Claims C1–C3 (TalkLoRA with T = I is MoELoRA; a linear T is absorbed by the router; a code router
# is an input router, not conversely).  Claims, rules and figures: `analysis/claims/equivalence.py`.

# %% [markdown]
# *Setup: the figure data is read from `figures/data/` (or `$TALKLORA_FIGURES_DIR/data`); the
# drawing functions are the claim module's own, so notebook and `python -m analysis figures` agree.*

# %%
from analysis.figures import figure_data as load, set_style
from analysis.claims import equivalence

set_style()


# %% [markdown]
# ## F6 — residuals of the exact maps
# Relative max-abs output residuals on random configurations: they should sit at the dtype's
# rounding level.  Right panel (C3, "not conversely"): on centred router rows (I − J/E)W — softmax
# ignores a common logit shift — with B ≠ 0, a random input router's centred row-space residual and
# its output gap to the best code router must be clearly positive, while a code router plus a common
# shift is non-zero uncentred but 0 once centred.

# %%
f6 = load("F6")
f6.groupby(["metric", "dtype"])["value"].agg(["count", "median", "min", "max"])

# %%
fig = equivalence.draw_f6(f6)
