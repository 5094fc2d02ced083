"""analysis.stats: intervals, binomial intervals, Holm (the Family of a claim's comparisons), MDE, the
seeds P4 needs, exact McNemar, and the verdict rules of one comparison (docs/method.md §5.4): the
analytic rule (holds / refuted / inconclusive) and the empirical vocabulary, each outcome reachable."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis import stats as S


# ----------------------------------------------------------------------------- t-intervals
@pytest.mark.parametrize("df, expected", [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (30, 2.0422725),
                                          (31, 2.0395134), (60, 2.0002978), (1000, 1.9623391)])
def test_t_quantile_matches_reference_values(df, expected):
    # above 30 degrees of freedom the old hand-written tables disagreed (Cornish–Fisher vs 1.96 + 2.4/df)
    assert S.t_quantile(df) == pytest.approx(expected, abs=1e-6)


def test_t_quantile_rejects_bad_conf_and_has_no_value_below_one_df():
    assert math.isnan(S.t_quantile(0))
    with pytest.raises(ValueError, match="conf"):
        S.t_quantile(3, conf=1.5)


def test_estimate_t_interval_and_text():
    e = S.estimate([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.n == 3
    assert e.hi - e.mean == pytest.approx(4.3026527 / math.sqrt(3))
    assert e.text() == "2 [-0.484, 4.48] (n = 3 seeds)"
    one = S.estimate([5.0, math.nan])
    assert one.n == 1 and math.isnan(one.lo)
    assert "no interval" in one.text() and S.estimate([]).text() == "n/a (no data)"


def test_estimate_on_the_log_scale_is_a_geometric_mean():
    r = S.estimate([0.25, 1.0, 4.0], log=True)
    assert r.mean == pytest.approx(1.0)
    half = 4.3026527 * math.log(4) / math.sqrt(3)
    assert (r.lo, r.hi) == pytest.approx((math.exp(-half), math.exp(half)))


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=30))
def test_interval_contains_the_mean_and_matches_scipy(values):
    from scipy import stats
    mean, lo, hi, n = S.t_interval(values)
    assert n == len(values) and lo <= mean + 1e-9 and mean - 1e-9 <= hi
    v = np.asarray(values)
    if v.std(ddof=1) > 1e-9:
        ref = stats.t.interval(0.95, n - 1, loc=v.mean(), scale=stats.sem(v))
        assert (lo, hi) == pytest.approx(ref, rel=1e-9, abs=1e-9)


# ----------------------------------------------------------------------------- binomial
@pytest.mark.parametrize("k, n", [(0, 100), (50, 100), (3, 20), (20, 20)])
def test_wilson_matches_the_closed_form(k, n):
    z = 1.959963984540054
    p, lo, hi = S.wilson(k, n)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert p == k / n
    assert lo == pytest.approx(0.0 if k == 0 else centre - half, abs=1e-12)
    assert hi == pytest.approx(1.0 if k == n else centre + half, abs=1e-12)


def test_wilson_edges():
    assert all(math.isnan(x) for x in S.wilson(0, 0))
    with pytest.raises(ValueError, match="k must be"):
        S.wilson(5, 4)


# ----------------------------------------------------------------------------- multiple comparisons
def test_holm_step_down():
    adj = S.holm([0.01, 0.04, 0.03, 0.2])
    # sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08 -> running max 0.09, 0.2
    assert adj == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert S.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="pvalues"):
        S.holm([0.1, 1.5])


def test_mde_shrinks_with_n_and_matches_the_formula():
    from scipy import stats
    assert S.mde(1.0, 10) == pytest.approx((stats.t.ppf(0.975, 9) + stats.t.ppf(0.8, 9)) / math.sqrt(10))
    assert S.mde(1.0, 40) < S.mde(1.0, 10)
    assert math.isnan(S.mde(1.0, 1))


# ----------------------------------------------------------------------------- the verdict rule (docs/method.md §5)
VERDICT_RULE = [
    # ci_low, ci_high, margin, claimed side -> verdict
    (0.02, 0.05, 0.01, "greater", "holds"),            # entirely on the claimed side
    (-0.05, -0.02, 0.01, "greater", "refuted"),        # entirely on the wrong side
    (-0.005, 0.008, 0.01, "greater", "refuted"),       # entirely inside ±margin: no relevant effect
    (0.002, 0.008, 0.01, "greater", "refuted"),        # excludes 0 but inside ±margin: still not relevant
    (0.002, 0.012, 0.01, "greater", "holds"),          # on the claimed side and leaves the margin
    (-0.005, 0.03, 0.01, "greater", "inconclusive"),   # straddles 0 and leaves the margin
    (0.0, 0.03, 0.01, "greater", "inconclusive"),      # touches 0: not entirely on the side
    (-0.05, -0.02, 0.01, "less", "holds"),
    (0.02, 0.05, 0.01, "less", "refuted"),
    (-0.03, 0.005, 0.01, "less", "inconclusive"),
    (math.nan, math.nan, 0.01, "greater", "inconclusive"),   # no interval (one seed)
    (-0.005, 0.008, 0.0, "greater", "inconclusive"),   # no margin: only the sign decides
]


@pytest.mark.parametrize("lo, hi, margin, side, expected", VERDICT_RULE)
def test_verdict_from_interval(lo, hi, margin, side, expected):
    assert S.verdict_from_interval(lo, hi, margin, side) == expected
    c = S.Comparison("x", 5, (lo + hi) / 2, lo, hi, margin, mde=0.01, claimed_side=side)
    assert c.verdict == expected


def test_comparison_from_paired_differences():
    c = S.Comparison.from_differences("talk − code", [0.03, 0.05, 0.04, math.nan], margin=0.01)
    half = 4.3026527 * 0.01 / math.sqrt(3)
    assert (c.n, c.effect) == (3, pytest.approx(0.04))
    assert (c.ci_low, c.ci_high) == pytest.approx((0.04 - half, 0.04 + half))
    assert c.mde == pytest.approx(S.mde(0.01, 3)) and c.verdict == "holds"
    assert c.row()[-1] == "holds" and c.row()[4] == "±0.01"
    one = S.Comparison.from_differences("x", [0.5], margin=0.01, claimed_side="less")
    assert one.n == 1 and math.isnan(one.mde) and one.verdict == "inconclusive"


def test_verdict_from_interval_rejects_bad_arguments():
    with pytest.raises(ValueError, match="claimed_side"):
        S.verdict_from_interval(0.1, 0.2, 0.01, "up")
    with pytest.raises(ValueError, match="margin"):
        S.verdict_from_interval(0.1, 0.2, -1, "greater")
    with pytest.raises(ValueError, match="ci_low"):
        S.verdict_from_interval(0.2, 0.1, 0.01, "greater")


@pytest.mark.parametrize("x, text", [(0, "0"), (1234.0, "1,234"), (1.234e-14, "1.23e-14"), (0.12345, "0.123"),
                                     (math.nan, "n/a")])
def test_fmt(x, text):
    assert S.fmt(x) == text


# ----------------------------------------------------------------------------- stats helpers
def test_p_value_matches_scipy_and_degenerate_cases():
    from scipy import stats as sps
    d = [0.1, 0.3, -0.05, 0.2]
    assert S.p_value(d) == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue)
    assert S.p_value([0.0, 0.0]) == 1.0 and S.p_value([0.2, 0.2]) == 0.0 and math.isnan(S.p_value([1.0]))


def test_holm_levels_and_combine():
    assert S.holm_levels([0.01, 0.04, 0.02]) == pytest.approx([1 - 0.05 / 3, 0.95, 1 - 0.05 / 2])
    # step-down stops at 0.03 (> 0.05/2): the larger 0.04 keeps that step's level, not 0.95
    assert S.holm_levels([0.01, 0.04, 0.03]) == pytest.approx([1 - 0.05 / 3, 1 - 0.05 / 2, 1 - 0.05 / 2])
    assert S.holm_levels([math.nan, 0.01]) == pytest.approx([0.95, 0.975])
    assert S.combine(["holds", "holds"]) == "holds"
    assert S.combine(["holds", "inconclusive", "refuted"]) == "refuted"
    assert S.combine(["holds", "inconclusive"]) == "inconclusive" and S.combine([]) == "inconclusive"


def test_family_decides_by_the_declared_combination():
    good = S.Comparison.from_differences("a", [0.10, 0.11, 0.12], 0.01)
    none = S.Comparison.from_differences("b", [0.001, -0.001, 0.0], 0.01)
    open_ = S.Comparison.from_differences("c", [0.1, -0.1, 0.05], 0.01)
    assert (good.verdict, none.verdict, open_.verdict) == ("holds", "refuted", "inconclusive")
    plain = lambda *cs: S.Family.of(cs, holm=False)           # noqa: E731
    assert plain(good, good).decide() == ("holds", "all 2 comparisons hold")
    verdict, reason = plain(good, open_, none).decide()
    assert verdict == "refuted" and reason.startswith("refuted by b ")
    verdict, reason = plain(good, open_).decide()
    assert verdict == "inconclusive" and reason.startswith("1 of 2 comparisons undecided") and reason.endswith(": c")
    assert S.Family.of([]).decide() == ("inconclusive", "no comparisons") and S.Family.of([]).adjusted_p == []


def test_family_of_differences_computes_each_comparison_at_its_holm_level():
    d = [0.1, 0.12, 0.08, 0.11]
    fam = S.Family.of_differences([("x", d, 0.01, "greater"), ("y", [0.2, 0.21, 0.19, 0.2], 0.01, "greater")])
    plain = S.Comparison.from_differences("x", d, 0.01)
    x, y = fam.comparisons
    assert x.ci_high - x.ci_low >= plain.ci_high - plain.ci_low
    assert x.effect == pytest.approx(plain.effect) and {x.conf, y.conf} == {0.95, 0.975}
    assert "(97.5 %)" in " ".join(" ".join(c.row()) for c in fam)
    at = next(c for c in fam if c.conf == 0.975)
    assert at.mde == pytest.approx(S.mde(float(np.std(d if at.name == "x" else [0.2, 0.21, 0.19, 0.2], ddof=1)), 4,
                                         conf=0.975))
    assert S.Family.of_differences([("x", d, 0.01, "greater")], holm=False).comparisons[0] == plain


def test_family_of_relevels_comparisons_and_keeps_their_mde():
    """``Family.of`` re-levels intervals already computed at 95 % (the MDE stays at 95 %); the adjusted p-values
    are Holm's of the comparisons' own p-values, which match scipy's paired t-test."""
    from scipy import stats as sps
    a = S.Comparison.from_differences("a", [0.10, 0.12, 0.08, 0.11], 0.01)
    b = S.Comparison.from_differences("b", [0.02, -0.01, 0.03, 0.01], 0.01)
    assert a.p_value == pytest.approx(sps.ttest_1samp([0.10, 0.12, 0.08, 0.11], 0.0).pvalue)
    fam = S.Family.of([a, b])
    first = fam.comparisons[0]
    assert first.conf == pytest.approx(0.975) and first.mde == a.mde and first.effect == a.effect
    half = (a.ci_high - a.ci_low) / 2 * S.t_quantile(3, 0.975) / S.t_quantile(3)
    assert (first.ci_low, first.ci_high) == pytest.approx((a.effect - half, a.effect + half))
    assert fam.adjusted_p == pytest.approx(S.holm([a.p_value, b.p_value]).tolist())
    assert fam.verdicts == [c.verdict for c in fam.comparisons] and len(fam) == 2
    assert S.Family.of([a, b], holm=False).comparisons == (a, b)


# ----------------------------------------------------------------------------- the empirical vocabulary (docs/method.md §5.4)
EVIDENCE_RULE = [
    # ci_low, ci_high, margin, claimed side, P4 met -> verdict
    (0.02, 0.05, 0.01, "greater", True, "supported"),                    # claimed side, leaves the margin
    (0.002, 0.012, 0.01, "greater", True, "supported"),                  # reaching beyond the margin suffices
    (0.002, 0.008, 0.01, "greater", True, "supported-below-relevance"),  # claimed side, inside ±margin
    (-0.005, 0.008, 0.01, "greater", True, "no-relevant-effect"),        # holds 0, inside ±margin, powered
    (-0.005, 0.008, 0.01, "greater", False, "inconclusive"),             # ... without power: not evidence of none
    (-0.05, -0.02, 0.01, "greater", True, "contradicted"),               # wrong side
    (-0.008, -0.002, 0.01, "greater", True, "contradicted"),             # wrong side inside ±margin: still contradicted
    (-0.005, 0.03, 0.01, "greater", True, "inconclusive"),               # holds 0, leaves the margin
    (0.0, 0.03, 0.01, "greater", True, "inconclusive"),                  # touches 0
    (-0.05, -0.02, 0.01, "less", True, "supported"),                     # the same rule mirrored
    (-0.008, -0.002, 0.01, "less", True, "supported-below-relevance"),
    (0.02, 0.05, 0.01, "less", True, "contradicted"),
    (math.nan, math.nan, 0.01, "greater", True, "inconclusive"),         # no interval (one seed)
    (-0.005, 0.008, math.nan, "greater", True, "inconclusive"),          # no margin
]


@pytest.mark.parametrize("lo, hi, margin, side, power, expected", EVIDENCE_RULE)
def test_evidence_verdict(lo, hi, margin, side, power, expected):
    assert S.evidence_verdict(lo, hi, margin, side, power) == expected
    mde = 0.005 if power else 0.02
    c = S.Comparison("x", 8, (lo + hi) / 2, lo, hi, margin, mde, side, rule="evidence")
    assert c.verdict == expected
    assert S.Comparison("x", 8, (lo + hi) / 2, lo, hi, margin, mde, side, rule="evidence",
                        controls="failed: P1").verdict == "not-testable"


def test_every_empirical_verdict_is_reachable_and_symmetric():
    assert {e for *_, e in EVIDENCE_RULE} | {"not-testable"} == set(S.COMPARISON_VERDICTS)
    for lo, hi, margin, _, power, expected in EVIDENCE_RULE[:9]:
        if math.isfinite(lo):          # the mirror image on the other side gives the same verdict
            assert S.evidence_verdict(-hi, -lo, margin, "less", power) == expected


@pytest.mark.parametrize("lo, hi, expected", [(-0.05, 0.009, "supported"), (0.011, 0.03, "contradicted"),
                                              (-0.01, 0.02, "inconclusive"), (math.nan, math.nan, "inconclusive")])
def test_noninferiority_verdict(lo, hi, expected):
    assert S.noninferiority_verdict(lo, hi, 0.01) == expected
    c = S.Comparison("ds − full", 8, 0.0, lo, hi, 0.01, 0.005, "less", rule="non-inferiority")
    assert c.verdict == expected and c.null == 0.01


def test_a_zero_width_interval_is_never_evidence():
    c = S.Comparison.from_differences("acc", [0.0] * 8, 0.01, "greater", rule="evidence")
    assert (c.ci_low, c.ci_high, c.mde) == (0.0, 0.0, 0.0) and c.degenerate and c.verdict == "inconclusive"
    assert S.Comparison.from_differences("acc", [0.0] * 8, 0.01, "greater").verdict == "refuted"   # analytic rule


@given(st.floats(0.001, 1.0), st.floats(0.0005, 0.5))
def test_n_needed_is_the_smallest_n_that_reaches_the_margin(sd, margin):
    n = S.n_needed(sd, margin)
    if n is None:
        assert S.mde(sd, S.N_NEEDED_MAX, 0.95) > margin * 0.99
        return
    assert S.mde(sd, n) <= margin
    assert n == 2 or S.mde(sd, n - 1) > margin


def test_n_needed_at_a_holm_level_and_degenerate_inputs():
    assert S.n_needed(0.01, 0.01, conf=0.99) > S.n_needed(0.01, 0.01)
    assert S.n_needed(math.nan, 0.01) is None and S.n_needed(0.0, 0.01) == 2
    c = S.Comparison.from_differences("x", [0.01, -0.01, 0.02, -0.02], 0.001, rule="evidence")
    assert not c.power_met and c.n_needed == S.n_needed(float(np.std([0.01, -0.01, 0.02, -0.02], ddof=1)), 0.001)
    assert S.Comparison.from_differences("x", [0.01, -0.01, 0.02, -0.02], 0.001).n_needed is None   # analytic


def test_mcnemar_matches_scipy_and_its_interval_contains_the_effect():
    from scipy import stats as sps
    m = S.mcnemar(30, 10, 1000)
    assert m["effect"] == pytest.approx(0.02) and m["p"] == pytest.approx(sps.binomtest(30, 40, 0.5).pvalue)
    ci = sps.binomtest(30, 40).proportion_ci(0.95, method="exact")
    assert (m["ci_low"], m["ci_high"]) == pytest.approx((0.04 * (2 * ci.low - 1), 0.04 * (2 * ci.high - 1)))
    assert m["ci_low"] < m["effect"] < m["ci_high"] and m["ci_low"] > 0
    none = S.mcnemar(0, 0, 800)             # no discordant pair: ± the exact upper bound of the discordance rate
    upper = sps.binomtest(0, 800).proportion_ci(0.95, method="exact").high
    assert (none["ci_low"], none["ci_high"], none["p"]) == pytest.approx((-upper, upper, 1.0))
    assert S.mcnemar(30, 10, 1000, conf=0.99)["ci_low"] < m["ci_low"]
    with pytest.raises(ValueError, match=r"b \+ c <= total"):
        S.mcnemar(5, 6, 10)


def test_comparison_rejects_unknown_rule_and_test():
    with pytest.raises(ValueError, match="rule"):
        S.Comparison("x", 2, 0, 0, 0, 0.1, 0.1, rule="bayes")
    with pytest.raises(ValueError, match="test"):
        S.Comparison("x", 2, 0, 0, 0, 0.1, 0.1, test="wilcoxon")
