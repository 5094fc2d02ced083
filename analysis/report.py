"""The claims report: ``CLAIMS.md`` and ``claims.csv`` from judged claims, and the run of the
property tests that back them.

:func:`analysis.claims.run` (``python -m analysis claims [--profile quick|paper] [--results-dir DIR]``)

1. makes sure every experiment exists (:func:`analysis.experiments.ensure_results`; finished cells
   are skipped),
2. optionally runs the property tests that back the claims in a ``pytest`` subprocess
   (:func:`run_property_tests`, one outcome per test node id from its JUnit XML),
3. judges every claim declared in :mod:`analysis.claims` (the claim's rule in code, then the
   backing-test gate) and hands the result to :func:`publish`, which writes the report atomically.

Verdicts are exactly one of ``analysis.claims.base.VERDICTS``: the analytic claims' holds / refuted /
inconclusive, the empirical claims' supported / supported-below-relevance / no-relevant-effect /
contradicted / mixed / inconclusive / not-testable (docs/method.md §5.1).  Intervals are two-sided
Student-t intervals of the mean over seeds (:mod:`analysis.stats`; seeds are the replicates), at the
comparison's Holm-ordered level where a claim corrects for multiplicity (the level is reported), or
an exact McNemar interval per example (the test is named).  ``claims.csv`` has one row per claim
(``comparison`` empty) and one row per comparison of that claim (:class:`analysis.stats.Comparison`:
setting, controls, whether it decides, ``n, effect, ci_low, ci_high, margin, mde, n_needed,
claimed_side, conf, test`` and its own verdict); ``rules_version`` says which rules wrote it, and
``paper_verdict`` holds the paper profile's verdict of the claim (read from ``reports/paper/claims.csv``
when it exists and was written by the same rules).  The report also prints the preregistration, the
settings' positive controls and a Limitations section.  This module knows nothing about the individual
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
RULES_VERSION = "evidence-1"       # the verdict rules of docs/method.md §5 (vocabulary, controls, Holm per claim)
PAPER_CSV = REPO_ROOT / "reports" / "paper" / "claims.csv"
CSV_COLUMNS = ("id", "comparison", "setting", "controls", "verdict", "deciding", "n", "effect", "ci_low", "ci_high",
               "margin", "mde", "n_needed", "claimed_side", "conf", "test", "paper_verdict", "rules_version", "kind",
               "paper_wording", "statement", "evidence", "figure")
COMPARISON_FIELDS = ("setting", "controls", "deciding", "n", "effect", "ci_low", "ci_high", "margin", "mde",
                     "n_needed", "claimed_side", "conf", "test")
TEST_FILES = ("tests/test_properties.py", "tests/test_probes_lipschitz.py",
              "tests/test_probes_amplification.py", "tests/test_inject.py", "tests/test_structures.py")
EMPIRICAL_LEGEND = ("Empirical verdicts (docs/method.md §5.1): **supported** (the effect is on the claimed side and "
                    "may be relevant), **supported-below-relevance** (on the claimed side, smaller than the margin), "
                    "**no-relevant-effect** (shown smaller than the margin either way, with power checked), "
                    "**contradicted** (on the wrong side), **mixed** (some deciding comparisons supported, others "
                    "not: named), **inconclusive** (the data do not decide), **not-testable** (a positive control "
                    "failed: the setting cannot show the effect, whatever it is). Analytic verdicts (C1–C4, C8, "
                    "C10): **holds** / **refuted** / **inconclusive**.")


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


@dataclass
class PaperColumn:
    """The paper profile's verdicts beside this report's: ``verdicts`` claim id -> verdict, ``rows``
    the paper CSV's rows (for the reasons they differ), ``note`` why the column is n/a when it is."""
    verdicts: dict
    rows: pd.DataFrame | None = None
    note: str = ""

    @classmethod
    def read(cls, path=PAPER_CSV) -> "PaperColumn":
        """``reports/paper/claims.csv`` when it exists and was written by :data:`RULES_VERSION`; "n/a" otherwise."""
        path = Path(path)
        if not path.is_file():
            return cls({}, None, f"n/a: {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path} "
                                 "does not exist (run `make paper`)")
        frame = pd.read_csv(path)
        if "rules_version" not in frame or set(frame["rules_version"].dropna()) != {RULES_VERSION}:
            return cls({}, None, "n/a: the paper report was written by older rules (no rules_version "
                                 f"{RULES_VERSION}); re-run `make paper`")
        claims = frame[frame["comparison"].isna()]
        return cls(dict(zip(claims["id"], claims["verdict"])), frame)

    def verdict(self, claim_id: str) -> str:
        return self.verdicts.get(claim_id, "n/a")

    def why_different(self, claim) -> str:
        """Where this report's verdict and the paper's differ: which settings were testable and how many seeds."""
        paper = self.verdict(claim.id)
        if paper in ("n/a", claim.verdict):
            return ""
        rows = self.rows[self.rows["id"] == claim.id]
        p_controls = str(rows[rows["comparison"].isna()]["controls"].fillna("").iloc[0])
        p_n = rows["n"].dropna()
        n_here = [c.n for c in claim.comparisons if c.deciding]
        parts = []
        if p_controls != claim.controls:
            parts.append(f"controls here: {claim.controls or '—'}; paper: {p_controls or '—'}")
        if len(p_n) and n_here and int(p_n.max()) != max(n_here):
            parts.append(f"seeds here up to {max(n_here)}, paper up to {int(p_n.max())}")
        return "; ".join(parts) or "the same settings and seeds: the intervals differ"


def preregistration_lines(info: dict | None) -> list[str]:
    """The preregistration section: version, SHA-256, deviations (listed), profile deviation."""
    if not info:
        return ["Preregistration: not given."]
    out = [f"- File: `analysis/preregistration.toml`, version **{info['version']}** (registered "
           f"{info['registered']}), SHA-256 `{info['sha256']}`.",
           f"- Profile used: `{info['profile']}`; " + (f"**deviation:** {info['profile_deviation']}."
                                                       if info.get("profile_deviation") else "as registered.")]
    devs = info.get("deviations") or []
    out.append("- Deviations registered after results existed: " + ("none." if not devs else ""))
    out += [f"  - v{d['version']}: {d['change']} — {d['reason']}" for d in devs]
    return out


CONTROL_FIXES = {"P1": "adaptation that matters (longer training or a larger model)",
                 "P2": "decisive routing (gate entropy below the threshold: longer training)",
                 "P3": "twins that measurably diverge", "budgets": "three matched budgets per baseline",
                 "margin": "a margin the tuning runs can fix (the adapters beating the no-adapter reference on "
                           "validation)"}


def limitations_lines(claims: list, profile: str) -> list[str]:
    """The Limitations section: scale and tasks, failed controls, what would change each verdict."""
    out = ["- **Scale and tasks.** The paper evaluates TalkLoRA on 8B-parameter language models fine-tuned for "
           "commonsense reasoning; these settings are a planted-teacher regression (one linear layer), "
           "MiniLM-L6 (22.7M parameters) on short text classification and SmolLM2-135M on a three-domain causal "
           "LM, with a few hundred steps. A verdict here is evidence about these settings, named with each "
           "verdict, not about the paper's.",
           "- **Settings that fail a positive control say nothing.** Their comparisons are *not testable* and "
           "never count as \"no effect\"; a claim that is not testable anywhere is open, not refuted.",
           f"- **Which report to cite.** This report uses the `{profile}` profile; cite the paper profile "
           "(`reports/paper/CLAIMS.md`: more seeds and steps, official settings) where both exist, and only "
           "verdicts produced by the same rules (`rules_version` in claims.csv)."]
    what = []
    for c in claims:
        if c.kind != "empirical":
            continue
        weak = [x for x in c.comparisons if x.deciding and x.verdict != "not-testable" and not x.power_met]
        failed = {x.setting: x.controls for x in c.comparisons if x.deciding and x.verdict == "not-testable"}
        bits = []
        if weak:
            need = [x.n_needed for x in weak if x.n_needed]
            bits.append(f"{len(weak)} deciding comparison(s) lack power (P4): "
                        + (f"up to n ≈ {max(need)} seeds would be needed" if need else "no finite n from the observed sd"))
        for setting, controls in failed.items():
            fixes = [fix for key, fix in CONTROL_FIXES.items() if key in controls]
            bits.append(f"{setting} ({controls}) would count with " + " and ".join(fixes or ["passing its controls"]))
        if c.verdict in ("inconclusive", "mixed") and not bits:
            bits.append("more seeds (narrower intervals) or longer training")
        if bits:
            what.append(f"  - {c.id} ({c.verdict}): " + "; ".join(bits) + ".")
    if what:
        out += ["- **What would change a verdict:**", *what]
    return out


def render_markdown(claims: list, *, command: str, results_dir, commit: str, dirty,
                    meta: dict | None = None, tests: TestRun | None = None, generated_at: str | None = None,
                    prereg: dict | None = None, sections=(), paper: PaperColumn | None = None) -> str:
    """The claims report.  ``prereg``: the preregistration's version, hash, deviations and profile
    deviation; ``sections``: ``(title, lines)`` printed before the claims (e.g. the settings' controls);
    ``paper``: the paper profile's verdicts for the paper column."""
    generated_at = generated_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = meta or {}
    paper = paper or PaperColumn({}, None, "n/a: no paper report given")
    profile = (prereg or {}).get("profile", "?")
    out = ["# TalkLoRA claims report", "",
           "> **Generated file — do not edit by hand.** Every verdict below is computed by an explicit rule "
           "in the claim modules (`analysis/claims/`) from the saved results; re-run the command to update it.", "",
           f"- Command: `{command}`",
           f"- Results: `{results_dir}`",
           f"- Code: git commit `{commit}`" + (" (uncommitted changes to the code present)" if dirty else ""),
           f"- Rules: `{RULES_VERSION}`",
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
    out += ["", "## Preregistration", "", *preregistration_lines(prereg)]
    for title, lines in sections:
        out += ["", f"## {title}", "", *_spaced(list(lines))]
    out += ["", "## Summary", "", EMPIRICAL_LEGEND, "",
            f"Paper profile column: {paper.note or 'from `reports/paper/claims.csv` (same rules)'}.", "",
            md_table(["id", "claim", "verdict", "paper profile", "key number", "figure"],
                     [[c.id, _one_line(c.paper_wording), f"**{c.verdict}**", paper.verdict(c.id),
                       _one_line(c.key_number), c.figure] for c in claims])]
    differ = [f"- {c.id}: here **{c.verdict}**, paper **{paper.verdict(c.id)}** — {paper.why_different(c)}."
              for c in claims if paper.why_different(c)]
    if differ:
        out += ["", "Where this report and the paper profile differ:", "", *differ]
    for c in claims:
        out += ["", f"## {c.id} — {c.paper_wording}", "",
                f"**Paper's wording** (as summarised in docs/method.md §5): {c.paper_wording}", "",
                f"**Our statement.** {c.statement}", "",
                f"**Verdict: {c.verdict}.** {c.reason}." + (f" (Paper profile: {paper.verdict(c.id)}.)"
                                                             if paper.verdicts else ""), "",
                f"**Rule.** {c.rule}", "",
                "**Evidence.**", "", *_spaced(c.evidence + _comparison_lines(c)), "",
                f"**Figure:** {c.figure}."]
    out += ["", "## Limitations", "", *limitations_lines(claims, profile)]
    return "\n".join(out) + "\n"


def _comparison_lines(claim) -> list[str]:
    """An analytic claim's paired comparisons (n, effect, interval, margin, MDE); the empirical claims
    render theirs with their settings and controls (:mod:`analysis.claims.decide`)."""
    if not claim.comparisons or claim.kind == "empirical":
        return []
    return ["- Paired comparisons (t-interval over seeds at the stated level, 95 % unless shown; MDE at 80 % "
            "power; each comparison's verdict by its analytic rule):",
            md_table(["comparison", "n", "effect", "interval", "margin", "MDE", "verdict"],
                     [cmp.row() for cmp in claim.comparisons])]


def _spaced(lines: list[str]) -> list[str]:
    """Markdown tables need a blank line before and after them."""
    out = []
    for line in lines:
        if line.startswith("|") and not (out and out[-1].startswith("|")):
            out += ["", line]
        elif out and out[-1].startswith("|") and not line.startswith("|"):
            out += ["", line]
        else:
            out.append(line)
    return out


def claims_frame(claims: list, paper: PaperColumn | None = None) -> pd.DataFrame:
    """One row per claim (``comparison`` empty) followed by one row per comparison of that claim
    (its setting, controls, whether it decides, ``n, effect, ci_low, ci_high, margin, mde, n_needed``,
    the test and the comparison's own verdict)."""
    paper = paper or PaperColumn({})
    rows = []
    for c in claims:
        rows.append({"id": c.id, "comparison": "", "controls": c.controls, "verdict": c.verdict,
                     "paper_verdict": paper.verdict(c.id), "rules_version": RULES_VERSION, "kind": c.kind,
                     "paper_wording": c.paper_wording, "statement": c.statement, "evidence": c.evidence_text(),
                     "figure": c.figure})
        rows += [{"id": c.id, "comparison": cmp.name, "verdict": cmp.verdict, "figure": c.figure,
                  "rules_version": RULES_VERSION, "kind": c.kind,
                  **{f: getattr(cmp, f) for f in COMPARISON_FIELDS}} for cmp in c.comparisons]
    frame = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    return frame.astype({"n": "Int64", "n_needed": "Int64"})      # counts stay integers beside the empty claim rows


def write_report(claims: list, out_md, out_csv, *, ids, **render_kw) -> tuple[Path, Path]:
    """Write ``out_md`` and ``out_csv`` atomically (each replaced only when complete); ``ids``: the
    claim ids the report must hold, in order."""
    from .results import atomic_write_csv, atomic_write_text

    got = [c.id for c in claims]
    if got != list(ids):
        raise ValueError(f"the report needs exactly the claims {tuple(ids)} in order, got {got}")
    text = render_markdown(claims, **render_kw)
    frame = claims_frame(claims, render_kw.get("paper"))
    return atomic_write_text(out_md, text), atomic_write_csv(frame, out_csv)


def readme_section(claims: list, command: str, paper: PaperColumn) -> str:
    """The README's verdict table (between the ``claims`` markers), with the paper column and a short
    Limitations note."""
    summary = md_table(["id", "claim", "verdict", "paper profile", "key number"],
                       [[c.id, _one_line(c.paper_wording), f"**{c.verdict}**", paper.verdict(c.id),
                         _one_line(c.key_number)] for c in claims])
    return (f"Generated by `{command}` (rules `{RULES_VERSION}`; details, controls and rules: "
            f"[CLAIMS.md](CLAIMS.md)).\n\n{summary}\n\n"
            "**Limitations.** These are small settings (a planted teacher, MiniLM-L6, SmolLM2-135M; hundreds of "
            "steps), far from the paper's 8B commonsense-reasoning models; every empirical verdict names its "
            "setting, settings that fail a positive control are *not testable* (never \"no effect\"), and "
            "[CLAIMS.md](CLAIMS.md#limitations) says what would change each verdict.")


def publish(claims: list, out_md, out_csv, *, ids, command: str, results_dir, meta: dict | None = None,
            tests: TestRun | None = None, prereg: dict | None = None, sections=(),
            paper_csv=PAPER_CSV) -> tuple[Path, Path]:
    """:func:`write_report` stamped with the git commit, with the paper column read from ``paper_csv``
    (unless the report *is* the paper report); the README's verdict table too when the report goes to
    the repository root; one line per claim on stdout."""
    from .results import git_commit, git_dirty, update_marked_section

    same = Path(out_csv).resolve() == Path(paper_csv).resolve()
    paper = PaperColumn({}, None, "this is the paper profile's report") if same else PaperColumn.read(paper_csv)
    md, csv = write_report(claims, out_md, out_csv, ids=ids, command=command, results_dir=results_dir,
                           commit=git_commit(), dirty=git_dirty(), meta=meta, tests=tests, prereg=prereg,
                           sections=sections, paper=paper)
    if Path(out_md).resolve() == REPO_ROOT / "CLAIMS.md":
        update_marked_section(REPO_ROOT / "README.md", "claims", readme_section(claims, command, paper))
    width = max(len(c.id) for c in claims)
    for c in claims:
        print(f"{c.id:<{width}}  {c.verdict:<26}  {c.key_number}")
    print(f"wrote {md} and {csv}")
    return md, csv
