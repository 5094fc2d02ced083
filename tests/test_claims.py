"""Verdict rules of every claim (declared in analysis.claims, judged by analysis.claims.base.judge) as tables:
small synthetic frames in -> expected verdict; plus the claims report (analysis.claims.run, analysis.report).
No experiments, no pytest subprocess."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import claims as C
from analysis import methods
from analysis import report as R
from analysis.claims import claim_spec
from analysis.claims.base import judge as _judge, tests_for
from talklora_min.budget import closed_form_parameters as budget_closed_form

SEEDS = (0, 1, 2, 3)
PASS = {"tests/test_properties.py::test_c1_identity_talk_equals_moelora_code[cfg0]": "passed",
        "tests/test_properties.py::test_c1_identity_talk_equals_moelora_code[cfg1]": "passed",
        "tests/test_properties.py::test_c2_talk_absorption_for_arbitrary_T": "passed",
        "tests/test_properties.py::test_c3_counterexample_is_not_representable[0]": "passed",
        "tests/test_probes_lipschitz.py::test_sandwich_ordering_on_random_layers[a]": "passed",
        "tests/test_probes_lipschitz.py::test_uniform_mix_column_norm[2-0.5]": "passed",
        "tests/test_inject.py::test_count_parameters_talklora_untied": "passed",
        "tests/test_probes_lipschitz.py::test_topk_router_has_no_certified_bound_but_local_constants_match_generic": "passed"}


MARGINS: dict = {}              # every margin comes from the preregistration (analytic) or the tuning runs


MINILM_DIMS = {"query": (384, 384), "key": (384, 384), "value": (384, 384), "up": (384, 1536), "down": (1536, 384)}


def closed_form(method: str, rank: int, num_experts: int = 4, layers: int = 1,
                targets=("query", "key", "value", "up", "down")) -> int:
    """The closed-form count the train cells record for ``method`` on MiniLM (no shared B; 0 without adapter)."""
    kw = methods.method(method).adapter_kwargs()
    if not kw:
        return 0
    shapes = [(t, *MINILM_DIMS[t]) for _ in range(layers) for t in targets]
    experts = 1 if kw["kind"] == "lora" else num_experts        # LoRA has no experts (any rank)
    return budget_closed_form(kw["kind"], rank, experts, shapes, router_input=kw.get("router_input", "code"))


def failing(nodeid):
    return {**PASS, nodeid: "failed"}


def jitter(seed, scale=0.01):
    return scale * ((seed * 7919) % 5 - 2) / 2      # deterministic, mean 0 over SEEDS, not constant


# ----------------------------------------------------------------------------- frame builders
def eq_frame(c1=1e-16, c2=2e-16, c3=3e-16, counter=0.7, c1_32=1e-8, centred=0.5, gap=0.3, shift=1e-16,
             with_centred=True):
    """equivalence rows; ``centred`` / ``gap``: the C3 centred row-space residual of a random input router
    and its output gap to the best code router (B ≠ 0); ``shift``: the shift-only centred residual (0 by
    construction)."""
    rows = []
    for i in range(5):
        for dtype, scale in (("float32", 1e8), ("float64", 1.0)):
            info = dict(seed=0, config=i, E=2 + i % 3, m=1 + i % 2, d_in=20, d_out=10, dtype=dtype)
            rows += [dict(info, metric="C1_identity_talk", value=c1_32 if dtype == "float32" else c1),
                     dict(info, metric="C2_absorption", value=c2 * scale),
                     dict(info, metric="C3_inclusion", value=c3 * scale)]
            if dtype == "float64":
                rows.append(dict(info, metric="C3_counterexample_rowspace_residual", value=counter + 0.01 * i))
                if with_centred:
                    cen = dict(info, centred=1)
                    rows += [dict(cen, metric=m, value=v) for m, v in (
                        ("C3_centred_residual_random_input_router", centred + 0.01 * i),
                        ("C3_centred_residual_reference", 0.6), ("C3_best_code_output_residual", gap + 0.01 * i),
                        ("C3_best_code_output_residual_B0", 0.0), ("C3_inclusion_centred_residual", 1e-15),
                        ("C3_shift_only_plain_residual", 0.4), ("C3_shift_only_centred_residual", shift),
                        ("C3_shift_only_gate_residual", 1e-16))]
    return pd.DataFrame(rows)


def synth_frame(ratios: dict, seeds=SEEDS, local=0.6, empirical=0.61, noise=0.01, norms=None, certified=1.0):
    """perturb_synthetic-like rows: identity quotient 0.1; talk setting t has quotient 0.1 * ratios[t]."""
    rows = []
    norms = norms or {}
    for s in seeds:
        for talk, ratio in {"identity": 1.0, **ratios}.items():
            key = dict(E=4, r=32, talk=talk, seed=s, layer="layer")
            for kind in ("gaussian_input", "adversarial", "gaussian_block"):
                for eps in (0.01, 0.1):
                    q = 0.1 * ratio * (1 + (jitter(s, noise) if talk != "identity" else 0))
                    for stat, f in (("median", 1.0), ("p95", 1.5), ("max", 2.0)):
                        rows.append(dict(key, kind=kind, eps=eps, metric="routing_quotient", statistic=stat, value=q * f))
            for wrt in ("code", "input"):
                rows += [dict(key, kind=f"lipschitz_{wrt}", eps=0.0, metric="lipschitz", statistic=st, value=v)
                         for st, v in (("certified", certified), ("local_max", local), ("empirical", empirical))]
            tn = norms.get(talk, 1.0 if talk != "official" else 0.9)
            rows.append(dict(key, kind="talk", eps=0.0, metric="talk_norm", statistic="value", value=tn))
    return pd.DataFrame(rows)


def train_frame(gini=None, acc=None, quotient=None, counts=None, seeds=SEEDS, gini0=None):
    gini = gini or {"moelora-code": 0.10, "moelora-input": 0.10, "talklora-official": 0.05}
    acc = acc or {"lora": 0.60, "moelora-code": 0.70, "moelora-input": 0.70, "talklora-official": 0.70}
    quotient = quotient or {"moelora-code": 0.1, "talklora-official": 0.05}
    cfg = dict(rank=16, num_experts=4, adapt_top_layers=2, targets=["query", "key", "value", "up", "down"])
    closed = {m: closed_form(m, cfg["rank"], cfg["num_experts"], cfg["adapt_top_layers"], cfg["targets"]) for m in acc}
    counts = counts or closed
    rows = []
    for s in seeds:
        for m in sorted(set(gini) | set(acc)):
            k = dict(method=m, seed=s)
            for step in (0, 100):
                rows.append(dict(k, step=step, split="val", layer="all", domain="all", metric="accuracy", value=0.5))
                if m in gini:
                    for layer in ("L5.query", "L5.up"):
                        g = gini[m] + jitter(s, 0.004) if step == 100 else (gini0 or {}).get(m, 0.08)
                        rows += [dict(k, step=step, split="val", layer=layer, domain="all", metric="gini", value=g),
                                 dict(k, step=step, split="val", layer=layer, domain="all", metric="load_entropy", value=1 - g)]
            rows.append(dict(k, step=100, split="test", layer="all", domain="all", metric="accuracy",
                             value=acc.get(m, 0.5) + (jitter(s, 0.004) if m.startswith("talk") else 0)))
            rows.append(dict(k, step=100, split="test", layer="all", domain="all", metric="trainable_parameters",
                             value=counts.get(m, 1)))
            rows.append(dict(k, step=100, split="test", layer="all", domain="all", metric="closed_form_parameters",
                             value=closed.get(m, 1)))
            if m in quotient:
                for layer in ("L5.query", "L5.up"):
                    for kind in ("gaussian_input", "adversarial"):
                        for eps in (0.01, 0.1):
                            q = quotient[m] * (1 + jitter(s, 0.02))
                            rows.append(dict(k, step=-1, split="test", layer=layer, domain="all", kind=kind, eps=eps,
                                             statistic="median", metric="routing_quotient", value=q))
                    rows += [dict(k, step=-1, split="test", layer=layer, domain="all", kind="lipschitz_input",
                                  statistic=st, metric="lipschitz", value=v)
                             for st, v in (("certified", 2.0), ("local_max", 1.0), ("empirical", 1.0))]
    return pd.DataFrame(rows), cfg


def talk_norms_frame(p_norm=0.2, p_ratio=0.05, draws=1000):
    rows = []
    for E in (2, 4):
        k_norm, k_ratio = int(p_norm * draws), int(p_ratio * draws)
        rows += [dict(E=E, seed=0, draw=i, metric="talk_norm", value=1.5 if i < k_norm else 0.5) for i in range(draws)]
        rows += [dict(E=E, seed=0, draw=i, metric="certified_ratio", value=1.2 if i < k_ratio else 0.6) for i in range(draws)]
    return pd.DataFrame(rows)


def twins_frame(diff: dict, seeds=SEEDS, divergence=0.5, noise=0.004, move=None):
    """Twin rows; ``diff[opt]``: TalkLoRA's test-accuracy gain over its twin (its test-loss gap is −diff);
    ``move[opt]``: the routers' relative movement (default 0.1: the arm enters C9)."""
    rows = []
    for opt, d in diff.items():
        for s in seeds:
            for model in ("talklora-official", "moelora-twin"):
                gain = d + jitter(s, noise) if model == "talklora-official" else 0.0
                k = dict(optimizer=opt, seed=s, step=50, model=model)
                rows += [dict(k, split="test", layer="all", metric="accuracy", value=0.6 + gain),
                         dict(k, split="test", layer="all", metric="loss", value=0.5 - gain),
                         dict(k, split="weights", layer="L5.query", metric="router_rel_change",
                              value=(move or {}).get(opt, 0.1))]
            k = dict(optimizer=opt, seed=s, layer="all", split="probe")
            for step in (0, 50):
                for model in ("talklora-official", "moelora-twin", "talklora-frozen-T", "talklora-identity-matched"):
                    a = 0.6 + (d + jitter(s, noise) if model == "talklora-official" and step == 50 else 0)
                    rows.append(dict(k, step=step, model=model, metric="accuracy", value=a))
                    dv = 0.0 if model == "talklora-official" or step == 0 else divergence
                    rows.append(dict(k, step=step, model=model, metric="logit_maxabs_diff", value=dv))
                    for layer in ("L5.query",):
                        rows += [dict(k, step=step, model=model, layer=layer, metric="lipschitz_certified", value=1.0),
                                 dict(k, step=step, model=model, layer=layer, metric="lipschitz_local_max", value=0.5)]
    return pd.DataFrame(rows)


def routers_frame(max_extra: dict, median_extra: dict, seeds=SEEDS):
    rows = []
    for s in seeds:
        for router in ("dense", "top1", "top2"):
            k = dict(router=router, seed=s, layer="layer")
            for kind in ("gaussian_input", "adversarial"):
                for eps in (0.01, 0.1):
                    mx = 0.1 + (max_extra.get(router, 0) + jitter(s, 0.02) if router != "dense" else 0)
                    md = 0.05 + (median_extra.get(router, 0) + jitter(s, 0.02) if router != "dense" else 0)
                    rows += [dict(k, kind=kind, eps=eps, metric="routing_quotient", statistic="max", value=mx),
                             dict(k, kind=kind, eps=eps, metric="routing_quotient", statistic="median", value=md),
                             dict(k, kind=kind, eps=eps, metric="total_variation", statistic="max", value=mx / 2),
                             dict(k, kind=kind, eps=eps, metric="top1_flip_rate", statistic="mean", value=0.1 * eps)]
                rows.append(dict(k, kind="gaussian_input", eps=eps, metric="topk_set_flip_rate", statistic="mean",
                                 value=0.0 if router == "dense" else 0.2))
            rows.append(dict(k, kind="lipschitz_code", eps=0.0, metric="certified_exists", statistic="value",
                             value=float(router == "dense")))
            rows.append(dict(k, kind="lipschitz_code", eps=0.0, metric="lipschitz", statistic="local_max", value=0.3))
            if router == "dense":
                rows.append(dict(k, kind="lipschitz_code", eps=0.0, metric="lipschitz", statistic="certified", value=0.5))
    return pd.DataFrame(rows)


def judge(cid, tests=None, config=None, verdicts=None, **data):
    """Judge claim ``cid`` on the experiment frames given by name (as `python -m analysis claims` does);
    ``config`` defaults to the declared margins alone."""
    return _judge(claim_spec(cid), data, tests, MARGINS if config is None else config, verdicts)


def c4_data(**kw):
    tr, _ = train_frame()
    return dict(perturb_synthetic=synth_frame({"official": 0.8}, **kw), perturb_routers=routers_frame({}, {}),
                train=tr, twins=twins_frame({"adamw": 0}))


# ----------------------------------------------------------------------------- verdict tables
# (claim, frames, backing-test outcomes, config, verdicts of other claims) -> expected verdict
VERDICT_TABLE = [
    ("C1", lambda: dict(equivalence=eq_frame()), PASS, None, None, "holds"),
    ("C1", lambda: dict(equivalence=eq_frame()), None, None, None, "holds"),          # tests not run: numeric rule
    ("C1", lambda: dict(equivalence=eq_frame(c1=1e-9)), PASS, None, None, "refuted"),
    ("C1", lambda: dict(equivalence=eq_frame(c1_32=1e-4)), PASS, None, None, "refuted"),
    ("C2", lambda: dict(equivalence=eq_frame()), PASS, None, {"C9": "inconclusive"}, "refuted"),
    ("C2", lambda: dict(equivalence=eq_frame(c2=1e-6)), PASS, None, None, "inconclusive"),
    ("C3", lambda: dict(equivalence=eq_frame()), PASS, None, None, "holds"),
    ("C3", lambda: dict(equivalence=eq_frame(c3=1e-6)), PASS, None, None, "refuted"),
    ("C3", lambda: dict(equivalence=eq_frame(counter=1e-6)), PASS, None, None, "holds"),     # uncentred: not judged
    ("C3", lambda: dict(equivalence=eq_frame(centred=1e-6)), PASS, None, None, "inconclusive"),
    ("C3", lambda: dict(equivalence=eq_frame(gap=1e-6)), PASS, None, None, "inconclusive"),  # same function
    ("C3", lambda: dict(equivalence=eq_frame(shift=1e-3)), PASS, None, None, "inconclusive"),  # centring suspect
    ("C3", lambda: dict(equivalence=eq_frame(with_centred=False)), PASS, None, None, "inconclusive"),
    ("C4", lambda: c4_data(), PASS, None, None, "holds"),
    ("C4", lambda: dict(perturb_synthetic=synth_frame({"official": 0.8}, empirical=1.001)), PASS, None, None, "refuted"),
    ("C4", lambda: dict(perturb_synthetic=synth_frame({"official": 0.8}, local=1 + 1e-12)), PASS, None, None,
     "holds"),                                                                          # within tolerance
    ("C4", lambda: dict(perturb_synthetic=synth_frame({"official": 0.8}, certified=math.inf)), PASS, None, None,
     "inconclusive"),                                                                   # no finite bound: not passing
]


@pytest.mark.parametrize("cid, frames, tests, config, verdicts, expected", VERDICT_TABLE,
                         ids=[f"{c[0]}-{i}-{c[-1].replace(' ', '_')}" for i, c in enumerate(VERDICT_TABLE)])
def test_verdict_table(cid, frames, tests, config, verdicts, expected):
    claim = judge(cid, tests, config, verdicts, **frames())
    assert claim.verdict == expected, claim.reason
    spec = claim_spec(cid)
    assert (claim.rule, claim.paper_wording, claim.figure) == (spec.rule, spec.paper, ", ".join(spec.figures))


def test_every_claim_has_a_table_row_per_reachable_verdict():
    seen = {}
    for cid, *_, expected in VERDICT_TABLE:
        seen.setdefault(cid, set()).add(expected)
    # C8, C10: tests/test_claims_smoothness.py; the empirical claims: tests/test_claims_empirical.py
    assert set(seen) | {"C8", "C10"} == {c.id for c in C.CLAIMS if c.kind == "analytic"}
    assert all(len(v) >= 2 for v in seen.values()), seen           # every rule is seen deciding both ways


# the gate: for every claim with backing tests, the table's first "holds"/"refuted" case turns
# inconclusive when one of its backing tests (or, for C2, one of C1's) failed
GATED = [(cid, nodeid) for cid, nodeid in (
    ("C1", "tests/test_properties.py::test_c1_identity_talk_equals_moelora_code[cfg1]"),
    ("C2", "tests/test_properties.py::test_c2_x"),
    ("C2", "tests/test_properties.py::test_c1_identity_talk_equals_moelora_code[cfg1]"),
    ("C3", "tests/test_properties.py::test_counterexample_y"),
    ("C4", "tests/test_probes_lipschitz.py::test_sandwich_ordering_on_random_layers[b]"),
    )]


@pytest.mark.parametrize("cid, nodeid", GATED, ids=[f"{c}-{n.split('::')[1]}" for c, n in GATED])
def test_failed_backing_test_makes_the_verdict_inconclusive(cid, nodeid):
    case = next(c for c in VERDICT_TABLE if c[0] == cid and c[-1] in ("holds", "refuted"))
    _, frames, tests, config, verdicts, expected = case
    assert judge(cid, PASS, config, verdicts, **frames()).verdict == expected
    claim = judge(cid, failing(nodeid), config, verdicts, **frames())
    assert claim.verdict == "inconclusive" and nodeid in claim.reason
    assert f"FAILED: `{nodeid}`" in "\n".join(claim.evidence) or cid == "C2"


def test_claims_without_backing_tests_ignore_the_test_run():
    for cid in ("C6", "C8", "C9", "C11", "C12"):
        assert claim_spec(cid).tests == ()
    frames = dict(talk_norms=talk_norms_frame(p_norm=0.25, p_ratio=0.2))
    assert judge("C8", {"tests/test_properties.py::test_c1_a": "failed"}, MARGINS, **frames).verdict == "holds"


def test_missing_frame_names_the_command_and_results_dir():
    with pytest.raises(C.MissingResultsError, match=r"'equivalence'.*python -m analysis perturb --results-dir elsewhere"):
        _judge(claim_spec("C1"), {}, results_dir="elsewhere")
    assert _judge(claim_spec("C6"), {}).verdict == "not-testable"      # a setting that did not run is absent


# ----------------------------------------------------------------------------- evidence texts
def test_c1_evidence_cites_tests_and_numbers():
    claim = judge("C1", PASS, equivalence=eq_frame(c1=1.234e-14))
    text = "\n".join(claim.evidence)
    assert "1.23e-14" in text and "1.23e-14" in claim.key_number
    assert "`tests/test_properties.py::test_c1_identity_talk_equals_moelora_code`: 2/2" in text
    assert claim.key_number.endswith("tests 2/2 passed")
    assert "not run" in "\n".join(judge("C1", None, equivalence=eq_frame()).evidence)


def test_c2_statement_cites_the_c9_verdict():
    claim = judge("C2", PASS, verdicts={"C9": "inconclusive"}, equivalence=eq_frame())
    assert "EQUALS" in claim.rule and "C9 verdict on these data: **inconclusive**" in claim.statement


def test_c4_counts_topk_apart_and_never_as_passing():
    data = c4_data()
    ro = data["perturb_routers"]
    extra = ro[(ro.router == "top1") & (ro.statistic == "local_max")].assign(value=5.0)   # > any certified bound
    data["perturb_routers"] = pd.concat([ro, extra])
    claim = judge("C4", PASS, **data)
    assert claim.verdict == "holds"
    assert "top-k routers of perturb_routers" in "\n".join(claim.evidence)
    inf = judge("C4", PASS, perturb_synthetic=synth_frame({"official": 0.8}, certified=math.inf))
    assert "without a finite certified bound" in "\n".join(inf.evidence) and inf.reason == "no Lipschitz cell with a finite certified bound"


def test_c3_evidence_uses_the_centred_rows():
    claim = judge("C3", PASS, equivalence=eq_frame(centred=0.42))
    assert "0.42" in claim.key_number and "B ≠ 0" in claim.rule and "centred" in claim.rule
    assert "0.3" in claim.key_number                     # the output gap with B ≠ 0


def test_c4_refutation_names_the_ratio():
    claim = judge("C4", PASS, perturb_synthetic=synth_frame({"official": 0.8}, empirical=1.001))
    assert "1.001" in claim.reason


def test_parse_junit_and_claim_mapping(tmp_path):
    xml = """<?xml version="1.0"?><testsuites><testsuite name="pytest">
    <testcase classname="tests.test_properties" name="test_c1_identity_talk_equals_moelora_code[cfg0]"/>
    <testcase classname="tests.test_properties" name="test_c1_rejects_non_identity_talk"><failure message="x"/></testcase>
    <testcase classname="tests.test_probes_lipschitz" name="test_wide_layer_d4096"><skipped/></testcase>
    </testsuite></testsuites>"""
    out = R.parse_junit(xml)
    assert out == {"tests/test_properties.py::test_c1_identity_talk_equals_moelora_code[cfg0]": "passed",
                   "tests/test_properties.py::test_c1_rejects_non_identity_talk": "failed",
                   "tests/test_probes_lipschitz.py::test_wide_layer_d4096": "skipped"}
    s = tests_for(claim_spec("C1").tests, out)
    assert s["status"] == "failed" and s["n_pass"] == 1 and s["n_run"] == 2
    assert tests_for(claim_spec("C8").tests, out)["applicable"] is False
    assert tests_for(claim_spec("C1").tests, R.TestRun(out)) == s


def test_missing_experiment_names_it_and_the_command(tmp_path):
    with pytest.raises(C.MissingResultsError, match=rf"perturb_synthetic.*python -m analysis perturb --results-dir {tmp_path}"):
        C.load_results(tmp_path)


# ----------------------------------------------------------------------------- report
def full_data():
    """Every experiment: the analytic sweeps, the planted-teacher setting (evaluation, tuning and budget
    cells, with the doubly-stochastic structure) and the twin runs."""
    from claims_frames import setting
    syn = synth_frame({"official": 0.7, "uniform-mix:0.5": 0.6})
    from test_claims_smoothness import controls_frame
    data = dict(equivalence=eq_frame(c1=1.234e-14), perturb_synthetic=syn,
                perturb_routers=routers_frame({"top1": 0.5, "top2": 0.3}, {"top1": 0.2, "top2": 0.2}),
                perturb_controls=controls_frame(syn, {"spectral": {"official": 0.8}, "frobenius": {"official": 0.8}}),
                talk_norms=talk_norms_frame(p_norm=0.375, p_ratio=0.05),
                twins=twins_frame({"adamw": 0.05, "sgd": 0.0}))
    means = {"head-only": {"loss": 1.0}, "lora": {"loss": 0.6, "params": 1010}, "moelora-code": {"loss": 0.55, "params": 990},
             "talklora-official": {"loss": 0.4, "gini": 0.1, "churn": 0.02, "quotient": 0.5, "params": 1000},
             "moelora-twin": {"loss": 0.5}, "moelora-code-scaled": {"loss": 0.5}, "moelora-code-centred": {"loss": 0.5},
             "talklora-doubly-stochastic": {"loss": 0.4, "ratio": 0.95}}
    per = {m: means[m] for m in ("talklora-official", "lora", "moelora-code")}
    data.update(setting("planted", means, budgets={"24": per, "32": per}))
    return data, {}


def test_report_has_all_ids_numbers_and_is_written_atomically(tmp_path):
    data, cfg = full_data()
    claims = C.evaluate(data, R.TestRun(PASS, "pytest (fake)", 0, 1.0), cfg)
    assert [c.id for c in claims] == list(C.CLAIM_IDS)
    assert all(c.verdict in C.VERDICTS for c in claims)
    md, csv = tmp_path / "CLAIMS.md", tmp_path / "claims.csv"
    R.write_report(claims, md, csv, ids=C.CLAIM_IDS, command="python -m analysis claims", results_dir=tmp_path,
                   commit="deadbeef", dirty=False, tests=R.TestRun(PASS, "pytest (fake)", 0, 1.0))
    text = md.read_text()
    assert "Generated file" in text and "deadbeef" in text and "python -m analysis claims" in text
    for cid in C.CLAIM_IDS:
        assert f"| {cid} |" in text and f"## {cid} —" in text
    assert "1.23e-14" in text                    # C1 residual from the frame
    assert "37.5 %" in text                      # C8 fraction from the frame
    assert "## Limitations" in text and "## Preregistration" in text and "8B" in text
    frame = pd.read_csv(csv)
    claim_rows = frame[frame.comparison.isna()]
    assert tuple(frame.columns) == R.CSV_COLUMNS and list(claim_rows.id) == list(C.CLAIM_IDS)
    assert set(frame.verdict) <= set(C.VERDICTS) and set(frame.rules_version) == {R.RULES_VERSION}
    empirical = claim_rows[claim_rows.kind == "empirical"]
    assert set(empirical.verdict) <= {"supported", "supported-below-relevance", "no-relevant-effect", "contradicted",
                                      "inconclusive", "not-testable", "mixed"}
    assert set(claim_rows[claim_rows.kind == "analytic"].verdict) <= {"holds", "refuted", "inconclusive"}
    assert "Rule:" in frame.evidence[0]
    assert (pd.read_csv(csv, keep_default_na=False).query("comparison == ''").paper_verdict == "n/a").all()
    cmp_rows = frame[frame.comparison.notna()]
    assert len(cmp_rows) == sum(len(c.comparisons) for c in claims) > 0
    assert cmp_rows[["n", "effect", "ci_low", "ci_high", "mde"]].notna().all().all()
    deciding = cmp_rows[cmp_rows.deciding.astype(str) == "True"]
    assert len(deciding) and deciding.margin.notna().all()    # reported rows may lack one (twin runs, no MiniLM)
    setting_rows = cmp_rows[cmp_rows.kind == "empirical"]
    assert setting_rows.setting.notna().all() and set(setting_rows.controls) >= {"passed"}
    # never "no relevant effect" without the power to see an effect of the margin's size (P4)
    nre = cmp_rows[cmp_rows.verdict == "no-relevant-effect"]
    assert (nre.mde <= nre.margin).all()
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_write_keeps_the_previous_report(tmp_path, monkeypatch):
    data, cfg = full_data()
    claims = C.evaluate(data, None, cfg)
    md, csv = tmp_path / "CLAIMS.md", tmp_path / "claims.csv"
    md.write_text("old report\n")
    csv.write_text("old,csv\n")
    with pytest.raises(ValueError, match="exactly the claims"):
        R.write_report(claims[:-1], md, csv, ids=C.CLAIM_IDS, command="x", results_dir=tmp_path, commit="c", dirty=None)

    def boom(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(OSError, match="disk full"):
        R.write_report(claims, md, csv, ids=C.CLAIM_IDS, command="x", results_dir=tmp_path, commit="c", dirty=None)
    assert csv.read_text() == "old,csv\n"        # untouched: the CSV is replaced only when complete
    assert not list(tmp_path.glob(".*.tmp"))


def test_verdict_must_be_one_of_the_kind():
    with pytest.raises(ValueError, match="verdict"):
        C.Claim("C1", "s", "probably", "k", [], "r")
    with pytest.raises(ValueError, match="analytic claim must be one of"):
        C.Claim("C1", "s", "supported", "k", [], "r")
    with pytest.raises(ValueError, match="empirical claim must be one of"):
        C.Claim("C6", "s", "holds", "k", [], "r", kind="empirical")


def test_run_reads_saved_results_and_reports_the_same_verdicts(tmp_path, monkeypatch):
    """End to end from a results directory (the experiments themselves are stubbed out)."""
    data, cfg = full_data()
    for name, frame in data.items():
        (tmp_path / "results" / name).mkdir(parents=True)
        frame.to_csv(tmp_path / "results" / name / "rows.csv", index=False)
    calls = []
    monkeypatch.setattr(C, "ensure_results", lambda config, **kw: calls.append(kw))
    md, csv = tmp_path / "CLAIMS.md", tmp_path / "claims.csv"
    claims = C.run({**cfg, "profile": "test"}, results_dir=tmp_path / "results", workers=2, out_md=md, out_csv=csv,
                   run_tests=False)
    assert calls == [dict(results_dir=tmp_path / "results", workers=2, executor=None, force=False)]
    expected = [c.verdict for c in C.evaluate(data, None, cfg)]
    saved = pd.read_csv(csv)
    assert [c.verdict for c in claims] == expected == list(saved[saved.comparison.isna()].verdict)
    assert expected[:3] == ["holds", "refuted", "holds"] and expected[10] == "supported"     # C11 in planted
    text = md.read_text()
    assert "planted teacher, one linear layer, 100 steps" in text and "profile 'test' is not preregistered" in text
    assert "## Settings and positive controls" in text and "| planted-teacher | loss |" in text
    (tmp_path / "results" / "twins" / "rows.csv").unlink()          # optional: C9 is judged without it
    C.run(cfg, results_dir=tmp_path / "results", out_md=md, out_csv=csv, run_tests=False)
    (tmp_path / "results" / "equivalence" / "rows.csv").unlink()    # required by C1–C3
    with pytest.raises(C.MissingResultsError, match=rf"'equivalence'.*--results-dir {tmp_path / 'results'}"):
        C.run(cfg, results_dir=tmp_path / "results", out_md=md, out_csv=csv, run_tests=False)


def test_report_lists_comparisons_when_a_claim_has_them(tmp_path):
    from analysis.stats import Comparison
    data, cfg = full_data()
    claims = C.evaluate(data, None, cfg)
    for c in claims:                                        # the claims with comparisons: start from none
        c.comparisons = []
    claims[5].kind = "analytic"                             # an analytic claim's table (empirical: their own)
    claims[5].verdict = "holds"
    claims[5].comparisons = [Comparison.from_differences("TalkLoRA − MoELoRA-code", [0.03, 0.05, 0.04], margin=0.01)]
    md, csv = tmp_path / "CLAIMS.md", tmp_path / "claims.csv"
    R.write_report(claims, md, csv, ids=C.CLAIM_IDS, command="x", results_dir=tmp_path, commit="c", dirty=False)
    text = md.read_text()
    assert text.count("| MDE | verdict |") == 1 and "| TalkLoRA − MoELoRA-code | 3 | 0.04 |" in text
    frame = pd.read_csv(csv)
    row = frame[frame.comparison == "TalkLoRA − MoELoRA-code"].iloc[0]
    cmp = claims[5].comparisons[0]
    assert row.id == claims[5].id and row.verdict == cmp.verdict == "holds" and row.n == 3
    assert (row.effect, row.ci_low, row.ci_high, row.margin, row.mde) == pytest.approx(
        (cmp.effect, cmp.ci_low, cmp.ci_high, 0.01, cmp.mde))


def test_the_paper_column_reads_the_paper_report_of_the_same_rules(tmp_path):
    data, cfg = full_data()
    claims = C.evaluate(data, None, cfg)
    paper_md, paper_csv = tmp_path / "paper.md", tmp_path / "paper.csv"
    R.write_report(claims, paper_md, paper_csv, ids=C.CLAIM_IDS, command="x", results_dir=tmp_path, commit="c",
                   dirty=False)
    frame = pd.read_csv(paper_csv)
    c11 = (frame["id"] == "C11") & frame["comparison"].isna()
    frame.loc[c11, ["verdict", "controls"]] = ["inconclusive", "planted-teacher: failed: P1"]
    frame.to_csv(paper_csv, index=False)
    paper = R.PaperColumn.read(paper_csv)
    assert paper.verdict("C1") == "holds" and paper.verdict("C11") == "inconclusive"
    md, csv = tmp_path / "CLAIMS.md", tmp_path / "claims.csv"
    R.write_report(claims, md, csv, ids=C.CLAIM_IDS, command="x", results_dir=tmp_path, commit="c", dirty=False,
                   paper=paper)
    text = md.read_text()
    c11_here = next(c for c in claims if c.id == "C11")
    assert f"- C11: here **{c11_here.verdict}**, paper **inconclusive** — controls here: planted-teacher: passed; " \
           "paper: planted-teacher: failed: P1." in text
    saved = pd.read_csv(csv, keep_default_na=False)
    assert saved.query("id == 'C11' and comparison == ''").paper_verdict.item() == "inconclusive"
    # a paper report written by older rules (no rules_version) or absent: the column is n/a
    frame.drop(columns=["rules_version"]).to_csv(paper_csv, index=False)
    old = R.PaperColumn.read(paper_csv)
    assert old.verdict("C1") == "n/a" and "older rules" in old.note
    assert "does not exist" in R.PaperColumn.read(tmp_path / "absent.csv").note


def test_readme_section_uses_the_new_words_and_limitations():
    data, cfg = full_data()
    claims = C.evaluate(data, None, cfg)
    text = R.readme_section(claims, "python -m analysis claims", R.PaperColumn({}, None, "n/a"))
    assert "| id | claim | verdict | paper profile | key number |" in text and "**Limitations.**" in text
    assert "**supported**" in text and "holds under stated conditions" not in text
