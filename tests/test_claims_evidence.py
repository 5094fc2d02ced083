"""The settings, margins and positive controls of the empirical claims (analysis.claims.evidence and
analysis.claims.assay, docs/method.md §5.2, §5.6) on hand-built rows: which settings exist, margins from
the tuning runs at the selected lrs (exact numbers), P1 / P2 / P3 pass and fail, the flattening check,
and the controls section of the report."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import methods
from analysis.claims import assay as A
from analysis.claims import evidence as E
from claims_frames import BEST_LR, setting

REF, TWIN, SCALED, CODE, LORA = ("talklora-official", "moelora-twin", "moelora-code-scaled", "moelora-code", "lora")


def planted(**over):
    means = {"head-only": {"loss": 1.0}, LORA: {"loss": 0.7}, CODE: {"loss": 0.5, "gini": 0.4, "churn": 0.2},
             REF: {"loss": 0.45}, TWIN: {"loss": 0.46}, SCALED: {"loss": 0.47}}
    for m, v in over.items():
        means.setdefault(m, {}).update(v)
    return setting("planted", means)


def reg():
    return A.registration()


def test_runs_finds_every_setting_present_and_only_those():
    data = {**planted(), **setting("train", {"head-only": {}, REF: {}, CODE: {}}, task="topic"),
            **setting("lm", {"base": {"loss": 3.0}, REF: {"loss": 2.0}, CODE: {}})}
    runs = E.runs(data)
    assert [r.name for r in runs] == ["planted-teacher", "minilm-topic", "smollm2-lm"]
    assert runs[0].steps == 100 and "100 steps" in runs[0].wording and runs[1].classification
    assert runs[2].no_adapter == "base" and runs[0].no_adapter == "head-only"
    assert E.runs({}) == [] and [r.name for r in E.runs({"planted": planted()["planted"]})] == ["planted-teacher"]
    assert runs[0].tuning is not None and E.runs({"planted": planted()["planted"]})[0].tuning is None


def test_margins_come_from_the_tuning_runs_at_the_selected_lr():
    data = planted()
    run = E.runs(data)[0]
    m = A.margins(run)
    # loss: 0.1 × (no-adapter 1.0 − best adapter 0.45); gini / churn: 0.25 × MoELoRA-code's tuning values
    assert m.get("loss") == pytest.approx(reg().margin_rule("loss_fraction") * (1.0 - 0.45))
    assert m.get("gini") == pytest.approx(reg().margin_rule("gini_fraction") * 0.4)
    assert m.get("churn") == pytest.approx(reg().margin_rule("churn_fraction") * 0.2)
    assert m.get("amplification_log") == reg().margin_rule("amplification_log")
    assert math.isnan(m.get("accuracy")) and "no accuracy" in m.why["accuracy"]
    with pytest.raises(KeyError, match="not preregistered"):
        m.get("c6_gini")
    # the evaluation seeds cannot move a margin: change every evaluation value, the margins stay
    shifted = dict(data, planted=data["planted"].assign(value=data["planted"]["value"] * 3))
    assert A.margins(E.runs(shifted)[0]).values == m.values


def test_margins_without_tuning_runs_or_gain_are_undefined():
    data = planted()
    run = E.runs({"planted": data["planted"]})[0]
    assert all(math.isnan(A.margins(run).get(k)) for k in ("loss", "gini", "churn"))
    worse = planted()
    worse["planted_tuning"] = worse["planted_tuning"].assign(
        value=lambda f: f["value"].where(~((f["metric"] == "loss") & (f["step"] == 100)), 2.0))
    m = A.margins(E.runs(worse)[0])
    assert math.isnan(m.get("loss")) and "do not beat" in m.why["loss"]


def test_accuracy_margin_for_classification_from_the_tuned_head():
    data = setting("train", {"head-only": {"loss": 1.2, "accuracy": 0.6}, REF: {"loss": 0.6, "accuracy": 0.8},
                             CODE: {"loss": 0.7, "accuracy": 0.85}})
    m = A.margins(E.runs(data)[0])
    assert m.get("accuracy") == pytest.approx(reg().margin_rule("accuracy_fraction") * (0.85 - 0.6))
    assert m.get("loss") == pytest.approx(reg().margin_rule("loss_fraction") * (1.2 - 0.6))


def test_p1_passes_with_a_real_gain_and_fails_without():
    a = A.assay(E.runs(planted())[0])
    assert a.best == REF and a.no_adapter_loss == pytest.approx(1.0 + 0.01) and a.p1
    assert a.p1_threshold == pytest.approx(max(reg().control("p1_min_relative_gain") * a.no_adapter_loss,
                                               reg().control("p1_gain_over_margin") * a.margins.get("loss")))
    assert a.controls((REF, TWIN)) == "passed"
    # the adapters barely beat the no-adapter model on held-out data: P1 fails
    flat = A.assay(E.runs(planted(**{m: {"loss": 0.99} for m in (LORA, CODE, REF, TWIN, SCALED)}))[0])
    assert not flat.p1 and flat.controls((REF,)) == "failed: P1"


def test_p2_is_checked_on_the_routed_methods_a_claim_compares():
    a = A.assay(E.runs(planted(**{TWIN: {"entropy": 0.95}}))[0])
    limit = reg().control("p2_max_entropy")
    assert a.entropy[TWIN] > limit >= a.entropy[REF]
    assert a.p2((REF, SCALED)) == (True, "") and not a.p2((REF, TWIN))[0]
    assert a.controls((REF, TWIN), p2=True) == "failed: P2" and a.controls((REF, TWIN)) == "passed"
    assert a.controls((REF, LORA), p2=True) == "passed"          # LoRA has no router
    assert a.controls((REF,), p2=True, extra={"P3": False}) == "failed: P3"


def test_flattening_and_tuned_lrs_are_reported():
    a = A.assay(E.runs(planted())[0])
    best, change = a.flatten
    assert best == REF and change == pytest.approx(0.01 / 1.01, rel=1e-6)
    assert a.lrs[REF] == BEST_LR


def test_the_controls_section_prints_every_setting_and_its_margins():
    lines = A.controls_section(A.assays(planted()))
    text = "\n".join(lines)
    assert "planted teacher" in text and "100 steps" in text and "pass: gain" in text
    assert "| planted-teacher | loss |" in text and "0.1 × (no-adapter 1 − talklora-official 0.45)" in text
    assert A.controls_section([])[0].startswith("No setting")


def test_cluster_recovery_is_reported_per_router_with_its_interval():
    from types import SimpleNamespace

    rows = [dict(method=m, seed=s, step=step, split=split, metric="cluster_mi", value=v)
            for m, end in [(REF, 0.9), ("moelora-code", 0.5)] for s in range(4)
            for step, split, v in [(0, "val", 0.1 + 0.01 * s), (100, "test", end + 0.01 * s)]]
    item = SimpleNamespace(run=SimpleNamespace(name="planted-teacher", rows=pd.DataFrame(rows)))
    text = "\n".join(A.cluster_recovery_section([item]))
    assert f"| planted-teacher | {methods.label(REF)} | 0.115 [" in text        # step 0: mean of 0.10..0.13
    assert "| 0.915 [" in text and "| 0.515 [" in text                          # end: per router
    no_clusters = SimpleNamespace(run=SimpleNamespace(name="x", rows=pd.DataFrame(rows).assign(metric="loss")))
    assert A.cluster_recovery_section([no_clusters]) == []


def test_assays_are_computed_once_per_set_of_frames():
    data = planted()
    first = A.assays(data)
    assert A.assays(data) is first and A.assays(dict(data)) is first     # same frames: same result
    assert A.assays(planted()) is not first


def test_deciding_methods_come_from_the_preregistration():
    assert A.deciding_methods("C6") == (TWIN, SCALED)
    assert A.deciding_methods("C11") == methods.tagged("baseline")
    assert A.deciding_methods("C13") == ("talklora-doubly-stochastic",)
    with pytest.raises(KeyError, match="no preregistered deciding"):
        A.deciding_methods("C1")


def test_selectors_read_the_runner_schemas():
    data = {**planted(), **setting("lm", {"base": {"loss": 3.0}, REF: {"loss": 2.0}, CODE: {"loss": 2.1}})}
    p, lm = E.runs(data)
    assert set(E.heldout(p.rows).columns) >= {REF, "head-only"} and len(E.heldout(p.rows)) == 8
    assert E.no_adapter_heldout(lm) == 3.0 and "base" not in E.heldout(lm.rows)
    assert E.routing(lm, "gini")["end"][REF].mean() == pytest.approx(0.3, abs=0.02)
    amp = E.amplification(p)
    assert set(amp["kind"]) == {"gaussian_input", "gaussian_block", "adversarial"}
    assert set(E.certified(p)["method"]) == {REF}
    assert not E.churn(p).empty and E.churn(lm).empty is False
    assert E.discordant(p, REF, CODE) is None
    assert isinstance(E.val_loss(p.rows), pd.DataFrame)


def test_a_setting_without_tuning_runs_is_not_testable():
    """The custom runner has no tuning sweep: its margins cannot be fixed without the evaluation seeds, so
    nothing says which effect is relevant — every comparison there is not testable (controls: margins)."""
    rows = planted()["planted"].assign(setting="my-reviews", objective="classification")
    (run,) = E.runs({"custom": rows}, {"setting": {"name": "other"}})
    assert run.setting.runner == "custom" and run.name == "my-reviews" and run.classification
    a = A.assay(run)
    assert a.controls((REF,)) == "failed: margins" and not a.p1


def test_a_comparison_without_a_margin_is_not_testable():
    from analysis.claims import decide as D
    (c,) = D.judge_family([D.Paired("x", (0.1, 0.2, 0.15), math.nan, "greater")])
    assert c.controls == "failed: margin" and c.verdict == "not-testable"


def test_twin_runs_name_the_seeds_that_diverged_and_leave_them_out():
    from analysis.claims import twins as TW

    rows = [dict(task="topic", optimizer="sgd", seed=s, step=10, split="test", model=m, layer="all",
                 metric=metric, value=base + 0.01 * s)
            for s in range(4) for m, base in [(REF, 0.5), (TWIN, 0.6)] for metric in ("loss", "accuracy")]
    rows += [dict(task="topic", optimizer="sgd", seed=4, step=3, split="train", model=m, layer="all",
                  metric="diverged", value=float(m == TWIN)) for m in (REF, TWIN)]
    out = TW.twin_runs({"twins": pd.DataFrame(rows)})
    assert [p.name for p in out] == [f"twin runs topic, sgd: {m} TalkLoRA − twin (1 seed(s) diverged and are left out: 4)"
                                     for m in ("loss", "accuracy")]
    assert all(len(p.differences) == 4 for p in out)
    clean = TW.twin_runs({"twins": pd.DataFrame(rows[:-2])})
    assert [p.name for p in clean] == [f"twin runs topic, sgd: {m} TalkLoRA − twin" for m in ("loss", "accuracy")]
