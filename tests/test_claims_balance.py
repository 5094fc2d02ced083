"""Verdict rules of C6, C7, C9 and C11 (analysis.topics.balance / twins / efficiency) as tables:
synthetic rows shaped like the ``train``, ``train_budget``, ``twins`` and ``lm`` experiments in ->
expected verdict; plus the Holm step, the step-0 correction and the F10 forest plot's data."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis.evidence import judge  # noqa: E402
from analysis.stats import Comparison  # noqa: E402
from analysis.topics import balance, claim_spec, efficiency  # noqa: E402
from analysis.train import closed_form_parameters, matched_rank  # noqa: E402

SEEDS = tuple(range(8))
TALK = "talklora-official"
CFG = dict(rank=16, num_experts=4, adapt_top_layers=1, targets=["query", "key", "value", "up", "down"])
CONFIG = {"train": CFG, "twins": {"lr_adamw": 3e-4, "lr_sgd": 3.0}}


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
                         dict(k, step=64, split="test", layer="all", metric="accuracy", value=ac),
                         dict(k, step=64, split="test", layer="all", metric="trainable_parameters",
                              value=closed_form_parameters(m, 16, 4, 1, CFG["targets"]))]
    return pd.DataFrame(rows)


def budget_frame(acc_gain=0.02, ranks=(8, 32), sd=0.004):
    """``train_budget`` rows: TalkLoRA at rank r, LoRA / MoELoRA-code at their matched ranks."""
    rows = []
    for r in ranks:
        for m in ("lora", "moelora-code", TALK):
            rank = r if m == TALK else matched_rank(m, r, CFG)[0]
            for s in SEEDS:
                k = dict(task="sentiment", budget=r, method=m, seed=s, step=64, split="test", layer="all",
                         domain="all", rank=rank)
                a = 0.8 + (acc_gain + noise(s, sd) if m == TALK else 0.0)
                rows += [dict(k, metric="accuracy", value=a), dict(k, metric="loss", value=0.5),
                         dict(k, metric="trainable_parameters",
                              value=closed_form_parameters(m, rank, 4, 1, CFG["targets"]))]
    return pd.DataFrame(rows)


def twins_frame(loss_gap=0.0, acc_gap=0.0, move=None, sd=0.004, task="sentiment"):
    """``twins`` rows per optimiser: val Gini (steps 0 / 64), test loss / accuracy, router movement."""
    move = move or {"adamw": 0.2, "sgd": 0.02}
    rows = []
    for opt, mv in move.items():
        for s in SEEDS:
            for model in ("talklora", "moelora-twin"):
                k = dict(task=task, optimizer=opt, seed=s, model=model)
                talk = model == "talklora"
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
    comps = balance.c6_comparisons({"train": tr}, efficiency.margins({}))
    code = next(c for c, iso in comps if iso and c.name.startswith("MiniLM sentiment") and c.name.endswith(
        "moelora-code (Δend − Δstep0)"))
    assert code.effect == pytest.approx((0.08 - 0.15) - (-0.02 - 0.05))
    claim = verdict("C6", train=tr)[1]
    assert "load entropy" in "\n".join(claim.evidence)


def test_c6_margins_come_from_the_config():
    tr = train_frame(gini={**BETTER, TALK: 0.15})
    assert verdict("C6", train=tr)[0] == "refuted"
    claim = judge(claim_spec("C6"), {"train": tr}, None, {**CONFIG, "margins": {"c6_gini": 1e-6}})
    assert claim.verdict == "inconclusive" and claim.comparisons[0].margin == 1e-6


def test_holm_turns_a_marginal_difference_inconclusive():
    strong = Comparison.from_differences("a", [-0.10, -0.11, -0.09, -0.10], 0.01, "less")
    weak = Comparison.from_differences("b", [-0.01, -0.03, 0.004, -0.02, -0.005, -0.025], 0.001, "less")
    assert weak.verdict == "holds" and 0.025 < weak.p_value < 0.05
    adj, v = efficiency.holm_verdicts([strong, weak, weak])
    assert v == ["holds", "inconclusive", "inconclusive"] and adj[1] == pytest.approx(2 * weak.p_value)
    small = Comparison(weak.name, weak.n, weak.effect, weak.ci_low, weak.ci_high, 0.1, weak.mde, "less")
    assert small.verdict == "refuted"                     # excludes 0, but inside ±margin: not relevant
    assert efficiency.holm_verdicts([strong, small, small])[1] == ["holds", "refuted", "refuted"]


def test_c7_uses_only_matched_budgets_and_checks_counts():
    got, claim = verdict("C7", train=train_frame(acc={TALK: 0.82}), train_budget=budget_frame(0.02))
    assert "3 matched budgets" in claim.key_number
    text = "\n".join(claim.evidence)
    assert "✗" not in text and "untied ✓" in text
    assert "moelora-input" in text and "no (reported)" not in text.split("moelora-code")[0]
    bad = budget_frame(0.02)
    bad.loc[bad.metric == "trainable_parameters", "value"] += 1
    assert verdict("C7", train=train_frame(acc={TALK: 0.82}), train_budget=bad)[0] == "inconclusive"


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
def _rows(**frames):
    return [frames.get(e, pd.DataFrame()) for e in efficiency.F10_EXPERIMENTS]


def test_f10_collects_every_comparison_of_the_claims():
    frames = dict(train=train_frame(gini=BETTER, loss={TALK: 0.40}), train_budget=budget_frame(0.02),
                  twins=twins_frame(loss_gap=-0.05), lm=lm_frame({TALK: 2.9}))
    data = efficiency.prepare_f10(*_rows(**frames))
    assert {"C6", "C7", "C9", "C11"} <= set(data["claim"])
    c9 = judge(claim_spec("C9"), frames, None, {}).comparisons
    assert data[data.claim == "C9"]["effect"].tolist() == pytest.approx([c.effect for c in c9])
    measured = data.dropna(subset=["effect"])            # claims whose rows are absent here get one note row
    assert (measured["ci_low"] <= measured["effect"]).all() and (measured["margin"] > 0).all()
    assert set(data.claim) - set(measured.claim) <= {"C5", "C12"}
    fig = efficiency.draw_f10(data)
    assert len(fig.axes) == len(set(data["claim"]))


def test_f10_draws_with_no_comparisons():
    data = efficiency.prepare_f10(*_rows())
    assert data.empty and "claim" in data
    assert efficiency.draw_f10(data).axes


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
