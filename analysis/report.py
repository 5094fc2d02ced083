"""The claims report: ``CLAIMS.md`` and ``claims.csv`` from judged claims, and the run of the
property tests that back them.

:func:`analysis.claims.run` (``python -m analysis claims [--profile quick|paper] [--results-dir DIR]``)

1. makes sure every experiment exists (:func:`analysis.experiments.ensure_results`; finished cells
   are skipped),
2. optionally runs the property tests that back the claims in a ``pytest`` subprocess
   (:func:`run_property_tests`, one outcome per test node id from its JUnit XML),
3. judges every claim declared in :mod:`analysis.claims` (the claim's rule in code, then the
   backing-test gate) and hands the result to :func:`publish`, which writes the report atomically.

Verdicts are exactly one of ``analysis.claims.base.VERDICTS``.  Intervals are two-sided Student-t
intervals of the mean over seeds (:mod:`analysis.stats`; seeds are the replicates), 95 % unless a
claim's family uses Holm-ordered levels (the level is reported).  ``claims.csv`` has one row per claim
(``comparison`` empty) and one row per paired comparison of that claim
(:class:`analysis.stats.Comparison`: ``n, effect, ci_low, ci_high, margin, mde, claimed_side, conf``
and the comparison's own verdict, docs/method.md §5).  This module knows nothing about the individual
claims (it imports no claim module): it formats what it is given.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .stats import fmt

REPO_ROOT = Path(__file__).resolve().parents[1]
CSV_COLUMNS = ("id", "comparison", "paper_wording", "statement", "verdict", "evidence", "figure",
               "n", "effect", "ci_low", "ci_high", "margin", "mde", "claimed_side", "conf")
COMPARISON_FIELDS = ("n", "effect", "ci_low", "ci_high", "margin", "mde", "claimed_side", "conf")
TEST_FILES = ("tests/test_properties.py", "tests/test_probes_lipschitz.py",
              "tests/test_probes_amplification.py", "tests/test_inject.py")


def md_table(header: list[str], rows: list[list]) -> str:
    """A markdown table (the report puts blank lines around it)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- property tests
@dataclass
class TestRun:
    """Outcomes of the backing property tests (node id -> passed/failed/error/skipped)."""
    __test__ = False             # not a pytest test class
    outcomes: dict
    command: str = "(injected)"
    returncode: int | None = None
    wall_s: float | None = None


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


def render_markdown(claims: list, *, command: str, results_dir, commit: str, dirty,
                    meta: dict | None = None, tests: TestRun | None = None, generated_at: str | None = None) -> str:
    generated_at = generated_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = meta or {}
    out = ["# TalkLoRA claims report", "",
           "> **Generated file — do not edit by hand.** Every verdict below is computed by an explicit rule "
           "in the claim modules (`analysis/claims/`) from the saved results; re-run the command to update it.", "",
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
                f"**Paper's wording** (as summarised in docs/method.md §5): {c.paper_wording}", "",
                f"**Our statement.** {c.statement}", "",
                f"**Verdict: {c.verdict}.** {c.reason}.", "",
                f"**Rule.** {c.rule}", "",
                "**Evidence.**", "", *_spaced(c.evidence + _comparison_lines(c)), "",
                f"**Figure:** {c.figure}."]
    return "\n".join(out) + "\n"


def _comparison_lines(claim) -> list[str]:
    """The claim's paired comparisons (docs/method.md §5: n, effect, 95 % interval, margin, MDE), if any."""
    if not claim.comparisons:
        return []
    return ["- Paired comparisons (t-interval over seeds at the stated level, 95 % unless shown; MDE at 80 % "
            "power; each comparison's verdict by docs/method.md §5):",
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


def claims_frame(claims: list) -> pd.DataFrame:
    """One row per claim (``comparison`` empty) followed by one row per paired comparison of that claim
    (``n, effect, ci_low, ci_high, margin, mde`` and the comparison's own ``verdict``)."""
    rows = []
    for c in claims:
        rows.append({"id": c.id, "comparison": "", "paper_wording": c.paper_wording, "statement": c.statement,
                     "verdict": c.verdict, "evidence": c.evidence_text(), "figure": c.figure})
        rows += [{"id": c.id, "comparison": cmp.name, "verdict": cmp.verdict, "figure": c.figure,
                  **{f: getattr(cmp, f) for f in COMPARISON_FIELDS}} for cmp in c.comparisons]
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def write_report(claims: list, out_md, out_csv, *, ids, **render_kw) -> tuple[Path, Path]:
    """Write ``out_md`` and ``out_csv`` atomically (each replaced only when complete); ``ids``: the
    claim ids the report must hold, in order."""
    from .results import atomic_write_csv, atomic_write_text

    got = [c.id for c in claims]
    if got != list(ids):
        raise ValueError(f"the report needs exactly the claims {tuple(ids)} in order, got {got}")
    text = render_markdown(claims, **render_kw)
    frame = claims_frame(claims)
    return atomic_write_text(out_md, text), atomic_write_csv(frame, out_csv)


def publish(claims: list, out_md, out_csv, *, ids, command: str, results_dir, meta: dict | None = None,
            tests: TestRun | None = None) -> tuple[Path, Path]:
    """:func:`write_report` stamped with the git commit; the README's verdict table too when the report
    goes to the repository root; one line per claim on stdout."""
    from .results import git_commit, git_dirty, update_marked_section

    md, csv = write_report(claims, out_md, out_csv, ids=ids, command=command, results_dir=results_dir,
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
    return md, csv
