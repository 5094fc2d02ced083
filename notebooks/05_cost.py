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
# # Cost of communication (F13)
#
# What does communication cost?  The paper does not report it; a published commentary names it as
# the open question.  `make bench` (`benchmarks/cost_vs_experts.py`) measures, at a fixed rank budget
# r = 64 and E = 2 … 64 experts, the forward + backward time and the peak memory of one layer of
# LoRA, MoELoRA-code and TalkLoRA with each communication structure (docs/method.md §1), relative to
# LoRA of the same rank timed in the same rounds, and saves the numbers to
# `figures/data/F13_cost_vs_experts.csv`.  This notebook redraws the figure from that file with the
# same drawing function (`analysis.cost.draw_f13`), so notebook and `figures/` cannot drift.

# %% [markdown]
# *Setup: the data is read from `figures/data/` (or `$TALKLORA_FIGURES_DIR/data`).  The drawing code
# needs pandas and matplotlib only.*

# %%
from analysis.cost import caption, draw_f13, f13_data

f13 = f13_data()
print(caption(f13))

# %% [markdown]
# ## The measured ratios
# Median time over LoRA (paired per round) and peak memory over LoRA, per method and E.

# %%
ratios = f13[f13["statistic"].isin(["median", "value"]) & f13["metric"].isin(["time_ratio", "memory_ratio"])]
ratios.pivot_table(index="label", columns=["metric", "num_experts"], values="value", sort=False).round(3)

# %% [markdown]
# ## F13 — time and peak memory per token relative to LoRA, against E

# %%
fig = draw_f13(f13)
