"""What every claim module declares, and the one place a claim is judged.

* :class:`ClaimSpec` — a claim declared once: id, the paper's wording, our statement, the verdict
  rule in words, the figures that show it, the backing property tests (regexes on pytest node ids),
  the experiments it reads and the ``evaluate`` function that applies the rule in code;
* :class:`Outcome` — what ``evaluate`` returns (verdict, reason, key number, evidence lines, and
  the :class:`~analysis.stats.Comparison` rows of its paired comparisons, if any);
* :func:`margin` — an analytic claim's margin, declared in the preregistration (``[margins]``; the
  empirical claims' margins are per setting: :mod:`analysis.claims.assay`);
* :func:`judge` — turns a spec, the data and the backing-test outcomes into a reported
  :class:`Claim`; it applies the backing-test gate: **a failed backing test makes the verdict
  inconclusive** (the measuring code is then suspect); tests that were not run leave the numeric
  rule in charge and the evidence says "not run";
* :class:`FigureSpec` — a figure: ``prepare(rows…) -> DataFrame`` (the data drawn and saved) and
  ``draw(data) -> Figure``, its caption and the notebook that redraws it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from ..experiments import EXPERIMENTS, MissingResultsError
from ..stats import ANALYTIC_VERDICTS, CLAIM_VERDICTS, Comparison

KINDS = {"analytic": ANALYTIC_VERDICTS, "empirical": CLAIM_VERDICTS}
VERDICTS = tuple(dict.fromkeys(v for vs in KINDS.values() for v in vs))


def margin(name: str) -> float:
    """An analytic claim's margin (``c8_share``, ``c10_relative``), declared in the preregistration
    before anything runs (docs/method.md §5.7): a missing one is an error, never a default."""
    from .assay import registration
    return registration().margin_rule(name)


# ----------------------------------------------------------------------------- declarations
@dataclass
class Outcome:
    """The numeric rule's result for one claim (before the backing-test gate)."""
    verdict: str
    reason: str
    key_number: str
    evidence: list[str]
    statement: str | None = None            # overrides the declared statement (e.g. with numbers)
    comparisons: list[Comparison] = field(default_factory=list)
    controls: str = ""                      # empirical claims: the controls per setting, in one line

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass(frozen=True)
class ClaimSpec:
    """One claim, declared once (docs/method.md §5).  ``evaluate(data, config, verdicts) -> Outcome``
    where ``data`` maps experiment names to their rows, ``config`` is the experiment config as a dict
    and ``verdicts`` holds the verdicts of the claims named in ``uses_verdicts``.  ``kind``:
    ``analytic`` (holds / refuted / inconclusive) or ``empirical`` (docs/method.md §5.1 vocabulary).  ``also_gated_by``:
    backing-test patterns of other claims whose failure also makes this one inconclusive (C2 rests
    on C1's identity map)."""
    id: str
    paper: str
    statement: str
    rule: str
    figures: tuple[str, ...]
    tests: tuple[str, ...]
    experiments: tuple[str, ...]
    evaluate: Callable[..., Outcome]
    optional: tuple[str, ...] = ()
    uses_verdicts: tuple[str, ...] = ()
    also_gated_by: tuple[str, ...] = ()
    kind: str = "analytic"

    def __post_init__(self):
        if not re.fullmatch(r"C\d+", self.id):
            raise ValueError(f"claim id must look like 'C<n>', got {self.id!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.id}: kind must be one of {list(KINDS)}, got {self.kind!r}")
        unknown = [e for e in (*self.experiments, *self.optional) if e not in EXPERIMENTS]
        if unknown:
            raise ValueError(f"{self.id}: experiments must be among {sorted(EXPERIMENTS)}, got {unknown}")
        if not self.figures or not all(re.fullmatch(r"F\d+", f) for f in self.figures):
            raise ValueError(f"{self.id}: figures must be ids like 'F<n>' (at least one), got {self.figures!r}")


@dataclass
class Claim:
    """A claim as reported: the declaration's texts plus the verdict and its evidence."""
    id: str
    statement: str
    verdict: str
    key_number: str
    evidence: list[str]          # markdown paragraphs / bullet lines / tables
    reason: str                  # why the rule gave this verdict, with the numbers
    paper_wording: str = ""
    figure: str = ""
    rule: str = ""
    comparisons: list[Comparison] = field(default_factory=list)
    kind: str = "analytic"
    controls: str = ""

    def __post_init__(self):
        allowed = KINDS.get(self.kind, ())
        if self.verdict not in allowed:
            raise ValueError(f"{self.id}: verdict of a {self.kind} claim must be one of {allowed}, got {self.verdict!r}")

    def evidence_text(self) -> str:
        return "\n".join([f"Rule: {self.rule}", f"Outcome: {self.reason}", f"Key number: {self.key_number}",
                          *self.evidence])


@dataclass(frozen=True)
class FigureSpec:
    """A figure ``F<n>_<slug>``: ``prepare(*rows) -> DataFrame`` and ``draw(data)``; ``rows`` are the
    frames of ``experiments`` (required) then of ``optional`` (``None`` when absent: a setting that did
    not run).  ``caption_text`` says what is drawn and may contain ``{claims}``, filled from the claims
    that cite the figure (the registry sets ``claims``).  ``notebook``: the notebook that redraws it.
    With ``needs_config`` the prepare step also gets ``config=`` (the experiment config as a dict)."""
    id: str
    slug: str
    experiments: tuple[str, ...]
    prepare: Callable[..., pd.DataFrame]
    draw: Callable
    caption_text: str
    notebook: str
    claims: tuple[str, ...] = ()
    needs_config: bool = False
    optional: tuple[str, ...] = ()

    def __post_init__(self):
        if not re.fullmatch(r"F\d+", self.id):
            raise ValueError(f"figure id must look like 'F<n>', got {self.id!r}")
        unknown = [e for e in (*self.experiments, *self.optional) if e not in EXPERIMENTS]
        if unknown:
            raise ValueError(f"{self.id}: experiments must be among {sorted(EXPERIMENTS)}, got {unknown}")
        if not re.fullmatch(r"\d\d_\w+\.py", self.notebook):
            raise ValueError(f"{self.id}: notebook must name a file in notebooks/ like '01_balance.py', "
                             f"got {self.notebook!r}")

    @property
    def name(self) -> str:
        return f"{self.id}_{self.slug}"

    @property
    def reads(self) -> tuple[str, ...]:
        """Every experiment ``prepare`` receives, in its argument order."""
        return (*self.experiments, *self.optional)

    @property
    def caption(self) -> str:
        return self.caption_text.format(claims=claim_ref(self.claims))

    def make(self, *rows: pd.DataFrame, config: dict | None = None):
        """``(figure, data)`` from the experiments' rows (and ``config`` where ``needs_config``)."""
        data = self.prepare(*rows, config=config) if self.needs_config else self.prepare(*rows)
        return self.draw(data), data


def experiments_of(claims) -> tuple[str, ...]:
    """The experiments (required and optional) ``claims`` read, in the registry's order."""
    used = {e for c in claims for e in (*c.experiments, *c.optional)}
    return tuple(e for e in EXPERIMENTS if e in used)


def claim_ref(ids) -> str:
    """``claim C6`` / ``claims C1–C3`` / ``claims C4, C6``: consecutive runs of ≥ 3 ids as a range."""
    nums = sorted(int(i[1:]) for i in ids)
    if not nums:
        return "no claim"
    parts, start = [], 0
    for k in range(1, len(nums) + 1):
        if k == len(nums) or nums[k] != nums[k - 1] + 1:
            run = nums[start:k]
            parts += [f"C{run[0]}–C{run[-1]}"] if len(run) >= 3 else [f"C{n}" for n in run]
            start = k
    return ("claim " if len(nums) == 1 else "claims ") + ", ".join(parts)


# ----------------------------------------------------------------------------- backing tests
def tests_for(patterns, tests) -> dict:
    """Backing-test summary for the node-id regexes ``patterns``: ``status`` (passed / failed / not
    run), per-function pass/run counts, failed node ids.  ``tests``: a mapping node id -> outcome
    (passed / failed / error / skipped), an object with such an ``outcomes`` mapping, or ``None``."""
    outcomes = getattr(tests, "outcomes", tests) or {}
    compiled = [re.compile(p) for p in patterns]
    picked = {nid: o for nid, o in outcomes.items() if any(p.search(nid) for p in compiled)}
    per_fn: dict[str, list[int]] = {}
    failed = []
    for nid, outcome in sorted(picked.items()):
        counts = per_fn.setdefault(nid.split("[", 1)[0], [0, 0])
        counts[1] += outcome != "skipped"
        counts[0] += outcome == "passed"
        if outcome in ("failed", "error"):
            failed.append(nid)
    n_pass = sum(c[0] for c in per_fn.values())
    n_run = sum(c[1] for c in per_fn.values())
    status = "failed" if failed else "passed" if n_pass else "not run"
    return dict(status=status, per_fn=per_fn, failed=failed, n_pass=n_pass, n_run=n_run,
                applicable=bool(compiled))


def test_lines(summary: dict, tests) -> list[str]:
    """Evidence lines listing the backing tests of a claim (none when it has no backing tests)."""
    if not summary["applicable"]:
        return []
    if summary["status"] == "not run":
        why = "run_tests=False" if tests is None else "no matching test node ids in the run"
        return [f"- Backing property tests: **not run** ({why})."]
    lines = [f"- Backing property tests: **{summary['n_pass']}/{summary['n_run']} test cases passed** "
             f"({len(summary['per_fn'])} test functions; a case is one parametrisation, and a Hypothesis "
             f"property test is one case that runs many generated examples):"]
    lines += [f"  - `{fn}`: {p}/{n}" for fn, (p, n) in summary["per_fn"].items()]
    lines += [f"  - FAILED: `{nid}`" for nid in summary["failed"]]
    return lines


test_lines.__test__ = False       # helpers, not pytest tests
tests_for.__test__ = False


# ----------------------------------------------------------------------------- judging
def judge(spec: ClaimSpec, data: dict, tests=None, config: dict | None = None,
          verdicts: dict | None = None, *, results_dir="results") -> Claim:
    """Evaluate ``spec`` on ``data`` and apply the backing-test gate (the only place it is applied)."""
    for name in spec.experiments:
        if data.get(name) is None:
            raise MissingResultsError(name, results_dir)
    outcome = spec.evaluate(data, config or {}, verdicts or {})
    verdict, reason, key = outcome.verdict, outcome.reason, outcome.key_number
    own = tests_for(spec.tests, tests)
    failed = own["failed"] + (tests_for(spec.also_gated_by, tests)["failed"] if spec.also_gated_by else [])
    if failed:
        verdict, reason = "inconclusive", f"backing tests failed: {failed}"
    if own["applicable"]:
        key += f"; tests {own['n_pass']}/{own['n_run']} passed" if own["status"] != "not run" else "; tests not run"
    return Claim(spec.id, outcome.statement or spec.statement, verdict, key,
                 [*outcome.evidence, *test_lines(own, tests)], reason, paper_wording=spec.paper,
                 figure=", ".join(spec.figures), rule=spec.rule, comparisons=list(outcome.comparisons),
                 kind=spec.kind, controls=outcome.controls)


def judge_all(specs, data: dict, tests=None, config: dict | None = None, *, results_dir="results") -> list[Claim]:
    """Every claim in ``specs`` (claims that use other verdicts are judged after those), in ``specs`` order."""
    done: dict[str, Claim] = {}
    pending = list(specs)
    while pending:
        ready = [s for s in pending if all(u in done for u in s.uses_verdicts)]
        if not ready:
            raise ValueError(f"circular uses_verdicts among {[s.id for s in pending]}")
        for s in ready:
            done[s.id] = judge(s, data, tests, config, {u: done[u].verdict for u in s.uses_verdicts},
                               results_dir=results_dir)
            pending.remove(s)
    return [done[s.id] for s in specs]
