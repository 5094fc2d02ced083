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
# # Evidence: communication structures (F12)
#
# Claim C13 (ours): a doubly-stochastic Talking Module (T non-negative with rows and columns summing
# to 1, so ‖T‖₂ ≤ 1) keeps TalkLoRA's held-out loss within the setting's loss margin and never raises
# the certified router bound w.r.t. the code above that of T = I.  F12 puts every communication
# structure of docs/method.md §1 side by side (full T, broadcast, doubly stochastic, block, banded,
# low-rank, with MoELoRA-code as T = I) in each setting that ran them: held-out loss, the gate
# entropy of P2, the load Gini and the certified ratio ‖W_r(T⊗I)‖₂ / ‖W_r‖₂.  Only the
# doubly-stochastic structure decides C13; the others are reported.  Claim, rule and figure:
# `analysis/claims/structures.py`.

# %% [markdown]
# *Setup: the figure data is read from `figures/data/` (or `$TALKLORA_FIGURES_DIR/data`); the
# drawing functions are the claim module's own, so notebook and `python -m analysis figures` agree.*

# %%
from analysis.figures import figure_data as load, set_style
from analysis.claims import structures

set_style()


# %% [markdown]
# ## F12 — the structures side by side
# A certified ratio above the dashed line (1) means that structure's trained T raised the router's
# certified bound w.r.t. the code; the doubly-stochastic one cannot (‖T‖₂ ≤ 1).

# %%
f12 = load("F12")
f12.pivot_table(index=["source", "method"], columns="metric", values="mean", sort=False).round(4)

# %%
fig = structures.draw_f12(f12)
