"""Verdict rules of the smoothness claims C5, C8, C10, C12 (analysis.claims.amplification / init_norms /
topk / churn) as tables:
small synthetic frames in -> expected verdict, with data that gives each of holds / refuted /
inconclusive; plus the SPEC §5 comparison rows they report (n, effect, interval, margin, MDE), the
scale-matched control pairing of C5 and the per-ε / per-statistic split of C10.  (The statistics
helpers — Holm levels, ``Family``, ``combine`` — are tested in tests/test_stats.py.)"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import stats as S
from analysis.claims import claim_spec
from test_claims import PASS, failing, judge, synth_frame, talk_norms_frame

SEEDS = tuple(range(8))
MARGINS = dict(c5_ratio=0.05, c6_gini=0.02, c6_entropy=0.01, c7_accuracy=0.01, c8_share=0.05, c9_accuracy=0.01,
               c9_loss=0.02, c10_relative=0.05, c11_accuracy=0.005, c11_loss=0.02, c12_churn=0.01)
CFG = {"margins": MARGINS}


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


def c5_data(spectral=0.8, frobenius=0.8, scale=0.01, trained=None, seeds=SEEDS):
    syn = synth_frame({"official": 0.9, "uniform-mix:0.5": 0.6}, seeds=seeds)
    ratios = {"spectral": {"official": spectral, "uniform-mix:0.5": 0.95},
              "frobenius": {"official": frobenius, "uniform-mix:0.5": 1.0}}
    data = dict(perturb_synthetic=syn, perturb_controls=controls_frame(syn, ratios, scale))
    if trained is not None:
        rows = []
        for task, ratio in trained.items():
            for s in seeds:
                for m, q in (("talklora-official", 0.1 * ratio * math.exp(noise(s, 0.01))), ("moelora-code-scaled", 0.1)):
                    for kind in ("gaussian_input", "adversarial"):
                        rows.append(dict(task=task, method=m, seed=s, step=-1, split="test", layer="L5.query",
                                         domain="all", kind=kind, eps=0.1, statistic="median",
                                         metric="routing_quotient", value=q))
        data["train"] = pd.DataFrame(rows)
    return data


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


def lm_frame(diff: dict, scale: float = 0.002, seeds=SEEDS) -> pd.DataFrame:
    """lm rows: top1_churn (layer 'mean') 0.1 for the references (minus ``scaled_offset`` / ``twin_offset``
    for the scale-matched control / the twin), 0.1 + diff["moelora-code"] (+ noise) for TalkLoRA."""
    rows = []
    for s in seeds:
        for step in (4, 8):
            vals = {"moelora-code": 0.1, "moelora-code-scaled": 0.1 - diff.get("scaled_offset", 0.0),
                    "moelora-twin": 0.1 - diff.get("twin_offset", 0.0)}
            vals["talklora-official"] = 0.1 + diff["moelora-code"] + noise(s, scale)
            for m, v in vals.items():
                rows += [dict(method=m, seed=s, step=step, split="test", layer="mean", domain="all",
                              metric="top1_churn", value=v),
                         dict(method=m, seed=s, step=step, split="test", layer="L0.q_proj", domain="all",
                              metric="top1_churn", value=0.9)]          # per-layer rows: not re-counted
    return pd.DataFrame(rows)


def train_churn_frame(diff: float, scale: float = 0.002, seeds=SEEDS) -> pd.DataFrame:
    rows = []
    for task in ("sentiment", "topic"):
        for s in seeds:
            for m in ("talklora-official", "moelora-code", "moelora-code-scaled", "moelora-twin", "lora"):
                for layer in ("L5.query", "L5.up"):
                    v = 0.2 + (diff + noise(s, scale) if m == "talklora-official" else 0.0)
                    rows.append(dict(task=task, method=m, seed=s, step=10, split="probe", layer=layer, domain="all",
                                     metric="churn", value=v, budget=np.nan))
            rows.append(dict(task=task, method="talklora-official", seed=s, step=10, split="probe", layer="L5.query",
                             domain="all", metric="churn", value=0.9, budget=4.0))      # C7 budget cell: ignored
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
    ("C5", lambda: c5_data(0.8, 0.8), "holds"),                              # beats both controls
    ("C5", lambda: c5_data(0.8, 0.8, trained={"sentiment": 0.8, "topic": 0.85}), "holds"),
    ("C5", lambda: c5_data(0.8, 1.0), "refuted"),                            # Frobenius match: no effect
    ("C5", lambda: c5_data(1.2, 1.2), "refuted"),                            # communication amplifies
    ("C5", lambda: c5_data(0.8, 0.8, trained={"sentiment": 1.0}), "refuted"),  # trained: no effect
    ("C5", lambda: c5_data(0.97, 0.97, scale=0.2), "inconclusive"),          # too noisy to decide
    ("C5", lambda: c5_data(0.8, 0.8, seeds=(0,)), "inconclusive"),           # one seed: no interval
    ("C8", lambda: dict(talk_norms=talk_norms_frame(p_ratio=0.2)), "holds"),
    ("C8", lambda: dict(talk_norms=c8_frame(2000)), "holds"),                 # 10 % of 20,000 draws
    ("C8", lambda: dict(talk_norms=c8_frame(40)), "refuted"),                 # 0.2 % < 5 %
    ("C8", lambda: dict(talk_norms=talk_norms_frame(p_ratio=0.0)), "refuted"),
    ("C8", lambda: dict(talk_norms=talk_norms_frame(p_ratio=0.05)), "inconclusive"),  # 50 of 1000: straddles 5 %
    ("C10", lambda: dict(perturb_routers=routers_frame({"max": 2.0, "median": 0.5})), "holds"),
    ("C10", lambda: dict(perturb_routers=routers_frame({"max": 2.0, "median": 0.0})), "refuted"),   # median: no effect
    ("C10", lambda: dict(perturb_routers=routers_frame({"max": 2.0, "median": -0.5})), "refuted"),  # median: top-k better
    ("C10", lambda: dict(perturb_routers=routers_frame({"max": 2.0, "median": 0.1}, scale=0.5)), "inconclusive"),
    ("C12", lambda: dict(lm=lm_frame({"moelora-code": -0.05})), "holds"),
    ("C12", lambda: dict(lm=lm_frame({"moelora-code": -0.05}), train=train_churn_frame(-0.05)), "holds"),
    ("C12", lambda: dict(lm=lm_frame({"moelora-code": -0.05}), train=train_churn_frame(0.0)), "refuted"),
    ("C12", lambda: dict(lm=lm_frame({"moelora-code": -0.05, "scaled_offset": 0.05})), "refuted"),  # = scaled control
    ("C12", lambda: dict(lm=lm_frame({"moelora-code": -0.05, "twin_offset": 0.05})), "refuted"),    # = the twin
    ("C12", lambda: dict(lm=lm_frame({"moelora-code": 0.03})), "refuted"),   # TalkLoRA churns more
    ("C12", lambda: dict(lm=lm_frame({"moelora-code": -0.01}, scale=0.05)), "inconclusive"),
    ("C12", lambda: dict(lm=lm_frame({"moelora-code": -0.05}, seeds=(0,))), "inconclusive"),
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
    """holds iff every comparison holds; refuted iff one is refuted (the rule text says so)."""
    for cid, frames, _ in TABLE:
        claim = judge(cid, PASS, CFG, None, **frames())
        if cid == "C8" or not claim.comparisons:
            continue
        assert claim.verdict == S.combine(c.verdict for c in claim.comparisons)
        assert "holds if every comparison holds" in claim.rule and "refuted if any" in claim.rule


def test_missing_margin_is_a_clear_error():
    with pytest.raises(KeyError, match=r"margin 'c5_ratio' is not declared.*\[margins\]"):
        judge("C5", PASS, {}, None, **c5_data())
    with pytest.raises(ValueError, match=r"margins.c12_churn must be > 0"):
        judge("C12", PASS, {"margins": {"c12_churn": 0}}, None, lm=lm_frame({"moelora-code": -0.05}))


def test_failed_backing_test_gates_c5_and_c10():
    nodeid = "tests/test_probes_amplification.py::test_fixed_block_and_talk_spreading"
    claim = judge("C5", failing(nodeid), CFG, None, **c5_data())
    assert claim.verdict == "inconclusive" and nodeid in claim.reason
    nodeid = "tests/test_properties.py::test_top_k_gates_sum_to_one"
    claim = judge("C10", failing(nodeid), CFG, None, perturb_routers=routers_frame({"max": 2.0, "median": 0.5}))
    assert claim.verdict == "inconclusive"


# ----------------------------------------------------------------------------- C5: the control pairing
def test_c5_pairs_each_cell_with_its_own_control():
    """Common random numbers: the per-seed effect is exactly log(talk / control) of the same cells."""
    data = c5_data(0.8, 0.9)
    claim = judge("C5", PASS, CFG, None, **data)
    by = {c.name.split(",")[0]: c for c in claim.comparisons}
    spectral, frob = by["log(official / spectral-matched control)"], by["log(official / frobenius-matched control)"]
    expected = np.mean([math.log(0.8) + noise(s, 0.01) for s in SEEDS])
    assert spectral.effect == pytest.approx(expected) and frob.effect == pytest.approx(expected - math.log(0.8) + math.log(0.9))
    assert spectral.n == frob.n == len(SEEDS) and spectral.margin == MARGINS["c5_ratio"]
    assert spectral.claimed_side == "less" and math.isfinite(spectral.mde)
    # Holm over 2 comparisons: the smaller p-value gets a 97.5 % interval, the other 95 %
    assert sorted(c.conf for c in claim.comparisons) == pytest.approx([0.95, 0.975])
    assert "×0.8" in claim.key_number


def test_c5_uses_the_scaled_control_not_plain_moelora_when_trained():
    data = c5_data(0.8, 0.8, trained={"sentiment": 0.8})
    data["train"] = pd.concat([data["train"], data["train"].query("method == 'moelora-code-scaled'")
                               .assign(method="moelora-code", value=0.02)])   # plain MoELoRA: 4× smaller
    claim = judge("C5", PASS, CFG, None, **data)
    trained = [c for c in claim.comparisons if "trained" in c.name]
    assert len(trained) == 1 and trained[0].effect == pytest.approx(math.log(0.8), abs=0.01)
    assert claim.verdict == "holds"


def test_c5_uniform_mix_is_reported_not_judged():
    data = c5_data(0.8, 0.8)
    data["perturb_controls"] = controls_frame(data["perturb_synthetic"], {
        "spectral": {"official": 0.8, "uniform-mix:0.5": 1.5}, "frobenius": {"official": 0.8, "uniform-mix:0.5": 1.5}})
    claim = judge("C5", PASS, CFG, None, **data)
    assert claim.verdict == "holds" and all("uniform-mix" not in c.name for c in claim.comparisons)
    assert "log(uniform-mix:0.5 / spectral-matched control)" in "\n".join(claim.evidence)


# ----------------------------------------------------------------------------- C8, C10, C12 details
def test_c8_uses_the_share_rows_and_reports_wilson_intervals():
    claim = judge("C8", PASS, CFG, None, talk_norms=c8_frame(2000))
    c = claim.comparisons[0]
    p, lo, hi = S.wilson(2000, 20000)
    assert c.n == 20000 and c.effect == pytest.approx(p - 0.05)
    assert (c.ci_low, c.ci_high) == pytest.approx((lo - 0.05, hi - 0.05))
    assert "10.0 %" in claim.statement and "50.0 %" in claim.statement


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


def test_c12_compares_with_every_reference_per_source():
    claim = judge("C12", PASS, CFG, None, lm=lm_frame({"moelora-code": -0.05}), train=train_churn_frame(-0.04))
    names = sorted(c.name for c in claim.comparisons)
    assert len(names) == 9 and any("train: topic" in n for n in names) and any("lm (SmolLM2)" in n for n in names)
    assert sum(n.endswith("TalkLoRA − moelora-twin") for n in names) == 3
    lm = next(c for c in claim.comparisons if c.name == "lm (SmolLM2): churn TalkLoRA − moelora-code")
    assert lm.effect == pytest.approx(-0.05) and lm.n == len(SEEDS) and lm.claimed_side == "less"
    sent = next(c for c in claim.comparisons if c.name == "train: sentiment: churn TalkLoRA − moelora-code-scaled")
    assert sent.effect == pytest.approx(-0.04)           # the budget cell's 0.9 is not counted
    assert 0.95 <= min(c.conf for c in claim.comparisons) and max(c.conf for c in claim.comparisons) == pytest.approx(
        1 - 0.05 / 9)


def test_c12_names_references_without_rows():
    lm = lm_frame({"moelora-code": -0.05})
    claim = judge("C12", PASS, CFG, None, lm=lm[lm.method != "moelora-twin"])
    assert len(claim.comparisons) == 2
    assert any("lm (SmolLM2): moelora-twin" in e for e in claim.evidence)
