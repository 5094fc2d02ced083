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
# # Evidence topic: smoothness (F2, F3, F7, F9)
#
# Claims C4 (router Lipschitz bounds), C5 (communication mitigates perturbation amplification),
# C8 (how often the official init has ‖T‖₂ > 1 and raises the router bound) and C10 (dense softmax
# vs hard–soft top-k routing).  Claims, rules and figures: `analysis/topics/smoothness.py` (C8 and
# F7: `analysis/topics/smoothness_init.py`).  The synthetic layers of a seed share A, C, B and
# W_r and differ only in the Talking Module T, so any difference between talk settings is T's.

# %% [markdown]
# *Setup: the figure data is read from `figures/data/` (or `$TALKLORA_FIGURES_DIR/data`); the
# drawing functions are the topic module's own, so notebook and `python -m analysis figures` agree.*

# %%
from analysis.figures import figure_data as load, set_style
from analysis.topics import smoothness as T

set_style()


# %% [markdown]
# ## F2 — amplification vs ε
# Routing quotient ‖Δg‖₂/‖δ‖₂ per token (median and 95th percentile) for Gaussian, expert-block
# and adversarial perturbations.  A flat curve means the router responds linearly at that scale.

# %%
f2 = load("F2")
f2[f2["statistic"] == "median"].pivot_table(index=["E", "kind", "eps"], columns="talk", values="mean").round(4)

# %%
fig = T.draw_f2(f2)

# %% [markdown]
# ## F3 — Lipschitz sandwich
# certified bound ≥ largest local Jacobian norm ≥ PGD empirical quotient, across talk strength α
# (T = αI + (1−α)J/E; α = 1 is MoELoRA-code) and the official init, and for trained routers.

# %%
f3 = load("F3")
fig = T.draw_f3(f3)

# %% [markdown]
# ## F9 — dense vs top-k routing
# Flip rates of the top-1 expert and of the selected top-k set vs ε, and local Lipschitz
# constants away from ties; the certified bound does not exist for top-k (the gates jump).

# %%
f9 = load("F9")
fig = T.draw_f9(f9)

# %% [markdown]
# ## F7 — ‖T‖₂ under the official initialisation
# Monte Carlo over E: box statistics of ‖T‖₂ and of the certified-bound ratio (official T vs
# T = I with the same W_r), and the share of draws above 1.

# %%
f7 = load("F7")
f7[["metric", "E", "median", "mean", "frac_gt_1", "n"]]

# %%
fig = T.draw_f7(f7)
