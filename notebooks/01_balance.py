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
# # Evidence topic: balance and efficiency (F1, F4, F5)
#
# Claims C6 (communication gives more balanced expert load) and C7 (parameter efficiency), on
# MiniLM adapters trained for two-domain classification of real text (movie-review snippets and
# news headlines), several seeds per method.  Every figure is redrawn from its saved data file
# with the topic's own drawing function, so this notebook and `figures/` cannot drift.
# Intervals are 95% t-intervals over seeds.  Claims, rules and figures: `analysis/topics/balance.py`.

# %% [markdown]
# *Setup: the figure data is read from `figures/data/` (or `$TALKLORA_FIGURES_DIR/data`); the
# drawing functions are the topic module's own, so notebook and `python -m analysis figures` agree.*

# %%
from analysis.figures import figure_data as load, set_style
from analysis.topics import balance as T

set_style()


# %% [markdown]
# ## F1 — expert load per layer after training
# Gini of the soft expert load (0 = perfectly balanced; at most (E−1)/E) and its normalised
# entropy (1 = uniform) on the validation split at the final step — the split and step the C6
# verdict uses — for the routed methods.  If TalkLoRA balanced load
# better, its points would sit lower in Gini and higher in entropy than MoELoRA's.

# %%
f1 = load("F1")
f1.pivot_table(index="layer", columns=["metric", "method"], values="mean", sort=False).round(3)

# %%
fig = T.draw_f1(f1)

# %% [markdown]
# ## F4 — balance over training
# The same load metrics on the validation split at every evaluation step, averaged over the
# adapted layers, plus the mean per-token gate entropy (how soft the routing is per token).

# %%
f4 = load("F4")
fig = T.draw_f4(f4)

# %% [markdown]
# ## F5 — accuracy vs trainable parameters
# Exact trainable-parameter counts (tied tensors once, head excluded) against test accuracy.

# %%
f5 = load("F5")
f5[["method", "trainable_parameters", "mean", "lo", "hi", "n"]]

# %%
fig = T.draw_f5(f5)
