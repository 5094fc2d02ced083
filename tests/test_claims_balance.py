"""Verdict rules of C6, C7, C9 and C11 (analysis.claims.balance / efficiency / twins / outperforms) as
tables: synthetic rows shaped like the ``train``, ``train_budget``, ``twins`` and ``lm`` experiments in ->
expected verdict; plus the Holm step, the step-0 correction, the two mutants the suite must kill and the
F10 forest plot's data."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import claims  # noqa: E402
from analysis.claims import balance, claim_spec, efficiency, forest  # noqa: E402
from analysis.claims.base import judge  # noqa: E402
from analysis.stats import Comparison, Family  # noqa: E402
from test_claims import MARGINS, closed_form  # noqa: E402

SEEDS = tuple(range(8))
TALK = "talklora-official"
CFG = dict(rank=16, num_experts=4, adapt_top_layers=1, targets=["query", "key", "value", "up", "down"])
CONFIG = {"train": CFG, "twins": {"lr_adamw": 3e-4, "lr_sgd": 3.0}, **MARGINS}


def matched_rank(method: str, talk_rank: int) -> int:
    """The rank of ``method`` (a multiple of E for the MoE methods) whose count is closest to TalkLoRA's."""
    target, step = closed_form(TALK, talk_rank), 1 if method == "lora" else CFG["num_experts"]
    return min(range(step, 4 * talk_rank + 1, step), key=lambda r: (abs(closed_form(method, r) - target), r))


def noise(seed, scale):
    """Deterministic per-seed noise, mean exactly 0 over SEEDS, sd ≈ 0.6 · scale."""
    return scale * ((seed * 5) % 8 - 3.5) / 4


# ----------------------------------------------------------------------------- frames
def train_frame(gini=None, gini0=None, loss=None, acc=None, tasks=("sentiment", "topic"), sd=0.004):
    """``train`` rows: val Gini per layer at steps 0 and 64; test loss / accuracy / counts at step 64."""
    gini = gini or {}
    methods = ["head-only", "lora", "moelora-code", "moelora-code-scaled", TALK, "moelora-input", "switch",
               "topk-entropy"]
    rows = []
    for task in tasks:
        for m in methods:
            for s in SEEDS:
                k = dict(task=task, method=m, seed=s, domain="all", rank=0 if m == "head-only" else 16)
                if m not in ("head-only", "lora"):
                    for step in (0, 64):
                        g = gini.get(m, 0.10) + (noise(s, sd) if m == TALK else 0) if step == 64 else (gini0 or {}).get(m, 0.05)
                        for layer in ("L5.query", "L5.up"):
                            rows += [dict(k, step=step, split="val", layer=layer, metric="gini", value=g),
                                     dict(k, step=step, split="val", layer=layer, metric="load_entropy", value=1 - g)]
                lo = (loss or {}).get(m, 0.50) + (noise(s, sd) if m == TALK else 0.0)
                ac = (acc or {}).get(m, 0.80) + (noise(s, sd) if m == TALK else 0.0)
                rows += [dict(k, step=64, split="test", layer="all", metric="loss", value=lo),
                         dict(k, step=64, split="test", layer="all", metric="accuracy", value=ac)]
                rows += [dict(k, step=64, split="test", layer="all", metric=metric, value=closed_form(m, 16))
                         for metric in ("trainable_parameters", "closed_form_parameters")]
    return pd.DataFrame(rows)


def budget_frame(acc_gain=0.02, ranks=(8, 32), sd=0.004, ranks_of=None):
    """``train_budget`` rows: TalkLoRA at rank r, LoRA / MoELoRA-code at their matched ranks (or at
    ``ranks_of[(method, r)]``)."""
    rows = []
    for r in ranks:
        for m in ("lora", "moelora-code", TALK):
            rank = r if m == TALK else (ranks_of or {}).get((m, r), matched_rank(m, r))
            for s in SEEDS:
                k = dict(task="sentiment", budget=r, method=m, seed=s, step=64, split="test", layer="all",
                         domain="all", rank=rank)
                a = 0.8 + (acc_gain + noise(s, sd) if m == TALK else 0.0)
                rows += [dict(k, metric="accuracy", value=a), dict(k, metric="loss", value=0.5)]
                rows += [dict(k, metric=metric, value=closed_form(m, rank))
                         for metric in ("trainable_parameters", "closed_form_parameters")]
    return pd.DataFrame(rows)


def twins_frame(loss_gap=0.0, acc_gap=0.0, move=None, sd=0.004, task="sentiment"):
    """``twins`` rows per optimiser: val Gini (steps 0 / 64), test loss / accuracy, router movement."""
    move = move or {"adamw": 0.2, "sgd": 0.02}
    rows = []
    for opt, mv in move.items():
        for s in SEEDS:
            for model in (TALK, "moelora-twin"):
                k = dict(task=task, optimizer=opt, seed=s, model=model)
                talk = model == TALK
                rows += [dict(k, step=64, split="test", layer="all", metric="loss",
                              value=0.5 + (loss_gap + noise(s, sd) if talk else 0.0)),
                         dict(k, step=64, split="test", layer="all", metric="accuracy",
                              value=0.8 + (acc_gap + noise(s, sd) if talk else 0.0)),
                         dict(k, step=64, split="weights", layer="L5.query", metric="router_rel_change", value=mv),
                         dict(k, step=64, split="probe", layer="all", metric="logit_maxabs_diff",
                              value=0.0 if talk else 1e-3)]
                for step in (0, 64):
                    rows.append(dict(k, step=step, split="val", layer="L5.query", metric="gini", value=0.1))
    return pd.DataFrame(rows)


def lm_frame(loss=None, sd=0.004):
    rows = []
    for m in ("lora", "moelora-code", "moelora-code-scaled", TALK):
        for s in SEEDS:
            k = dict(method=m, seed=s, split="test")
            for dom in ("movie", "news", "math", "all"):
                v = (loss or {}).get(m, 3.0) + (noise(s, sd) if m == TALK else 0.0)
                rows.append(dict(k, step=16, layer="all", domain=dom, metric="loss", value=v))
            if m != "lora":
                for step in (0, 16):
                    rows.append(dict(k, step=step, layer="mean", domain="all", metric="gini", value=0.1))
    return pd.DataFrame(rows)


def verdict(cid, **data):
    claim = judge(claim_spec(cid), data, None, CONFIG)
    return claim.verdict, claim


BETTER = {"moelora-code": 0.15, "moelora-code-scaled": 0.15, "moelora-input": 0.15, "switch": 0.08,
          "topk-entropy": 0.08, TALK: 0.08}


# ----------------------------------------------------------------------------- verdict tables
CASES = [
    # C6: the twin decides with the other communication-isolating baselines
    ("C6", lambda: dict(train=train_frame(gini=BETTER), twins=twins_frame()), "refuted"),     # twin: ΔGini 0
    ("C6", lambda: dict(train=train_frame(gini=BETTER)), "holds"),
    ("C6", lambda: dict(train=train_frame(gini={**BETTER, TALK: 0.15})), "refuted"),          # inside ±0.02
    ("C6", lambda: dict(train=train_frame(gini=BETTER, gini0={TALK: -0.02})), "refuted"),     # step-0 gap explains it
    ("C6", lambda: dict(train=train_frame(gini={**BETTER, TALK: 0.125}, sd=0.08)), "inconclusive"),
    # C7: three matched budgets (rank 16 from the main sweep, 8 and 32 from train_budget)
    ("C7", lambda: dict(train=train_frame(acc={TALK: 0.82}), train_budget=budget_frame(0.02)), "holds"),
    ("C7", lambda: dict(train=train_frame(acc={TALK: 0.82}), train_budget=budget_frame(-0.02)), "refuted"),
    ("C7", lambda: dict(train=train_frame(acc={TALK: 0.82}), train_budget=budget_frame(0.0)), "refuted"),  # ±margin
    ("C7", lambda: dict(train=train_frame(acc={TALK: 0.82})), "inconclusive"),                # one budget only
    ("C7", lambda: dict(train=train_frame(acc={TALK: 0.82}), train_budget=budget_frame(0.005, sd=0.05)),
     "inconclusive"),
    # C9: loss primary, accuracy beside it
    ("C9", lambda: dict(twins=twins_frame(loss_gap=-0.05)), "holds"),
    ("C9", lambda: dict(twins=twins_frame(loss_gap=0.0, acc_gap=0.0)), "refuted"),
    ("C9", lambda: dict(twins=twins_frame(loss_gap=0.01, acc_gap=0.0, sd=0.08)), "inconclusive"),
    ("C9", lambda: dict(twins=twins_frame(loss_gap=-0.05, move={"adamw": 1e-3, "sgd": 1e-4})), "inconclusive"),
    # C11: every task × model × baseline
    ("C11", lambda: dict(train=train_frame(loss={TALK: 0.40}), lm=lm_frame({TALK: 2.9})), "holds"),
    ("C11", lambda: dict(train=train_frame(loss={TALK: 0.40}), lm=lm_frame({TALK: 3.0})), "refuted"),
    ("C11", lambda: dict(train=train_frame(loss={TALK: 0.40}, acc={TALK: 0.75})), "refuted"),   # accuracy worse
    ("C11", lambda: dict(train=train_frame(loss={TALK: 0.49}, sd=0.08)), "inconclusive"),
]


@pytest.mark.parametrize("cid, frames, expected", CASES,
                         ids=[f"{c}-{i}-{e}" for i, (c, _, e) in enumerate(CASES)])
def test_verdict_table(cid, frames, expected):
    got, claim = verdict(cid, **frames())
    assert got == expected, claim.reason
    assert claim.comparisons or "routers do not move" in "\n".join(claim.evidence)
    for c in claim.comparisons:
        assert c.n == len(SEEDS) and c.margin > 0 and np.isfinite(c.mde)


def test_every_rule_reaches_every_verdict():
    seen = {}
    for cid, _, expected in CASES:
        seen.setdefault(cid, set()).add(expected)
    assert seen == {c: {"holds", "refuted", "inconclusive"} for c in ("C6", "C7", "C9", "C11")}


def test_no_rule_uses_the_conditional_verdict():
    for cid in ("C6", "C7", "C9", "C11"):
        assert "stated conditions" not in claim_spec(cid).rule


# ----------------------------------------------------------------------------- details
def test_c6_removes_the_step0_gap_and_reports_entropy():
    tr = train_frame(gini=BETTER, gini0={TALK: -0.02})
    comps = balance.compare_c6(balance.select_c6({"train": tr}), 0.02)
    code = next(c for c, iso in comps if iso and c.name.startswith("MiniLM sentiment") and c.name.endswith(
        "moelora-code (Δend − Δstep0)"))
    assert code.effect == pytest.approx((0.08 - 0.15) - (-0.02 - 0.05))
    claim = verdict("C6", train=tr)[1]
    assert "load entropy" in "\n".join(claim.evidence)


def test_c6_margins_come_from_the_config():
    tr = train_frame(gini={**BETTER, TALK: 0.15})
    assert verdict("C6", train=tr)[0] == "refuted"
    claim = judge(claim_spec("C6"), {"train": tr}, None, {**CONFIG, "margins": {"c6_gini": 1e-6, "c6_entropy": 0.01}})
    assert claim.verdict == "inconclusive" and claim.comparisons[0].margin == 1e-6
    with pytest.raises(KeyError, match="margin 'c6_gini' is not declared"):
        judge(claim_spec("C6"), {"train": tr}, None, {"train": CFG})


def test_holm_turns_a_marginal_difference_inconclusive():
    strong = Comparison.from_differences("a", [-0.10, -0.11, -0.09, -0.10], 0.01, "less")
    weak = Comparison.from_differences("b", [-0.01, -0.03, 0.004, -0.02, -0.005, -0.025], 0.001, "less")
    assert weak.verdict == "holds" and 0.025 < weak.p_value < 0.05
    family = Family.of([strong, weak, weak])
    assert family.verdicts == ["holds", "inconclusive", "inconclusive"]
    assert family.adjusted_p[1] == pytest.approx(2 * weak.p_value)
    small = Comparison(weak.name, weak.n, weak.effect, weak.ci_low, weak.ci_high, 0.1, weak.mde, "less")
    assert small.verdict == "refuted"                     # excludes 0, but inside ±margin: not relevant
    assert Family.of([strong, small, small]).verdicts == ["holds", "refuted", "refuted"]


def test_c6_decides_on_the_holm_verdicts_not_the_raw_ones():
    """Two communication-isolating comparisons whose raw 95 % intervals exclude 0 (p between α/2 and α)
    but whose Holm-level intervals do not: C6 is undecided, not "holds"."""
    weak = 0.563 * 0.004                       # ≈ 2.6 standard errors of the paired difference
    gini = {"moelora-code": 0.08 + weak, "moelora-code-scaled": 0.08 + weak, "moelora-input": 0.15,
            "switch": 0.15, "topk-entropy": 0.15, TALK: 0.08}
    tr = train_frame(gini=gini, tasks=("sentiment",))
    config = {**CONFIG, "margins": {**MARGINS["margins"], "c6_gini": 1e-4}}
    raw = [c for c, deciding in balance.compare_c6(balance.select_c6({"train": tr}), 1e-4) if deciding]
    assert len(raw) == 2 and all(c.verdict == "holds" and 0.025 < c.p_value < 0.05 for c in raw)
    claim = judge(claim_spec("C6"), {"train": tr}, None, config)
    assert claim.verdict == "inconclusive", claim.reason
    deciding = [c for c in claim.comparisons if "moelora-code" in c.name]
    assert all(c.conf == pytest.approx(0.975) and c.ci_high > 0 for c in deciding)


def test_c7_uses_only_matched_budgets_and_checks_counts():
    got, claim = verdict("C7", train=train_frame(acc={TALK: 0.82}), train_budget=budget_frame(0.02))
    assert "3 matched budgets" in claim.key_number
    text = "\n".join(claim.evidence)
    assert "✗" not in text and "| ✓ |" in text
    assert f"| {TALK} | 16 | {closed_form(TALK, 16):,} | {closed_form(TALK, 16):,} | ✓ |" in text
    assert "moelora-input" in text and "no (reported)" not in text.split("moelora-code")[0]
    bad = budget_frame(0.02)
    bad.loc[bad.metric == "trainable_parameters", "value"] += 1
    got, claim = verdict("C7", train=train_frame(acc={TALK: 0.82}), train_budget=bad)
    assert got == "inconclusive" and "≠ closed form" in claim.reason


def test_c7_a_five_percent_count_gap_is_not_a_matched_budget():
    """Budget 32 with LoRA at rank 34 (+5.2 %) and MoELoRA-code at rank 36 (+12.5 %): not matched, so only
    two matched budgets remain and C7 cannot hold, although every accuracy comparison would."""
    ranks_of = {("lora", 32): 34, ("moelora-code", 32): 36}
    budget = budget_frame(0.02, ranks_of=ranks_of)
    gap = closed_form("lora", 34) / closed_form(TALK, 32) - 1
    assert 0.04 < gap < 0.06
    cells = efficiency.c7_cells({"train": train_frame(acc={TALK: 0.82}), "train_budget": budget})
    rows = {(b["budget"], b["baseline"]): b for b in efficiency.compare_c7(cells, 0.01)}
    assert rows[(32, "lora")]["gap"] == pytest.approx(gap) and not rows[(32, "lora")]["matched"]
    assert not rows[(32, "moelora-code")]["decides"] and rows[(8, "lora")]["decides"]
    got, claim = verdict("C7", train=train_frame(acc={TALK: 0.82}), train_budget=budget)
    assert got == "inconclusive" and "only 2 matched budget(s)" in claim.reason
    assert "| sentiment | 32 | lora | 34 |" in "\n".join(claim.evidence)


def test_c9_reports_an_excluded_sgd_arm_with_its_router_movement():
    got, claim = verdict("C9", twins=twins_frame(loss_gap=-0.05, move={"adamw": 0.2, "sgd": 1e-3}))
    assert got == "holds"
    text = "\n".join(claim.evidence)
    assert "excluded (routers do not move)" in text and "0.001" in text
    assert all("sgd" not in c.name for c in claim.comparisons)


def test_c11_reports_head_only_and_scaled_control():
    claim = verdict("C11", train=train_frame(loss={TALK: 0.40}, acc={"head-only": 0.7}), lm=lm_frame({TALK: 2.9}))[1]
    text = "\n".join(claim.evidence)
    assert "head-only" in text and "0.7" in text
    names = [c.name for c in claim.comparisons]
    assert any("moelora-code-scaled" in n for n in names) and any(n.startswith("SmolLM2 math") for n in names)


# ----------------------------------------------------------------------------- F10
F10 = claims.figure_spec("F10")


def _rows(**frames):
    return [frames.get(e, pd.DataFrame()) for e in F10.experiments]


def test_f10_collects_every_comparison_of_the_claims():
    frames = dict(train=train_frame(gini=BETTER, loss={TALK: 0.40}), train_budget=budget_frame(0.02),
                  twins=twins_frame(loss_gap=-0.05), lm=lm_frame({TALK: 2.9}))
    data = F10.prepare(*_rows(**frames), config=CONFIG)
    assert {"C6", "C7", "C9", "C11"} <= set(data["claim"])
    c9 = judge(claim_spec("C9"), frames, None, CONFIG).comparisons
    assert data[data.claim == "C9"]["effect"].tolist() == pytest.approx([c.effect for c in c9])
    measured = data.dropna(subset=["effect"])            # claims whose rows are absent here get one note row
    assert (measured["ci_low"] <= measured["effect"]).all() and (measured["margin"] > 0).all()
    assert set(data.claim) - set(measured.claim) <= {"C5", "C12"}
    fig = forest.draw_f10(data)
    assert len(fig.axes) == len(set(data["claim"]))


def test_f10_draws_with_no_comparisons_and_needs_the_margins():
    data = F10.prepare(*_rows(), config=CONFIG)
    assert data.empty and "claim" in data
    assert forest.draw_f10(data).axes
    with pytest.raises(ValueError, match="declared margins"):
        F10.prepare(*_rows(), config={"train": CFG})


def test_f10_draws_the_claims_that_cite_it():
    cited = [c.id for c in claims.CLAIMS if "F10" in c.figures]
    assert F10.claims == tuple(cited) == ("C5", "C6", "C7", "C9", "C11", "C12")
    assert set(F10.experiments) == {e for c in claims.CLAIMS if c.id in cited for e in (*c.experiments, *c.optional)}
    assert "perturb_real" not in F10.experiments          # a profile without the supplementary sweep still draws it


def test_c6_counts_a_twin_run_once_when_train_and_twins_ran_the_same_experiment():
    """With the twins' AdamW arm at the training sweep's settings both experiments give the same per-seed
    Gini differences: the twin comparison enters the Holm family once and the evidence says so."""
    train = train_frame(gini=BETTER, tasks=("sentiment",))
    talk = train[(train.method == TALK) & (train.split == "val")]
    train = pd.concat([train, talk.assign(method="moelora-twin")], ignore_index=True)  # ΔGini vs twin: 0
    _, claim = verdict("C6", train=train, twins=twins_frame())                       # twins: ΔGini 0 too
    twin = [c.name for c in claim.comparisons if "moelora-twin" in c.name]
    assert twin == ["MiniLM sentiment: Gini TalkLoRA − moelora-twin (Δend − Δstep0)"]
    assert any("MiniLM sentiment twins/AdamW = MiniLM sentiment (moelora-twin)" in e for e in claim.evidence)
    # a twin run that differs (another task) is its own comparison
    _, claim = verdict("C6", train=train, twins=twins_frame(task="topic"))
    assert sum("moelora-twin" in c.name for c in claim.comparisons) == 2
