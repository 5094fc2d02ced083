"""Claims report: judge every claim of the evidence topics (SPEC §5) from saved results and write
``CLAIMS.md`` and ``claims.csv``.

``python -m analysis claims [--profile quick|paper] [--results-dir DIR]`` calls :func:`run`, which

1. makes sure every experiment exists (:func:`analysis.experiments.ensure_results`; finished cells
   are skipped),
2. optionally runs the property tests that back the claims in a ``pytest`` subprocess and reads
   their JUnit XML (one outcome per test node id),
3. judges every claim declared in :mod:`analysis.topics` (:func:`analysis.evidence.judge`: the
   topic's ``evaluate`` applies the rule in code, then the backing-test gate) and writes the report
   atomically.

Verdicts are exactly one of :data:`VERDICTS`.  Intervals are two-sided Student-t intervals of the
mean over seeds (:mod:`analysis.stats`; seeds are the replicates), 95 % unless a claim's family uses
Holm-ordered levels (the level is reported).  ``claims.csv`` has one row per claim (``comparison``
empty) and one row per paired comparison of that claim (:class:`analysis.stats.Comparison`: ``n,
effect, ci_low, ci_high, margin, mde, claimed_side, conf`` and the comparison's own SPEC §5 verdict).  A missing experiment raises
:class:`analysis.experiments.MissingResultsError` naming the command that produces it.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .evidence import VERDICTS, Claim, TestRun, judge_all, md_table, tests_for  # noqa: F401  (public names)
from .experiments import EXPERIMENTS, MissingResultsError, ensure_results, load_all  # noqa: F401
from .results import atomic_write_csv, atomic_write_text, git_commit, git_dirty, update_marked_section
from .stats import fmt
from .topics import CLAIM_IDS, CLAIMS

REPO_ROOT = Path(__file__).resolve().parents[1]
CSV_COLUMNS = ("id", "comparison", "paper_wording", "statement", "verdict", "evidence", "figure",
               "n", "effect", "ci_low", "ci_high", "margin", "mde", "claimed_side", "conf")
COMPARISON_FIELDS = ("n", "effect", "ci_low", "ci_high", "margin", "mde", "claimed_side", "conf")
TEST_FILES = ("tests/test_properties.py", "tests/test_probes_lipschitz.py",
              "tests/test_probes_amplification.py", "tests/test_inject.py")


def load_results(results_dir) -> tuple[dict, dict]:
    """Rows and meta of every experiment the claims read; raises :class:`MissingResultsError`."""
    needed = [e for e in EXPERIMENTS if any(e in (*c.experiments, *c.optional) for c in CLAIMS)]
    return load_all(needed, results_dir, needed_by="claims")


def evaluate(data: dict, tests: TestRun | dict | None = None, config: dict | None = None, *,
             results_dir="results") -> list[Claim]:
    """Every claim (in id order) from the experiment frames ``data``; ``config``: the experiment config
    as a dict (sections ``train`` and ``twins`` are used).  A missing experiment raises
    :class:`MissingResultsError` naming ``results_dir``."""
    return judge_all(CLAIMS, data, tests, config, results_dir=results_dir)


# ----------------------------------------------------------------------------- property tests
def parse_junit(text: str, root: Path = REPO_ROOT) -> dict[str, str]:
    """Node id -> outcome (passed / failed / error / skipped) from a pytest JUnit XML report."""
    outcomes = {}
    for case in ET.fromstring(text).iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        parts = classname.split(".") if classname else []
        nodeid = None
        if case.get("file"):
            f = case.get("file")
            inner = [p for p in parts if p not in Path(f).with_suffix("").parts]
            nodeid = "::".join([f, *inner, name])
        else:
            for i in range(len(parts), 0, -1):
                path = "/".join(parts[:i]) + ".py"
                if (root / path).is_file():
                    nodeid = "::".join([path, *parts[i:], name])
                    break
        nodeid = nodeid or "::".join([*parts, name])
        tags = {child.tag for child in case}
        outcome = ("failed" if "failure" in tags else "error" if "error" in tags
                   else "skipped" if "skipped" in tags else "passed")
        if outcomes.get(nodeid) in ("failed", "error"):   # setup/teardown error after a result
            continue
        outcomes[nodeid] = outcome
    return outcomes


def run_property_tests(files=TEST_FILES, root: Path = REPO_ROOT, timeout: int = 1800) -> TestRun:
    """``python -m pytest -q -p no:cacheprovider --junitxml <tmp> <files>`` in a subprocess
    (Hypothesis profile ``ci``, derandomised, unless HYPOTHESIS_PROFILE is set)."""
    with tempfile.TemporaryDirectory(prefix="claims-junit-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(xml), *files]
        env = {**os.environ}
        env.setdefault("HYPOTHESIS_PROFILE", "ci")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=timeout)
        wall = time.perf_counter() - t0
        if not xml.is_file():
            raise RuntimeError(f"pytest wrote no JUnit report (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        outcomes = parse_junit(xml.read_text(), root)
    shown = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", "<tmp>", *files]
    return TestRun(outcomes, " ".join(shown) + f"  (HYPOTHESIS_PROFILE={env['HYPOTHESIS_PROFILE']})",
                   proc.returncode, wall)


# ----------------------------------------------------------------------------- report
def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(claims: list[Claim], *, command: str, results_dir, commit: str, dirty,
                    meta: dict | None = None, tests: TestRun | None = None, generated_at: str | None = None) -> str:
    generated_at = generated_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = meta or {}
    out = ["# TalkLoRA claims report", "",
           "> **Generated file — do not edit by hand.** Every verdict below is computed by an explicit rule "
           "in the evidence topics (`analysis/topics/`) from the saved results; re-run the command to update it.", "",
           f"- Command: `{command}`",
           f"- Results: `{results_dir}`",
           f"- Code: git commit `{commit}`" + (" (uncommitted changes present)" if dirty else ""),
           f"- Generated: {generated_at}"]
    if meta:
        rows = []
        for name, m in meta.items():
            cfg = m.get("config") or {}
            rows.append([f"`{name}`", m.get("rows", "?"), m.get("status", "?"), cfg.get("profile", "?"),
                         f"`{str(m.get('git_commit', '?'))[:12]}`", m.get("finished_at", "?")])
        out += ["", "Experiments read:", "",
                md_table(["experiment", "rows", "status", "profile", "git commit of the run", "finished"], rows)]
    if tests is None:
        out += ["", "Property tests: **not run** (`run_tests=False`); claims that rely on them say so."]
    else:
        n = len(tests.outcomes)
        passed = sum(o == "passed" for o in tests.outcomes.values())
        failed = sum(o in ("failed", "error") for o in tests.outcomes.values())
        out += ["", f"Property tests: **{passed}/{n} passed**, {failed} failed/errored "
                    f"(`{tests.command}`, exit {tests.returncode}, {fmt(tests.wall_s or math.nan)} s)."]
    out += ["", "Verdicts: `holds` / `holds under stated conditions` / `refuted` / `inconclusive` (the data "
                "cannot decide, e.g. an interval that includes the null value or a single seed). Intervals are "
                "95 % Student-t intervals over seeds unless stated otherwise.", "",
            "## Summary", "",
            md_table(["id", "claim", "verdict", "key number", "figure"],
                     [[c.id, _one_line(c.paper_wording), f"**{c.verdict}**", _one_line(c.key_number), c.figure]
                      for c in claims])]
    for c in claims:
        out += ["", f"## {c.id} — {c.paper_wording}", "",
                f"**Paper's wording** (as summarised in SPEC §5): {c.paper_wording}", "",
                f"**Our statement.** {c.statement}", "",
                f"**Verdict: {c.verdict}.** {c.reason}.", "",
                f"**Rule.** {c.rule}", "",
                "**Evidence.**", "", *_spaced(c.evidence + _comparison_lines(c)), "",
                f"**Figure:** {c.figure}."]
    return "\n".join(out) + "\n"


def _comparison_lines(claim: Claim) -> list[str]:
    """The claim's paired comparisons (SPEC §5: n, effect, 95 % interval, margin, MDE), if it has any."""
    if not claim.comparisons:
        return []
    return ["- Paired comparisons (t-interval over seeds at the stated level, 95 % unless shown; MDE at 80 % "
            "power; each comparison's verdict by SPEC §5):",
            md_table(["comparison", "n", "effect", "interval", "margin", "MDE", "verdict"],
                     [cmp.row() for cmp in claim.comparisons])]


def _spaced(lines: list[str]) -> list[str]:
    """Markdown tables need a blank line before and after them."""
    out = []
    for line in lines:
        if line.startswith("|"):
            out += ["", line, ""]
        else:
            out.append(line)
    return out


def claims_frame(claims: list[Claim]) -> pd.DataFrame:
    """One row per claim (``comparison`` empty) followed by one row per paired comparison of that claim
    (SPEC §5: ``n, effect, ci_low, ci_high, margin, mde`` and the comparison's own ``verdict``)."""
    rows = []
    for c in claims:
        rows.append({"id": c.id, "comparison": "", "paper_wording": c.paper_wording, "statement": c.statement,
                     "verdict": c.verdict, "evidence": c.evidence_text(), "figure": c.figure})
        rows += [{"id": c.id, "comparison": cmp.name, "verdict": cmp.verdict, "figure": c.figure,
                  **{f: getattr(cmp, f) for f in COMPARISON_FIELDS}} for cmp in c.comparisons]
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def write_report(claims: list[Claim], out_md, out_csv, **render_kw) -> tuple[Path, Path]:
    ids = [c.id for c in claims]
    if ids != list(CLAIM_IDS):
        raise ValueError(f"the report needs exactly the claims {CLAIM_IDS} in order, got {ids}")
    text = render_markdown(claims, **render_kw)
    frame = claims_frame(claims)
    return atomic_write_text(out_md, text), atomic_write_csv(frame, out_csv)


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        out_md="CLAIMS.md", out_csv="claims.csv", run_tests: bool = True):
    """Run any missing experiments, the backing property tests (``run_tests``), judge every claim and
    write ``out_md`` / ``out_csv`` atomically.  Returns the list of :class:`Claim`."""
    ensure_results(config, results_dir=results_dir, workers=workers, executor=executor, force=force)
    tests = run_property_tests() if run_tests else None
    data, meta = load_results(results_dir)
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    claims = evaluate(data, tests, cfg, results_dir=results_dir)
    profile = cfg.get("profile", "?")
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("")
    if argv0.name == "__main__.py" and argv0.parent.name == "analysis":
        command = "python -m analysis " + " ".join(sys.argv[1:])
    else:
        command = (f"analysis.claims.run(<config profile {profile!r}>, results_dir={str(results_dir)!r}, "
                   f"out_md={str(out_md)!r}, out_csv={str(out_csv)!r}, run_tests={run_tests})")
    md, csv = write_report(claims, out_md, out_csv, command=command, results_dir=results_dir,
                           commit=git_commit(), dirty=git_dirty(), meta=meta, tests=tests)
    if Path(out_md).resolve() == REPO_ROOT / "CLAIMS.md":
        summary = md_table(["id", "claim", "verdict", "key number"],
                           [[c.id, _one_line(c.paper_wording), f"**{c.verdict}**", _one_line(c.key_number)]
                            for c in claims])
        update_marked_section(REPO_ROOT / "README.md", "claims",
                              f"Generated by `{command}` (details and rules: [CLAIMS.md](CLAIMS.md)).\n\n{summary}")
    width = max(len(c.id) for c in claims)
    for c in claims:
        print(f"{c.id:<{width}}  {c.verdict:<30}  {c.key_number}")
    print(f"wrote {md} and {csv}")
    return claims
