"""Claim C11 ("consistently outperforms vanilla LoRA and MoELoRA"), figure F10 (forest plot of every
paired comparison) and the comparison helpers the balance and twins rules share.

C11 and F10 are part of the **balance** topic (:mod:`analysis.topics.balance`, notebook
``notebooks/01_balance.py``); this module only keeps ``balance.py`` short.  Rows: ``train`` (MiniLM,
tasks ``sentiment`` and ``topic``, every test example at the last step) and ``lm`` (SmolLM2 causal
LM, held-out loss per domain).

Every comparison is a paired difference over seeds (common random numbers, SPEC §5),
``Comparison.from_differences``: n, mean effect, 95 % t-interval, margin (declared in the profile's
``[margins]``) and minimum detectable effect; its verdict is :func:`analysis.stats.verdict_from_interval`.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from ..config import MarginsConfig
from ..evidence import ClaimSpec, FigureSpec, Outcome, md_table
from ..experiments import EXPERIMENTS
from ..plotting import WIDTH
from ..stats import Comparison, combine_verdicts, estimate, fmt, holm, holm_adjust

TALK = "talklora-official"
ALPHA = 0.05                                  # family-wise error rate of the Holm correction


# ----------------------------------------------------------------------------- shared helpers
def margins(config: dict) -> dict:
    """The declared margins (``config["margins"]``, defaults of :class:`MarginsConfig` otherwise)."""
    return MarginsConfig.from_dict(dict((config or {}).get("margins") or {})).to_dict()


def at_last_step(rows: pd.DataFrame, keys) -> pd.DataFrame:
    """The rows at the last step of each group ``keys`` (e.g. method and seed)."""
    if rows.empty:
        return rows
    return rows[rows["step"] == rows.groupby(list(keys))["step"].transform("max")]


def compare(name: str, wide: pd.DataFrame, a: str, b: str, margin: float, side: str) -> Comparison | None:
    """Paired comparison ``wide[a] − wide[b]`` (rows: seeds); ``None`` when a column is missing."""
    if a not in wide or b not in wide:
        return None
    d = (wide[a] - wide[b]).dropna()
    return Comparison.from_differences(name, d, margin, side) if len(d) else None


def holm_verdicts(comps: list[Comparison]) -> tuple[list[float], list[str]]:
    """Holm-adjusted p-values of the family ``comps`` and each comparison's SPEC §5 verdict at its
    Holm-ordered interval level (:func:`analysis.stats.holm_adjust`): an interval excludes 0 only
    where the comparison passes its Holm step; one inside ±margin is refuted at any level."""
    if not comps:
        return [], []
    adj = holm([1.0 if not math.isfinite(c.p_value) else c.p_value for c in comps]).tolist()
    return adj, [c.verdict for c in holm_adjust(comps)]


def inside_margin(c: Comparison) -> bool:
    return math.isfinite(c.ci_low) and -c.margin < c.ci_low and c.ci_high < c.margin


every = combine_verdicts          # the declared combination: all hold -> holds, any refuted -> refuted


def comparison_table(comps, verdicts=None, extra: dict | None = None) -> str:
    """Markdown table of comparisons (``verdicts``: the verdicts that count, e.g. after Holm)."""
    header = ["paired difference", "n", "effect", "95 % interval", "margin", "MDE", "verdict"]
    rows = [c.row() for c in comps]
    if verdicts is not None:
        rows = [r[:-1] + [v] for r, v in zip(rows, verdicts)]
    for col, values in (extra or {}).items():
        header.append(col)
        rows = [r + [v] for r, v in zip(rows, values)]
    return md_table(header, rows)


# ----------------------------------------------------------------------------- C11
C11_BASELINES = ("lora", "moelora-code")               # the claim's baselines (decide)
C11_REPORTED = ("moelora-code-scaled",)                # reported beside them
LM_DOMAINS = ("movie", "news", "math")


def c11_settings(data: dict) -> list[tuple[str, pd.DataFrame, pd.DataFrame | None]]:
    """``(setting, loss by seed × method, accuracy by seed × method or None)`` per task × model:
    MiniLM per ``train`` task (test split, every example, last step) and SmolLM2 per LM domain."""
    out = []
    tr = data.get("train")
    if tr is not None and len(tr):
        t = tr[(tr["split"] == "test") & (tr["layer"] == "all") & (tr["step"] >= 0)]
        if "domain" in t:
            t = t[t["domain"] == "all"]
        t = at_last_step(t, ["task", "method", "seed"] if "task" in t else ["method", "seed"])
        for task, g in (t.groupby("task") if "task" in t else [("task", t)]):
            wide = {m: g[g["metric"] == m].groupby(["seed", "method"])["value"].mean().unstack("method")
                    for m in ("loss", "accuracy")}
            out.append((f"MiniLM {task}", wide["loss"], wide["accuracy"]))
    lm = data.get("lm")
    if lm is not None and len(lm):
        t = at_last_step(lm[(lm["split"] == "test") & (lm["metric"] == "loss") & (lm["seed"] >= 0)],
                         ["method", "seed"])
        for dom in LM_DOMAINS:
            g = t[t["domain"] == dom]
            if len(g):
                out.append((f"SmolLM2 {dom}", g.groupby(["seed", "method"])["value"].mean().unstack("method"), None))
    return out


def evaluate_c11(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C11.rule`` (below) to the saved rows."""
    mg = margins(config)
    deciding, reported, cell_verdicts, rows, head = [], [], {}, [], []
    for setting, loss, acc in c11_settings(data):
        for b in (*C11_BASELINES, *C11_REPORTED):
            cl = compare(f"{setting}: loss TalkLoRA − {b}", loss, TALK, b, mg["c11_loss"], "less")
            ca = None if acc is None else compare(f"{setting}: accuracy TalkLoRA − {b}", acc, TALK, b,
                                                   mg["c11_accuracy"], "greater")
            if cl is None:
                continue
            if b in C11_BASELINES:
                v = c11_cell(cl, ca)
                cell_verdicts[(setting, b)] = v
                deciding += [c for c in (cl, ca) if c is not None]
                rows.append([setting, b, cl.row()[2], cl.row()[3], cl.verdict,
                             ca.row()[2] if ca else "—", ca.row()[3] if ca else "—", ca.verdict if ca else "—", v])
            else:
                reported += [c for c in (cl, ca) if c is not None]
        if acc is not None and "head-only" in acc and TALK in acc:
            head.append([setting, estimate(acc["head-only"]).text(3), estimate(acc[TALK]).text(3),
                         estimate(loss["head-only"]).text(3) if "head-only" in loss else "n/a",
                         estimate(loss[TALK]).text(3)])
    verdict = every(cell_verdicts.values())
    if not cell_verdicts:
        reason = "no paired TalkLoRA / LoRA / MoELoRA-code rows"
    elif verdict == "holds":
        reason = f"TalkLoRA ahead of LoRA and MoELoRA-code on every task × model ({len(cell_verdicts)} cells)"
    elif verdict == "refuted":
        bad = [f"{s} vs {b}" for (s, b), v in cell_verdicts.items() if v == "refuted"]
        reason = "not ahead (refuted) on " + ", ".join(bad)
    else:
        open_ = [f"{s} vs {b}" for (s, b), v in cell_verdicts.items() if v != "holds"]
        reason = "undecided on " + ", ".join(open_)
    first = next(iter(deciding), None)
    key = f"{first.name}: {fmt(first.effect)} [{fmt(first.ci_low)}, {fmt(first.ci_high)}]" if first else "n/a"
    ev = ["- Per task × model, paired by seed (common random numbers); held-out loss (nats, primary) on "
          "every test example / held-out text at the last step, accuracy beside it (MiniLM):",
          md_table(["setting", "baseline", "Δloss", "95 % interval", "loss verdict", "Δacc", "95 % interval",
                    "acc verdict", "cell verdict"], rows) if rows else "(no rows)",
          "- Every comparison (deciding first, then the scale-matched control, reported only):",
          comparison_table(deciding + reported)]
    if head:
        ev += ["- Do the adapters matter? Head-only baseline (frozen encoder, trained head) vs TalkLoRA:",
               md_table(["setting", "head-only accuracy", "TalkLoRA accuracy", "head-only loss", "TalkLoRA loss"], head)]
    return Outcome(verdict, reason, key, ev, comparisons=deciding + reported)


def c11_cell(loss: Comparison, acc: Comparison | None) -> str:
    """One task × model × baseline: holds if the loss comparison holds and accuracy (where measured)
    is not resolved below 0; refuted if the loss comparison is refuted or accuracy is resolved
    below 0; otherwise inconclusive."""
    acc_worse = acc is not None and math.isfinite(acc.ci_high) and acc.ci_high < 0
    if loss.verdict == "refuted" or acc_worse:
        return "refuted"
    return "holds" if loss.verdict == "holds" else "inconclusive"


C11 = ClaimSpec(
    "C11", paper="TalkLoRA consistently outperforms vanilla LoRA and MoELoRA",
    statement=("On every task × model, TalkLoRA-official reaches a lower held-out loss than LoRA and "
               "MoELoRA-code trained identically (same seeds, data order and steps), without losing accuracy."),
    rule=("per task × model (MiniLM sentiment, MiniLM topic, SmolLM2 LM per domain movie / news / math) "
          "and baseline (LoRA, MoELoRA-code): paired by seed, held-out loss TalkLoRA − baseline (primary, "
          "margin ±margins.c11_loss nats) and, for MiniLM, accuracy (margin ±margins.c11_accuracy); a cell "
          "holds if the loss interval lies below 0 and the accuracy interval is not entirely below 0; it is "
          "refuted if the loss interval lies inside ±margin or above 0, or the accuracy interval lies "
          "entirely below 0; else inconclusive. The claim ('consistently') holds if every cell holds, is "
          "refuted if any cell is refuted, else inconclusive. The scale-matched control and the head-only "
          "baseline are reported, not deciding."),
    figures=("F10",), tests=(), experiments=("train",), optional=("lm",), evaluate=evaluate_c11)


# ----------------------------------------------------------------------------- F10 forest plot
FOREST_CLAIMS = ("C5", "C6", "C7", "C9", "C11", "C12")
# the rows the claims of FOREST_CLAIMS read (experiments + optional; tests/test_topics.py checks the union),
# in EXPERIMENTS order -- not perturb_real (supplementary), which a profile may skip
F10_EXPERIMENTS = tuple(e for e in EXPERIMENTS if e in {"perturb_synthetic", "perturb_controls", "train", "twins",
                                                         "lm", "train_budget"})


def prepare_f10(*rows: pd.DataFrame, config: dict | None = None) -> pd.DataFrame:
    """Every paired comparison the claims of :data:`FOREST_CLAIMS` return (``Outcome.comparisons``),
    evaluated on ``rows`` (one frame per experiment of :data:`F10_EXPERIMENTS`) with the margins
    declared in ``config["margins"]`` (the profile's; without a config, :class:`MarginsConfig`'s
    defaults); a claim whose experiments are missing (empty frame) contributes nothing, and a claim
    whose rule cannot read the rows contributes one row naming the error (drawn without a point)."""
    from . import CLAIMS                      # the registry (this module is part of it)

    config = {**(config or {}), "margins": margins(config or {})}

    data = {e: r for e, r in zip(F10_EXPERIMENTS, rows) if r is not None and len(r)}
    out = []
    for spec in CLAIMS:
        if spec.id not in FOREST_CLAIMS or any(e not in data for e in spec.experiments):
            continue
        used = {u: "inconclusive" for u in spec.uses_verdicts}
        try:
            comps = spec.evaluate(data, config, used).comparisons
        except (KeyError, ValueError) as err:     # rows the rule cannot read: one row naming why, drawn empty
            out.append(dict(claim=spec.id, comparison=f"not evaluated: {type(err).__name__} {err}", n=0,
                            effect=math.nan, ci_low=math.nan, ci_high=math.nan, margin=math.nan, mde=math.nan,
                            claimed_side="", verdict="inconclusive"))
            continue
        for c in comps:
            out.append(dict(claim=spec.id, comparison=c.name, n=c.n, effect=c.effect, ci_low=c.ci_low,
                            ci_high=c.ci_high, margin=c.margin, mde=c.mde, claimed_side=c.claimed_side,
                            verdict=c.verdict))
    cols = ["claim", "comparison", "n", "effect", "ci_low", "ci_high", "margin", "mde", "claimed_side", "verdict"]
    return pd.DataFrame(out, columns=cols)


VERDICT_COLORS = {"holds": "#2ca02c", "refuted": "#d62728", "inconclusive": "#7f7f7f"}
F10_CLIP = 6.0                                # x range of F10 in margins (beyond: a triangle at the edge)


def draw_f10(data: pd.DataFrame):
    """One panel per claim (rows: comparisons); each difference is drawn relative to its margin and
    signed so that the claimed direction is positive (``±effect / margin``, − for a claimed decrease),
    so the ±margin band is [−1, 1] and "better as claimed" is to the right in every row."""
    claims = list(dict.fromkeys(data["claim"])) if len(data) else []
    heights = [max(len(data[data["claim"] == c]), 1) for c in claims] or [1]
    fig, axes = plt.subplots(len(heights), 1, figsize=(1.5 * WIDTH, 0.9 + 0.24 * sum(heights) + 0.5 * len(heights)),
                             gridspec_kw=dict(height_ratios=heights), squeeze=False)
    if not claims:
        axes[0, 0].text(0.5, 0.5, "no paired comparisons", ha="center", va="center", transform=axes[0, 0].transAxes)
        axes[0, 0].set_axis_off()
        return fig
    for ax, cid in zip(axes[:, 0], claims):
        d = data[data["claim"] == cid].reset_index(drop=True)
        m = d["margin"].to_numpy(float)
        scale = np.where(m > 0, m, 1.0) * np.where(d["claimed_side"] == "less", -1.0, 1.0)
        y = np.arange(len(d))[::-1]
        ax.axvspan(-1, 1, color="0.9", zorder=0)
        ax.axvline(0, color="0.3", lw=0.8)
        for i, r in d.iterrows():
            col = VERDICT_COLORS.get(r["verdict"], "k")
            lo, hi, eff = (r[k] / scale[i] for k in ("ci_low", "ci_high", "effect"))
            lo, hi = min(lo, hi), max(lo, hi)
            if np.isfinite(lo) and np.isfinite(hi):
                ax.plot([max(lo, -F10_CLIP), min(hi, F10_CLIP)], [y[i]] * 2, color=col, lw=1.8)
            if np.isfinite(eff):
                if abs(eff) > F10_CLIP:         # off the scale: a triangle at the edge pointing outwards
                    ax.plot(np.sign(eff) * F10_CLIP, y[i], ">" if eff > 0 else "<", color=col, ms=6)
                else:
                    ax.plot(eff, y[i], "o", color=col, ms=4.5)
        ax.set_xlim(-F10_CLIP - 0.5, F10_CLIP + 0.5)
        ax.set_yticks(y, [f"{c}  (n={n})" for c, n in zip(d["comparison"], d["n"])], fontsize=7)
        ax.set_ylim(-0.7, len(d) - 0.3)
        ax.set_title(f"{cid}", fontsize=9.5, loc="left")
        ax.grid(axis="y", visible=False)
    axes[-1, 0].set_xlabel("paired difference / its margin, claimed direction → (shaded: ±margin; green holds, "
                           "red refuted, grey inconclusive)")
    fig.tight_layout()
    return fig


F10 = FigureSpec(
    "F10", "forest_of_comparisons", F10_EXPERIMENTS, prepare_f10, draw_f10, needs_config=True, caption_text=
    "Every paired comparison behind the verdicts ({claims}, and every other claim that returns paired "
    "comparisons: the smoothness and twins claims): mean "
    "paired difference over seeds and its 95 % t-interval, each divided by its declared margin and signed "
    "so that the claimed direction points right (the shaded band ±1 is ±margin in every row; values beyond ±6 "
    "margins are drawn at the edge as triangles); colour: the comparison's SPEC §5 verdict as CLAIMS.md reports it "
    "(where a claim corrects for multiplicity, the interval is at its Holm-ordered level). "
    "Labels name the task and model.")
