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
# # Evidence: smoothness (F2, F3, F7, F9, F11)
#
# Claims C4 (router Lipschitz bounds), C5 (communication mitigates perturbation amplification: the
# verdict reads trained routers against the function-matched twin and the centred-map-matched
# control; the synthetic sweeps of F2 are reported), C8 (two separate quantities under the official
# init: how often ‖T‖₂ > 1, and how often the router bound rises), C10 (dense softmax vs hard–soft
# top-k routing, per ε and statistic) and C12 (communication smooths routing dynamics: top-1 churn of
# decided tokens over training).  Claims, rules and figures, in
# `analysis/claims/`: `lipschitz.py` (C4, F3), `amplification.py` (C5, F2), `init_norms.py` (C8, F7),
# `topk.py` (C10, F9) and `churn.py` (C12, F11).  The synthetic layers of a seed share A, C, B and W_r and differ
# only in the Talking Module T, so any difference between talk settings is T's.

# %% [markdown]
# *Setup: the figure data is read from `figures/data/` (or `$TALKLORA_FIGURES_DIR/data`); the
# drawing functions are the claim modules' own, so notebook and `python -m analysis figures` agree.*

# %%
from analysis.figures import figure_data as load, set_style
from analysis.claims import amplification, churn, init_norms, lipschitz, topk

set_style()


# %% [markdown]
# ## F2 — amplification vs ε
# Routing quotient ‖Δg‖₂/‖δ‖₂ per token (median and 95th percentile) for Gaussian, expert-block
# and adversarial perturbations.  A flat curve means the router responds linearly at that scale.
# Bottom row: each talk setting against its scale-matched MoELoRA-code control (same spectral or
# Frobenius norm of the effective router, i.e. the same router temperature); below 1 means
# communication reduces amplification by more than its effect on the router's scale.

# %%
f2 = load("F2")
quot = f2[f2["panel"] == "quotient"] if "panel" in f2 else f2
quot[quot["statistic"] == "median"].pivot_table(index=["E", "kind", "eps"], columns="talk", values="mean").round(4)

# %%
if "panel" in f2:       # talk / control ratios (absent from figure data written before the controls)
    display(f2[f2["panel"].str.startswith("ratio/")].pivot_table(index=["kind", "eps"], columns=["panel", "talk"],
                                                                 values="mean").round(3))

# %%
fig = amplification.draw_f2(f2)

# %% [markdown]
# ## F3 — Lipschitz sandwich
# certified bound ≥ largest local Jacobian norm ≥ PGD empirical quotient, across talk strength α
# (T = αI + (1−α)J/E; α = 1 is MoELoRA-code) and the official init, and for trained routers.

# %%
f3 = load("F3")
fig = lipschitz.draw_f3(f3)

# %% [markdown]
# ## F9 — dense vs top-k routing
# Per ε and statistic (median token, worst token): relative difference of the routing quotient
# (top-k − dense)/dense on the same weights; the top-k set flip rate vs ε, and local Lipschitz
# constants away from ties; the certified bound does not exist for top-k (the gates jump).

# %%
f9 = load("F9")
fig = topk.draw_f9(f9)

# %% [markdown]
# ## F7 — ‖T‖₂ under the official initialisation
# Monte Carlo over E: box statistics of ‖T‖₂ and of the certified-bound ratio (official T vs
# T = I with the same W_r), and the share of draws above 1.

# %%
f7 = load("F7")
f7[["metric", "E", "median", "mean", "frac_gt_1", "n"]]

# %%
fig = init_norms.draw_f7(f7)

# %% [markdown]
# ## F11 — routing churn over training
# Share of decided held-out tokens (top-2 gate gap above the tie threshold) whose top-1 expert changed
# since the previous checkpoint, TalkLoRA vs the function-matched twin (same routing at step 0: only
# communication's training dynamics differ), the scale-matched control and MoELoRA-code, per setting
# (mean ± 95 % CI over seeds).

# %%
from pathlib import Path
from analysis.figures import FIGURE_BY_ID, default_figures_dir

if (Path(default_figures_dir()) / "data" / f"{FIGURE_BY_ID['F11'].name}.csv").is_file():
    f11 = load("F11")
    display(f11.pivot_table(index=["source", "step"], columns="method", values="mean").round(4))
    fig = churn.draw_f11(f11)
else:   # figure data committed before F11 existed: `python -m analysis figures` writes it
    print(f"no {FIGURE_BY_ID['F11'].name}.csv yet: run `python -m analysis figures`")
