"""How an empirical claim is decided (analysis.claims.decide, docs/method.md §5.4–§5.5): the claim's verdict
from hand-built comparisons (one table, every outcome reachable), Holm over the deciding comparisons of the
testable settings only, and the per-example (McNemar) path for accuracy differences without seed variance."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis import stats as S
from analysis.claims import decide as D


def cmp(lo, hi, margin=0.01, side="greater", deciding=True, controls="passed", rule="evidence", mde=0.005, name="x"):
    return S.Comparison(name, 8, (lo + hi) / 2, lo, hi, margin, mde, side, rule=rule, controls=controls,
                        deciding=deciding, setting="s")


SUP = cmp(0.02, 0.05)                          # supported
LOW = cmp(0.002, 0.008)                        # supported-below-relevance
NONE = cmp(-0.005, 0.008)                      # no-relevant-effect
CIN = cmp(-0.008, -0.002)                      # contradicted inside ±margin
CBEYOND = cmp(-0.05, -0.002)                   # contradicted, interval beyond the margin
OPEN = cmp(-0.005, 0.03)                       # inconclusive
NT = cmp(0.02, 0.05, controls="failed: P1")    # not testable
REPORTED_CONTRA = cmp(-0.05, -0.02, deciding=False)

CLAIM_TABLE = [
    ([SUP, SUP], "supported"),
    ([SUP, SUP, NT], "supported"),                         # a not-testable setting never counts
    ([SUP, SUP, REPORTED_CONTRA], "supported"),            # nor does a reported comparison
    ([SUP, CBEYOND], "contradicted"),                      # any contradicted beyond the margin
    ([CBEYOND, OPEN], "contradicted"),
    ([NONE, LOW, CIN], "no-relevant-effect"),              # every one smaller than the margin
    ([NONE, NONE], "no-relevant-effect"),
    ([LOW, LOW], "supported-below-relevance"),             # the sub-case where every one is below relevance
    ([SUP, OPEN], "mixed"),
    ([SUP, LOW], "mixed"),                                 # below relevance is not "supported"
    ([SUP, CIN], "mixed"),
    ([NT, NT], "not-testable"),
    ([], "not-testable"),
    ([REPORTED_CONTRA], "not-testable"),                   # no deciding comparison at all
    ([OPEN, NONE], "inconclusive"),
    ([OPEN], "inconclusive"),
]


@pytest.mark.parametrize("comps, expected", CLAIM_TABLE, ids=[f"{i}-{e}" for i, (_, e) in enumerate(CLAIM_TABLE)])
def test_claim_verdict_table(comps, expected):
    verdict, reason = D.claim_verdict(comps, "why not")
    assert verdict == expected and reason
    if expected == "not-testable":
        assert reason == "why not"


def test_every_claim_verdict_is_reachable():
    assert {e for _, e in CLAIM_TABLE} == set(S.CLAIM_VERDICTS)


def test_mixed_and_contradicted_name_the_comparisons():
    a, b = cmp(0.02, 0.05, name="A"), cmp(-0.005, 0.03, name="B")
    verdict, reason = D.claim_verdict([a, b])
    assert verdict == "mixed" and "supported: A" in reason and "B (inconclusive)" in reason
    verdict, reason = D.claim_verdict([a, cmp(-0.05, -0.02, name="C")])
    assert verdict == "contradicted" and "C" in reason and "margin 0.01" in reason


def test_noninferiority_contradicted_is_beyond_the_margin():
    worse = cmp(0.011, 0.03, rule="non-inferiority")
    ok = cmp(-0.02, 0.009, rule="non-inferiority")
    assert (worse.verdict, ok.verdict) == ("contradicted", "supported")
    assert D.beyond_margin(worse) and D.claim_verdict([ok, worse])[0] == "contradicted"
    assert D.claim_verdict([ok, ok])[0] == "supported"


# ----------------------------------------------------------------------------- Holm over the testable deciding family
def paired(name, d, deciding=True, controls="passed", margin=0.05, side="greater", **kw):
    return D.Paired(name, tuple(d), margin, side, "s", controls, deciding, **kw)


def test_holm_runs_over_the_testable_deciding_comparisons_only():
    strong = [0.10, 0.12, 0.09, 0.11, 0.10, 0.13, 0.12, 0.10]
    weak = [0.02, 0.05, -0.01, 0.04, 0.03, 0.00, 0.06, 0.01]
    items = [paired("a", strong), paired("b", weak), paired("reported", strong, deciding=False),
             paired("untestable", strong, controls="failed: P2"), paired("empty", [])]
    a, b, rep, nt, empty = D.judge_family(items)
    # two comparisons in the family: the smaller p-value at 1 − 0.05/2, the other at 0.95 (or the stopping level)
    assert a.conf == pytest.approx(0.975) and b.conf in (pytest.approx(0.95), pytest.approx(0.975))
    assert rep.conf == nt.conf == 0.95 and empty.conf == 0.95
    assert nt.verdict == "not-testable" and not rep.deciding and empty.verdict == "inconclusive" and empty.n == 0
    plain = S.Comparison.from_differences("a", strong, 0.05, rule="evidence", conf=0.975)
    assert (a.ci_low, a.ci_high, a.mde) == pytest.approx((plain.ci_low, plain.ci_high, plain.mde))
    # the not-testable comparison does not widen the others: the same family without it
    again = D.judge_family(items[:2])
    assert (again[0].conf, again[1].conf) == (a.conf, b.conf)


def test_p4_failure_reports_the_seeds_needed_at_the_holm_level():
    noisy = [0.02, -0.03, 0.01, -0.02, 0.03, -0.01, 0.0, 0.01]
    (c,) = D.judge_family([paired("noisy", noisy, margin=0.01)])
    sd = float(np.std(noisy, ddof=1))
    assert not c.power_met and c.n_needed == S.n_needed(sd, 0.01, conf=c.conf)
    assert c.verdict == "inconclusive"        # inside ±margin would need P4 for no-relevant-effect


def test_accuracy_without_seed_variance_is_judged_per_example():
    same = [0.0] * 8
    (c,) = D.judge_family([paired("acc", same, margin=0.01, discordant=(60, 20, 8000))])
    m = S.mcnemar(60, 20, 8000)
    assert c.test == "exact McNemar" and (c.effect, c.ci_low, c.ci_high) == pytest.approx(
        (m["effect"], m["ci_low"], m["ci_high"]))
    assert c.verdict == "supported-below-relevance"        # 0.005 [0.0027, 0.0075] inside ±0.01
    (t,) = D.judge_family([paired("acc", same, margin=0.01)])   # no per-example rows: a zero-width t-interval
    assert t.test == "paired t" and t.verdict == "inconclusive"
    (v,) = D.judge_family([paired("acc", [0.01, 0.0] * 4, margin=0.01, discordant=(60, 20, 8000))])
    assert v.test == "paired t"                            # seed-level variance > 0: the t-interval


def test_pair_needs_both_methods():
    import pandas as pd
    wide = pd.DataFrame({"t": [1.0, 2.0], "b": [0.5, 1.0]})
    p = D.pair("x", wide, "t", "b", 0.1, "greater", setting="s", controls="passed", deciding=True)
    assert p.differences == (0.5, 1.0)
    # a deciding comparison whose method did not run stays in the claim, inconclusive; a reported one is dropped
    missing = D.pair("x", wide, "t", "missing", 0.1, "greater", setting="s", controls="passed", deciding=True)
    assert missing.name == "x (not run)" and missing.differences == () and missing.deciding
    assert D.pair("x", wide, "missing", "b", 0.1, "greater", setting="s", controls="passed",
                  deciding=True).differences == ()
    assert D.pair("x", wide, "t", "missing", 0.1, "greater", setting="s", controls="passed", deciding=False) is None
    (c,) = D.judge_family([missing])
    assert math.isnan(c.effect) and c.n == 0 and c.verdict == "inconclusive"
    assert D.claim_verdict([c, cmp(0.02, 0.05)])[0] == "mixed"
