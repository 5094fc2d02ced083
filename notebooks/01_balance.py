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
# # Evidence: balance, efficiency and every comparison (F1, F4, F5, F10)
#
# Claims C6 (communication gives more balanced expert load), C7 (parameter efficiency at matched
# budgets) and C11 (consistently better than LoRA and MoELoRA), judged in every setting that ran and
# passes its positive controls (the planted teacher, MiniLM on BBC topics, SmolLM2; MiniLM sentiment
# in the paper profile), 8 paired seeds per method (common random numbers), each method at its own
# tuned learning rate.  Every figure is redrawn from its saved data file with the claim modules' own
# drawing functions, so this notebook and `figures/` cannot drift.  Intervals are 95% t-intervals
# over seeds.  Claims, rules and figures: `analysis/claims/balance.py` (C6, F1, F4), `efficiency.py`
# (C7, F5), `outperforms.py` (C11) and `forest.py` (F10); the settings, margins and positive controls:
# `evidence.py` and `assay.py`.

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
# entropy (1 = uniform) at the last step, per routed layer, one column per setting.  If TalkLoRA
# balanced load better, its points would sit lower in Gini and higher in entropy than its twin's and
# the scale-matched control's.  The C6 verdict does not read these per-layer values: it compares the
# layer-mean Gini at the end with that at step 0 (difference-in-differences against the twin and the
# scale-matched control) in every setting that passes P1 and P2.

# %%
f1 = load("F1")
f1.pivot_table(index=["source", "layer"], columns=["metric", "method"], values="mean", sort=False).round(3)

# %%
fig = balance.draw_f1(f1)

# %% [markdown]
# ## F4 — balance over training
# The same load metrics and the per-token gate entropy (the P2 quantity: near 1 = the gates are
# close to uniform and routing is not used) at every checkpoint that records them, per setting.

# %%
f4 = load("F4")
fig = balance.draw_f4(f4)

# %% [markdown]
# ## F5 — held-out loss vs trainable parameters at matched budgets
# Exact trainable-parameter counts (tied tensors once, head excluded) against held-out loss (and
# accuracy for classification); one point per budget (LoRA / MoELoRA at the rank whose count is
# closest to TalkLoRA's).  Only budgets within ±2 % decide C7, and a baseline needs three of them.

# %%
f5 = load("F5")
f5[[c for c in ("source", "budget", "method", "metric", "trainable_parameters", "mean", "lo", "hi", "n") if c in f5]]

# %%
fig = efficiency.draw_f5(f5)

# %% [markdown]
# ## F10 — every comparison behind the claims
# One row per comparison (C5–C7, C9, C11–C13): mean difference over seeds and its interval (at its
# Holm level when it decides), divided by the setting's margin, so the shaded band ±1 is ±margin in
# every row.  Colour: the comparison's verdict (supported, below relevance, no relevant effect,
# contradicted, inconclusive); hollow markers on a grey band: not testable (a positive control of the
# setting failed — never evidence of "no effect"); thin lines: reported, not deciding.

# %%
f10 = load("F10")
f10[[c for c in ("claim", "setting", "comparison", "n", "effect", "ci_low", "ci_high", "margin", "controls",
                 "verdict") if c in f10]]

# %%
fig = forest.draw_f10(f10)
