"""Verdict rules of the empirical claims (C5, C6, C7, C9, C11, C12, C13) as tables: hand-built rows of a
setting (tests/claims_frames.py: evaluation sweep, tuning sweep, budget cells) in -> the claim's verdict,
every outcome of docs/method.md §5.5 reachable for each claim; plus what the rules must never do
(count a not-testable setting, average kinds, treat a zero-width interval as proof)."""
from __future__ import annotations

import pytest

from analysis import claims as C
from analysis.claims.base import judge
from claims_frames import setting

REF, TWIN, SCALED, CENTRED, CODE, LORA, DS = ("talklora-official", "moelora-twin", "moelora-code-scaled",
                                               "moelora-code-centred", "moelora-code", "lora",
                                               "talklora-doubly-stochastic")
BASE = {"head-only": {"loss": 1.0}, LORA: {"loss": 0.6}, CODE: {"loss": 0.55}, REF: {"loss": 0.45},
        TWIN: {"loss": 0.5}, SCALED: {"loss": 0.5}, CENTRED: {"loss": 0.5}}


def planted(sd=0.01, budgets=None, **over):
    means = {m: dict(v) for m, v in BASE.items()}
    for m, v in over.items():
        if v is None:
            means.pop(m, None)
        else:
            means.setdefault(m, {}).update(v)
    return setting("planted", means, sd=sd, budgets=budgets)


def verdict(cid, data):
    return judge(C.claim_spec(cid), data).verdict


ALL = (LORA, CODE, REF, TWIN, SCALED, CENTRED)
flat = {m: {"loss": 0.99} for m in ALL}                  # no adaptation: P1 fails everywhere
noisy = dict(sd=0.3)


def budgets(ref=0.40, other=0.55, ranks=("24", "32"), closed=None, lora=None):
    per = {REF: {"loss": ref, "params": 1000}, LORA: {"loss": other if lora is None else lora, "params": 1010},
           CODE: {"loss": other, "params": 990, **({"closed": closed} if closed else {})}}
    return {r: per for r in ranks}


def with_lm(data, sd=0.003, **lm_means):
    """``data`` plus a SmolLM2 setting (frozen base loss 1.0) with ``lm_means`` over the defaults."""
    means = {"base": {"loss": 1.0}, **{m: dict(v) for m, v in BASE.items() if m != "head-only"}}
    for m, v in lm_means.items():
        means.setdefault(m, {}).update(v)
    return {**data, **setting("lm", means, sd=sd)}


PARAMS = {LORA: {"params": 1010}, CODE: {"params": 990}, REF: {"params": 1000}}

CASES = [
    # C11: LoRA and MoELoRA-code; "consistently" = supported in every testable setting
    ("C11", planted(**{REF: {"loss": 0.40}}), "supported"),
    ("C11", planted(**{REF: {"loss": 0.70}}), "contradicted"),
    ("C11", planted(sd=0.001, **{REF: {"loss": 0.45}, LORA: {"loss": 0.45}, CODE: {"loss": 0.45}}), "no-relevant-effect"),
    ("C11", planted(sd=0.001, **{REF: {"loss": 0.45}, LORA: {"loss": 0.47}, CODE: {"loss": 0.47}}),
     "supported-below-relevance"),
    ("C11", planted(**{REF: {"loss": 0.40}, CODE: {"loss": 0.40}}), "mixed"),
    ("C11", planted(**flat), "not-testable"),
    ("C11", planted(**noisy, **{REF: {"loss": 0.45}, CODE: {"loss": 0.47}, LORA: {"loss": 0.47}}), "inconclusive"),
    # the other outcomes each rule can reach
    ("C6", planted(sd=0.001, **{REF: {"gini": 0.28}}), "supported-below-relevance"),
    ("C12", planted(**{REF: {"churn": 0.02}, SCALED: {"churn": 0.02}}), "mixed"),
    ("C12", planted(sd=0.001, **{REF: {"churn": 0.09}}), "supported-below-relevance"),
    ("C5", planted(sd=0.001, **{REF: {"quotient": 0.95}}), "supported-below-relevance"),
    ("C9", with_lm(planted(**{REF: {"loss": 0.40}}), **{REF: {"loss": 0.45}, TWIN: {"loss": 0.45}}), "mixed"),
    ("C9", planted(sd=0.001, **{REF: {"loss": 0.48}, TWIN: {"loss": 0.50}}), "supported-below-relevance"),
    ("C7", planted(sd=0.001, budgets=budgets(0.5, 0.5), **{REF: {"loss": 0.5}, LORA: {"loss": 0.5, "params": 1010},
                                                            CODE: {"loss": 0.5, "params": 990}}), "no-relevant-effect"),
    ("C7", planted(sd=0.001, budgets=budgets(0.48, 0.5), **{REF: {"loss": 0.48}, LORA: {"loss": 0.5, "params": 1010},
                                                             CODE: {"loss": 0.5, "params": 990}}),
     "supported-below-relevance"),
    ("C7", planted(budgets=budgets(0.40, 0.55, lora=0.40), **{REF: {"loss": 0.40}, LORA: {"loss": 0.40, "params": 1010},
                                                              CODE: {"params": 990}}), "mixed"),
    ("C13", with_lm(planted(**{DS: {"loss": 0.45, "ratio": 0.9}}), sd=0.3, **{DS: {"loss": 0.47, "ratio": 0.9}}),
     "mixed"),
    # C6: Gini difference-in-differences against the twin and the scale-matched control (P2 needed)
    ("C6", planted(**{REF: {"gini": 0.1}}), "supported"),
    ("C6", planted(**{REF: {"gini": 0.6}}), "contradicted"),
    ("C6", planted(sd=0.001), "no-relevant-effect"),
    ("C6", planted(**{REF: {"gini": 0.1}, SCALED: {"gini": 0.1}}), "mixed"),
    ("C6", planted(**{REF: {"gini": 0.1}, TWIN: {"entropy": 0.95}}), "not-testable"),
    ("C6", planted(**noisy, **{REF: {"gini": 0.25}}), "inconclusive"),
    # C12: decided-token churn against the twin and the scale-matched control
    ("C12", planted(**{REF: {"churn": 0.02}}), "supported"),
    ("C12", planted(**{REF: {"churn": 0.3}}), "contradicted"),
    ("C12", planted(sd=0.001), "no-relevant-effect"),
    ("C12", planted(**{REF: {"entropy": 0.99}}), "not-testable"),
    ("C12", planted(**noisy, **{REF: {"churn": 0.08}}), "inconclusive"),
    # C5: per kind, against the twin and the centred-map-matched control
    ("C5", planted(**{REF: {"quotient": 0.5}}), "supported"),
    ("C5", planted(**{REF: {"quotient": 2.0}}), "contradicted"),
    ("C5", planted(sd=0.001), "no-relevant-effect"),
    ("C5", planted(**{REF: {"quotient": 0.5}, CENTRED: {"quotient": 0.5}}), "mixed"),
    ("C5", planted(**flat), "not-testable"),
    ("C5", planted(**noisy, **{REF: {"quotient": 0.9}}), "inconclusive"),
    # C9: against the twin, P3 (the twins diverge) required
    ("C9", planted(**{REF: {"loss": 0.40}}), "supported"),
    ("C9", planted(**{REF: {"loss": 0.60}}), "contradicted"),
    ("C9", planted(sd=0.003, **{REF: {"loss": 0.45}, TWIN: {"loss": 0.45}}), "no-relevant-effect"),
    ("C9", planted(sd=0.0, **{REF: {"loss": 0.45}, TWIN: {"loss": 0.45}}), "not-testable"),      # P3: identical twins
    ("C9", planted(**noisy, **{REF: {"loss": 0.47}, TWIN: {"loss": 0.48}}), "inconclusive"),
    # C7: matched budgets (main sweep + two budget cells = three), counts checked
    ("C7", planted(budgets=budgets(), **{REF: {"loss": 0.40, "params": 1000}, LORA: {"params": 1010},
                                         CODE: {"params": 990}}), "supported"),
    ("C7", planted(budgets=budgets(0.7, 0.45), **{REF: {"loss": 0.70}, **PARAMS}), "contradicted"),
    ("C7", planted(budgets=budgets(ranks=("24",)), **{REF: {"loss": 0.40}, **PARAMS}), "not-testable"),   # 2 budgets
    ("C7", planted(budgets=budgets(closed=777), **{REF: {"loss": 0.40}, **PARAMS}), "inconclusive"),      # counts
    ("C7", planted(**noisy, budgets=budgets(0.47, 0.48), **{REF: {"loss": 0.47}, LORA: {"loss": 0.48, "params": 1010},
                                                           CODE: {"loss": 0.48, "params": 990}}), "inconclusive"),
    # C13: doubly stochastic vs full T: non-inferior loss and certified ratio ≤ 1
    ("C13", planted(**{DS: {"loss": 0.45, "ratio": 0.9}}), "supported"),
    ("C13", planted(**{DS: {"loss": 0.45, "ratio": 1.1}}), "contradicted"),
    ("C13", planted(**{DS: {"loss": 0.60, "ratio": 0.9}}), "contradicted"),
    ("C13", planted(), "not-testable"),
    ("C13", planted(**{DS: {"loss": 0.45, "ratio": 0.9, "entropy": 0.97}}), "not-testable"),
    ("C13", planted(**noisy, **{DS: {"loss": 0.47, "ratio": 0.9}}), "inconclusive"),
]


@pytest.mark.parametrize("cid, data, expected", CASES, ids=[f"{c}-{i}-{e}" for i, (c, _, e) in enumerate(CASES)])
def test_verdict_table(cid, data, expected):
    claim = judge(C.claim_spec(cid), data)
    assert claim.verdict == expected, claim.reason
    assert claim.controls and claim.reason


def test_every_empirical_claim_reaches_every_outcome_its_rule_can_give():
    """All seven for the claims judged by docs/method.md §5.5; C13's non-inferiority comparisons are only
    supported, contradicted or inconclusive, so it cannot give no-relevant-effect or below-relevance."""
    seen = {}
    for cid, _, expected in CASES:
        seen.setdefault(cid, set()).add(expected)
    assert set(seen) == {c.id for c in C.CLAIMS if c.kind == "empirical"}
    everything = {"supported", "supported-below-relevance", "no-relevant-effect", "contradicted", "mixed",
                  "inconclusive", "not-testable"}
    for cid, verdicts in seen.items():
        expected = everything - ({"no-relevant-effect", "supported-below-relevance"} if cid == "C13" else set())
        assert verdicts == expected, (cid, expected - verdicts)


def test_a_not_testable_setting_never_counts():
    data = {**planted(**{REF: {"loss": 0.40}}),
            **setting("lm", {"base": {"loss": 1.0}, **{m: {"loss": 0.99} for m in ALL}})}
    claim = judge(C.claim_spec("C11"), data)
    assert claim.verdict == "supported" and "not testable in smollm2-lm (failed: P1)" in claim.reason
    lm = [c for c in claim.comparisons if c.setting == "smollm2-lm"]
    assert lm and all(c.verdict == "not-testable" for c in lm) and all(c.conf == 0.95 for c in lm)
    planted_ = [c for c in claim.comparisons if c.setting == "planted-teacher" and c.deciding]
    # Holm over the testable setting's two comparisons only (with the LM's two it would start at 1 − 0.05/4)
    assert sorted(c.conf for c in planted_) == pytest.approx([0.95, 0.975])


def test_verdicts_name_their_setting_with_its_wording():
    claim = judge(C.claim_spec("C11"), planted(**{REF: {"loss": 0.40}}))
    assert "judged in planted teacher, one linear layer, 100 steps" in claim.reason
    assert "planted teacher, one linear layer, 100 steps" in "\n".join(claim.evidence)


def test_c5_never_averages_perturbation_kinds():
    claim = judge(C.claim_spec("C5"), planted(**{REF: {"quotient": 0.5}}))
    deciding = [c for c in claim.comparisons if c.deciding]
    assert len(deciding) == 3 * 2                     # three kinds × (twin, centred), each its own comparison
    assert {c.name.split(", ")[1] for c in deciding} == {"gaussian_input", "gaussian_block", "adversarial"}
    assert any(not c.deciding and "Scale-matched" in c.name or "scale-matched" in c.name for c in claim.comparisons)


def test_a_deciding_method_that_did_not_run_keeps_the_claim_from_being_supported():
    claim = judge(C.claim_spec("C6"), planted(**{REF: {"gini": 0.1}, SCALED: None}))
    missing = [c for c in claim.comparisons if c.name.endswith("(not run)")]
    assert claim.verdict == "mixed" and len(missing) == 1 and "scale-matched" in missing[0].name
    assert missing[0].verdict == "inconclusive" and missing[0].n == 0


def test_c6_removes_the_step0_gap():
    # TalkLoRA starts 0.2 below the others and ends 0.2 below: no effect of training
    data = planted(sd=0.001, **{REF: {"gini0": -0.1, "gini": 0.1}})
    claim = judge(C.claim_spec("C6"), data)
    assert claim.verdict == "no-relevant-effect"
    assert all(abs(c.effect) < 0.01 for c in claim.comparisons if c.deciding)


def test_c9_accuracy_without_seed_variance_uses_mcnemar():
    means = {"head-only": {"loss": 1.2, "accuracy": 0.5}, REF: {"loss": 0.5, "accuracy": 0.8},
             TWIN: {"loss": 0.6, "accuracy": 0.8}, CODE: {"loss": 0.6}}
    data = setting("train", means, examples={REF: 0.8, TWIN: 0.8})
    data["train"].loc[data["train"]["metric"] == "accuracy", "value"] = 0.8    # identical accuracy in every seed
    claim = judge(C.claim_spec("C9"), data)
    acc = next(c for c in claim.comparisons if "accuracy" in c.name)
    assert acc.test == "exact McNemar" and acc.n == 8 and acc.ci_low < 0 < acc.ci_high


def test_no_relevant_effect_only_with_power():
    claim = judge(C.claim_spec("C11"), planted(sd=0.001, **{REF: {"loss": 0.45}, LORA: {"loss": 0.45},
                                                             CODE: {"loss": 0.45}}))
    for c in claim.comparisons:
        assert c.verdict != "no-relevant-effect" or c.mde <= c.margin
    weak = judge(C.claim_spec("C11"), planted(sd=0.05, **{REF: {"loss": 0.45}, LORA: {"loss": 0.45},
                                                          CODE: {"loss": 0.45}}))
    lacking = [c for c in weak.comparisons if c.deciding and not c.power_met]
    assert lacking and all(c.verdict != "no-relevant-effect" and c.n_needed > 8 for c in lacking)


def test_c7_needs_three_matched_budgets_per_baseline():
    data = planted(budgets=budgets(ranks=("24",)), **{REF: {"loss": 0.40}, **PARAMS})
    claim = judge(C.claim_spec("C7"), data)
    assert "budgets" in claim.controls and claim.verdict == "not-testable"
    unmatched = planted(budgets=budgets(), **{REF: {"loss": 0.40}, LORA: {"params": 1500}, CODE: {"params": 990}})
    comps = judge(C.claim_spec("C7"), unmatched).comparisons
    assert not any(c.deciding for c in comps if "main sweep" in c.name and "LoRA" in c.name and "MoE" not in c.name)


def test_c13_reports_the_largest_certified_ratio():
    claim = judge(C.claim_spec("C13"), planted(**{DS: {"loss": 0.45, "ratio": 0.93}}))
    assert "max certified ratio 0.93" in claim.key_number and claim.verdict == "supported"
    assert all(c.rule == "non-inferiority" for c in claim.comparisons)


def test_an_empty_result_set_makes_every_empirical_claim_not_testable():
    for c in C.CLAIMS:
        if c.kind == "empirical":
            assert judge(c, {}).verdict == "not-testable", c.id
