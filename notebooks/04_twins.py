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
# *Setup: the figure data is read from `figures/data/` (or `$TALKLORA_FIGURES_DIR/data`); the
# drawing functions are the pipeline's own, so notebook and `python -m analysis figures` agree.*

# %%
from analysis import figures as F

F.set_style()
load = F.figure_data


# %% [markdown]
# ## F8 — divergence and metric gaps over training
# Under SGD the absorbed twin follows TalkLoRA only to first order; under AdamW the per-parameter
# scaling differs between parameterisations.  Gaps near 0 mean no persistent advantage.

# %%
f8 = load("F8")
f8[f8["step"] == f8["step"].max()].pivot_table(index=["optimizer", "model"], columns="metric", values="mean")

# %%
fig = F.draw_f8(f8)
