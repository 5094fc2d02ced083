"""Claim C12 (communication "smooths routing dynamics" during training) and figure F11.

Rows: every setting's evaluation sweep (:mod:`analysis.claims.evidence`): ``churn`` — the share of
held-out tokens (MiniLM, planted: the fixed probe set, ``split = probe``; SmolLM2: ``split = test``)
whose top-1 expert changed since the previous checkpoint, counted only among *decided* tokens (top-2
gate gap above the tie threshold at both checkpoints; docs/method.md §4), per routed layer.
**select** per seed the mean churn over checkpoints and routed layers → **compare** TalkLoRA − the
twin and the scale-matched control (the preregistration's ``[deciding] C12``), one Holm family over
the testable settings (P1, P2) → **verdict** (docs/method.md §5.5) → **render**.  MoELoRA-code is
reported.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from .. import methods
from ..plotting import WIDTH, dedupe, empty, legend_below, line_ci, order, summarise
from ..stats import fmt
from . import evidence as ev
from .assay import assays, deciding_methods, levels
from .base import ClaimSpec, FigureSpec, Outcome
from .decide import Paired, claim_verdict, empirical_outcome, judge_family, pair, why_not_testable
from .helpers import md_table


def c12_methods() -> tuple[str, ...]:
    """The reference, its deciding comparators (C12) and MoELoRA-code (reported)."""
    return tuple(dict.fromkeys((methods.reference(), *deciding_methods("C12"), *methods.tagged("baseline", "routed"))))


# ----------------------------------------------------------------------------- select / compare
def items_c12(data: dict, config: dict | None = None) -> tuple[list[Paired], list, list]:
    """Per setting: mean decided-token churn TalkLoRA − each comparator (claimed < 0, the setting's churn
    margin); controls P1, P2.  Also the mean churn rows (setting, method, seeds, churn, churn of all tokens)."""
    talk, deciding = methods.reference(), deciding_methods("C12")
    items, tested, levels_ = [], [], []
    for a in assays(data, config):
        run = a.run
        wide = ev.churn(run)
        if wide.empty:
            continue
        every = ev.churn(run, metric="churn_all")
        controls = a.controls((talk, *deciding), p2=True)
        tested.append((a, controls, f"churn ±{fmt(a.margins.get('churn'))}"))
        for b in c12_methods()[1:]:
            p = pair(f"{run.name}: churn TalkLoRA − {methods.label(b)}", wide, talk, b, a.margins.get("churn"), "less",
                     setting=run.name, controls=controls, deciding=b in deciding)
            if p is not None:
                items.append(p)
        levels_ += [[run.name, methods.label(m), int(wide[m].notna().sum()), fmt(float(wide[m].mean())),
                     fmt(float(every[m].mean())) if m in every else "n/a"] for m in c12_methods() if m in wide]
    return items, tested, levels_


def evaluate_c12(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C12.rule`` (below) to the saved rows."""
    items, tested, rows = items_c12(data, config)
    comps = judge_family(items, *levels())
    lines = ["- Effect per seed: mean over checkpoints (from the second on) and routed layers of the churn of "
             "decided held-out tokens (top-2 gate gap above the tie threshold at both checkpoints), TalkLoRA − the "
             "comparator of the same seed (same draws and data order); < 0 = TalkLoRA churns less. Deciding: the "
             "function-matched twin and the scale-matched control; MoELoRA-code reported.",
             "- Mean churn per setting and method (mean over seeds; decided tokens, and all tokens beside it):",
             md_table(["setting", "method", "seeds", "churn (decided)", "churn (all tokens)"], rows) if rows
             else "(no churn rows)"]
    return empirical_outcome(comps, tested, verdict_c12(comps, why_not_testable(tested)), lines=lines)


def verdict_c12(comps, none_testable: str) -> tuple[str, str]:
    """docs/method.md §5.5 over the churn comparisons with the twin and the scale-matched control."""
    return claim_verdict(comps, none_testable)


# ----------------------------------------------------------------------------- F11 churn over training
def churn_rows(*frames) -> pd.DataFrame:
    """Churn per (source, method, seed, step), mean over routed layers, in every setting of the
    evaluation sweeps ``frames`` (planted, train, lm; ``None`` where absent); ``source``: the setting name."""
    data = {name: f for name, f in zip(("planted", "train", "lm"), frames) if f is not None}
    parts = []
    for run in ev.runs(data):
        r = ev.routed_layers(run.rows[(run.rows["split"] == run.churn_split) & (run.rows["metric"] == "churn")
                                      & run.rows["method"].isin(c12_methods())], run)
        if len(r):
            parts.append(r.groupby(["method", "seed", "step"], as_index=False)["value"].mean().assign(source=run.name))
    cols = ["source", "method", "seed", "step", "value"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def prepare_f11(planted: pd.DataFrame | None = None, train: pd.DataFrame | None = None,
                lm: pd.DataFrame | None = None) -> pd.DataFrame:
    """``mean, lo, hi, n`` over seeds of the layer-mean churn per (setting, method, step)."""
    ch = churn_rows(planted, train, lm)
    if not len(ch):
        return pd.DataFrame(columns=["source", "method", "step", "mean", "lo", "hi", "n"])
    return summarise(ch, ["source", "method", "step"], bounds=(0.0, 1.0))


def draw_f11(data: pd.DataFrame):
    sources = order(data["source"], list(ev.ORDER)) or ["no data"]
    fig, axes = plt.subplots(1, len(sources), figsize=(WIDTH, 3.3), squeeze=False)
    for ax, source in zip(axes[0], sources):
        d = data[data["source"] == source]
        if not len(d):
            empty(ax)
            continue
        for m in c12_methods():
            dm = d[d["method"] == m]
            if len(dm):
                line_ci(ax, dm, "step", color=methods.color(m), marker=methods.marker(m), label=methods.label(m))
        ax.set_ylim(bottom=0)
        ax.set_title(source, fontsize=9.5)
        ax.set_xlabel("training step")
    axes[0, 0].set_ylabel("top-1 churn of decided tokens\nsince the previous checkpoint")
    fig.tight_layout()
    h, lab = dedupe(axes)
    legend_below(fig, h, lab, ncol=4, title="method (shaded: 95% CI over seeds)")
    return fig


# ----------------------------------------------------------------------------- declarations
C12 = ClaimSpec(
    "C12", paper='communication "smooths routing dynamics" during training',
    statement=("During training, TalkLoRA's routing of held-out tokens changes less between consecutive "
               "checkpoints (lower top-1 churn of decided tokens) than that of the function-matched twin (the same "
               "routing at step 0, no T) and of the scale-matched MoELoRA-code control, in every testable setting."),
    rule=("per setting passing P1 and P2 (every compared router decisive at the end): per seed, churn of "
          "TalkLoRA-official − churn of the comparator (mean over checkpoints and routed layers; only tokens whose "
          "top-2 gate gap exceeds the tie threshold at both checkpoints), claimed < 0, margin churn_fraction × "
          "MoELoRA-code's mean churn on the tuning runs; deciding: the twin and the scale-matched control "
          "(preregistration [deciding] C12), Holm over every deciding comparison of the testable settings; "
          "docs/method.md §5.4 per comparison, §5.5 for the claim. MoELoRA-code reported."),
    figures=("F10", "F11"), tests=(), experiments=(), optional=ev.EXPERIMENTS, evaluate=evaluate_c12,
    kind="empirical")
F11 = FigureSpec(
    "F11", "routing_churn_over_training", (), prepare_f11, draw_f11, notebook="02_smoothness.py",
    optional=("planted", "train", "lm"), caption_text=
    "Routing dynamics over training ({claims}): share of decided held-out tokens (top-2 gate gap above the tie "
    "threshold) whose top-1 expert changed since the previous checkpoint (mean over routed layers), "
    "TalkLoRA-official vs the function-matched twin, the scale-matched control and MoELoRA-code, per setting "
    "(one panel each); mean and 95% CI over seeds. The verdict averages each seed's churn over the checkpoints "
    "and compares TalkLoRA with the twin and the scale-matched control, paired by seed (one Holm family over the "
    "testable settings; a setting failing P1 or P2 is not testable).")

CLAIMS = (C12,)
FIGURES = (F11,)
