"""The evidence-topic registry (analysis.topics) and its declarations (analysis.evidence)."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from analysis import evidence as E
from analysis import experiments as X
from analysis import topics as T

ROOT = Path(__file__).resolve().parents[1]

LAYOUT = {   # the layout: topic -> (claims, figures)
    "equivalence": ({"C1", "C2", "C3"}, {"F6"}),
    "smoothness": ({"C4", "C5", "C8", "C10", "C12"}, {"F2", "F3", "F7", "F9", "F11"}),
    "balance": ({"C6", "C7", "C11"}, {"F1", "F4", "F5", "F10"}),
    "twins": ({"C9"}, {"F8"}),
}


def test_topics_hold_the_claims_and_figures_of_the_layout():
    got = {t.name: ({c.id for c in t.claims}, {f.id for f in t.figures}) for t in T.TOPICS}
    assert got == LAYOUT
    def by_number(ids):
        return tuple(sorted(ids, key=lambda i: int(i[1:])))
    assert T.CLAIM_IDS == by_number(c for cs, _ in LAYOUT.values() for c in cs)
    assert T.FIGURE_IDS == by_number(f for _, fs in LAYOUT.values() for f in fs)


def test_one_notebook_per_topic_and_it_draws_every_figure_of_the_topic():
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.py") if p.name != "00_library_tour.py")
    assert sorted(t.notebook for t in T.TOPICS) == notebooks
    for t in T.TOPICS:
        text = (ROOT / "notebooks" / t.notebook).read_text()
        assert f"from analysis.topics import {t.name} as T" in text
        for f in t.figures:
            assert f.notebook == t.notebook and f"T.draw_{f.id.lower()}(" in text


@pytest.mark.parametrize("fig", T.FIGURES, ids=[f.id for f in T.FIGURES])
def test_caption_cites_exactly_the_claims_that_cite_the_figure(fig):
    citing = [c.id for c in T.CLAIMS if fig.id in c.figures]
    assert list(fig.claims) == citing and citing
    cited = set(re.findall(r"\bC\d+\b", fig.caption_text.format(claims=E.claim_ref(citing))))
    # a range "C1–C3" names its ends; expand it before comparing
    for a, b in re.findall(r"C(\d+)–C(\d+)", fig.caption):
        cited |= {f"C{i}" for i in range(int(a), int(b) + 1)}
    assert set(citing) <= cited
    assert "{claims}" in fig.caption_text                 # ids come from the declarations, not typed by hand
    assert not re.search(r"\bC\d+\b", fig.caption_text.replace("{claims}", "")) or fig.id == "F6"


def test_f3_and_f1_inconsistencies_are_gone():
    f3, f1 = T.figure_spec("F3"), T.figure_spec("F1")
    assert f3.caption.startswith("Router Lipschitz sandwich (claim C4)")
    assert "validation split" in f1.caption and "test split" not in f1.caption


@pytest.mark.parametrize("ids, text", [(["C6"], "claim C6"), (["C1", "C2", "C3"], "claims C1–C3"),
                                       (["C4", "C6"], "claims C4, C6"), (["C5", "C4"], "claims C4, C5"),
                                       (["C1", "C2", "C3", "C5", "C7", "C8", "C9"], "claims C1–C3, C5, C7–C9")])
def test_claim_ref(ids, text):
    assert E.claim_ref(ids) == text


def test_lookups_fail_with_the_accepted_values():
    assert T.claim_spec("C6").figures == ("F1", "F4", "F10")
    assert T.topic_of("F7").name == "smoothness" and T.topic_of("C9").name == "twins"
    with pytest.raises(KeyError, match="claim_id must be one of"):
        T.claim_spec("C99")
    with pytest.raises(KeyError, match="figure_id must be one of"):
        T.figure_spec("F0")


def test_every_claim_reads_registered_experiments():
    for c in T.CLAIMS:
        assert set(c.experiments) | set(c.optional) <= set(X.EXPERIMENTS)
        assert c.gate[0] == c.id and all(g in T.CLAIM_IDS for g in c.gate)
        assert all(u in T.CLAIM_IDS for u in c.uses_verdicts)
    for f in T.FIGURES:
        assert set(f.experiments) <= set(X.EXPERIMENTS)


def _spec(cid="C1", **kw):
    args = dict(paper="p", statement="s", rule="r", figures=("F1",), tests=(), experiments=("train",),
                evaluate=lambda data, config, verdicts: E.Outcome("holds", "why", "k", []))
    return E.ClaimSpec(cid, **{**args, **kw})


def test_declarations_reject_bad_input():
    with pytest.raises(ValueError, match="claim id"):
        _spec("X1")
    with pytest.raises(ValueError, match="experiments must be among"):
        _spec(experiments=("nope",))
    with pytest.raises(ValueError, match="verdict must be one of"):
        E.Outcome("probably", "r", "k", [])
    fig = E.FigureSpec("F2", "slug", ("train",), lambda rows: rows, lambda d: None, "cap ({claims})")
    with pytest.raises(ValueError, match="cite"):
        E.Topic("t", "n.py", claims=(_spec(),), figures=(fig,))        # C1 cites F1, the topic draws F2


def test_judge_all_orders_by_verdict_dependencies():
    seen = []

    def ev(tag, verdict="holds"):
        def f(data, config, verdicts):
            seen.append((tag, dict(verdicts)))
            return E.Outcome(verdict, tag, "k", [])
        return f
    a = _spec("C1", evaluate=ev("C1"), uses_verdicts=("C2",))
    b = _spec("C2", evaluate=ev("C2", "refuted"))
    claims = E.judge_all([a, b], {"train": pd.DataFrame()})
    assert [c.id for c in claims] == ["C1", "C2"]                  # reported in declaration order
    assert seen == [("C2", {}), ("C1", {"C2": "refuted"})]        # judged after the claim it uses
    with pytest.raises(ValueError, match="circular"):
        E.judge_all([_spec("C1", uses_verdicts=("C2",)), _spec("C2", uses_verdicts=("C1",))], {"train": pd.DataFrame()})


def test_gate_is_applied_once_for_any_claim():
    spec = _spec(tests=(r"tests/test_x\.py::test_a",))
    ok = E.judge(spec, {"train": pd.DataFrame()}, {"tests/test_x.py::test_a[0]": "passed"})
    assert ok.verdict == "holds" and ok.key_number == "k; tests 1/1 passed"
    bad = E.judge(spec, {"train": pd.DataFrame()}, {"tests/test_x.py::test_a[0]": "failed"})
    assert bad.verdict == "inconclusive" and "test_a[0]" in bad.reason
    not_run = E.judge(spec, {"train": pd.DataFrame()}, None)
    assert not_run.verdict == "holds" and not_run.key_number == "k; tests not run"


def test_missing_results_message_uses_the_results_dir(tmp_path):
    err = X.MissingResultsError("twins", tmp_path / "r", needed_by="figures")
    assert f"python -m analysis twins --results-dir {tmp_path / 'r'}" in str(err)
    assert f"python -m analysis figures --results-dir {tmp_path / 'r'}" in str(err)
    with pytest.raises(ValueError, match="experiment must be one of"):
        X.command_for("nope")


def test_ensure_results_runs_each_command_once_in_order(monkeypatch, tmp_path):
    from analysis import lm, perturb, train, twins
    calls = []
    for mod in (perturb, train, twins, lm):
        monkeypatch.setattr(mod, "run", lambda config, mod=mod, **kw: calls.append((mod.__name__, kw)))
    X.ensure_results("CFG", results_dir=tmp_path, workers=2, force=True)
    assert [c[0] for c in calls] == ["analysis.perturb", "analysis.train", "analysis.twins", "analysis.lm"]
    assert all(c[1] == dict(results_dir=tmp_path, workers=2, executor=None, force=True) for c in calls)


def test_f10_reads_exactly_the_rows_of_its_claims():
    """F10 evaluates the claims of FOREST_CLAIMS: it needs their experiments and nothing else (a profile
    without the supplementary perturb_real must still draw it)."""
    from analysis.topics import efficiency
    used = {e for c in T.CLAIMS if c.id in efficiency.FOREST_CLAIMS for e in (*c.experiments, *c.optional)}
    assert set(T.figure_spec("F10").experiments) == used and "perturb_real" not in used
