"""Verdict rules of the analytic smoothness claims C8 and C10 (analysis.claims.init_norms / topk) as tables:
small synthetic frames in -> expected verdict, each of holds / refuted / inconclusive; plus the comparison
rows they report (n, effect, interval, margin, MDE), the per-ε / per-statistic split of C10 and the synthetic
sweeps C5 reports (each talk cell paired with its own scale-matched control).  The empirical C5 and C12 are
judged on trained routers (tests/test_claims_empirical.py); the statistics helpers in tests/test_stats.py."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import prereg
from analysis import stats as S
from analysis.claims import claim_spec
from test_claims import PASS, failing, judge, synth_frame, talk_norms_frame

SEEDS = tuple(range(8))
REG = prereg.load()
C8_SHARE, C10_RELATIVE, AMPLIFICATION = (REG.margins[k] for k in ("c8_share", "c10_relative", "amplification_log"))
CFG = {}


def noise(seed, scale):
    """Deterministic per-seed noise with mean 0 over SEEDS and sd ≈ 0.6·scale (not constant)."""
    return scale * ((seed * 7919) % 8 - 3.5) / 4


# ----------------------------------------------------------------------------- frame builders
def controls_frame(syn: pd.DataFrame, ratios: dict, scale: float = 0.01) -> pd.DataFrame:
    """perturb_controls rows for ``syn``: ``ratios[control][talk]`` = quotient of talk / its control
    (per seed times exp(noise)); plus router_norm rows."""
    q = syn[syn.metric == "routing_quotient"]
    parts = []
    for ctrl, per_talk in ratios.items():
        r = q["talk"].map(per_talk).fillna(1.0) * np.exp(q["seed"].map(lambda s: noise(s, scale)))
        parts.append(q.assign(control=ctrl, value=q["value"] / r))
    norms = [dict(E=4, r=32, talk=t, seed=s, layer="layer", kind="router", eps=0.0, control=c, metric="router_norm",
                  statistic=st, value=1.0) for t in syn.talk.unique() for s in syn.seed.unique()
             for c in ("talk", *ratios) for st in ("spectral", "frobenius")]
    return pd.concat([*parts, pd.DataFrame(norms)], ignore_index=True)


def c5_data(spectral=0.8, frobenius=0.8, scale=0.01, seeds=SEEDS):
    syn = synth_frame({"official": 0.9, "uniform-mix:0.5": 0.6}, seeds=seeds)
    ratios = {"spectral": {"official": spectral, "uniform-mix:0.5": 0.95},
              "frobenius": {"official": frobenius, "uniform-mix:0.5": 1.0}}
    return dict(perturb_synthetic=syn, perturb_controls=controls_frame(syn, ratios, scale))


def routers_frame(rel: dict, scale: float = 0.01, seeds=SEEDS) -> pd.DataFrame:
    """perturb_routers rows: top-k quotient = dense · (1 + rel[statistic] + noise) per (kind, ε)."""
    rows = []
    for s in seeds:
        for router in ("dense", "top1", "top2"):
            k = dict(router=router, seed=s, layer="layer")
            for kind in ("gaussian_input", "adversarial"):
                for eps in (0.01, 0.1):
                    for stat, base in (("max", 0.2), ("median", 0.05)):
                        f = 1.0 if router == "dense" else 1 + rel[stat] + noise(s, scale)
                        rows.append(dict(k, kind=kind, eps=eps, metric="routing_quotient", statistic=stat,
                                         value=base * f))
                    rows.append(dict(k, kind=kind, eps=eps, metric="top1_flip_rate", statistic="mean", value=0.1 * eps))
            rows.append(dict(k, kind="lipschitz_code", eps=0.0, metric="certified_exists", statistic="value",
                             value=float(router == "dense")))
    return pd.DataFrame(rows)


def c8_frame(k_rises: int, n: int = 20000) -> pd.DataFrame:
    """talk_norms with only the per-E share rows (k of n draws where the bound rises)."""
    rows = []
    for E in (2, 4):
        rows += [dict(E=E, seed=0, draw=-1, metric="share_bound_rises", statistic="share", k=k_rises, n=n,
                      value=k_rises / n),
                 dict(E=E, seed=0, draw=-1, metric="share_talk_norm_gt_1", statistic="share", k=n // 2, n=n, value=0.5)]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- verdict tables
# (claim, frames, expected verdict); every case judged with CFG (the declared margins)
TABLE = [
    ("C8", lambda: dict(talk_norms=talk_norms_frame(p_ratio=0.2)), "holds"),
    ("C8", lambda: dict(talk_norms=c8_frame(2000)), "holds"),                 # 10 % of 20,000 draws
    ("C8", lambda: dict(talk_norms=c8_frame(40)), "refuted"),                 # 0.2 % < 1 %
    ("C8", lambda: dict(talk_norms=talk_norms_frame(p_ratio=0.0)), "refuted"),
    ("C8", lambda: dict(talk_norms=talk_norms_frame(p_ratio=0.01)), "inconclusive"),  # 10 of 1000: straddles 1 %
    ("C10", lambda: dict(perturb_routers=routers_frame({"max": 2.0, "median": 0.5})), "holds"),
    ("C10", lambda: dict(perturb_routers=routers_frame({"max": 2.0, "median": 0.0})), "refuted"),   # median: no effect
    ("C10", lambda: dict(perturb_routers=routers_frame({"max": 2.0, "median": -0.5})), "refuted"),  # median: top-k better
    ("C10", lambda: dict(perturb_routers=routers_frame({"max": 2.0, "median": 0.1}, scale=0.5)), "inconclusive"),
]


@pytest.mark.parametrize("cid, frames, expected", TABLE,
                         ids=[f"{c[0]}-{i}-{c[-1]}" for i, c in enumerate(TABLE)])
def test_verdict_table(cid, frames, expected):
    claim = judge(cid, PASS, CFG, None, **frames())
    assert claim.verdict == expected, claim.reason
    assert claim.rule == claim_spec(cid).rule
    assert claim.verdict != "holds under stated conditions"
    if cid != "C8":                                      # C8's comparisons are binomial, not paired
        assert claim.comparisons and all(c.n in (0, 1, len(SEEDS)) for c in claim.comparisons)


def test_every_smoothness_claim_reaches_each_verdict():
    seen = {}
    for cid, _, expected in TABLE:
        seen.setdefault(cid, set()).add(expected)
    assert all(v == {"holds", "refuted", "inconclusive"} for v in seen.values()), seen


def test_claim_verdict_follows_the_declared_combination():
    """C10: holds iff every comparison holds; refuted iff one is refuted (the rule text says so)."""
    for cid, frames, _ in TABLE:
        claim = judge(cid, PASS, CFG, None, **frames())
        if cid == "C8" or not claim.comparisons:
            continue
        assert claim.verdict == S.combine(c.verdict for c in claim.comparisons)
        assert "holds if every comparison holds" in claim.rule and "refuted if any" in claim.rule


def test_failed_backing_test_gates_c5_and_c10():
    nodeid = "tests/test_probes_amplification.py::test_fixed_block_and_talk_spreading"
    claim = judge("C5", failing(nodeid), CFG, None, **c5_data())
    assert claim.verdict == "inconclusive" and nodeid in claim.reason
    nodeid = "tests/test_properties.py::test_top_k_gates_sum_to_one"
    claim = judge("C10", failing(nodeid), CFG, None, perturb_routers=routers_frame({"max": 2.0, "median": 0.5}))
    assert claim.verdict == "inconclusive"


# ----------------------------------------------------------------------------- C5: the synthetic sweeps (reported)
def test_c5_pairs_each_synthetic_cell_with_its_own_control_and_only_reports_it():
    """Common random numbers: the per-seed effect is exactly log(talk / control) of the same cells; the
    synthetic comparisons never decide (no trained setting here: C5 is not testable)."""
    claim = judge("C5", PASS, CFG, None, **c5_data(0.8, 0.9))
    by = {c.name: c for c in claim.comparisons}
    spectral = by["synthetic: log(official / spectral-matched control)"]
    frob = by["synthetic: log(official / frobenius-matched control)"]
    expected = np.mean([math.log(0.8) + noise(s, 0.01) for s in SEEDS])
    assert spectral.effect == pytest.approx(expected) and frob.effect == pytest.approx(expected - math.log(0.8) + math.log(0.9))
    assert spectral.n == frob.n == len(SEEDS) and spectral.margin == AMPLIFICATION
    assert spectral.claimed_side == "less" and not spectral.deciding and spectral.conf == 0.95
    assert "synthetic: log(uniform-mix:0.5 / spectral-matched control)" in by
    assert claim.verdict == "not-testable"


# ----------------------------------------------------------------------------- C8, C10 details
def test_c8_uses_the_share_rows_and_reports_wilson_intervals():
    claim = judge("C8", PASS, CFG, None, talk_norms=c8_frame(2000))
    c = claim.comparisons[0]
    p, lo, hi = S.wilson(2000, 20000)
    assert c.n == 20000 and c.effect == pytest.approx(p - C8_SHARE)
    assert (c.ci_low, c.ci_high) == pytest.approx((lo - C8_SHARE, hi - C8_SHARE))
    assert "10.0 %" in claim.statement and "50.0 %" in claim.statement
    # titled and reported as two separate quantities, the verdict on the second
    assert "two separate quantities" in claim.paper_wording and "‖T‖₂ > 1" in claim.paper_wording
    assert "(1) P(‖T‖₂ > 1)" in "\n".join(claim.evidence) and "(2) P(bound rises)" in "\n".join(claim.evidence)


def test_c10_is_per_eps_and_statistic_without_averaging():
    claim = judge("C10", PASS, CFG, None, perturb_routers=routers_frame({"max": 2.0, "median": -0.5}))
    names = [c.name for c in claim.comparisons]
    assert len(names) == 2 * 2 * 2 * 2                  # router × kind × ε × statistic
    worst = [c for c in claim.comparisons if c.name.startswith("worst")]
    typical = [c for c in claim.comparisons if c.name.startswith("typical")]
    assert all(c.verdict == "holds" for c in worst) and all(c.verdict == "refuted" for c in typical)
    assert all(c.effect == pytest.approx(2.0) for c in worst)
    assert "worst case (max over tokens): **holds**" in claim.reason
    assert "typical token (median): **refuted**" in claim.reason
