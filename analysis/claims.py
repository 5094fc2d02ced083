"""Claims report: evaluate the claims C1–C10 (SPEC §5) from saved results and write ``CLAIMS.md``
and ``claims.csv``.

``python -m analysis claims [--profile quick|paper] [--results-dir DIR]`` calls :func:`run`, which

1. makes sure every experiment exists (``analysis.perturb.run``, ``analysis.train.run``,
   ``analysis.twins.run`` with the same arguments; finished cells are skipped),
2. optionally runs the property tests that back the claims in a ``pytest`` subprocess and reads
   their JUnit XML (one outcome per test node id),
3. evaluates every claim with an explicit rule in code (:data:`RULES`; no verdict is typed by hand)
   and writes the report atomically.

Verdicts are exactly one of :data:`VERDICTS`.  Intervals are two-sided 95 % Student-t intervals of
the mean over seeds (seeds are the replicates: the layers, ε values and kinds of one seed are
averaged first, they are not independent); a comparison is *resolved* when its interval excludes
the null value (0 for a difference, 1 for a ratio).  With a single seed no interval exists and the
comparison is unresolved.  Ratios are averaged on the log scale (geometric means).

Missing data: every experiment the claims read (:data:`EXPERIMENTS`) must exist; a missing one
raises :class:`MissingResultsError` naming it and the command that produces it (there is no
"not evaluated" verdict).  Backing tests: a claim whose backing tests failed is ``inconclusive``
(the measuring code is then suspect); tests that were not run (``run_tests=False``) leave the
numeric rule in charge and the evidence says "not run".
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .train import MINILM_DIMS, closed_form_parameters
from .results import (ResultStore, atomic_write_csv, atomic_write_text, git_commit, git_dirty,
                      update_marked_section)

REPO_ROOT = Path(__file__).resolve().parents[1]

VERDICTS = ("holds", "holds under stated conditions", "refuted", "inconclusive")
CLAIM_IDS = tuple(f"C{i}" for i in range(1, 11))
CSV_COLUMNS = ("id", "paper_wording", "statement", "verdict", "evidence", "figure")

# experiment -> the command that produces it
EXPERIMENTS = {
    "perturb_synthetic": "perturb", "perturb_routers": "perturb", "talk_norms": "perturb",
    "equivalence": "perturb", "perturb_real": "perturb", "train": "train", "twins": "twins",
}

# ----------------------------------------------------------------------------- thresholds
TOL = {"float64": 1e-12, "float32": 1e-5}   # max relative residual of an exact map, per dtype
COUNTEREXAMPLE_MIN = 1e-3                   # rowspace residual that makes W_g non-representable
LIP_REL_TOL = 1e-9                          # local/empirical <= certified * (1 + LIP_REL_TOL)
C5_KINDS = ("gaussian_input", "adversarial")
C7_OVERHEAD_NEGLIGIBLE = 0.01               # TalkLoRA's extra parameters / MoELoRA-code's
C9_MARGIN = 0.01                            # accuracy difference that counts as "no advantage"
TWIN_IDENTICAL_ATOL = 1e-5                  # = analysis.twins.MATCH_ATOL: twins agree to this at step 0
CONF = 0.95
Z975 = 1.959963984540054

# MiniLM (all-MiniLM-L6-v2) projection sizes (d_in, d_out) of the train targets (SPEC §7)

PAPER = {   # SPEC §5, the "claim (paper's wording first)" column
    "C1": "TalkLoRA reduces to MoELoRA when communication is the identity",
    "C2": "TalkLoRA \"strictly generalises\" MoELoRA",
    "C3": "TalkLoRA ⊆ MoELoRA-input, not conversely",
    "C4": "router Lipschitz bounds (softmax ½; certified ≥ local max; certified ≥ empirical)",
    "C5": "communication mitigates perturbation amplification",
    "C6": "communication gives more balanced expert load",
    "C7": "parameter efficiency",
    "C8": "(ours) how often the official initialisation gives ‖T‖₂ > 1, i.e. lets communication "
          "raise the router bound",
    "C9": "any TalkLoRA advantage over MoELoRA-code persists from a function-matched start",
    "C10": "dense softmax vs hard–soft top-k routing (LoRA-Mixer): stability under perturbation",
}
FIGURES = {"C1": "F6", "C2": "F6", "C3": "F6", "C4": "F3", "C5": "F2", "C6": "F1, F4", "C7": "F5",
           "C8": "F7", "C9": "F8", "C10": "F9"}

RULES = {
    "C1": "holds if max relative residual of `C1_identity_talk` ≤ tol for every dtype "
          "(float64 1e-12, float32 1e-5); refuted if any residual exceeds tol; inconclusive if a "
          "backing test failed.",
    "C2": "C2 uses the absorption residuals `C2_absorption` and C1's residuals: if both ≤ tol (and "
          "no backing test failed) the class of functions with linear T EQUALS MoELoRA-code, so the "
          "claim, read as a statement about function classes, is refuted; if a residual exceeds tol "
          "the maps fail numerically and the verdict is inconclusive.",
    "C3": "holds if `C3_inclusion` ≤ tol for every dtype and the smallest "
          "`C3_counterexample_rowspace_residual` > 1e-3; refuted if the inclusion residual exceeds "
          "tol; inconclusive if the counterexample is representable (≤ 1e-3) or a backing test failed.",
    "C4": "holds if local_max ≤ certified·(1+1e-9) and empirical ≤ certified·(1+1e-9) in every "
          "cell (synthetic layers, dense routers, trained routers, twins); refuted if any cell "
          "violates it; inconclusive if a backing test failed.",
    "C5": "per talk setting, the ratio of the median routing quotient to that of T = I "
          "(same A, C, B, W_r; trained: TalkLoRA-official vs MoELoRA-code of the same seed), "
          "geometric mean over kinds {gaussian_input, adversarial}, ε and layers within a seed, "
          "95 % t-interval over seeds. Refuted if the official init or the trained TalkLoRA "
          "increases it (interval above 1); holds if every setting reduces it (interval below 1); "
          "holds under stated conditions if the contractive uniform-mix settings (‖T‖₂ ≤ 1) "
          "reduce it but not all others do; otherwise inconclusive.",
    "C6": "final-step validation Gini of the soft load, averaged over layers per seed; paired "
          "difference TalkLoRA-official − baseline over seeds with a 95 % t-interval, for "
          "baseline MoELoRA-code and MoELoRA-input. Holds if it is below 0 (resolved) against both; "
          "holds under stated conditions if below 0 against one and not above 0 against the other; "
          "refuted if it is above 0 against at least one and below 0 against none; otherwise "
          "inconclusive.",
    "C7": "measured trainable counts must equal the closed form (else inconclusive). Then with "
          "Δacc = test accuracy TalkLoRA-official − MoELoRA-code (paired by seed, 95 % t-interval): "
          "holds if Δacc > 0 (resolved); refuted if Δacc < 0 (resolved); holds under stated "
          "conditions (as a parameter-count statement only) if unresolved and the overhead over "
          "MoELoRA-code is ≤ 1 %; otherwise inconclusive.",
    "C8": "fractions of official-init draws with ‖T‖₂ > 1 and with certified ratio "
          "½‖W_r(T⊗I)‖₂ / ½‖W_r‖₂ > 1, per E, Wilson 95 % intervals. Holds (communication can raise "
          "the router bound under the official init) if the Wilson lower bound of the certified-ratio "
          "fraction is > 0 for some E; refuted if no draw at any E raises it.",
    "C9": "per optimiser, final-step validation accuracy TalkLoRA − MoELoRA-twin (paired by seed, "
          "95 % t-interval): holds if > 0 (resolved); refuted if < 0 (resolved), if the interval lies "
          "inside ±0.01 (no advantage), or if the twins' logits still agree within 1e-5 (their step-0 "
          "matching tolerance) at the end; otherwise "
          "inconclusive. Overall: holds if it holds for every optimiser, holds under stated "
          "conditions if for some, refuted if refuted for all, else inconclusive.",
    "C10": "claim read as 'dense softmax is more stable under perturbation than top-k'. Per top-k "
           "router, paired difference (top-k − dense, same weights and seed) of the routing quotient, "
           "averaged over kinds and ε within a seed, 95 % t-interval over seeds, for the max over "
           "tokens (worst case) and the median (typical token). Refuted if some top-k router has a "
           "resolved lower worst case; holds if every top-k router is resolved worse in both; holds "
           "under stated conditions if worse in the worst case only; otherwise inconclusive. "
           "(Top-1 flip rates are not compared: dense and top-k routers share the argmax.)",
}

# backing tests: claim -> regex on pytest node ids
CLAIM_TESTS = {
    "C1": [r"tests/test_properties\.py::test_c1_"],
    "C2": [r"tests/test_properties\.py::test_c2_"],
    "C3": [r"tests/test_properties\.py::test_c3_", r"tests/test_properties\.py::test_counterexample_"],
    "C4": [r"tests/test_probes_lipschitz\.py::test_(softmax_jacobian|sandwich_ordering|certified_values"
           r"|generic_|huge_logits|wide_layer)",
           r"tests/test_probes_amplification\.py::test_adversarial_dominates_gaussian_and_everything_below_certified"],
    "C5": [r"tests/test_probes_lipschitz\.py::test_(uniform_mix_column_norm|worked_example_E2_m1|doubly_stochastic_)",
           r"tests/test_probes_amplification\.py::test_fixed_block_and_talk_spreading"],
    "C7": [r"tests/test_inject\.py::test_(count_parameters|share_B_across_layers)"],
    "C10": [r"tests/test_probes_lipschitz\.py::test_topk_router_has_no_certified_bound",
            r"tests/test_probes_amplification\.py::test_topk_layer_flips_grow_with_eps",
            r"tests/test_properties\.py::test_top_k_"],
}
TEST_FILES = ("tests/test_properties.py", "tests/test_probes_lipschitz.py",
              "tests/test_probes_amplification.py", "tests/test_inject.py")


class MissingResultsError(FileNotFoundError):
    """An experiment the claims need has no ``rows.csv``."""

    def __init__(self, experiment: str, results_dir):
        self.experiment = experiment
        cmd = f"python -m analysis {EXPERIMENTS.get(experiment, experiment)} --results-dir {results_dir}"
        super().__init__(f"claims need the '{experiment}' results, but {Path(results_dir) / experiment / 'rows.csv'} "
                         f"does not exist; produce it with `{cmd}` (or run `python -m analysis claims`, "
                         f"which runs the missing experiments first)")


# ----------------------------------------------------------------------------- statistics
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def t_quantile_975(df: int) -> float:
    """Two-sided 95 % Student-t quantile (table up to 30 degrees of freedom, Cornish–Fisher above)."""
    if df < 1:
        return math.nan
    if df in _T975:
        return _T975[df]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass
class Est:
    """Mean over replicates (seeds) with a 95 % t-interval; ``log=True``: geometric (ratio) scale."""
    mean: float
    lo: float
    hi: float
    n: int
    log: bool = False

    @property
    def null(self) -> float:
        return 1.0 if self.log else 0.0

    @property
    def direction(self) -> str:
        """``above`` / ``below`` when the interval excludes the null value, else ``unresolved``."""
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return "unresolved"
        if self.lo > self.null:
            return "above"
        if self.hi < self.null:
            return "below"
        return "unresolved"

    def text(self, digits: int = 3, unit: str = "seed") -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "n/a (no data)"
        if self.n < 2 or not math.isfinite(self.lo):
            return f"{fmt(self.mean, digits)} (n = {self.n} {unit}, no interval)"
        return f"{fmt(self.mean, digits)} [{fmt(self.lo, digits)}, {fmt(self.hi, digits)}] (n = {self.n} {unit}s)"


def estimate(values, log: bool = False) -> Est:
    """Mean and 95 % t-interval of ``values`` (one per replicate); ``log``: of log(values), back-transformed."""
    v = np.asarray(list(values), dtype=float)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.log(v)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return Est(math.nan, math.nan, math.nan, 0, log)
    mean = float(v.mean())
    if n < 2:
        lo = hi = math.nan
    else:
        half = t_quantile_975(n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
        lo, hi = mean - half, mean + half
    if log:
        mean, lo, hi = (math.exp(x) if math.isfinite(x) else math.nan for x in (mean, lo, hi))
    return Est(mean, lo, hi, n, log)


def wilson(k: int, n: int) -> tuple[float, float, float]:
    """Fraction k/n with its Wilson 95 % interval."""
    if n == 0:
        return math.nan, math.nan, math.nan
    p, z = k / n, Z975
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return p, lo, hi


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    x = float(x)
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) < 1e-3 or abs(x) >= 1e6:
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def pct(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{100 * p:.1f} %"


# ----------------------------------------------------------------------------- claims
@dataclass
class Claim:
    id: str
    statement: str
    verdict: str
    key_number: str
    evidence: list[str]          # markdown paragraphs / bullet lines / tables
    reason: str                  # why the rule gave this verdict, with the numbers
    paper_wording: str = ""
    figure: str = ""
    rule: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"{self.id}: verdict must be one of {VERDICTS}, got {self.verdict!r}")
        self.paper_wording = self.paper_wording or PAPER[self.id]
        self.figure = self.figure or FIGURES[self.id]
        self.rule = self.rule or RULES[self.id]

    def evidence_text(self) -> str:
        return "\n".join([f"Rule: {self.rule}", f"Outcome: {self.reason}", f"Key number: {self.key_number}",
                          *self.evidence])


@dataclass
class TestRun:
    """Outcomes of the backing property tests (node id -> passed/failed/error/skipped)."""
    outcomes: dict
    command: str = "(injected)"
    returncode: int | None = None
    wall_s: float | None = None


def tests_for(claim_id: str, tests: TestRun | dict | None) -> dict:
    """Backing-test summary of a claim: ``status`` (passed / failed / not run), per-function counts."""
    outcomes = (tests.outcomes if isinstance(tests, TestRun) else tests) or {}
    patterns = [re.compile(p) for p in CLAIM_TESTS.get(claim_id, [])]
    picked = {nid: o for nid, o in outcomes.items() if any(p.search(nid) for p in patterns)}
    per_fn: dict[str, list[int]] = {}
    failed = []
    for nid, outcome in sorted(picked.items()):
        fn = nid.split("[", 1)[0]
        counts = per_fn.setdefault(fn, [0, 0])
        counts[1] += outcome != "skipped"
        counts[0] += outcome == "passed"
        if outcome in ("failed", "error"):
            failed.append(nid)
    n_pass = sum(c[0] for c in per_fn.values())
    n_run = sum(c[1] for c in per_fn.values())
    if failed:
        status = "failed"
    elif n_pass:
        status = "passed"
    else:
        status = "not run"
    return dict(status=status, per_fn=per_fn, failed=failed, n_pass=n_pass, n_run=n_run,
                applicable=bool(patterns))


def _test_lines(summary: dict, tests) -> list[str]:
    if not summary["applicable"]:
        return []
    if summary["status"] == "not run":
        why = "run_tests=False" if tests is None else "no matching test node ids in the run"
        return [f"- Backing property tests: **not run** ({why})."]
    lines = [f"- Backing property tests: **{summary['n_pass']}/{summary['n_run']} test cases passed** "
             f"({len(summary['per_fn'])} test functions; a case is one parametrisation, and a Hypothesis "
             f"property test is one case that runs many generated examples):"]
    for fn, (p, n) in summary["per_fn"].items():
        lines.append(f"  - `{fn}`: {p}/{n}")
    for nid in summary["failed"]:
        lines.append(f"  - FAILED: `{nid}`")
    return lines


def _require(df, experiment: str):
    if df is None:
        raise MissingResultsError(experiment, "results")
    return df


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# C1 -------------------------------------------------------------------------
def _residuals(equivalence: pd.DataFrame, metric: str) -> dict[str, float]:
    sub = equivalence[equivalence.metric == metric]
    return {str(d): float(g.value.max()) for d, g in sub.groupby("dtype")}


def claim_c1(equivalence: pd.DataFrame, tests=None) -> Claim:
    eq = _require(equivalence, "equivalence")
    res = _residuals(eq, "C1_identity_talk")
    n_cfg = eq[eq.metric == "C1_identity_talk"].groupby("dtype").size().to_dict()
    ts = tests_for("C1", tests)
    bad = {d: r for d, r in res.items() if not r <= TOL.get(d, TOL["float32"])}
    if not res:
        verdict, reason = "inconclusive", "no C1_identity_talk rows in the equivalence results"
    elif ts["status"] == "failed":
        verdict, reason = "inconclusive", f"backing tests failed: {ts['failed']}"
    elif bad:
        verdict, reason = "refuted", "residual above tolerance: " + ", ".join(
            f"{d} {fmt(r)} > {TOL.get(d, TOL['float32']):g}" for d, r in bad.items())
    else:
        verdict = "holds"
        reason = "every residual ≤ its tolerance: " + ", ".join(
            f"{d} max {fmt(r)} ≤ {TOL.get(d, TOL['float32']):g}" for d, r in sorted(res.items()))
    key = "max residual " + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(res.items()))
    ranges = ", ".join(f"{c} ∈ {int(eq[c].min())}..{int(eq[c].max())}" for c in ("E", "m", "d_in", "d_out") if c in eq)
    ev = [f"- Max relative output residual (TalkLoRA with T = I vs MoELoRA-code with the same A, C, B, "
          f"W_r), over random configurations ({ranges}): "
          + "; ".join(f"{d}: {fmt(r)} over {n_cfg.get(d, 0)} configurations" for d, r in sorted(res.items())),
          *_test_lines(ts, tests)]
    return Claim("C1", "TalkLoRA with T = I computes exactly the same function as MoELoRA with the code "
                 "router (router_input=\"code\") and the same A, C_e, B_e, W_r.", verdict, key, ev, reason)


# C2 -------------------------------------------------------------------------
def claim_c2(equivalence: pd.DataFrame, tests=None, c9_verdict: str | None = None) -> Claim:
    eq = _require(equivalence, "equivalence")
    absorb = _residuals(eq, "C2_absorption")
    ident = _residuals(eq, "C1_identity_talk")
    ts = tests_for("C2", tests)
    t1 = tests_for("C1", tests)
    over = {f"{m} {d}": r for m, rs in (("absorption", absorb), ("identity", ident))
            for d, r in rs.items() if not r <= TOL.get(d, TOL["float32"])}
    if not absorb or not ident:
        verdict, reason = "inconclusive", "missing C1/C2 residual rows"
    elif "failed" in (ts["status"], t1["status"]):
        verdict, reason = "inconclusive", f"backing tests failed: {ts['failed'] + t1['failed']}"
    elif over:
        verdict, reason = "inconclusive", ("a reparameterisation map fails numerically ("
                                          + ", ".join(f"{k} {fmt(v)}" for k, v in over.items())
                                          + "), so neither equality nor strictness is shown")
    else:
        verdict = "refuted"
        reason = ("TalkLoRA(A, C, B, T, W_r) = MoELoRA-code(A, C, B, W_r(T⊗I)) for every tested T "
                  "(absorption max residual " + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(absorb.items()))
                  + ") and MoELoRA-code = TalkLoRA with T = I (C1), so the two function classes are "
                  "equal: there is no function TalkLoRA computes that MoELoRA-code cannot")
    c9 = f" (C9 verdict on these data: **{c9_verdict}**)" if c9_verdict else ""
    statement = ("As function classes, TalkLoRA with a linear Talking Module equals MoELoRA-code "
                 "(absorption W' = W_r(T⊗I_m) one way, T = I the other); it is not a strict "
                 "generalisation. 'Strictly' can only hold as a statement about the parameterisation "
                 "(different gradients / optimisation trajectory from the same function), which is "
                 f"what C9 tests{c9}.")
    key = "absorption max residual " + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(absorb.items()))
    n = eq[eq.metric == "C2_absorption"].groupby("dtype").size().to_dict()
    ev = [f"- Absorption map W' = W_r(T⊗I_m), official-init T, W_r scaled ×4, B ~ N(0, 1): max relative "
          f"residual " + "; ".join(f"{d}: {fmt(r)} over {n.get(d, 0)} configurations" for d, r in sorted(absorb.items())),
          f"- Identity map (C1): max residual " + "; ".join(f"{d}: {fmt(r)}" for d, r in sorted(ident.items())),
          *_test_lines(ts, tests)]
    return Claim("C2", statement, verdict, key, ev, reason)


# C3 -------------------------------------------------------------------------
def claim_c3(equivalence: pd.DataFrame, tests=None) -> Claim:
    eq = _require(equivalence, "equivalence")
    incl = _residuals(eq, "C3_inclusion")
    counter = eq[eq.metric == "C3_counterexample_rowspace_residual"].value
    cmin = float(counter.min()) if len(counter) else math.nan
    ts = tests_for("C3", tests)
    bad = {d: r for d, r in incl.items() if not r <= TOL.get(d, TOL["float32"])}
    if not incl:
        verdict, reason = "inconclusive", "no C3_inclusion rows"
    elif ts["status"] == "failed":
        verdict, reason = "inconclusive", f"backing tests failed: {ts['failed']}"
    elif bad:
        verdict, reason = "refuted", "inclusion residual above tolerance: " + ", ".join(
            f"{d} {fmt(r)}" for d, r in bad.items())
    elif not cmin > COUNTEREXAMPLE_MIN:
        verdict, reason = "inconclusive", (f"inclusion holds but the smallest counterexample rowspace residual "
                                          f"{fmt(cmin)} is not > {COUNTEREXAMPLE_MIN:g} (or there is none)")
    else:
        verdict = "holds"
        reason = (f"inclusion residual ≤ tol (" + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(incl.items()))
                  + f") and every counterexample has rowspace residual ≥ {fmt(cmin)} > {COUNTEREXAMPLE_MIN:g}")
    key = f"inclusion max {', '.join(f'{d} {fmt(r)}' for d, r in sorted(incl.items()))}; counterexample min residual {fmt(cmin)}"
    ev = [f"- Inclusion MoELoRA-code(W') = MoELoRA-input(W_g = W'A) applied to absorbed TalkLoRA layers: "
          f"max relative residual " + "; ".join(f"{d}: {fmt(r)}" for d, r in sorted(incl.items())),
          f"- Counterexamples (MoELoRA-input with router rows outside rowspace(A), invertible C_e; E ≥ 2, "
          f"float64): {len(counter)} built, least-squares rowspace residual min {fmt(cmin)}, "
          f"median {fmt(float(counter.median()) if len(counter) else math.nan)}",
          "- Condition: 'not conversely' is with the same experts (A, C_e, B_e); a MoELoRA-input "
          "router whose rows leave rowspace(A) reads directions of x the code h = Ax never sees.",
          *_test_lines(ts, tests)]
    return Claim("C3", "Every TalkLoRA (and MoELoRA-code) layer equals a MoELoRA-input layer with "
                 "W_g = W_r(T⊗I)A; a MoELoRA-input layer whose router rows are not in rowspace(A) has "
                 "no TalkLoRA equivalent with the same experts.", verdict, key, ev, reason)


# C4 -------------------------------------------------------------------------
def _sandwich_ratios(df: pd.DataFrame, keys: list[str], certified: str, local: str, empirical: str | None,
                     col: str = "statistic") -> pd.DataFrame:
    piv = df.pivot_table(index=keys, columns=col, values="value", aggfunc="first")
    out = pd.DataFrame(index=piv.index)
    out["local"] = piv[local] / piv[certified]
    if empirical is not None and empirical in piv:
        out["empirical"] = piv[empirical] / piv[certified]
    return out.reset_index()


def claim_c4(synthetic: pd.DataFrame, tests=None, routers: pd.DataFrame | None = None,
             train: pd.DataFrame | None = None, twins: pd.DataFrame | None = None) -> Claim:
    syn = _require(synthetic, "perturb_synthetic")
    parts = []
    lip = syn[syn.metric == "lipschitz"]
    keys = [c for c in ("E", "r", "talk", "seed", "kind") if c in lip]
    parts.append(("synthetic layers (w.r.t. code and input)", _sandwich_ratios(lip, keys, "certified", "local_max", "empirical")))
    if routers is not None:
        lr = routers[(routers.metric == "lipschitz")]
        lr = lr[lr.groupby(["router", "seed"]).statistic.transform(lambda s: (s == "certified").any())]
        if len(lr):
            parts.append(("dense routers (w.r.t. code)", _sandwich_ratios(lr, ["router", "seed", "kind"],
                                                                          "certified", "local_max", None)))
    if train is not None:
        lt = train[train.metric == "lipschitz"]
        if len(lt):
            parts.append(("trained routers (w.r.t. input)", _sandwich_ratios(lt, ["method", "seed", "layer", "kind"],
                                                                              "certified", "local_max", "empirical")))
    if twins is not None:
        tw = twins[twins.metric.isin(["lipschitz_certified", "lipschitz_local_max"])]
        if len(tw):
            parts.append(("twin runs over training (w.r.t. code)",
                          _sandwich_ratios(tw, ["optimizer", "seed", "step", "model", "layer"],
                                           "lipschitz_certified", "lipschitz_local_max", None, col="metric")))
    rows, worst, n_cells, violations = [], {"local": 0.0, "empirical": 0.0}, 0, []
    for name, r in parts:
        n_cells += len(r)
        line = [name, len(r)]
        for c in ("local", "empirical"):
            if c in r and r[c].notna().any():
                mx = float(r[c].max())
                worst[c] = max(worst[c], mx)
                nbad = int((~(r[c] <= 1 + LIP_REL_TOL)).sum() - r[c].isna().sum())
                if nbad:
                    violations.append(f"{name}: {nbad} cells with {c}/certified > 1 + 1e-9 (max {fmt(mx, 6)})")
                line.append(f"{fmt(mx, 6)} (min {fmt(float(r[c].min()), 3)})")
            else:
                line.append("—")
        rows.append(line)
    ts = tests_for("C4", tests)
    if n_cells == 0:
        verdict, reason = "inconclusive", "no Lipschitz rows"
    elif ts["status"] == "failed":
        verdict, reason = "inconclusive", f"backing tests failed: {ts['failed']}"
    elif violations:
        verdict, reason = "refuted", "; ".join(violations)
    else:
        verdict = "holds"
        reason = (f"in all {n_cells} cells local_max/certified ≤ {fmt(worst['local'], 6)} and "
                  f"empirical/certified ≤ {fmt(worst['empirical'], 6)}, both ≤ 1 + 1e-9")
    key = f"max local/certified {fmt(worst['local'], 4)}, max empirical/certified {fmt(worst['empirical'], 4)}"
    ev = ["- Ratios to the certified bound ½‖W_eff(A)‖₂ (max over cells; ≤ 1 means the bound holds):",
          _table(["source", "cells", "max local_max / certified", "max empirical / certified"], rows),
          "- The softmax-Jacobian bound ‖J_s(p)‖₂ ≤ ½ is what makes local_max ≤ certified; it is "
          "tested directly by `test_softmax_jacobian_norm_at_most_half` and its closed forms.",
          *_test_lines(ts, tests)]
    return Claim("C4", "For dense softmax routers, ‖J_s(p)‖₂ ≤ ½; the certified bound ½‖W_eff‖₂ "
                 "(w.r.t. h) or ½‖W_eff A‖₂ (w.r.t. x) is ≥ the maximal local Lipschitz constant over "
                 "tokens and ≥ the empirical (PGD) lower bound.", verdict, key, ev, reason)


# C5 -------------------------------------------------------------------------
def _per_seed_log_ratio(frame: pd.DataFrame, num: str, den: str, seed_col: str = "seed") -> pd.Series:
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(frame[num] / frame[den])
    ok = np.isfinite(lr)
    return pd.Series(lr[ok].to_numpy(), index=frame.loc[ok, seed_col].to_numpy()).groupby(level=0).mean()


def _est_from_logs(per_seed: pd.Series) -> Est:
    return estimate(np.exp(per_seed.to_numpy()), log=True)


def claim_c5(synthetic: pd.DataFrame, train: pd.DataFrame, tests=None, real: pd.DataFrame | None = None) -> Claim:
    syn = _require(synthetic, "perturb_synthetic")
    tr = _require(train, "train")
    q = syn[(syn.metric == "routing_quotient") & (syn.statistic == "median") & syn.kind.isin(C5_KINDS) & (syn.eps > 0)]
    piv = q.pivot_table(index=["E", "r", "seed", "kind", "eps"], columns="talk", values="value", aggfunc="first")
    if "identity" not in piv:
        raise ValueError("C5 needs perturb_synthetic cells with talk = 'identity' (the MoELoRA-code reference)")
    norms = syn[syn.metric == "talk_norm"].groupby("talk").value.agg(["mean", "max"])
    settings, table, breakdown = {}, [], []
    flat = piv.reset_index()
    for talk in [c for c in piv.columns if c != "identity"]:
        est = _est_from_logs(_per_seed_log_ratio(flat, talk, "identity"))
        settings[talk] = est
        nmax = float(norms.loc[talk, "max"]) if talk in norms.index else math.nan
        table.append([f"`{talk}`", fmt(float(norms.loc[talk, "mean"]) if talk in norms.index else math.nan),
                      est.text(), est.direction])
        for (kind, eps), g in flat.groupby(["kind", "eps"]):
            e = _est_from_logs(_per_seed_log_ratio(g, talk, "identity"))
            breakdown.append([f"`{talk}`", kind, fmt(eps), e.text()])
    contractive = [t for t in settings if t.startswith("uniform-mix")
                   and t in norms.index and float(norms.loc[t, "max"]) <= 1 + 1e-9]
    # trained: TalkLoRA-official vs MoELoRA-code, same seed (same data order, same A/C/B/W_r init seed)
    tq = tr[(tr.step == -1) & (tr.metric == "routing_quotient") & (tr.statistic == "median") & tr.kind.isin(C5_KINDS)]
    tpiv = tq.pivot_table(index=["seed", "layer", "kind", "eps"], columns="method", values="value", aggfunc="first")
    trained = None
    if {"talklora-official", "moelora-code"} <= set(tpiv.columns):
        trained = _est_from_logs(_per_seed_log_ratio(tpiv.reset_index(), "talklora-official", "moelora-code"))
        settings["trained talklora-official vs moelora-code"] = trained
        table.append(["trained TalkLoRA-official vs trained MoELoRA-code", "—", trained.text(), trained.direction])
    official = settings.get("official")
    increased = [k for k in ("official", "trained talklora-official vs moelora-code")
                 if k in settings and settings[k].direction == "above"]
    reducing = [k for k, e in settings.items() if e.direction == "below"]
    ts = tests_for("C5", tests)
    if ts["status"] == "failed":
        verdict, reason = "inconclusive", f"backing tests failed: {ts['failed']}"
    elif not settings:
        verdict, reason = "inconclusive", "no talk setting besides identity"
    elif increased:
        verdict = "refuted"
        reason = "; ".join(f"`{k}` increases the median routing quotient by ×{settings[k].text()}" for k in increased)
    elif len(reducing) == len(settings):
        verdict, reason = "holds", "every setting reduces it (interval below 1)"
    elif contractive and all(settings[t].direction == "below" for t in contractive):
        verdict = "holds under stated conditions"
        others = [k for k in settings if k not in contractive]
        reason = ("the contractive uniform-mix settings (" + ", ".join(f"`{t}`" for t in contractive)
                  + ") resolve a reduction"
                  + "".join(f", and so does `{k}` ×{settings[k].text()}" for k in others if k in reducing)
                  + "; unresolved or not reducing: "
                  + ", ".join(f"`{k}` ×{settings[k].text()}" for k in others if k not in reducing))
    else:
        verdict = "inconclusive"
        reason = ("no rule condition met: reductions resolved for "
                  + (", ".join(f"`{k}`" for k in reducing) or "no setting")
                  + "; the other intervals include 1 or are missing (a single seed gives no interval)")
    key = "official/identity ×" + (official.text() if official else "n/a")
    if trained is not None:
        key += f"; trained ×{fmt(trained.mean)}"
    ev = ["- Ratio of the median routing quotient ‖Δg‖/‖δ‖ to T = I (geometric mean over kinds "
          f"{list(C5_KINDS)}, ε ∈ {sorted(flat.eps.unique().tolist())} and grid (E, r) within a seed; "
          "95 % t-interval over seeds; < 1 = communication reduces amplification):",
          _table(["setting", "mean ‖T‖₂", "ratio to T = I", "direction"], table),
          "- Per kind and ε (synthetic layers):",
          _table(["setting", "kind", "ε", "ratio to T = I"], breakdown),
          "- Why uniform-mix reduces it: T = αI + (1−α)J/E is doubly stochastic (‖T‖₂ = 1), and "
          "T⊗I = P + α(I − P) with P the orthogonal projector onto block-constant codes, so "
          "W_eff = W_r[P + α(I − P)] shrinks the router on every code direction with zero block mean "
          "(a logit temperature α on those directions). By C2 the same W_eff is an ordinary "
          "MoELoRA-code router: the reduction comes from a smaller router, which MoELoRA-code can "
          "have without communication.",
          "- The trained comparison is between two independently trained models (same seed, data "
          "order and init seed), not the same weights."]
    if real is not None and len(real):
        rq = real[(real.metric == "routing_quotient") & (real.statistic == "median") & real.kind.isin(C5_KINDS)]
        rp = rq.pivot_table(index=["model", "seed", "layer", "kind", "eps"], columns="talk", values="value", aggfunc="first")
        if "identity" in rp:
            lines = []
            for talk in [c for c in rp.columns if c != "identity"]:
                with np.errstate(divide="ignore", invalid="ignore"):
                    r = (rp[talk] / rp["identity"]).replace([np.inf, -np.inf], np.nan).dropna()
                if len(r):
                    lines.append([f"`{talk}`", fmt(float(np.exp(np.log(r).mean()))), fmt(float(r.min())),
                                  fmt(float(r.max())), r.index.get_level_values("layer").nunique()])
            ev += ["- Supplementary (not in the verdict; one seed, layers are not independent replicates): "
                   "real pretrained model, official-layout TalkLoRA, ratio to T = I per layer:",
                   _table(["setting", "geometric mean", "min over layers", "max over layers", "layers"], lines)]
    ev += _test_lines(ts, tests)
    return Claim("C5", "Relative to T = I (exactly MoELoRA-code with the same A, C, B, W_r), a Talking "
                 "Module lowers the router's perturbation amplification, measured as the median "
                 "routing quotient ‖Δg‖/‖δ‖ under Gaussian-input and adversarial perturbations.",
                 verdict, key, ev, reason)


# C6 -------------------------------------------------------------------------
def _final_layer_mean(train: pd.DataFrame, metric: str, step: str = "final") -> pd.DataFrame:
    v = train[(train.split == "val") & (train.metric == metric) & (train.layer != "all")]
    if step == "final":
        last = v.groupby(["method", "seed"]).step.transform("max")
        v = v[v.step == last]
    else:
        v = v[v.step == step]
    return v.groupby(["method", "seed"]).value.mean().unstack("method")


def _paired(wide: pd.DataFrame, a: str, b: str) -> Est:
    if a not in wide or b not in wide:
        return Est(math.nan, math.nan, math.nan, 0)
    return estimate((wide[a] - wide[b]).dropna().to_numpy())


def claim_c6(train: pd.DataFrame, tests=None) -> Claim:
    tr = _require(train, "train")
    talk = "talklora-official"
    g_end = _final_layer_mean(tr, "gini")
    g_start = _final_layer_mean(tr, "gini", step=0)
    h_end = _final_layer_mean(tr, "load_entropy")
    diffs = {b: _paired(g_end, talk, b) for b in ("moelora-code", "moelora-input")}
    dirs = {b: e.direction for b, e in diffs.items() if e.n}
    better = [b for b, d in dirs.items() if d == "below"]
    worse = [b for b, d in dirs.items() if d == "above"]
    if not dirs:
        verdict, reason = "inconclusive", "no Gini rows for TalkLoRA-official and the baselines"
    elif len(better) == len(dirs) and len(dirs) == 2:
        verdict, reason = "holds", "Gini lower than both baselines (intervals below 0)"
    elif better and not worse:
        verdict = "holds under stated conditions"
        reason = (f"lower Gini than {', '.join(better)} (resolved); against "
                  f"{', '.join(b for b in dirs if b not in better) or '—'} unresolved")
    elif worse and not better:
        verdict, reason = "refuted", f"TalkLoRA's load is LESS balanced than {', '.join(worse)} (interval above 0)"
    elif better and worse:
        verdict = "holds under stated conditions"
        reason = f"more balanced than {', '.join(better)} but less balanced than {', '.join(worse)}"
    else:
        verdict, reason = "inconclusive", "every interval includes 0: " + "; ".join(
            f"vs {b}: {e.text(4)}" for b, e in diffs.items())
    init = _paired(g_start, talk, "moelora-code")
    if init.n:
        reason += f" (before training, at step 0, ΔGini vs MoELoRA-code was already {init.text(3)})"
    rows = []
    for m in [c for c in ("moelora-code", "moelora-input", "talklora-identity", talk) if c in g_end]:
        rows.append([m, estimate(g_end[m]).text(4), estimate(g_start[m]).text(4) if m in g_start else "n/a",
                     estimate(h_end[m]).text(4) if m in h_end else "n/a"])
    diff_rows = [[f"{talk} − {b}", diffs[b].text(4), _paired(g_start, talk, b).text(4),
                  _paired(h_end, talk, b).text(4), diffs[b].direction] for b in diffs]
    steps = sorted(tr[(tr.split == "val") & (tr.metric == "gini")].step.unique().tolist())
    key = f"ΔGini vs MoELoRA-code {diffs['moelora-code'].text(3)}"
    ev = [f"- Soft-load Gini (0 = equal load, 0.75 = one expert for E = 4) on the validation split at the "
          f"final step ({steps[-1] if steps else 'n/a'}), mean over adapted layers per seed; 95 % t-interval over seeds:",
          _table(["method", "Gini (final)", "Gini (step 0, before training)", "load entropy (final)"], rows),
          "- Paired differences (same seed: same data order, same head init):",
          _table(["difference", "ΔGini final", "ΔGini at step 0", "Δ load entropy final", "direction (Gini)"], diff_rows),
          "- Read the step-0 column: a difference already present before any training step comes from "
          "the initialisation (official random T), not from learned communication."]
    return Claim("C6", "After training (same data, steps and seeds), TalkLoRA-official spreads the soft "
                 "expert load more evenly (lower Gini) than MoELoRA-code and MoELoRA-input.",
                 verdict, key, ev, reason)


# C7 -------------------------------------------------------------------------
def claim_c7(train: pd.DataFrame, tests=None, train_cfg: dict | None = None) -> Claim:
    tr = _require(train, "train")
    counts = tr[tr.metric == "trainable_parameters"].groupby("method").value.agg(["min", "max"])
    acc = tr[(tr.split == "test") & (tr.metric == "accuracy") & (tr.domain == "all")]
    acc = acc[acc.step == acc.groupby(["method", "seed"]).step.transform("max")]
    acc_w = acc.groupby(["method", "seed"]).value.mean().unstack("method")
    cfg = train_cfg or {}
    mismatch, rows, forms = [], [], {}
    have_cfg = all(k in cfg for k in ("rank", "num_experts", "adapt_top_layers", "targets"))
    for m in counts.index:
        measured = counts.loc[m, "max"]
        if counts.loc[m, "min"] != measured:
            mismatch.append(f"{m}: count differs across seeds")
        if have_cfg and m in ("lora", "moelora-code", "moelora-input", "talklora-official", "talklora-identity"):
            args = (m, cfg["rank"], cfg["num_experts"], cfg["adapt_top_layers"], cfg["targets"])
            untied, shared = closed_form_parameters(*args), closed_form_parameters(*args, shared_B=True)
            forms[m] = (untied, shared)
            match = "untied ✓" if measured == untied else "shared-B ✓" if measured == shared else "✗"
            if match == "✗":
                mismatch.append(f"{m}: measured {fmt(measured)} ≠ closed form {fmt(untied)} (untied) / {fmt(shared)} (shared B)")
        else:
            untied = shared = math.nan
            match = "no closed form" if m in forms or not have_cfg else "—"
        rows.append([m, fmt(measured), fmt(untied), fmt(shared), match,
                     estimate(acc_w[m]).text(3) if m in acc_w else "n/a"])
    talk, code = "talklora-official", "moelora-code"
    overhead = rel_code = rel_lora = math.nan
    if talk in counts.index and code in counts.index:
        overhead = counts.loc[talk, "max"] - counts.loc[code, "max"]
        rel_code = overhead / counts.loc[code, "max"]
    if talk in counts.index and "lora" in counts.index:
        rel_lora = counts.loc[talk, "max"] / counts.loc["lora", "max"] - 1
    dacc = _paired(acc_w, talk, code)
    ts = tests_for("C7", tests)
    if ts["status"] == "failed":
        verdict, reason = "inconclusive", f"backing tests failed: {ts['failed']}"
    elif mismatch:
        verdict, reason = "inconclusive", "parameter accounting does not match the closed form: " + "; ".join(mismatch)
    elif not have_cfg:
        verdict, reason = "inconclusive", "no train config (rank, num_experts, adapt_top_layers, targets) for the closed form"
    elif dacc.direction == "above":
        verdict = "holds"
        reason = (f"TalkLoRA-official gains accuracy over MoELoRA-code ({dacc.text()}) for "
                  f"{fmt(overhead)} extra parameters ({pct(rel_code)})")
    elif dacc.direction == "below":
        verdict = "refuted"
        reason = f"TalkLoRA-official loses accuracy against MoELoRA-code ({dacc.text()}) despite {fmt(overhead)} more parameters"
    elif rel_code <= C7_OVERHEAD_NEGLIGIBLE:
        verdict = "holds under stated conditions"
        reason = (f"as a parameter-count statement only: the overhead over MoELoRA-code is {fmt(overhead)} "
                  f"parameters ({pct(rel_code)} ≤ {pct(C7_OVERHEAD_NEGLIGIBLE)}), but the accuracy difference "
                  f"{dacc.text()} is unresolved, so no efficiency gain in accuracy per parameter is shown")
    else:
        verdict = "inconclusive"
        reason = f"overhead {pct(rel_code)} is not negligible and the accuracy difference {dacc.text()} is unresolved"
    per_layer = ""
    if have_cfg:
        E = cfg["num_experts"]
        n_layers = cfg["adapt_top_layers"] * len(cfg["targets"])
        per_layer = (f"- TalkLoRA − MoELoRA-code = T, E² = {E * E} per adapted layer × {n_layers} layers = "
                     f"{E * E * n_layers} (measured {fmt(overhead)}); relative to MoELoRA-code {pct(rel_code)}, "
                     f"TalkLoRA relative to LoRA +{pct(rel_lora)} (C E m² + W_r E r + T E² per layer).")
    key = f"TalkLoRA − MoELoRA-code = {fmt(overhead)} params ({pct(rel_code)}); Δacc {dacc.text()}"
    ev = ["- Trainable adapter parameters (classifier head excluded; tied tensors counted once) and test "
          "accuracy (mean over seeds, 95 % t-interval):",
          _table(["method", "measured", "closed form (untied B)", "closed form (B shared per projection type)",
                  "match", "test accuracy"], rows),
          "- Closed form per adapted layer: A r·d_in + C E·m² + B d_out·r + T E² + W_r E·r "
          "(MoELoRA-input: W_g E·d_in instead of W_r; LoRA: A + B). Shared-B accounting (official "
          "code): B counted once per projection type instead of once per layer.",
          per_layer,
          f"- Paired accuracy difference TalkLoRA-official − MoELoRA-code: {dacc.text()}; "
          f"TalkLoRA-official − LoRA: {_paired(acc_w, talk, 'lora').text()}.",
          *_test_lines(ts, tests)]
    return Claim("C7", "TalkLoRA adds exactly E² trainable parameters per adapted layer to MoELoRA-code "
                 "(the Talking Module T); it is parameter-efficient if this small overhead buys accuracy "
                 "over MoELoRA-code trained identically.",
                 verdict, key, [e for e in ev if e], reason)


# C8 -------------------------------------------------------------------------
def claim_c8(talk_norms: pd.DataFrame, tests=None) -> Claim:
    tn = _require(talk_norms, "talk_norms")
    rows, fr = [], {}
    for E, g in tn.groupby("E"):
        norm = g[g.metric == "talk_norm"].value
        ratio = g[g.metric == "certified_ratio"].value
        kn, n = int((norm > 1).sum()), len(norm)
        kr, nr = int((ratio > 1).sum()), len(ratio)
        p, lo, hi = wilson(kn, n)
        q, qlo, qhi = wilson(kr, nr)
        fr[int(E)] = dict(p=p, lo=lo, hi=hi, q=q, qlo=qlo, qhi=qhi, n=n, kr=kr, nr=nr)
        rows.append([int(E), n, f"{pct(p)} [{pct(lo)}, {pct(hi)}]", fmt(float(norm.median())),
                     f"{pct(q)} [{pct(qlo)}, {pct(qhi)}]", fmt(float(ratio.median())), fmt(float(ratio.max()))])
    raises = [E for E, f in fr.items() if f["qlo"] > 0]
    if not fr:
        verdict, reason = "inconclusive", "no talk_norms rows"
    elif raises:
        verdict = "holds"
        reason = ("the official init raises the certified router bound in a resolved fraction of draws at E ∈ "
                  + ", ".join(f"{E} ({pct(fr[E]['q'])}, Wilson lower {pct(fr[E]['qlo'])})" for E in raises))
    elif all(f["kr"] == 0 for f in fr.values()):
        verdict = "refuted"
        reason = ("no draw at any E raised the certified bound (upper Wilson bounds: "
                  + ", ".join(f"E={E} {pct(f['qhi'])}" for E, f in fr.items()) + ")")
    else:
        verdict = "inconclusive"
        reason = "some draws raise the bound but no Wilson lower bound is above 0"
    key = ("‖T‖₂ > 1: " + ", ".join(f"E={E} {pct(f['p'])}" for E, f in fr.items())
           + "; bound raised: " + ", ".join(f"E={E} {pct(f['q'])}" for E, f in fr.items()))
    statement = ("Under the official initialisation T ~ U(±1/√E), ‖T‖₂ > 1 in "
                 + ", ".join(f"{pct(f['p'])} (E = {E})" for E, f in fr.items())
                 + " of draws, but communication raises the certified router bound ½‖W_r(T⊗I)‖₂ above "
                 "½‖W_r‖₂ (same W_r ~ U(±1/√r), m = 8) in only "
                 + ", ".join(f"{pct(f['q'])} [{pct(f['qlo'])}, {pct(f['qhi'])}] (E = {E})" for E, f in fr.items())
                 + ". ‖T‖₂ > 1 does not imply a raised bound: the bound depends on ‖W_r(T⊗I)‖₂, and a "
                 "random T shrinks most directions.")
    ev = ["- Monte Carlo over independent draws per E (Wilson 95 % intervals):",
          _table(["E", "draws", "P(‖T‖₂ > 1)", "median ‖T‖₂", "P(certified ratio > 1)",
                  "median ratio", "max ratio"], rows)]
    return Claim("C8", statement, verdict, key, ev, reason)


# C9 -------------------------------------------------------------------------
def claim_c9(twins: pd.DataFrame, tests=None, twins_cfg: dict | None = None) -> Claim:
    tw = _require(twins, "twins")
    cfg = twins_cfg or {}
    per_opt, rows, div_rows = {}, [], []
    for opt, g in tw.groupby("optimizer"):
        a = g[(g.metric == "accuracy") & (g.layer == "all")]
        last = int(a.step.max())
        aw = a[a.step == last].groupby(["seed", "model"]).value.mean().unstack("model")
        d = _paired(aw, "talklora", "moelora-twin")
        dv = g[(g.metric == "logit_maxabs_diff") & (g.step == last) & (g.model == "moelora-twin")].value
        identical = len(dv) > 0 and float(dv.max()) <= TWIN_IDENTICAL_ATOL
        within = d.n >= 2 and math.isfinite(d.lo) and -C9_MARGIN < d.lo and d.hi < C9_MARGIN
        if d.direction == "above":
            v, why = "holds", f"TalkLoRA ahead of its twin by {d.text()}"
        elif d.direction == "below":
            v, why = "refuted", f"the MoELoRA twin is ahead: {d.text()}"
        elif identical:
            v, why = "refuted", (f"the twins still compute the same function at the last step (max |Δlogit| "
                                 f"{fmt(float(dv.max()))} ≤ {TWIN_IDENTICAL_ATOL:g}, the step-0 matching "
                                 f"tolerance): no advantage can exist")
        elif within:
            v, why = "refuted", f"no advantage: interval {d.text()} inside ±{C9_MARGIN:g}"
        else:
            v, why = "inconclusive", f"interval includes 0 and exceeds ±{C9_MARGIN:g}: {d.text()}"
        lr = cfg.get("lr_adamw" if opt == "adamw" else "lr_sgd")
        name = f"{opt} (lr {lr:g})" if lr is not None else str(opt)
        per_opt[name] = (v, why, d)
        rows.append([name, last, d.text(), _paired(aw, "talklora", "talklora-frozen-T").text(),
                     _paired(aw, "talklora", "talklora-identity").text(), v])
        div_rows.append([name, fmt(float(dv.mean())) if len(dv) else "n/a", fmt(float(dv.max())) if len(dv) else "n/a"])
    vs = [v for v, _, _ in per_opt.values()]
    if not vs:
        verdict, reason = "inconclusive", "no twin rows"
    elif all(v == "holds" for v in vs):
        verdict, reason = "holds", "; ".join(f"{k}: {w}" for k, (_, w, _) in per_opt.items())
    elif "holds" in vs:
        verdict = "holds under stated conditions"
        reason = "only with " + ", ".join(k for k, (v, _, _) in per_opt.items() if v == "holds") + "; " + \
                 "; ".join(f"{k}: {w}" for k, (_, w, _) in per_opt.items())
    elif all(v == "refuted" for v in vs):
        verdict, reason = "refuted", "; ".join(f"{k}: {w}" for k, (_, w, _) in per_opt.items())
    else:
        verdict, reason = "inconclusive", "; ".join(f"{k}: {v} — {w}" for k, (v, w, _) in per_opt.items())
    key = "; ".join(f"{k}: Δacc {d.text()}" for k, (_, _, d) in per_opt.items())
    wd = cfg.get("weight_decay")
    ev = ["- Final-step validation accuracy differences (paired by seed, 95 % t-interval). All four "
          "models compute the same function at step 0 and see the same batches; only the "
          "parameterisation differs" + (f" (weight decay {wd:g} for AdamW)" if wd is not None else "") + ":",
          _table(["optimiser", "last step", "TalkLoRA − MoELoRA-twin", "TalkLoRA − TalkLoRA(frozen T)",
                  "TalkLoRA − TalkLoRA(T=I, W_r=W')", "verdict"], rows),
          "- Divergence of the MoELoRA twin from TalkLoRA at the last step (max |Δlogit| on a fixed "
          "held-out batch):",
          _table(["optimiser", "mean over seeds", "max over seeds"], div_rows)]
    return Claim("C9", "Starting from the same function (MoELoRA-code twin with W' = W_r(T⊗I)), "
                 "TalkLoRA's parameterisation alone gives a final accuracy advantage, per optimiser "
                 "(AdamW at the official lr 3e-4; plain SGD).", verdict, key, ev, reason)


# C10 ------------------------------------------------------------------------
def claim_c10(routers: pd.DataFrame, tests=None) -> Claim:
    ro = _require(routers, "perturb_routers")
    q = ro[(ro.metric == "routing_quotient") & (ro.eps > 0)]
    piv = q.pivot_table(index=["seed", "kind", "eps", "statistic"], columns="router", values="value", aggfunc="first")
    topk = [c for c in piv.columns if c != "dense"]
    res, rows = {}, []
    for k in topk:
        e = {}
        for stat in ("max", "median"):
            sub = piv.xs(stat, level="statistic")
            diff = (sub[k] - sub["dense"]).groupby(level="seed").mean()
            e[stat] = estimate(diff.to_numpy())
        res[k] = e
        rows.append([k, e["max"].text(4), e["max"].direction, e["median"].text(4), e["median"].direction])
    ex = ro[ro.metric == "certified_exists"].groupby("router").value.agg(["min", "max"])
    no_cert = [k for k in topk if k in ex.index and ex.loc[k, "max"] == 0]
    dense_cert = "dense" in ex.index and ex.loc["dense", "min"] == 1
    flips = ro[ro.metric.isin(["top1_flip_rate", "topk_set_flip_rate"]) & (ro.kind == "gaussian_input")]
    fpiv = flips.pivot_table(index=["metric", "eps"], columns="router", values="value", aggfunc="mean")
    tv = ro[(ro.metric == "total_variation") & (ro.statistic == "max")]
    tpiv = tv.pivot_table(index=["kind", "eps"], columns="router", values="value", aggfunc="mean")
    ts = tests_for("C10", tests)
    worse_worst = [k for k in topk if res[k]["max"].direction == "above"]
    better_worst = [k for k in topk if res[k]["max"].direction == "below"]
    if ts["status"] == "failed":
        verdict, reason = "inconclusive", f"backing tests failed: {ts['failed']}"
    elif not topk:
        verdict, reason = "inconclusive", "no top-k routers"
    elif better_worst:
        verdict, reason = "refuted", f"top-k router(s) {better_worst} have a LOWER worst-case routing quotient than dense"
    elif len(worse_worst) == len(topk) and all(res[k]["median"].direction == "above" for k in topk):
        verdict, reason = "holds", "every top-k router is less stable than dense at both the worst and the typical token"
    elif len(worse_worst) == len(topk):
        verdict = "holds under stated conditions"
        reason = ("dense is more stable in the worst case (max over tokens, near ties), but not at the typical "
                  "token: median difference " + ", ".join(f"{k} {res[k]['median'].text(3)}" for k in topk))
    else:
        verdict = "inconclusive"
        reason = "worst-case differences unresolved: " + ", ".join(f"{k} {res[k]['max'].text(3)}" for k in topk)
    key = "; ".join(f"{k} − dense max quotient {res[k]['max'].text(3)}" for k in topk)
    cert = (f"certified bound exists for dense: {'yes' if dense_cert else 'no'}; for "
            + ", ".join(f"{k}: {'no' if k in no_cert else 'yes'}" for k in topk))
    flip_rows = [[m, fmt(eps)] + [fmt(fpiv.loc[(m, eps), c]) if c in fpiv else "n/a" for c in ["dense", *topk]]
                 for (m, eps) in fpiv.index]
    tv_rows = [[kind, fmt(eps)] + [fmt(tpiv.loc[(kind, eps), c]) if c in tpiv else "n/a" for c in ["dense", *topk]]
               for (kind, eps) in tpiv.index]
    ev = ["- Same MoELoRA-code weights and tokens for every router; paired difference top-k − dense of the "
          "routing quotient ‖Δg‖/‖δ‖ (mean over kinds {gaussian_input, adversarial} and ε within a seed, "
          "95 % t-interval over seeds; > 0 = top-k less stable):",
          _table(["router", "Δ max over tokens", "direction", "Δ median", "direction"], rows),
          f"- Certified Lipschitz bound: {cert}. Top-k gates jump when the k-th and (k+1)-th logits cross "
          "(a tie), so no finite global bound exists; away from ties the local constant is finite "
          "(top-1 gates are locally constant: local constant 0).",
          "- Flip rates under Gaussian input perturbations (mean over seeds). The top-1 flip rate is the "
          "same for every router under the same δ (they share the argmax), so it cannot separate them; "
          "the top-k set flip rate is the fraction of tokens whose gates jump discontinuously (dense: "
          "the set is all experts, never flips):",
          _table(["metric", "ε", "dense", *topk], flip_rows),
          "- Worst-token total variation ½‖Δg‖₁ (mean over seeds):",
          _table(["kind", "ε", "dense", *topk], tv_rows),
          *_test_lines(ts, tests)]
    return Claim("C10", "On the same weights, dense softmax routing is more stable under input "
                 "perturbations than hard–soft top-k routing: it has a certified Lipschitz bound and a "
                 "smaller worst-case routing change; top-k has no certified bound across ties.",
                 verdict, key, ev, reason)


# ----------------------------------------------------------------------------- evaluation
def load_results(results_dir) -> tuple[dict, dict]:
    """Rows and meta of every experiment in :data:`EXPERIMENTS`; raises :class:`MissingResultsError`."""
    data, meta = {}, {}
    for name in EXPERIMENTS:
        store = ResultStore(name, results_dir)
        if not store.rows_path.is_file():
            raise MissingResultsError(name, results_dir)
        data[name] = store.read_rows()
        try:
            meta[name] = store.read_meta()
        except (OSError, ValueError):
            meta[name] = {}
    return data, meta


def evaluate(data: dict, tests: TestRun | dict | None = None, config: dict | None = None) -> list[Claim]:
    """All ten claims from the experiment frames ``data`` (missing ones raise MissingResultsError).
    ``config``: the experiment config as a dict (sections ``train`` and ``twins`` are used)."""
    def get(name):
        if name not in data or data[name] is None:
            raise MissingResultsError(name, "results")
        return data[name]
    config = config or {}
    c9 = claim_c9(get("twins"), tests, config.get("twins"))
    claims = [
        claim_c1(get("equivalence"), tests),
        claim_c2(get("equivalence"), tests, c9_verdict=c9.verdict),
        claim_c3(get("equivalence"), tests),
        claim_c4(get("perturb_synthetic"), tests, routers=get("perturb_routers"), train=get("train"),
                 twins=get("twins")),
        claim_c5(get("perturb_synthetic"), get("train"), tests, real=get("perturb_real")),
        claim_c6(get("train"), tests),
        claim_c7(get("train"), tests, config.get("train")),
        claim_c8(get("talk_norms"), tests),
        c9,
        claim_c10(get("perturb_routers"), tests),
    ]
    for c in claims:                       # the backing-test count goes into every key number
        ts = tests_for(c.id, tests)
        if ts["applicable"]:
            c.key_number += (f"; tests {ts['n_pass']}/{ts['n_run']} passed" if ts["status"] != "not run"
                             else "; tests not run")
    return claims


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
           "in `analysis/claims.py` from the saved results; re-run the command to update it.", "",
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
                _table(["experiment", "rows", "status", "profile", "git commit of the run", "finished"], rows)]
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
            _table(["id", "claim", "verdict", "key number", "figure"],
                   [[c.id, _one_line(c.paper_wording), f"**{c.verdict}**", _one_line(c.key_number), c.figure]
                    for c in claims])]
    for c in claims:
        out += ["", f"## {c.id} — {c.paper_wording}", "",
                f"**Paper's wording** (as summarised in SPEC §5): {c.paper_wording}", "",
                f"**Our statement.** {c.statement}", "",
                f"**Verdict: {c.verdict}.** {c.reason}.", "",
                f"**Rule.** {c.rule}", "",
                "**Evidence.**", "", *_spaced(c.evidence), "",
                f"**Figure:** {c.figure}."]
    return "\n".join(out) + "\n"


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
    return pd.DataFrame([{"id": c.id, "paper_wording": c.paper_wording, "statement": c.statement,
                          "verdict": c.verdict, "evidence": c.evidence_text(), "figure": c.figure}
                         for c in claims], columns=list(CSV_COLUMNS))


def write_report(claims: list[Claim], out_md, out_csv, **render_kw) -> tuple[Path, Path]:
    ids = [c.id for c in claims]
    if ids != list(CLAIM_IDS):
        raise ValueError(f"the report needs exactly the claims {CLAIM_IDS} in order, got {ids}")
    text = render_markdown(claims, **render_kw)
    frame = claims_frame(claims)
    return atomic_write_text(out_md, text), atomic_write_csv(frame, out_csv)


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        out_md="CLAIMS.md", out_csv="claims.csv", run_tests: bool = True):
    """Run any missing experiments, the backing property tests (``run_tests``), evaluate C1–C10 and
    write ``out_md`` / ``out_csv`` atomically.  Returns the list of :class:`Claim`."""
    from . import perturb, train, twins

    for module in (perturb, train, twins):
        module.run(config, results_dir=results_dir, workers=workers, executor=executor, force=force)
    tests = run_property_tests() if run_tests else None
    data, meta = load_results(results_dir)
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    claims = evaluate(data, tests, cfg)
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
        summary = _table(["id", "claim", "verdict", "key number"],
                         [[c.id, _one_line(c.paper_wording), f"**{c.verdict}**", _one_line(c.key_number)]
                          for c in claims])
        update_marked_section(REPO_ROOT / "README.md", "claims",
                              f"Generated by `{command}` (details and rules: [CLAIMS.md](CLAIMS.md)).\n\n{summary}")
    width = max(len(c.id) for c in claims)
    for c in claims:
        print(f"{c.id:<{width}}  {c.verdict:<30}  {c.key_number}")
    print(f"wrote {md} and {csv}")
    return claims
