"""The claims layer's structure: the registries (analysis.claims), the declarations and the gate
(analysis.claims.base), and the import rules — no cycles in analysis/, no cross-claim imports, no torch
on the claims' import path, method names only through the registry (analysis.methods)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import claims as C
from analysis import experiments as X
from analysis import methods
from analysis.claims import base as B

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {   # module -> (claims, figures)
    "equivalence": ({"C1", "C2", "C3"}, {"F6"}), "lipschitz": ({"C4"}, {"F3"}), "amplification": ({"C5"}, {"F2"}),
    "balance": ({"C6"}, {"F1", "F4"}), "efficiency": ({"C7"}, {"F5"}), "init_norms": ({"C8"}, {"F7"}),
    "twins": ({"C9"}, {"F8"}), "topk": ({"C10"}, {"F9"}), "outperforms": ({"C11"}, set()),
    "churn": ({"C12"}, {"F11"}), "structures": ({"C13"}, {"F12"}),
}
SHARED = {"analysis.claims.base", "analysis.claims.helpers", "analysis.claims.evidence", "analysis.claims.assay",
          "analysis.claims.decide"}
CLAIM_MODULE_IMPORTS = {*SHARED, "analysis.stats", "analysis.methods", "analysis.plotting"}
SHARED_IMPORTS = {*CLAIM_MODULE_IMPORTS, "analysis.experiments", "analysis.report", "analysis.settings",
                  "analysis.prereg", "analysis.protocol"}
TOUR = "00_library_tour.py"        # uses the library directly (balance_loss="switch" is a loss, not a method)
BENCH = "05_cost.py"               # redraws F13 from the benchmark's data (analysis.cost), no claim figure
OWNED = [*sorted((ROOT / "analysis" / "claims").glob("*.py")),
         *(ROOT / "analysis" / f for f in ("report.py", "figures.py", "plotting.py", "stats.py", "experiments.py"))]


def by_number(ids):
    return tuple(sorted(ids, key=lambda i: int(i[1:])))


# ----------------------------------------------------------------------------- registries
def test_each_module_declares_its_claims_and_figures():
    got = {m.__name__.rsplit(".", 1)[1]: ({c.id for c in m.CLAIMS}, {f.id for f in m.FIGURES}) for m in C.MODULES}
    assert got == LAYOUT
    assert C.CLAIM_IDS == by_number(c for cs, _ in LAYOUT.values() for c in cs)
    assert C.FIGURE_IDS == by_number([*(f for _, fs in LAYOUT.values() for f in fs), "F10"])


def test_figure_claims_are_the_claims_that_cite_it():
    for f in C.FIGURES:
        assert f.claims == tuple(c.id for c in C.CLAIMS if f.id in c.figures) and f.claims
    assert all(fid in C.FIGURE_IDS for c in C.CLAIMS for fid in c.figures)


def test_every_figure_declares_a_notebook_that_imports_its_module_and_redraws_it():
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.py") if p.name not in (TOUR, BENCH))
    assert sorted({f.notebook for f in C.FIGURES}) == notebooks
    for f in C.FIGURES:
        text = (ROOT / "notebooks" / f.notebook).read_text()
        module = f.draw.__module__.rsplit(".", 1)[1]
        assert re.search(rf"from analysis\.claims import [\w, ]*\b{module}\b", text), (f.id, module)
        assert f"{module}.draw_{f.id.lower()}(" in text, f.id


@pytest.mark.parametrize("fig", C.FIGURES, ids=[f.id for f in C.FIGURES])
def test_caption_cites_exactly_the_claims_that_cite_the_figure(fig):
    assert "{claims}" in fig.caption_text                 # ids come from the declarations, not typed by hand
    assert B.claim_ref(fig.claims) in fig.caption
    assert not re.search(r"\bC\d+\b", fig.caption_text.replace("{claims}", "")) or fig.id == "F6"   # panel labels


def test_captions_say_how_the_figure_relates_to_the_verdict():
    f1 = C.figure_spec("F1").caption
    assert "validation" in f1 and "difference-in-differences" in f1 and "SmolLM2" in f1
    assert "scale-matched" in f1 and "twin" in f1
    for f in C.FIGURES:
        assert "verdict" in f.caption, f.id


def test_no_spec_citations_left():
    for path in OWNED + sorted(p for p in (ROOT / "notebooks").glob("*.py") if p.name != TOUR):
        assert "SPEC §" not in path.read_text(), path


@pytest.mark.parametrize("ids, text", [(["C6"], "claim C6"), (["C1", "C2", "C3"], "claims C1–C3"),
                                       (["C4", "C6"], "claims C4, C6"), (["C5", "C4"], "claims C4, C5"),
                                       (["C1", "C2", "C3", "C5", "C7", "C8", "C9"], "claims C1–C3, C5, C7–C9")])
def test_claim_ref(ids, text):
    assert B.claim_ref(ids) == text


def test_lookups_fail_with_the_accepted_values():
    assert C.claim_spec("C6").figures == ("F1", "F4", "F10")
    assert C.figure_spec("F7").claims == ("C8",)
    with pytest.raises(KeyError, match="claim_id must be one of"):
        C.claim_spec("C99")
    with pytest.raises(KeyError, match="figure_id must be one of"):
        C.figure_spec("F0")


def test_every_claim_reads_registered_experiments_and_gates_on_declared_tests():
    for c in C.CLAIMS:
        assert set(c.experiments) | set(c.optional) <= set(X.EXPERIMENTS)
        assert all(u in C.CLAIM_IDS for u in c.uses_verdicts)
        others = {p for o in C.CLAIMS if o.id != c.id for p in o.tests}
        assert set(c.also_gated_by) <= others
    assert C.claim_spec("C2").also_gated_by == C.claim_spec("C1").tests
    for f in C.FIGURES:
        assert set(f.experiments) <= set(X.EXPERIMENTS)


# ----------------------------------------------------------------------------- declarations and the gate
def _spec(cid="C1", **kw):
    args = dict(paper="p", statement="s", rule="r", figures=("F1",), tests=(), experiments=("train",),
                evaluate=lambda data, config, verdicts: B.Outcome("holds", "why", "k", []))
    return B.ClaimSpec(cid, **{**args, **kw})


def test_declarations_reject_bad_input():
    with pytest.raises(ValueError, match="claim id"):
        _spec("X1")
    with pytest.raises(ValueError, match="experiments must be among"):
        _spec(experiments=("nope",))
    with pytest.raises(ValueError, match="figures must be ids"):
        _spec(figures=())
    with pytest.raises(ValueError, match="verdict must be one of"):
        B.Outcome("probably", "r", "k", [])
    draw = lambda d: None                                   # noqa: E731
    with pytest.raises(ValueError, match="notebook must name"):
        B.FigureSpec("F2", "slug", ("train",), lambda rows: rows, draw, "cap ({claims})", notebook="balance")
    with pytest.raises(ValueError, match="figure id"):
        B.FigureSpec("G2", "slug", ("train",), lambda rows: rows, draw, "cap ({claims})", notebook="01_balance.py")


def test_margin_is_strict():
    from analysis import prereg
    assert B.margin("c8_share") == prereg.load().margins["c8_share"]
    with pytest.raises(KeyError, match=r"margin rule 'c6_gini' is not preregistered; declared: \["):
        B.margin("c6_gini")


def test_judge_all_orders_by_verdict_dependencies():
    seen = []

    def ev(tag, verdict="holds"):
        def f(data, config, verdicts):
            seen.append((tag, dict(verdicts)))
            return B.Outcome(verdict, tag, "k", [])
        return f
    a = _spec("C1", evaluate=ev("C1"), uses_verdicts=("C2",))
    b = _spec("C2", evaluate=ev("C2", "refuted"))
    claims = B.judge_all([a, b], {"train": pd.DataFrame()})
    assert [c.id for c in claims] == ["C1", "C2"]                  # reported in declaration order
    assert seen == [("C2", {}), ("C1", {"C2": "refuted"})]        # judged after the claim it uses
    with pytest.raises(ValueError, match="circular"):
        B.judge_all([_spec("C1", uses_verdicts=("C2",)), _spec("C2", uses_verdicts=("C1",))], {"train": pd.DataFrame()})


def test_gate_is_applied_once_for_any_claim_and_to_the_tests_it_rests_on():
    spec = _spec(tests=(r"tests/test_x\.py::test_a",), also_gated_by=(r"tests/test_y\.py::test_b",))
    ok = B.judge(spec, {"train": pd.DataFrame()}, {"tests/test_x.py::test_a[0]": "passed"})
    assert ok.verdict == "holds" and ok.key_number == "k; tests 1/1 passed"
    bad = B.judge(spec, {"train": pd.DataFrame()}, {"tests/test_x.py::test_a[0]": "failed"})
    assert bad.verdict == "inconclusive" and "test_a[0]" in bad.reason
    other = B.judge(spec, {"train": pd.DataFrame()}, {"tests/test_x.py::test_a[0]": "passed",
                                                      "tests/test_y.py::test_b": "error"})
    assert other.verdict == "inconclusive" and "test_b" in other.reason and other.key_number == "k; tests 1/1 passed"
    not_run = B.judge(spec, {"train": pd.DataFrame()}, None)
    assert not_run.verdict == "holds" and not_run.key_number == "k; tests not run"


def test_missing_results_message_uses_the_results_dir(tmp_path):
    err = X.MissingResultsError("twins", tmp_path / "r", needed_by="figures")
    assert f"python -m analysis twins --results-dir {tmp_path / 'r'}" in str(err)
    assert f"python -m analysis figures --results-dir {tmp_path / 'r'}" in str(err)
    with pytest.raises(ValueError, match="experiment must be one of"):
        X.command_for("nope")


def test_ensure_results_runs_each_command_once_in_order(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from analysis import custom, lm, perturb, planted, train, twins
    calls = []
    for mod in (perturb, train, twins, lm, planted, custom):
        monkeypatch.setattr(mod, "run", lambda config, mod=mod, **kw: calls.append((mod.__name__, kw)))
    X.ensure_results(SimpleNamespace(setting=None), results_dir=tmp_path, workers=2, force=True)
    assert [c[0] for c in calls] == ["analysis.perturb", "analysis.train", "analysis.twins", "analysis.lm",
                                     "analysis.planted"]
    assert all(c[1] == dict(results_dir=tmp_path, workers=2, executor=None, force=True) for c in calls)
    calls.clear()       # a user [setting] is trained in place of the MiniLM tasks, as `python -m analysis train` does
    X.ensure_results(SimpleNamespace(setting="mine"), results_dir=tmp_path)
    assert [c[0] for c in calls] == ["analysis.perturb", "analysis.custom", "analysis.twins", "analysis.lm",
                                     "analysis.planted"]


# ----------------------------------------------------------------------------- import rules
def import_graph(root: Path = ROOT / "analysis") -> dict[str, set[str]]:
    """Module -> the analysis modules it imports, at module level or inside a function (a lazy import
    still closes a cycle).  ``from . import x`` counts as importing ``x`` (not the package itself)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
                out |= subs or ({target} & set(modules))
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in modules}
        graph[name] = out - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        state[u] = "done"
        stack.pop()
    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_cycle_finder_finds_a_lazy_cycle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_analysis():
    graph = import_graph()
    assert "analysis.claims.balance" in graph and "analysis.report" in graph["analysis.claims"]
    assert cycles(graph) == []


def test_claim_modules_import_only_the_shared_layer():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("analysis.claims.") and name not in SHARED:
            assert deps <= CLAIM_MODULE_IMPORTS, (name, deps - CLAIM_MODULE_IMPORTS)
        elif name in SHARED:
            assert deps <= SHARED_IMPORTS, (name, deps - SHARED_IMPORTS)
    assert graph["analysis.report"] <= {"analysis.stats", "analysis.results"}   # it formats, it knows no claim


def test_the_claims_layer_imports_no_torch():
    code = "import analysis.claims, analysis.report, analysis.figures, sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_method_names_come_only_from_the_registry():
    quoted = re.compile("[\"'](" + "|".join(map(re.escape, methods.METHODS)) + ")[\"']")
    for path in OWNED + sorted(p for p in (ROOT / "notebooks").glob("*.py") if p.name != TOUR):
        hits = [m.group(0) for m in quoted.finditer(path.read_text())]
        assert not hits, (path.name, hits)
