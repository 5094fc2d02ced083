"""Claim C12 (communication "smooths routing dynamics" during training) and figure F11.

Rows: ``lm`` (causal LM: ``top1_churn`` of held-out tokens per checkpoint from the second on,
``layer = "mean"`` the mean over routed layers) and ``train`` (classification tasks: ``split =
"probe"``, ``metric = "churn"`` per routed layer).  Churn between consecutive checkpoints = share of
held-out tokens whose top-1 expert changed (docs/method.md §4).  **select** per-seed mean churn per
source and method → **compare** TalkLoRA − each communication-isolating reference as one Holm family
→ **verdict** → **render**.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from .. import methods
from ..plotting import WIDTH, dedupe, empty, legend_below, line_ci, summarise
from ..stats import Family, fmt
from .base import ClaimSpec, FigureSpec, Outcome, margin
from .helpers import md_table

LM_SOURCE = "lm (SmolLM2)"


def c12_methods() -> tuple[str, ...]:
    """The reference and the references it is compared with (those that differ only by communication)."""
    return (methods.reference(), *methods.tagged("isolates-communication"))


# ----------------------------------------------------------------------------- select
def churn_rows(lm: pd.DataFrame | None, train: pd.DataFrame | None) -> pd.DataFrame:
    """Churn per (source, method, seed, step), mean over routed layers: ``source`` is the train task
    or :data:`LM_SOURCE`.  Methods other than :func:`c12_methods` and C7 budget cells are dropped."""
    keep = list(c12_methods())
    parts = []
    if lm is not None and len(lm):
        d = lm[(lm.metric == "top1_churn") & (lm.layer == "mean") & lm.method.isin(keep)]
        parts.append(d.assign(source=LM_SOURCE)[["source", "method", "seed", "step", "value"]])
    if train is not None and len(train) and "split" in train:
        d = train[(train.split == "probe") & (train.metric == "churn") & train.method.isin(keep)]
        if "budget" in d:
            d = d[d["budget"].isna()]
        d = d[~d.layer.isin(["all", "mean"])]
        src = d["task"].astype(str) if "task" in d else pd.Series("train", index=d.index)
        d = d.assign(source="train: " + src).groupby(["source", "method", "seed", "step"], as_index=False)["value"].mean()
        parts.append(d)
    cols = ["source", "method", "seed", "step", "value"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


# ----------------------------------------------------------------------------- compare
def compare_c12(per_seed: pd.DataFrame, margin_: float) -> tuple[Family, list[str]]:
    """One Holm family over every (source, reference): per seed, churn of TalkLoRA − the reference
    (mean over checkpoints and routed layers), claimed < 0.  Also returns the (source, reference)
    pairs without churn rows."""
    talk = methods.reference()
    fam, missing = [], []
    for source, g in per_seed.groupby(level="source"):
        if talk not in g:
            continue
        for ref in methods.tagged("isolates-communication"):
            if ref in g:
                fam.append((f"{source}: churn TalkLoRA − {ref}", (g[talk] - g[ref]).dropna().to_numpy(), margin_, "less"))
            else:
                missing.append(f"{source}: {ref}")
    return Family.of_differences(fam), missing


# ----------------------------------------------------------------------------- verdict
def verdict_c12(family: Family) -> tuple[str, str]:
    """Holds if every comparison holds, refuted if any is refuted, else inconclusive."""
    if not len(family):
        return "inconclusive", (f"no churn rows with {methods.reference()} and a reference method "
                                f"({', '.join(methods.tagged('isolates-communication'))})")
    return family.decide()


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c12(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C12.rule`` (below) to the saved rows."""
    ch = churn_rows(data.get("lm"), data.get("train"))
    per_seed = ch.groupby(["source", "method", "seed"])["value"].mean().unstack("method")
    family, missing = compare_c12(per_seed, margin(config, "c12_churn"))
    verdict, reason = verdict_c12(family)
    level_rows = [[source, m, g[m].notna().sum(), fmt(float(g[m].mean()))]
                  for source, g in per_seed.groupby(level="source") for m in c12_methods() if m in g]
    comps = list(family)
    key = "; ".join(f"{c.name} {fmt(c.effect)} [{fmt(c.ci_low)}, {fmt(c.ci_high)}]" for c in comps[:4]) or "n/a"
    ev = ["- Effect per seed: mean over checkpoints (from the second on) and routed layers of the top-1 churn "
          "of held-out tokens (share whose top-1 expert changed since the previous checkpoint), TalkLoRA-official "
          "minus the reference of the same seed (same init seed and data order); < 0 = TalkLoRA churns less. "
          "Intervals at Holm-ordered levels over all comparisons; margin ±margins.c12_churn.",
          "- Mean churn per source and method (mean over seeds):",
          md_table(["source", "method", "seeds", "mean churn"], level_rows) if level_rows else "- (no churn rows)"]
    if missing:
        ev.append("- References without churn rows (not compared; run them to complete the rule): " + "; ".join(missing))
    return Outcome(verdict, reason, key, ev, comparisons=comps)


# ----------------------------------------------------------------------------- F11 churn over training
def prepare_f11(lm: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """``mean, lo, hi, n`` over seeds of the layer-mean churn per (source, method, step)."""
    ch = churn_rows(lm, train)
    if not len(ch):
        return pd.DataFrame(columns=["source", "method", "step", "mean", "lo", "hi", "n"])
    return summarise(ch, ["source", "method", "step"], bounds=(0.0, 1.0))


def draw_f11(data: pd.DataFrame):
    sources = sorted(data["source"].unique(), key=lambda s: (s != LM_SOURCE, s)) or ["no data"]
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
    axes[0, 0].set_ylabel("top-1 churn since the\nprevious checkpoint")
    fig.tight_layout()
    h, lab = dedupe(axes)
    legend_below(fig, h, lab, ncol=4, title="method (shaded: 95% CI over seeds)")
    return fig


# ----------------------------------------------------------------------------- declarations
C12 = ClaimSpec(
    "C12", paper='communication "smooths routing dynamics" during training',
    statement=("During training, TalkLoRA's routing of held-out tokens changes less between consecutive "
               "checkpoints (lower top-1 churn) than MoELoRA-code's, than that of the scale-matched "
               "MoELoRA-code control and than that of the function-matched twin (MoELoRA-code with "
               "W' = W_r(T⊗I): the same routing at step 0, so only communication's training dynamics differ), "
               "on every task × model."),
    rule=("one comparison per (task × model, reference ∈ {moelora-code, moelora-code-scaled, moelora-twin}): per seed, "
          "churn of TalkLoRA-official − churn of the reference (mean over checkpoints and routed layers), "
          "claimed side < 0, margin ±margins.c12_churn, intervals at Holm-ordered levels over all the "
          "comparisons; each comparison's verdict is docs/method.md §5's. C12 holds if every comparison holds, is "
          "refuted if any comparison is refuted (no relevant difference or more churn), else inconclusive."),
    figures=("F10", "F11"), tests=(), experiments=("lm",), optional=("train",), evaluate=evaluate_c12)
F11 = FigureSpec(
    "F11", "routing_churn_over_training", ("lm", "train"), prepare_f11, draw_f11, notebook="02_smoothness.py",
    caption_text=
    "Routing dynamics over training ({claims}): share of held-out tokens whose top-1 expert changed since the "
    "previous checkpoint (mean over routed layers), TalkLoRA-official vs MoELoRA-code, the scale-matched "
    "MoELoRA-code control and the function-matched twin, per task and model; mean and 95% CI over seeds. "
    "The verdict averages each seed's churn over the checkpoints and compares TalkLoRA with each reference, "
    "paired by seed (one Holm family over every task × model and reference).")

CLAIMS = (C12,)
FIGURES = (F11,)
