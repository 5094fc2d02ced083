"""The claims: one module per claim (or small group), the claim and figure registries, and the
``python -m analysis claims`` entry point.

=================  ==========  ==========  ===============================
module             claims      figures     notebook
=================  ==========  ==========  ===============================
``equivalence``    C1–C3       F6          ``notebooks/03_equivalence.py``
``lipschitz``      C4          F3          ``notebooks/02_smoothness.py``
``amplification``  C5          F2          ``notebooks/02_smoothness.py``
``balance``        C6          F1, F4      ``notebooks/01_balance.py``
``efficiency``     C7          F5          ``notebooks/01_balance.py``
``init_norms``     C8          F7          ``notebooks/02_smoothness.py``
``twins``          C9          F8          ``notebooks/04_twins.py``
``topk``           C10         F9          ``notebooks/02_smoothness.py``
``outperforms``    C11         —           —
``churn``          C12         F11         ``notebooks/02_smoothness.py``
``structures``     C13         F12         ``notebooks/05_structures.py``
``forest``         —           F10         ``notebooks/01_balance.py``
=================  ==========  ==========  ===============================

The shared layer: :mod:`~analysis.claims.base` (declarations, the backing-test gate),
:mod:`~analysis.claims.evidence` (the settings present in the results and the quantities read from
them), :mod:`~analysis.claims.assay` (margins from the tuning runs and the positive controls P1–P4,
per setting, from the preregistration) and :mod:`~analysis.claims.decide` (an empirical claim's Holm
family and verdict, docs/method.md §5.4–§5.5).

Each claim module declares its :class:`~analysis.claims.base.ClaimSpec` (statement, rule text,
figures, backing tests, ``kind`` analytic or empirical) and its code in four steps — select (rows →
tidy frames), compare (paired statistics → judged comparisons), verdict (a pure function of the
comparisons and margins) and render (evidence lines) — plus the figures it draws.  Claim modules
import only the shared layer, :mod:`analysis.stats`, :mod:`analysis.methods` and
:mod:`analysis.plotting`; nothing here imports torch.

:data:`CLAIMS` and :data:`FIGURES` are in id order; a figure's claims are those that list it in their
``figures`` (F10 draws the comparisons of every claim that cites it).  :func:`run` judges every claim
(:func:`~analysis.claims.base.judge_all`, with the backing-test gate) and writes ``CLAIMS.md`` and
``claims.csv`` with :mod:`analysis.report`.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from .. import report
from ..experiments import MissingResultsError, ensure_results, load_all  # noqa: F401
from . import (amplification, assay, balance, churn, efficiency, equivalence, forest, init_norms, lipschitz,
               outperforms, structures, topk, twins)
from .base import VERDICTS, Claim, ClaimSpec, FigureSpec, experiments_of, judge_all  # noqa: F401  (public names)

MODULES = (equivalence, lipschitz, amplification, balance, efficiency, init_norms, twins, topk, outperforms, churn,
           structures)


def _by_number(items):
    return tuple(sorted(items, key=lambda x: int(x.id[1:])))


CLAIMS: tuple[ClaimSpec, ...] = _by_number(c for m in MODULES for c in m.CLAIMS)
CLAIM_IDS = tuple(c.id for c in CLAIMS)


def _cited(figures) -> tuple[FigureSpec, ...]:
    """``figures`` with their ``claims`` (those that list them), checked both ways."""
    out = tuple(replace(f, claims=tuple(c.id for c in CLAIMS if f.id in c.figures)) for f in figures)
    uncited = [f.id for f in out if not f.claims]
    unknown = sorted({fid for c in CLAIMS for fid in c.figures} - {f.id for f in out})
    if uncited or unknown:
        raise ValueError(f"every figure must be cited by a claim and every cited figure drawn: uncited "
                         f"{uncited}, cited but not declared {unknown}")
    return _by_number(out)


FIGURES: tuple[FigureSpec, ...] = _cited([*(f for m in MODULES for f in m.FIGURES),
                                          forest.figure(c for c in CLAIMS if "F10" in c.figures)])
FIGURE_IDS = tuple(f.id for f in FIGURES)
if len(set(CLAIM_IDS)) != len(CLAIM_IDS) or len(set(FIGURE_IDS)) != len(FIGURE_IDS):
    raise ValueError(f"claim and figure ids must be unique, got {CLAIM_IDS} and {FIGURE_IDS}")


def claim_spec(claim_id: str) -> ClaimSpec:
    """The declaration of ``claim_id`` (``C1`` … ``C13``)."""
    for c in CLAIMS:
        if c.id == claim_id:
            return c
    raise KeyError(f"claim_id must be one of {CLAIM_IDS}, got {claim_id!r}")


def figure_spec(figure_id: str) -> FigureSpec:
    """The declaration of ``figure_id`` (``F1`` … ``F12``)."""
    for f in FIGURES:
        if f.id == figure_id:
            return f
    raise KeyError(f"figure_id must be one of {FIGURE_IDS}, got {figure_id!r}")


# ----------------------------------------------------------------------------- judging every claim
def load_results(results_dir) -> tuple[dict, dict]:
    """Rows and meta of every experiment the claims read; raises :class:`MissingResultsError` for a
    missing experiment that a claim requires (the settings' sweeps are optional: a setting that did not
    run is simply absent)."""
    required = {e for c in CLAIMS for e in c.experiments}
    every = experiments_of(CLAIMS)
    return load_all(every, results_dir, needed_by="claims", optional=[e for e in every if e not in required])


def evaluate(data: dict, tests=None, config: dict | None = None, *, results_dir="results") -> list[Claim]:
    """Every claim (in id order) from the experiment frames ``data``; ``tests``: the backing-test
    outcomes (:class:`analysis.report.TestRun`, a mapping node id -> outcome, or ``None``: not run);
    ``config``: the experiment config as a dict (a user ``[setting]`` names its setting).  A missing
    required experiment raises :class:`MissingResultsError` naming ``results_dir``."""
    return judge_all(CLAIMS, data, tests, config, results_dir=results_dir)


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        out_md="CLAIMS.md", out_csv="claims.csv", run_tests: bool = True) -> list[Claim]:
    """``python -m analysis claims``: run any missing experiments, the backing property tests
    (``run_tests``), judge every claim and write ``out_md`` / ``out_csv`` atomically."""
    ensure_results(config, results_dir=results_dir, workers=workers, executor=executor, force=force)
    tests = report.run_property_tests() if run_tests else None
    data, meta = load_results(results_dir)
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    claims = evaluate(data, tests, cfg, results_dir=results_dir)
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("")
    if argv0.name == "__main__.py" and argv0.parent.name == "analysis":
        command = "python -m analysis " + " ".join(sys.argv[1:])
    else:
        command = (f"analysis.claims.run(<config profile {cfg.get('profile', '?')!r}>, results_dir="
                   f"{str(results_dir)!r}, out_md={str(out_md)!r}, out_csv={str(out_csv)!r}, run_tests={run_tests})")
    report.publish(claims, out_md, out_csv, ids=CLAIM_IDS, command=command, results_dir=results_dir, meta=meta,
                   tests=tests, prereg=assay.preregistration_info(cfg.get("profile")),
                   sections=[("Settings and positive controls", assay.controls_section(assay.assays(data, cfg)))])
    return claims
