"""Resumable sweeps over cells, on the results store (:mod:`analysis.store`, re-exported here).

Layout of one experiment, ``<results_dir>/<experiment>/``::

    rows.csv            tidy table, one row per measurement (written when every cell is done)
    meta.json           config, seeds, package versions, git commit, code versions, wall time,
                        cell counts, the frozen-linear fast path (on/off, why, speed-up) of the cells
    cells/<hash>.json   one file per finished cell: key, params, rows, wall time

Row schema (tidy): every row holds the cell's key columns (e.g. ``E, r, talk, seed``), then the
measurement's own identifiers (free-form, e.g. ``layer, kind, eps, statistic`` or ``step, split,
domain``) and the two required columns ``metric`` (str) and ``value`` (float, NaN allowed).
:func:`run_sweep` adds ``cell`` (the cell's hash).  The perturbation probe's rows
(``layer, kind, eps, metric, statistic, value``) fit as they are.

A sweep is a list of :class:`Cell` objects: ``Cell(fn, key, params)``; running it calls
``fn(**key, **params)``, which returns a list of row dicts (or a DataFrame).  ``fn`` must be a
picklable top-level function, ``key``/``params`` JSON-serialisable.  The cell hash covers the
function's qualified name, key and params, so a changed config gives new cells instead of reusing
stale ones.  Each cell file also records the code that computed it
(:func:`~analysis.store.code_version`: the package version and a hash of every project module the
cell's module imports); a cell computed by other code is *stale*: it is re-run, and the run says how
many cells and which modules changed (a change to a module the cell does not import, e.g. plotting
or claims, leaves it alone).  Every finished cell is written atomically as its own file, so an
interrupted run loses at most the cells in flight; a re-run computes only the missing cells and a finished re-run runs
nothing (and says so).  ``rows.csv`` concatenates the cells *in the order of the cell list*, so it
does not depend on completion order or on how many workers ran.

Executors: ``workers=1`` runs cells inline (no pool, exceptions have full tracebacks);
``workers=N`` uses a local ``ProcessPoolExecutor`` (spawn start method, torch limited to
``cpu_count // N`` threads per worker).  Any object with ``submit(fn, *args)`` returning a
future-like object (``.result()``; ``.done()`` used when present) works as ``executor=``, e.g.
Slurm through submitit::

    import submitit
    ex = submitit.AutoExecutor(folder="results/slurm_logs")
    ex.update_parameters(timeout_min=60, slurm_partition="cpu", cpus_per_task=4)
    run_sweep("perturb", cells, executor=ex)

(``tests/test_analysis_infra.py`` runs a sweep through ``submitit.AutoExecutor(cluster="local")``,
each cell in its own subprocess, and checks the rows equal the inline run.)

The parent process writes the cell files as results come back, so workers need no access to the
results directory (with submitit they need the repository on a shared filesystem to import
``fn``).  A cell that raises does not stop the others; :class:`SweepError` is raised at the end,
listing the failed cells, and ``rows.csv`` is not written until every cell has succeeded.

Faults: a sweep holds an exclusive lock on ``<experiment>/.lock`` (``fcntl.flock``, released by the
kernel even on ``kill -9``) while it runs, so a second run on the same results directory stops at
once with :class:`ResultsLockedError` (naming the holder) instead of computing every cell again.
Each cell file carries the SHA-256 of its rows; a cell file that is not a regular file of UTF-8
JSON, is nested absurdly deep, lacks the record schema or its checksum, belongs to another cell or
fails its checksum is reported by name, moved aside to ``<hash>.json.damaged`` and its cell re-run.
``meta.json`` records the SHA-256 of ``rows.csv``, so a damaged ``rows.csv`` (or a ``meta.json``
without that checksum) is rebuilt from the cells.  The lock file is opened without following links
and refused unless it is a regular file of its own.  Files are created with the user's umask (a file
that is replaced keeps its permissions), never the 0600 of a bare temporary file.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from .store import (  # noqa: F401  (re-exported: analysis.results is the public place)
    DEFAULT_RESULTS_DIR, LOCATION_PARAMS, REQUIRED_COLUMNS, DamagedResultsError, ResultStore,
    ResultsLockedError, _sha256, atomic_path, atomic_write_csv, atomic_write_json, atomic_write_text,
    code_version, computed_params, git_commit, git_dirty, package_versions, read_rows, rows_checksum,
    update_marked_section)


# ----------------------------------------------------------------------------- cells
def _check_jsonable(what: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable (str/int/float/bool/None, lists, dicts); "
                        f"got {value!r}: {err}") from None


@dataclass(frozen=True)
class Cell:
    """One unit of a sweep: ``fn(**key, **params)`` returns rows.

    ``key`` identifies the cell and becomes columns of its rows (scalars only); ``params`` are the
    remaining arguments (settings shared by many cells).  Both enter the cell's hash, except the
    :data:`LOCATION_PARAMS` (a results directory given as ``results`` or as an absolute path, or
    moved, keeps its finished cells).
    """

    fn: Callable[..., Any]
    key: dict
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Cell.fn must be callable, got {self.fn!r}")
        qual = getattr(self.fn, "__qualname__", "")
        if "<lambda>" in qual or "<locals>" in qual:
            raise TypeError(f"Cell.fn must be a top-level (picklable) function, got {qual}")
        if not isinstance(self.key, dict) or not self.key:
            raise TypeError(f"Cell.key must be a non-empty dict, got {self.key!r}")
        for k, v in self.key.items():
            if not isinstance(k, str) or not (v is None or isinstance(v, (str, int, float, bool))):
                raise TypeError(f"Cell.key entries must be str -> scalar (str/int/float/bool/None), "
                                f"got {k!r}: {v!r}")
        if not isinstance(self.params, dict):
            raise TypeError(f"Cell.params must be a dict, got {self.params!r}")
        _check_jsonable("Cell.key", self.key)
        _check_jsonable("Cell.params", self.params)
        clash = sorted(set(self.key) & set(self.params))
        if clash:
            raise ValueError(f"Cell key and params share names {clash}")
        reserved = sorted(set(self.key) & {"cell", *REQUIRED_COLUMNS})
        if reserved:
            raise ValueError(f"Cell.key must not use the reserved column names {reserved}")

    @property
    def fn_name(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    @property
    def hash(self) -> str:
        blob = json.dumps({"fn": self.fn_name, "key": self.key, "params": computed_params(self.params)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.key.items())


def product_cells(fn: Callable[..., Any], params: dict | None = None, **axes: Iterable) -> list[Cell]:
    """One :class:`Cell` per combination of the ``axes`` values (first axis varies slowest)::

        product_cells(perturb_cell, {"n_tokens": 256}, talk=cfg.talk, E=[4, 8], seed=cfg.seeds)
    """
    import itertools
    names = list(axes)
    values = [list(v) for v in axes.values()]
    return [Cell(fn, dict(zip(names, combo)), dict(params or {})) for combo in itertools.product(*values)]


def _clean_value(v):
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:      # numpy / torch scalars
        v = v.item()
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    raise TypeError(f"row values must be scalars, got {type(v).__name__}: {v!r}")


def normalise_rows(rows, key: dict) -> list[dict]:
    """Check a cell's output and return plain row dicts with the key columns first."""
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"a cell function must return a list of dict rows or a DataFrame, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"row {i} is a {type(row).__name__}, not a dict")
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"row {i} lacks the required column(s) {missing}: {row!r}")
        clean = {k: _clean_value(v) for k, v in row.items()}
        for k, v in key.items():
            if k in clean and clean[k] != v:
                raise ValueError(f"row {i} has {k}={clean[k]!r}, conflicting with the cell key {k}={v!r}")
        clean["metric"] = str(clean["metric"])
        value = clean["value"]
        clean["value"] = float("nan") if value is None else float(value)
        out.append({**key, **{k: v for k, v in clean.items() if k not in key}})
    return out


def _fast_linear_status() -> dict | None:
    """The frozen-linear fast path of this process (:mod:`analysis.fast_linear`), None when nothing
    in it used the fast-path module (the module is not even imported then)."""
    module = sys.modules.get(f"{__package__ or 'analysis'}.fast_linear")
    return module.fast_path_status(check=False) if module is not None else None


def execute_cell(fn: Callable, key: dict, params: dict) -> dict:
    """Run one cell (in whatever process the executor chose); returns a picklable record, with the
    frozen-linear fast path status of that process (it decides on its own, see :mod:`analysis.fast_linear`)."""
    t0 = time.perf_counter()
    rows = normalise_rows(fn(**key, **params), key)
    return {"rows": rows, "wall_s": time.perf_counter() - t0, "host": platform.node(), "pid": os.getpid(),
            "fast_linear": _fast_linear_status()}


def _exit_with_parent(parent: int) -> None:
    """Linux: ask the kernel to SIGTERM this worker when the sweep process dies (a killed sweep must
    not leave workers computing for an hour); exit now if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return                                            # pragma: no cover
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):                      # pragma: no cover
        return
    if os.getppid() != parent:
        os._exit(1)


def _worker_init(threads: int, parent: int | None = None) -> None:
    if parent is not None:
        _exit_with_parent(parent)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:      # pragma: no cover
        pass


class SweepError(RuntimeError):
    """Some cells failed; the others were saved.  ``failures`` maps cell labels to tracebacks."""

    def __init__(self, experiment: str, failures: dict[str, str], n_cells: int):
        self.failures = failures
        first = next(iter(failures.values())).strip().splitlines()[-1]
        super().__init__(f"{experiment}: {len(failures)} of {n_cells} cells failed (the finished ones "
                         f"are saved; re-run to complete the rest). First failure "
                         f"[{next(iter(failures))}]: {first}")


@dataclass
class SweepResult:
    experiment: str
    path: Path
    rows: pd.DataFrame
    n_cells: int
    n_run: int
    n_skipped: int
    wall_s: float
    n_stale: int = 0

    def summary(self) -> str:
        if self.n_run == 0:
            return (f"[{self.experiment}] all {self.n_cells} cells already done, nothing to run; "
                    f"{len(self.rows)} rows in {self.path / 'rows.csv'}")
        stale = f" ({self.n_stale} of them stale: computed by other code)" if self.n_stale else ""
        return (f"[{self.experiment}] {self.n_run} cells run{stale}, {self.n_skipped} skipped (already done), "
                f"{self.n_cells} total; {len(self.rows)} rows -> {self.path / 'rows.csv'}; "
                f"wall {self.wall_s:.1f} s")


def _collect_rows(store: ResultStore, cells: list[Cell]) -> pd.DataFrame:
    rows = []
    for cell in cells:
        h = cell.hash
        rows += [{**r, "cell": h} for r in store.read_cell(h)["rows"]]
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=[*REQUIRED_COLUMNS, "cell"])
    front = [c for c in df.columns if c not in ("cell",)]
    return df[front + ["cell"]]


def _iter_completed(futures: dict):
    """Yield futures as they finish: ``as_completed`` for real futures, polling ``.done()`` for
    future-like objects (submitit jobs), else in submission order."""
    items = list(futures)
    if all(isinstance(f, cf.Future) for f in items):
        yield from cf.as_completed(items)
        return
    pending = list(items)
    while pending:
        if not all(hasattr(f, "done") for f in pending):
            yield pending.pop(0)
            continue
        ready = [f for f in pending if f.done()]
        if not ready:
            time.sleep(0.2)
            continue
        for f in ready:
            pending.remove(f)
            yield f


def _meta_matches(store: ResultStore, hashes: list[str]) -> bool:
    """``meta.json`` says complete for exactly these cells and ``rows.csv`` still has its checksum."""
    try:
        meta = store.read_meta()
        rows_sha = _sha256(store.rows_path.read_bytes())
    except (OSError, ValueError):
        return False
    return (meta.get("status") == "complete" and meta.get("cell_hashes") == hashes
            and meta.get("rows_sha256") == rows_sha)          # no checksum: rebuild, never trust


def _reusable(store: ResultStore, cell: Cell, code: dict, experiment: str, log, stale: dict) -> bool:
    """Whether ``cell`` has a sound file computed by ``code``; a damaged one is named, moved aside
    and its cell re-run; a stale one (other code) is noted in ``stale`` (label -> reason) and re-run."""
    path = store.cell_path(cell.hash)
    if not path.is_file():
        return False
    problem = store.cell_problem(cell)
    if problem is None:
        reason = store.stale_reason(cell, code)
        if reason is None:
            return True
        stale[cell.label()] = reason
        return False
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    log(f"[{experiment}] {path} is damaged ({problem}); moved to {aside.name}, re-running cell {cell.label()}")
    return False


def _fast_linear_summary(records: list[dict]) -> list[dict] | None:
    """One entry per distinct fast-path status among the cells' records (a status per process that
    ran cells), with how many cells ran under it; None when no cell used the fast-path module."""
    groups: dict[str, dict] = {}
    for record in records:
        status = record.get("fast_linear")
        if status is not None:
            entry = groups.setdefault(json.dumps(status, sort_keys=True), {**status, "cells": 0})
            entry["cells"] += 1
    return list(groups.values()) or None


def run_sweep(experiment: str, cells: list[Cell], *, results_dir: str | Path = DEFAULT_RESULTS_DIR,
              executor=None, workers: int = 1, force: bool = False, config=None,
              meta: dict | None = None, progress: bool = True, log: Callable[[str], None] = print
              ) -> SweepResult:
    """Run the cells not done yet, save each as it finishes, then write ``rows.csv`` and ``meta.json``.

    ``executor``: any ``concurrent.futures.Executor``-like object (``submit`` returning futures);
    ``None`` means inline for ``workers == 1`` and a local ``ProcessPoolExecutor(workers)`` otherwise.
    ``force`` re-runs every cell.  ``config`` (an object with ``to_dict()`` or a dict) and ``meta``
    are recorded in ``meta.json`` (with package versions, git commit and wall time).
    Raises :class:`SweepError` after running everything else if any cell failed, and
    :class:`ResultsLockedError` at once when another run holds this experiment's results.
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    cells = list(cells)
    if not all(isinstance(c, Cell) for c in cells):
        raise TypeError("cells must be a list of Cell objects")
    hashes = [c.hash for c in cells]
    if len(set(hashes)) != len(hashes):
        dup = next(c.label() for c, h in zip(cells, hashes) if hashes.count(h) > 1)
        raise ValueError(f"duplicate cells in the sweep (e.g. {dup})")
    store = ResultStore(experiment, results_dir)
    store.cells_dir.mkdir(parents=True, exist_ok=True)
    with store.lock():
        store.remove_stale_temporaries()
        return _sweep_locked(store, cells, hashes, t0=t0, started=started, executor=executor, workers=workers,
                             force=force, config=config, meta=meta, progress=progress, log=log)


def _sweep_locked(store: ResultStore, cells: list[Cell], hashes: list[str], *, t0, started, executor,
                  workers, force, config, meta, progress, log) -> SweepResult:
    """:func:`run_sweep` once the store's lock is held."""
    from tqdm.auto import tqdm

    experiment = store.experiment
    codes = {fn_name: code_version(fn) for fn_name, fn in {c.fn_name: c.fn for c in cells}.items()}
    stale: dict[str, str] = {}
    todo = [c for c in cells if force or not _reusable(store, c, codes[c.fn_name], experiment, log, stale)]
    n_skipped = len(cells) - len(todo)
    failures: dict[str, str] = {}
    if stale:
        reasons = sorted(set(stale.values()))
        more = f" (and {len(reasons) - 1} other reasons)" if len(reasons) > 1 else ""
        log(f"[{experiment}] {len(stale)} of {len(cells)} cells are stale, re-running them: {reasons[0]}{more}")

    def save(cell: Cell, record: dict) -> None:
        store.write_cell(cell.hash, {"key": cell.key, "params": cell.params, "fn": cell.fn_name,
                                     "code": codes[cell.fn_name],
                                     "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                     **record, "rows_sha256": rows_checksum(record["rows"])})

    if not todo and not force and store.rows_path.is_file() and _meta_matches(store, hashes):
        result = SweepResult(experiment, store.path, store.read_rows(), len(cells), 0, n_skipped,
                             time.perf_counter() - t0)
        log(result.summary())
        return result

    if todo:
        log(f"[{experiment}] {len(todo)} of {len(cells)} cells to run ({n_skipped} already done) "
            f"-> {store.path}")
    bar = tqdm(total=len(todo), desc=experiment, unit="cell", disable=not progress or not todo)
    own_pool = None
    try:
        if executor is None and workers == 1:
            for cell in todo:
                bar.set_postfix_str(cell.label(), refresh=False)
                try:
                    record = execute_cell(cell.fn, cell.key, cell.params)
                except Exception:
                    failures[cell.label()] = traceback.format_exc()
                else:
                    save(cell, record)
                bar.update()
        elif todo:
            if executor is None:
                import multiprocessing
                threads = max(1, (os.cpu_count() or 1) // workers)
                own_pool = executor = cf.ProcessPoolExecutor(
                    max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init, initargs=(threads, os.getpid()))
            futures = {executor.submit(execute_cell, c.fn, c.key, c.params): c for c in todo}
            for fut in _iter_completed(futures):
                cell = futures[fut]
                try:
                    record = fut.result()
                except Exception:
                    failures[cell.label()] = traceback.format_exc()
                else:
                    save(cell, record)
                bar.update()
    finally:
        bar.close()
        if own_pool is not None:
            own_pool.shutdown(wait=True, cancel_futures=True)

    wall = time.perf_counter() - t0
    done_records = [store.read_cell(c.hash) for c in cells if store.has_cell(c.hash)]
    cell_wall = sum(r.get("wall_s", 0.0) for r in done_records)
    meta_record = {
        "experiment": experiment,
        "status": "complete" if not failures else "incomplete",
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": wall,
        "cells": {"total": len(cells), "run": len(todo) - len(failures), "skipped": n_skipped,
                  "stale_rerun": len(stale), "failed": len(failures), "cell_wall_s_total": cell_wall},
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        "seeds": sorted({c.key["seed"] for c in cells if "seed" in c.key}),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "code": codes,
        "fast_linear": _fast_linear_summary(done_records),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "command": sys.argv,
        "cell_hashes": hashes,
        **(meta or {}),
    }
    if failures:
        store.write_meta(meta_record)
        for label, tb in failures.items():
            log(f"[{experiment}] cell {label} failed:\n{tb}")
        raise SweepError(experiment, failures, len(cells))
    store.write_rows(_collect_rows(store, cells))
    rows = store.read_rows()            # what later readers see (same dtypes as a skipped re-run)
    meta_record["rows"] = len(rows)
    meta_record["rows_sha256"] = _sha256(store.rows_path.read_bytes())
    store.write_meta(meta_record)
    result = SweepResult(experiment, store.path, rows, len(cells), len(todo), n_skipped, wall, len(stale))
    log(result.summary())
    return result


