"""Claim C11 (TalkLoRA consistently outperforms vanilla LoRA and MoELoRA).

Rows: every setting's evaluation sweep (:mod:`analysis.claims.evidence`: planted teacher, MiniLM per
task, SmolLM2, user settings), each method at its tuned lr.  **select** per setting the held-out loss
(and accuracy for classification) by seed and method → **compare** TalkLoRA − each baseline the paper
names (LoRA, MoELoRA-code; the preregistration's ``[deciding] C11``), paired by seed, one Holm family
over every testable setting → **verdict** (docs/method.md §5.5: "consistently" = supported in every
testable setting) → **render**.  MoELoRA-input is reported.  Its comparisons are drawn in F10.
"""
from __future__ import annotations

from .. import methods
from ..stats import fmt
from . import evidence as ev
from .assay import assays, deciding_methods, levels
from .base import ClaimSpec, Outcome
from .decide import claim_verdict, empirical_outcome, judge_family, pair, why_not_testable

METRICS = (("loss", "less", "loss"), ("accuracy", "greater", "accuracy"))   # (metric, claimed side, margin)


def items_for(claim: str, data: dict, config: dict | None = None, reported=()) -> tuple[list, list]:
    """``(Paired items, tested settings)``: held-out loss (claimed < 0) and, in classification
    settings, accuracy (claimed > 0) of the reference − each deciding method of ``claim`` (and of
    ``reported`` methods, not deciding), per setting; controls P1."""
    talk, deciding = methods.reference(), deciding_methods(claim)
    items, tested = [], []
    for a in assays(data, config):
        run = a.run
        controls = a.controls((talk, *deciding))
        tested.append((a, controls, ", ".join(f"{k} ±{fmt(a.margins.get(k))}" for k, _, _ in METRICS
                                             if k == "loss" or run.classification)))
        for metric, side, margin in METRICS[:1 + run.classification]:
            wide = ev.heldout(run.rows, metric)
            for b in (*deciding, *reported):
                p = pair(f"{run.name}: {metric} TalkLoRA − {methods.label(b)}", wide, talk, b, a.margins.get(margin),
                         side, setting=run.name, controls=controls, deciding=b in deciding,
                         discordant=ev.discordant(run, talk, b) if metric == "accuracy" else None)
                if p is not None:
                    items.append(p)
    return items, tested


def evaluate_c11(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C11.rule`` (below) to the saved rows."""
    items, tested = items_for("C11", data, config, reported=methods.tagged("input-router"))
    comps = judge_family(items, *levels())
    lines = ["- Held-out loss (nats; regression: mean squared error) on every test example at the last step, and "
             "accuracy in classification settings, TalkLoRA − baseline paired by seed (common random numbers), each "
             "method at its own tuned lr. Deciding: LoRA and MoELoRA-code in every testable setting; MoELoRA-input "
             "reported. Accuracy differences with zero seed-level variance: exact McNemar on the pooled per-example "
             "discordant pairs."]
    return empirical_outcome(comps, tested, verdict_c11(comps, why_not_testable(tested)), lines=lines)


def verdict_c11(comps, none_testable: str) -> tuple[str, str]:
    """docs/method.md §5.5 over the deciding comparisons: "consistently" = supported in every testable setting."""
    return claim_verdict(comps, none_testable)


C11 = ClaimSpec(
    "C11", paper="TalkLoRA consistently outperforms vanilla LoRA and MoELoRA",
    statement=("In every testable setting, TalkLoRA-official reaches a lower held-out loss (and, for "
               "classification, a higher accuracy) than LoRA and MoELoRA-code, each trained at its own tuned "
               "learning rate with the same seeds, data order and steps."),
    rule=("per setting passing P1 (adaptation matters) and deciding baseline (LoRA, MoELoRA-code; preregistration "
          "[deciding] C11): paired by seed, held-out loss TalkLoRA − baseline (claimed < 0, the setting's loss "
          "margin) and, for classification, accuracy (claimed > 0, accuracy margin; zero seed-level variance: exact "
          "McNemar per example); Holm over every deciding comparison of the testable settings; docs/method.md §5.4 "
          "per comparison, §5.5 for the claim: 'consistently' = supported in every testable setting. "
          "MoELoRA-input reported."),
    figures=("F10",), tests=(), experiments=(), optional=ev.EXPERIMENTS, evaluate=evaluate_c11, kind="empirical")

CLAIMS = (C11,)
FIGURES = ()
