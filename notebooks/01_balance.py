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
# # Evidence: balance and efficiency (F1, F4, F5, F10)
#
# Claims C6 (communication gives more balanced expert load), C7 (parameter efficiency at matched
# budgets) and C11 (consistently better than LoRA and MoELoRA), on MiniLM adapters trained per task
# (sentiment, topic) and a SmolLM2 causal LM, 8 paired seeds per method (common random numbers).  Every figure is redrawn from its saved data file
# with the claim modules' own drawing functions, so this notebook and `figures/` cannot drift.
# Intervals are 95% t-intervals over seeds.  Claims, rules and figures: `analysis/claims/balance.py` (C6,
# F1, F4), `efficiency.py` (C7, F5), `outperforms.py` (C11) and `forest.py` (F10).

# %% [markdown]
# *Setup: the figure data is read from `figures/data/` (or `$TALKLORA_FIGURES_DIR/data`); the
# drawing functions are the claim modules' own, so notebook and `python -m analysis figures` agree.*

# %%
from analysis.figures import figure_data as load, set_style
from analysis.claims import balance, efficiency, forest

set_style()


# %% [markdown]
# ## F1 — expert load per layer after training
# Gini of the soft expert load (0 = perfectly balanced; at most (E−1)/E) and its normalised
# entropy (1 = uniform) on the validation split at the last step, per adapted layer, for the routed
# methods of the training sweep, one column per task.  If TalkLoRA balanced load better, its points
# would sit lower in Gini and higher in entropy than MoELoRA's.  The C6 verdict does not read these
# per-layer values: it compares the layer-mean Gini at the end with that at step 0
# (difference-in-differences against the communication-isolating baselines) in every setting.

# %%
f1 = load("F1")
f1.pivot_table(index=["layer"], columns=["metric", "method"], values="mean", sort=False).round(3)

# %%
fig = balance.draw_f1(f1)

# %% [markdown]
# ## F4 — balance over training
# The same load metrics on the fixed probe set at every checkpoint (the validation split at step 0
# and the end when there are no probe rows), averaged over the adapted layers, per task.

# %%
f4 = load("F4")
fig = balance.draw_f4(f4)

# %% [markdown]
# ## F5 — accuracy vs trainable parameters at matched budgets
# Exact trainable-parameter counts (tied tensors once, head excluded) against test accuracy; one
# point per budget (LoRA / MoELoRA at the rank whose count is closest to TalkLoRA's).

# %%
f5 = load("F5")
f5[[c for c in ("task", "budget", "method", "trainable_parameters", "mean", "lo", "hi", "n") if c in f5]]

# %%
fig = efficiency.draw_f5(f5)

# %% [markdown]
# ## F10 — every paired comparison behind the claims
# One row per paired comparison (C5–C7, C9, C11, C12): mean difference over seeds and its 95 %
# interval, divided by the comparison's declared margin, so the shaded band ±1 is ±margin in
# every row.  Green: the interval lies on the claimed side of 0; red: inside ±margin or on the
# wrong side; grey: undecided.

# %%
f10 = load("F10")
f10[["claim", "comparison", "n", "effect", "ci_low", "ci_high", "margin", "verdict"]]

# %%
fig = forest.draw_f10(f10)
