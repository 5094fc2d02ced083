"""Evidence topic **balance and efficiency**: claims C6 (expert-load balance) and C7 (parameter
efficiency), figures F1, F4, F5.

Notebook: ``notebooks/01_balance.py``.  Rows: the ``train`` experiment (MiniLM adapters trained on
the two-domain text task; per method, seed, step, split and adapted layer).
"""
from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..evidence import ClaimSpec, FigureSpec, Outcome, Topic, md_table
from ..plotting import (METHOD_COLORS, METHOD_MARKERS, METHOD_ORDER, WIDTH, dedupe, legend_below, line_ci, order,
                        sel, summarise)
from ..stats import estimate, fmt, paired, pct
from ..train import closed_form_parameters

C6_SPLIT = "val"                            # the split of the C6 verdict, and the one F1 draws
C7_OVERHEAD_NEGLIGIBLE = 0.01               # TalkLoRA's extra parameters / MoELoRA-code's


# C6 -------------------------------------------------------------------------
def final_layer_mean(train: pd.DataFrame, metric: str, step: str = "final") -> pd.DataFrame:
    """``metric`` on the C6 split at the final step of each (method, seed) (or at ``step``), averaged
    over adapted layers: one row per seed, one column per method."""
    v = train[(train.split == C6_SPLIT) & (train.metric == metric) & (train.layer != "all")]
    if step == "final":
        last = v.groupby(["method", "seed"]).step.transform("max")
        v = v[v.step == last]
    else:
        v = v[v.step == step]
    return v.groupby(["method", "seed"]).value.mean().unstack("method")


def evaluate_c6(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C6.rule`` (below) to the saved rows."""
    tr = data["train"]
    talk = "talklora-official"
    g_end = final_layer_mean(tr, "gini")
    g_start = final_layer_mean(tr, "gini", step=0)
    h_end = final_layer_mean(tr, "load_entropy")
    diffs = {b: paired(g_end, talk, b) for b in ("moelora-code", "moelora-input")}
    dirs = {b: e.direction for b, e in diffs.items() if e.n}
    better = [b for b, d in dirs.items() if d == "below"]
    worse = [b for b, d in dirs.items() if d == "above"]
    if not dirs:
        verdict, reason = "inconclusive", "no Gini rows for TalkLoRA-official and the baselines"
    elif len(better) == len(dirs) and len(dirs) == 2:
        verdict, reason = "holds", "Gini lower than both baselines (intervals below 0)"
    elif better and not worse:
        verdict = "holds under stated conditions"
        reason = (f"lower Gini than {', '.join(better)} (resolved); against "
                  f"{', '.join(b for b in dirs if b not in better) or '—'} unresolved")
    elif worse and not better:
        verdict, reason = "refuted", f"TalkLoRA's load is LESS balanced than {', '.join(worse)} (interval above 0)"
    elif better and worse:
        verdict = "holds under stated conditions"
        reason = f"more balanced than {', '.join(better)} but less balanced than {', '.join(worse)}"
    else:
        verdict, reason = "inconclusive", "every interval includes 0: " + "; ".join(
            f"vs {b}: {e.text(4)}" for b, e in diffs.items())
    init = paired(g_start, talk, "moelora-code")
    if init.n:
        reason += f" (before training, at step 0, ΔGini vs MoELoRA-code was already {init.text(3)})"
    rows = []
    for m in [c for c in ("moelora-code", "moelora-input", "talklora-identity", talk) if c in g_end]:
        rows.append([m, estimate(g_end[m]).text(4), estimate(g_start[m]).text(4) if m in g_start else "n/a",
                     estimate(h_end[m]).text(4) if m in h_end else "n/a"])
    diff_rows = [[f"{talk} − {b}", diffs[b].text(4), paired(g_start, talk, b).text(4),
                  paired(h_end, talk, b).text(4), diffs[b].direction] for b in diffs]
    steps = sorted(tr[(tr.split == "val") & (tr.metric == "gini")].step.unique().tolist())
    key = f"ΔGini vs MoELoRA-code {diffs['moelora-code'].text(3)}"
    ev = [f"- Soft-load Gini (0 = equal load, 0.75 = one expert for E = 4) on the validation split at the "
          f"final step ({steps[-1] if steps else 'n/a'}), mean over adapted layers per seed; 95 % t-interval over seeds:",
          md_table(["method", "Gini (final)", "Gini (step 0, before training)", "load entropy (final)"], rows),
          "- Paired differences (same seed: same data order, same head init):",
          md_table(["difference", "ΔGini final", "ΔGini at step 0", "Δ load entropy final", "direction (Gini)"], diff_rows),
          "- Read the step-0 column: a difference already present before any training step comes from "
          "the initialisation (official random T), not from learned communication."]
    return Outcome(verdict, reason, key, ev)


# C7 -------------------------------------------------------------------------
def evaluate_c7(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C7.rule`` (below) to the saved rows."""
    tr = data["train"]
    counts = tr[tr.metric == "trainable_parameters"].groupby("method").value.agg(["min", "max"])
    acc = tr[(tr.split == "test") & (tr.metric == "accuracy") & (tr.domain == "all")]
    acc = acc[acc.step == acc.groupby(["method", "seed"]).step.transform("max")]
    acc_w = acc.groupby(["method", "seed"]).value.mean().unstack("method")
    cfg = config.get("train") or {}
    mismatch, rows, forms = [], [], {}
    have_cfg = all(k in cfg for k in ("rank", "num_experts", "adapt_top_layers", "targets"))
    for m in counts.index:
        measured = counts.loc[m, "max"]
        if counts.loc[m, "min"] != measured:
            mismatch.append(f"{m}: count differs across seeds")
        if have_cfg and m in ("lora", "moelora-code", "moelora-input", "talklora-official", "talklora-identity"):
            args = (m, cfg["rank"], cfg["num_experts"], cfg["adapt_top_layers"], cfg["targets"])
            untied, shared = closed_form_parameters(*args), closed_form_parameters(*args, shared_B=True)
            forms[m] = (untied, shared)
            match = "untied ✓" if measured == untied else "shared-B ✓" if measured == shared else "✗"
            if match == "✗":
                mismatch.append(f"{m}: measured {fmt(measured)} ≠ closed form {fmt(untied)} (untied) / {fmt(shared)} (shared B)")
        else:
            untied = shared = math.nan
            match = "no closed form" if m in forms or not have_cfg else "—"
        rows.append([m, fmt(measured), fmt(untied), fmt(shared), match,
                     estimate(acc_w[m]).text(3) if m in acc_w else "n/a"])
    talk, code = "talklora-official", "moelora-code"
    overhead = rel_code = rel_lora = math.nan
    if talk in counts.index and code in counts.index:
        overhead = counts.loc[talk, "max"] - counts.loc[code, "max"]
        rel_code = overhead / counts.loc[code, "max"]
    if talk in counts.index and "lora" in counts.index:
        rel_lora = counts.loc[talk, "max"] / counts.loc["lora", "max"] - 1
    dacc = paired(acc_w, talk, code)
    if mismatch:
        verdict, reason = "inconclusive", "parameter accounting does not match the closed form: " + "; ".join(mismatch)
    elif not have_cfg:
        verdict, reason = "inconclusive", "no train config (rank, num_experts, adapt_top_layers, targets) for the closed form"
    elif dacc.direction == "above":
        verdict = "holds"
        reason = (f"TalkLoRA-official gains accuracy over MoELoRA-code ({dacc.text()}) for "
                  f"{fmt(overhead)} extra parameters ({pct(rel_code)})")
    elif dacc.direction == "below":
        verdict = "refuted"
        reason = f"TalkLoRA-official loses accuracy against MoELoRA-code ({dacc.text()}) despite {fmt(overhead)} more parameters"
    elif rel_code <= C7_OVERHEAD_NEGLIGIBLE:
        verdict = "holds under stated conditions"
        reason = (f"as a parameter-count statement only: the overhead over MoELoRA-code is {fmt(overhead)} "
                  f"parameters ({pct(rel_code)} ≤ {pct(C7_OVERHEAD_NEGLIGIBLE)}), but the accuracy difference "
                  f"{dacc.text()} is unresolved, so no efficiency gain in accuracy per parameter is shown")
    else:
        verdict = "inconclusive"
        reason = f"overhead {pct(rel_code)} is not negligible and the accuracy difference {dacc.text()} is unresolved"
    per_layer = ""
    if have_cfg:
        E = cfg["num_experts"]
        n_layers = cfg["adapt_top_layers"] * len(cfg["targets"])
        per_layer = (f"- TalkLoRA − MoELoRA-code = T, E² = {E * E} per adapted layer × {n_layers} layers = "
                     f"{E * E * n_layers} (measured {fmt(overhead)}); relative to MoELoRA-code {pct(rel_code)}, "
                     f"TalkLoRA relative to LoRA +{pct(rel_lora)} (C E m² + W_r E r + T E² per layer).")
    key = f"TalkLoRA − MoELoRA-code = {fmt(overhead)} params ({pct(rel_code)}); Δacc {dacc.text()}"
    ev = ["- Trainable adapter parameters (classifier head excluded; tied tensors counted once) and test "
          "accuracy (mean over seeds, 95 % t-interval):",
          md_table(["method", "measured", "closed form (untied B)", "closed form (B shared per projection type)",
                    "match", "test accuracy"], rows),
          "- Closed form per adapted layer: A r·d_in + C E·m² + B d_out·r + T E² + W_r E·r "
          "(MoELoRA-input: W_g E·d_in instead of W_r; LoRA: A + B). Shared-B accounting (official "
          "code): B counted once per projection type instead of once per layer.",
          per_layer,
          f"- Paired accuracy difference TalkLoRA-official − MoELoRA-code: {dacc.text()}; "
          f"TalkLoRA-official − LoRA: {paired(acc_w, talk, 'lora').text()}."]
    return Outcome(verdict, reason, key, [e for e in ev if e])


# ----------------------------------------------------------------------------- F1 load balance per layer
ROUTED = ["moelora-code", "moelora-input", "talklora-official", "talklora-identity"]
F1_METRICS = {"gini": "Gini of expert load\n(0 = balanced)", "load_entropy": "load entropy\n(normalised, 1 = uniform)"}


def prepare_f1(train: pd.DataFrame) -> pd.DataFrame:
    """Final-step Gini and load entropy per (layer, method) on the validation split: the split and
    step the C6 verdict uses."""
    d = sel(train, split=C6_SPLIT, metric=list(F1_METRICS), method=ROUTED)
    d = d[d["layer"] != "all"]
    d = d[d["step"] == d["step"].max()]
    # both metrics live in [0, 1] (Gini at most 1 − 1/E): intervals are clipped to that range
    return summarise(d, ["metric", "layer", "method"], bounds=(0.0, 1.0))


def draw_f1(data: pd.DataFrame):
    layers = list(dict.fromkeys(data["layer"]))
    methods = order(data["method"], METHOD_ORDER)
    fig, axes = plt.subplots(2, 1, figsize=(WIDTH, 5.2), sharex=True)
    width = 0.8 / max(len(methods), 1)
    for ax, (metric, ylabel) in zip(axes, F1_METRICS.items()):
        for j, m in enumerate(methods):
            d = sel(data, metric=metric, method=m).set_index("layer").reindex(layers)
            x = np.arange(len(layers)) + (j - (len(methods) - 1) / 2) * width
            ax.errorbar(x, d["mean"], yerr=[d["mean"] - d["lo"], d["hi"] - d["mean"]], fmt="o",
                        color=METHOD_COLORS.get(m), label=m, capsize=2, ms=5)
        ax.set_ylabel(ylabel)
        for k in range(1, len(layers)):
            ax.axvline(k - 0.5, color="0.9", lw=0.8, zorder=0)
        ax.grid(axis="x", visible=False)
    axes[0].set_ylim(bottom=0)
    axes[1].set_xticks(range(len(layers)), layers, rotation=30, ha="right")
    axes[1].set_xlabel("adapted layer (MiniLM layer.projection)")
    axes[0].set_title("Expert load per layer after training (validation split; mean ± 95% CI over seeds)")
    fig.tight_layout()
    legend_below(fig, *dedupe(axes), ncol=4)
    return fig


# ----------------------------------------------------------------------------- F4 balance over training
F4_METRICS = {"gini": "Gini of expert load", "load_entropy": "load entropy (normalised)",
              "token_entropy": "per-token gate entropy\n(normalised)"}


def prepare_f4(train: pd.DataFrame) -> pd.DataFrame:
    d = sel(train, split="val", metric=list(F4_METRICS))
    d = d[d["layer"] != "all"]
    d = d.groupby(["method", "seed", "step", "metric"], as_index=False)["value"].mean()   # mean over layers
    return summarise(d, ["metric", "method", "step"])


def draw_f4(data: pd.DataFrame):
    metrics = [m for m in F4_METRICS if m in set(data["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(WIDTH, 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for m in order(data["method"], METHOD_ORDER):
            d = sel(data, metric=metric, method=m)
            if len(d):
                line_ci(ax, d, "step", color=METHOD_COLORS.get(m), label=m, marker="o")
        ax.set_title(F4_METRICS[metric], fontsize=9.5)
        ax.set_xlabel("training step")
    axes[0, 0].set_ylabel("value (mean over adapted layers)")
    fig.tight_layout()
    legend_below(fig, *dedupe(axes), ncol=4, title="validation split; shaded: 95% CI over seeds")
    return fig


# ----------------------------------------------------------------------------- F5 accuracy vs parameters
def prepare_f5(train: pd.DataFrame) -> pd.DataFrame:
    acc = sel(train, split="test", layer="all", domain="all", metric="accuracy")
    acc = summarise(acc, ["method"])
    params = sel(train, metric="trainable_parameters").groupby("method")["value"].median()
    return acc.assign(trainable_parameters=acc["method"].map(params))


def draw_f5(data: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(WIDTH * 0.8, 3.4))
    for m in order(data["method"], METHOD_ORDER):
        d = data[data["method"] == m]
        ax.errorbar(d["trainable_parameters"], d["mean"], yerr=[d["mean"] - d["lo"], d["hi"] - d["mean"]],
                    fmt=METHOD_MARKERS.get(m, "o"), ms=9, mfc="none", mew=1.8, capsize=3,
                    color=METHOD_COLORS.get(m), label=m)
    lo, hi = data["trainable_parameters"].min(), data["trainable_parameters"].max()
    if hi / lo > 4:
        ax.set_xscale("log")
    else:
        pad = max(hi - lo, 0.1 * hi) * 0.12
        ax.set_xlim(lo - pad, hi + pad)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e3:g}k"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("trainable adapter parameters (head excluded, tied tensors once)")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_title("Accuracy vs trainable parameters (mean ± 95% CI over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- declarations
C6 = ClaimSpec(
    "C6", paper="communication gives more balanced expert load",
    statement=("After training (same data, steps and seeds), TalkLoRA-official spreads the soft "
               "expert load more evenly (lower Gini) than MoELoRA-code and MoELoRA-input."),
    rule=("final-step validation Gini of the soft load, averaged over layers per seed; paired "
          "difference TalkLoRA-official − baseline over seeds with a 95 % t-interval, for "
          "baseline MoELoRA-code and MoELoRA-input. Holds if it is below 0 (resolved) against both; "
          "holds under stated conditions if below 0 against one and not above 0 against the other; "
          "refuted if it is above 0 against at least one and below 0 against none; otherwise "
          "inconclusive."),
    figures=("F1", "F4"), tests=(), experiments=("train",), evaluate=evaluate_c6)
C7 = ClaimSpec(
    "C7", paper="parameter efficiency",
    statement=("TalkLoRA adds exactly E² trainable parameters per adapted layer to MoELoRA-code "
               "(the Talking Module T); it is parameter-efficient if this small overhead buys accuracy "
               "over MoELoRA-code trained identically."),
    rule=("measured trainable counts must equal the closed form (else inconclusive). Then with "
          "Δacc = test accuracy TalkLoRA-official − MoELoRA-code (paired by seed, 95 % t-interval): "
          "holds if Δacc > 0 (resolved); refuted if Δacc < 0 (resolved); holds under stated "
          "conditions (as a parameter-count statement only) if unresolved and the overhead over "
          "MoELoRA-code is ≤ 1 %; otherwise inconclusive."),
    figures=("F5",), tests=(r"tests/test_inject\.py::test_(count_parameters|share_B_across_layers)",),
    experiments=("train",), evaluate=evaluate_c7)

F1 = FigureSpec(
    "F1", "load_balance_per_layer", ("train",), prepare_f1, draw_f1,
    "Expert-load balance per adapted layer after training on real text ({claims}): Gini of the soft "
    "expert load (top) and normalised load entropy (bottom) on the validation split at the final step "
    "(the split and step of its verdict), for MoELoRA (code / input router) and TalkLoRA "
    "(official / identity T). Mean ± 95% CI over seeds. Per-expert load shares are not stored; Gini "
    "and entropy summarise them.")
F4 = FigureSpec(
    "F4", "balance_over_training", ("train",), prepare_f4, draw_f4,
    "Load balance during training ({claims}): Gini of the expert load, normalised load entropy and "
    "mean per-token gate entropy on the validation split, averaged over adapted layers, vs step. "
    "Shaded: 95% CI over seeds.")
F5 = FigureSpec(
    "F5", "accuracy_vs_parameters", ("train",), prepare_f5, draw_f5,
    "Parameter efficiency ({claims}): test accuracy vs exact trainable adapter parameters (shared B "
    "and tied tensors counted once, classification head excluded). Mean ± 95% CI over seeds.")

TOPIC = Topic("balance", "01_balance.py", claims=(C6, C7), figures=(F1, F4, F5))
