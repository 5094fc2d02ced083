"""Claim C11 (TalkLoRA consistently outperforms vanilla LoRA and MoELoRA).

Rows: ``train`` (MiniLM, tasks ``sentiment`` and ``topic``, every test example at the last step)
and ``lm`` (SmolLM2 causal LM, held-out loss per domain).  **select** per task × model the held-out
loss (and MiniLM accuracy) by seed and method → **compare** TalkLoRA − each baseline, paired by
seed → **verdict** per cell and for the claim ("consistently": every cell) → **render**.  Its
comparisons are drawn in F10 (:mod:`analysis.claims.forest`).
"""
from __future__ import annotations

import math

import pandas as pd

from .. import methods
from ..stats import Comparison, Family, combine, estimate, fmt
from .base import ClaimSpec, Outcome, margin
from .helpers import at_last_step, by_seed, comparison_table, md_table, paired

LM_DOMAINS = ("movie", "news", "math")


# ----------------------------------------------------------------------------- select
def select_c11(data: dict) -> list[tuple[str, pd.DataFrame, pd.DataFrame | None]]:
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
            wide = {m: by_seed(g[g["metric"] == m]) for m in ("loss", "accuracy")}
            out.append((f"MiniLM {task}", wide["loss"], wide["accuracy"]))
    lm = data.get("lm")
    if lm is not None and len(lm):
        t = at_last_step(lm[(lm["split"] == "test") & (lm["metric"] == "loss") & (lm["seed"] >= 0)],
                         ["method", "seed"])
        for dom in LM_DOMAINS:
            g = t[t["domain"] == dom]
            if len(g):
                out.append((f"SmolLM2 {dom}", by_seed(g), None))
    return out


# ----------------------------------------------------------------------------- compare
def compare_c11(loss: pd.DataFrame, acc: pd.DataFrame | None, setting: str, baseline: str,
                margins: tuple[float, float]) -> tuple[Comparison | None, Comparison | None]:
    """Held-out loss (claimed < 0) and, where measured, accuracy (claimed > 0) of TalkLoRA − ``baseline``."""
    talk = methods.reference()
    cl = paired(f"{setting}: loss TalkLoRA − {baseline}", loss, talk, baseline, margins[0], "less")
    ca = None if acc is None else paired(f"{setting}: accuracy TalkLoRA − {baseline}", acc, talk, baseline,
                                         margins[1], "greater")
    return cl, ca


# ----------------------------------------------------------------------------- verdict
def c11_cell(loss: Comparison, acc: Comparison | None) -> str:
    """One task × model × baseline: holds if the loss comparison holds and accuracy (where measured)
    is not resolved below 0; refuted if the loss comparison is refuted or accuracy is resolved
    below 0; otherwise inconclusive."""
    acc_worse = acc is not None and math.isfinite(acc.ci_high) and acc.ci_high < 0
    if loss.verdict == "refuted" or acc_worse:
        return "refuted"
    return "holds" if loss.verdict == "holds" else "inconclusive"


def verdict_c11(cells: dict[tuple[str, str], str]) -> tuple[str, str]:
    """``cells``: (setting, baseline) -> cell verdict; "consistently" = every cell holds."""
    verdict = combine(cells.values())
    if not cells:
        return verdict, "no paired TalkLoRA / LoRA / MoELoRA-code rows"
    if verdict == "holds":
        return verdict, f"TalkLoRA ahead of LoRA and MoELoRA-code on every task × model ({len(cells)} cells)"
    if verdict == "refuted":
        return verdict, "not ahead (refuted) on " + ", ".join(f"{s} vs {b}" for (s, b), v in cells.items() if v == "refuted")
    return verdict, "undecided on " + ", ".join(f"{s} vs {b}" for (s, b), v in cells.items() if v != "holds")


# ----------------------------------------------------------------------------- evaluate (+ render)
def evaluate_c11(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C11.rule`` (below) to the saved rows."""
    margins = (margin(config, "c11_loss"), margin(config, "c11_accuracy"))
    talk, baselines = methods.reference(), methods.tagged("baseline")
    (head_only,) = methods.tagged("no-adapter")
    deciding, reported, cells, rows, head = [], [], {}, [], []
    for setting, loss, acc in select_c11(data):
        for b in (*baselines, *methods.tagged("scale-matched")):
            cl, ca = compare_c11(loss, acc, setting, b, margins)
            if cl is None:
                continue
            if b in baselines:
                v = c11_cell(cl, ca)
                cells[(setting, b)] = v
                deciding += [c for c in (cl, ca) if c is not None]
                rows.append([setting, b, cl.row()[2], cl.row()[3], cl.verdict,
                             ca.row()[2] if ca else "—", ca.row()[3] if ca else "—", ca.verdict if ca else "—", v])
            else:
                reported += [c for c in (cl, ca) if c is not None]
        if acc is not None and head_only in acc and talk in acc:
            head.append([setting, estimate(acc[head_only]).text(3), estimate(acc[talk]).text(3),
                         estimate(loss[head_only]).text(3) if head_only in loss else "n/a",
                         estimate(loss[talk]).text(3)])
    family = Family.of(deciding + reported, holm=False)
    verdict, reason = verdict_c11(cells)
    first = next(iter(deciding), None)
    key = f"{first.name}: {fmt(first.effect)} [{fmt(first.ci_low)}, {fmt(first.ci_high)}]" if first else "n/a"
    ev = ["- Per task × model, paired by seed (common random numbers); held-out loss (nats, primary) on "
          "every test example / held-out text at the last step, accuracy beside it (MiniLM):",
          md_table(["setting", "baseline", "Δloss", "95 % interval", "loss verdict", "Δacc", "95 % interval",
                    "acc verdict", "cell verdict"], rows) if rows else "(no rows)",
          "- Every comparison (deciding first, then the scale-matched control, reported only):",
          comparison_table(family)]
    if head:
        ev += ["- Do the adapters matter? Head-only baseline (frozen encoder, trained head) vs TalkLoRA:",
               md_table(["setting", "head-only accuracy", "TalkLoRA accuracy", "head-only loss", "TalkLoRA loss"], head)]
    return Outcome(verdict, reason, key, ev, comparisons=list(family))


# ----------------------------------------------------------------------------- declarations
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

CLAIMS = (C11,)
FIGURES = ()
