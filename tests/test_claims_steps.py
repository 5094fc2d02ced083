"""The verdict step of every claim on its own: a pure function of comparisons (or summary numbers) and
the declared margins — built here by hand, no rows, no pandas — one table of cases per claim."""
from __future__ import annotations

import pytest

from analysis import claims as C
from analysis.claims import (amplification, balance, churn, efficiency, equivalence, init_norms, lipschitz,
                             outperforms, topk, twins)
from analysis.stats import Comparison, Family


def cmp(name="x", lo=0.02, hi=0.04, margin=0.01, side="greater", n=8):
    return Comparison(name, n, (lo + hi) / 2, lo, hi, margin, 0.01, side)


HOLDS, REFUTED, OPEN = cmp(), cmp(lo=-0.005, hi=0.005), cmp(lo=-0.01, hi=0.04)
WRONG = cmp(lo=-0.05, hi=-0.02)                              # refuted, entirely on the wrong side
FAM = lambda *cs: Family.of(cs, holm=False)                  # noqa: E731


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
    # C5: both synthetic controls present, then every comparison
    ("C5", lambda: amplification.verdict_c5(FAM(cmp("a, synthetic", side="less", lo=-0.04, hi=-0.02),
                                          cmp("b, synthetic", side="less", lo=-0.04, hi=-0.02))), "holds"),
    ("C5", lambda: amplification.verdict_c5(FAM(cmp("a, synthetic", side="less", lo=-0.04, hi=-0.02),
                                          cmp("b, synthetic", side="less", lo=-0.005, hi=0.005))), "refuted"),
    ("C5", lambda: amplification.verdict_c5(FAM(cmp("a, synthetic", side="less", lo=-0.04, hi=-0.02))), "inconclusive"),
    # C6: only the deciding comparisons count
    ("C6", lambda: balance.verdict_c6(FAM(HOLDS, REFUTED), [True, False]), "holds"),
    ("C6", lambda: balance.verdict_c6(FAM(HOLDS, REFUTED), [True, True]), "refuted"),
    ("C6", lambda: balance.verdict_c6(FAM(HOLDS, OPEN), [True, True]), "inconclusive"),
    ("C6", lambda: balance.verdict_c6(FAM(HOLDS), [False]), "inconclusive"),
    # C7: counts first, then refutation, then the number of matched budgets
    ("C7", lambda: efficiency.verdict_c7([HOLDS] * 6, 3, [], []), "holds"),
    ("C7", lambda: efficiency.verdict_c7([HOLDS] * 4, 2, [], []), "inconclusive"),
    ("C7", lambda: efficiency.verdict_c7([HOLDS, REFUTED], 1, [], []), "refuted"),
    ("C7", lambda: efficiency.verdict_c7([HOLDS] * 6, 3, ["lora r=16: measured 1 ≠ closed form 2"], []), "inconclusive"),
    ("C7", lambda: efficiency.verdict_c7([HOLDS] * 6, 3, [], ["lora r=16"]), "inconclusive"),
    ("C7", lambda: efficiency.verdict_c7([HOLDS, OPEN], 3, [], []), "inconclusive"),
    # C8: above the declared share at some E / below it at every E
    ("C8", lambda: init_norms.verdict_c8(FAM(HOLDS, REFUTED), 0.01, {2: 0.5, 4: 0.005}), "holds"),
    ("C8", lambda: init_norms.verdict_c8(FAM(WRONG, WRONG), 0.01, {2: 0.005, 4: 0.005}), "refuted"),
    ("C8", lambda: init_norms.verdict_c8(FAM(OPEN, WRONG), 0.01, {2: 0.02, 4: 0.005}), "inconclusive"),
    # C9: cells of the arms whose routers move
    ("C9", lambda: twins.verdict_c9({"adamw": twins.c9_cell(HOLDS, OPEN)}), "holds"),
    ("C9", lambda: twins.verdict_c9({"adamw": twins.c9_cell(HOLDS, WRONG)}), "inconclusive"),   # one metric on the wrong side
    ("C9", lambda: twins.verdict_c9({"adamw": twins.c9_cell(REFUTED, REFUTED)}), "refuted"),
    ("C9", lambda: twins.verdict_c9({}), "inconclusive"),
    # C10: both statistics' families
    ("C10", lambda: topk.verdict_c10({"max": FAM(HOLDS), "median": FAM(HOLDS, HOLDS)}), "holds"),
    ("C10", lambda: topk.verdict_c10({"max": FAM(HOLDS), "median": FAM(REFUTED)}), "refuted"),
    ("C10", lambda: topk.verdict_c10({"max": FAM(HOLDS), "median": FAM(OPEN)}), "inconclusive"),
    ("C10", lambda: topk.verdict_c10({"max": FAM(), "median": FAM()}), "inconclusive"),
    # C11: every task × model × baseline cell
    ("C11", lambda: outperforms.verdict_c11({("a", "lora"): outperforms.c11_cell(cmp(side="less", lo=-0.04, hi=-0.02), HOLDS)}),
     "holds"),
    ("C11", lambda: outperforms.verdict_c11({("a", "lora"): outperforms.c11_cell(cmp(side="less", lo=-0.04, hi=-0.02),
                                                                          cmp(lo=-0.04, hi=-0.01))}), "refuted"),
    ("C11", lambda: outperforms.verdict_c11({("a", "lora"): outperforms.c11_cell(cmp(side="less", lo=-0.04, hi=0.02), None)}),
     "inconclusive"),
    # C12: one Holm family
    ("C12", lambda: churn.verdict_c12(FAM(HOLDS, HOLDS)), "holds"),
    ("C12", lambda: churn.verdict_c12(FAM(HOLDS, REFUTED)), "refuted"),
    ("C12", lambda: churn.verdict_c12(FAM()), "inconclusive"),
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
    assert "only 2 matched budget(s)" in efficiency.verdict_c7([HOLDS] * 4, 2, [], [])[1]
    verdict, reason = topk.verdict_c10({"max": FAM(HOLDS), "median": FAM(REFUTED)})
    assert "worst case (max over tokens): **holds**" in reason and reason.endswith("overall refuted")
    assert balance.verdict_c6(FAM(HOLDS), [True])[1].endswith("(1 comparisons)")
