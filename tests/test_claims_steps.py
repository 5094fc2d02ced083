"""The verdict step of every claim on its own: a pure function of comparisons (or summary numbers) and
the declared margins — built here by hand, no rows, no pandas — one table of cases per claim (the
empirical claims' tables on rows are in test_claims_empirical.py)."""
from __future__ import annotations

import pytest

from analysis import claims as C
from analysis.claims import (amplification, balance, churn, efficiency, equivalence, init_norms, lipschitz,
                             outperforms, structures, topk, twins)
from analysis.stats import Comparison, Family


def cmp(name="x", lo=0.02, hi=0.04, margin=0.01, side="greater", n=8, **kw):
    return Comparison(name, n, (lo + hi) / 2, lo, hi, margin, 0.01, side, **kw)


HOLDS, REFUTED, OPEN = cmp(), cmp(lo=-0.005, hi=0.005), cmp(lo=-0.01, hi=0.04)
WRONG = cmp(lo=-0.05, hi=-0.02)                              # refuted, entirely on the wrong side
FAM = lambda *cs: Family.of(cs, holm=False)                  # noqa: E731
E = dict(rule="evidence", deciding=True, margin=0.01)
SUP, NONE, OPEN_E = cmp(**E), cmp(lo=-0.005, hi=0.005, **E), cmp(lo=-0.01, hi=0.04, **E)
BEYOND = cmp(lo=-0.05, hi=-0.02, **E)
NT = cmp(controls="failed: P1", **E)
NONINF = cmp(lo=-0.02, hi=0.005, side="less", rule="non-inferiority", deciding=True)
EMPIRICAL = {"C5": amplification.verdict_c5, "C6": balance.verdict_c6, "C9": twins.verdict_c9,
             "C11": outperforms.verdict_c11, "C12": churn.verdict_c12}


def test_every_claim_module_has_a_verdict_step_per_claim():
    for module in C.MODULES:
        for spec in module.CLAIMS:
            assert callable(getattr(module, f"verdict_{spec.id.lower()}")), spec.id


CASES = [
    # C1–C3: residual maxima per dtype against the tolerances
    ("C1", lambda: equivalence.verdict_c1({"float64": 1e-15, "float32": 1e-7}), "holds"),
    ("C1", lambda: equivalence.verdict_c1({"float64": 1e-9}), "refuted"),
    ("C1", lambda: equivalence.verdict_c1({}), "inconclusive"),
    ("C2", lambda: equivalence.verdict_c2({"float64": 1e-15}, {"float64": 1e-15}), "refuted"),
    ("C2", lambda: equivalence.verdict_c2({"float64": 1e-6}, {"float64": 1e-15}), "inconclusive"),
    ("C3", lambda: equivalence.verdict_c3({"float64": 1e-15}, {m: 0.5 for m in equivalence.C3_CENTRED},
                                    {m: 0.0 for m in equivalence.C3_ZERO}, 5), "holds"),
    ("C3", lambda: equivalence.verdict_c3({"float64": 1e-6}, {m: 0.5 for m in equivalence.C3_CENTRED},
                                    {m: 0.0 for m in equivalence.C3_ZERO}, 5), "refuted"),
    ("C3", lambda: equivalence.verdict_c3({"float64": 1e-15}, {m: 1e-4 for m in equivalence.C3_CENTRED},
                                    {m: 0.0 for m in equivalence.C3_ZERO}, 5), "inconclusive"),
    # C4: sandwich violations over the cells with a finite certified bound
    ("C4", lambda: lipschitz.verdict_c4(10, [], {"local": 0.9, "empirical": 0.8}), "holds"),
    ("C4", lambda: lipschitz.verdict_c4(10, ["synthetic: 1 cell"], {"local": 1.1, "empirical": 0.8}), "refuted"),
    ("C4", lambda: lipschitz.verdict_c4(0, [], {"local": 0.0, "empirical": 0.0}), "inconclusive"),
    # C8: above the declared share at some E / below it at every E
    ("C8", lambda: init_norms.verdict_c8(FAM(HOLDS, REFUTED), 0.01, {2: 0.5, 4: 0.005}), "holds"),
    ("C8", lambda: init_norms.verdict_c8(FAM(WRONG, WRONG), 0.01, {2: 0.005, 4: 0.005}), "refuted"),
    ("C8", lambda: init_norms.verdict_c8(FAM(OPEN, WRONG), 0.01, {2: 0.02, 4: 0.005}), "inconclusive"),
    # C10: both statistics' families
    ("C10", lambda: topk.verdict_c10({"max": FAM(HOLDS), "median": FAM(HOLDS, HOLDS)}), "holds"),
    ("C10", lambda: topk.verdict_c10({"max": FAM(HOLDS), "median": FAM(REFUTED)}), "refuted"),
    ("C10", lambda: topk.verdict_c10({"max": FAM(HOLDS), "median": FAM(OPEN)}), "inconclusive"),
    ("C10", lambda: topk.verdict_c10({"max": FAM(), "median": FAM()}), "inconclusive"),
    # the empirical claims (C5, C6, C9, C11, C12): docs/method.md §5.5 over their deciding comparisons
    *[(cid, lambda f=f: f([SUP, SUP], "none"), "supported") for cid, f in EMPIRICAL.items()],
    *[(cid, lambda f=f: f([SUP, BEYOND], "none"), "contradicted") for cid, f in EMPIRICAL.items()],
    *[(cid, lambda f=f: f([SUP, OPEN_E], "none"), "mixed") for cid, f in EMPIRICAL.items()],
    *[(cid, lambda f=f: f([NT], "none"), "not-testable") for cid, f in EMPIRICAL.items()],
    # C7: the counts first, then §5.5
    ("C7", lambda: efficiency.verdict_c7([SUP, SUP], [], "none"), "supported"),
    ("C7", lambda: efficiency.verdict_c7([SUP, SUP], ["lora at 24: measured 1 vs closed form 2"], "none"),
     "inconclusive"),
    ("C7", lambda: efficiency.verdict_c7([NONE, NONE], [], "none"), "no-relevant-effect"),
    ("C7", lambda: efficiency.verdict_c7([], [], "no setting"), "not-testable"),
    # C13: (b) the certified ratio, then (a) non-inferiority
    ("C13", lambda: structures.verdict_c13([NONINF], {"s": (0.99, 8)}, "none"), "supported"),
    ("C13", lambda: structures.verdict_c13([NONINF], {"s": (1.01, 8)}, "none"), "contradicted"),
    ("C13", lambda: structures.verdict_c13([NONINF], {"s": (0.99, 0)}, "none"), "inconclusive"),
    ("C13", lambda: structures.verdict_c13([], {}, "none"), "not-testable"),
]


@pytest.mark.parametrize("cid, case, expected", CASES, ids=[f"{c}-{i}-{e}" for i, (c, _, e) in enumerate(CASES)])
def test_verdict_step(cid, case, expected):
    verdict, reason = case()
    assert verdict == expected and reason


def test_every_claim_has_verdict_step_cases_deciding_both_ways():
    seen = {}
    for cid, _, expected in CASES:
        seen.setdefault(cid, set()).add(expected)
    assert set(seen) == set(C.CLAIM_IDS) and all(len(v) >= 2 for v in seen.values()), seen


def test_verdict_reasons_carry_the_numbers():
    assert "1.00e-09 > 1e-12" in equivalence.verdict_c1({"float64": 1e-9})[1]
    assert "measured 1 vs closed form 2" in efficiency.verdict_c7([SUP], ["lora at 24: measured 1 vs closed form 2"],
                                                                  "none")[1]
    verdict, reason = topk.verdict_c10({"max": FAM(HOLDS), "median": FAM(REFUTED)})
    assert "worst case (max over tokens): **holds**" in reason and reason.endswith("overall refuted")
    assert structures.verdict_c13([NONINF], {"s": (1.01, 8)}, "none")[1].startswith(
        "(b) largest certified ratio of a trained doubly-stochastic layer 1.01")
    assert balance.verdict_c6([NT], "because P1")[1] == "because P1"
