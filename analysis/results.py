"""Results store and resumable sweeps.

Layout of one experiment, ``<results_dir>/<experiment>/``::

    rows.csv            tidy table, one row per measurement (written when every cell is done)
    meta.json           config, seeds, package versions, git commit, wall time, cell counts
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
stale ones.  Every finished cell is written atomically as its own file, so an interrupted run loses
at most the cells in flight; a re-run computes only the missing cells and a finished re-run runs
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
Each cell file carries the SHA-256 of its rows; a cell file that is not UTF-8 JSON, lacks the
record schema, belongs to another cell or fails its checksum is reported by name, moved aside to
``<hash>.json.damaged`` and its cell re-run.  ``meta.json`` records the SHA-256 of ``rows.csv``, so
a damaged ``rows.csv`` is rebuilt from the cells.  Files are created with the user's umask (a file
that is replaced keeps its permissions), never the 0600 of a bare temporary file.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from talklora_min._atomic import atomic_path

try:
    import fcntl
except ImportError:        # pragma: no cover - Windows: sweeps run without the results lock
    fcntl = None

DEFAULT_RESULTS_DIR = Path("results")
REQUIRED_COLUMNS = ("metric", "value")


# ----------------------------------------------------------------------------- atomic writes
# atomic_path: temporary file, fsync, the target's mode (or the umask's), rename (talklora_min._atomic)
def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, sort_keys: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=_json_default) + "\n")


def atomic_write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def update_marked_section(path: str | Path, name: str, text: str) -> bool:
    """Replace what stands between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``
    (atomically).  Returns False, changing nothing, when the file or the markers are absent."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if not path.is_file():
        return False
    content = path.read_text()
    i, j = content.find(start), content.find(end)
    if i < 0 or j < i:
        return False
    atomic_write_text(path, content[:i + len(start)] + "\n" + text.strip("\n") + "\n" + content[j:])
    return True


def _json_default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------- provenance
def package_versions(names: Iterable[str] = ("torch", "numpy", "transformers", "pandas", "tqdm")) -> dict:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(args: list[str], cwd: str | Path | None) -> str | None:
    cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(cwd: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding this package (or ``cwd``), else "unknown"."""
    return _git(["rev-parse", "HEAD"], cwd) or "unknown"


def git_dirty(cwd: str | Path | None = None) -> bool | None:
    """Whether tracked files have uncommitted changes (None when git is unavailable)."""
    out = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return None if out is None else bool(out)


# ----------------------------------------------------------------------------- store
class DamagedResultsError(ValueError):
    """A results file exists but cannot be used (not UTF-8 JSON/CSV, wrong schema, bad checksum)."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged: {reason}")


class ResultsLockedError(RuntimeError):
    """Another run holds ``<results_dir>/<experiment>/.lock``."""

    def __init__(self, path: str | Path, holder: str):
        self.path, self.holder = Path(path), holder
        super().__init__(f"{path} is locked by another run ({holder or 'holder unknown'}); wait for it "
                         f"to finish or use another --results-dir")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows_checksum(rows: list[dict]) -> str:
    """SHA-256 of a cell's rows as canonical JSON (NaN written as ``NaN``, keys sorted)."""
    return _sha256(json.dumps(rows, sort_keys=True).encode())


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DamagedResultsError(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DamagedResultsError(path, f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None


class ResultStore:
    """``<results_dir>/<experiment>/`` with ``rows.csv``, ``meta.json`` and ``cells/``."""

    def __init__(self, experiment: str, results_dir: str | Path = DEFAULT_RESULTS_DIR):
        if not experiment or "/" in experiment or experiment.startswith("."):
            raise ValueError(f"experiment must be a plain directory name, got {experiment!r}")
        self.experiment = experiment
        self.path = Path(results_dir) / experiment
        self.rows_path = self.path / "rows.csv"
        self.meta_path = self.path / "meta.json"
        self.cells_dir = self.path / "cells"

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    def cell_path(self, cell_hash: str) -> Path:
        return self.cells_dir / f"{cell_hash}.json"

    def has_cell(self, cell_hash: str) -> bool:
        return self.cell_path(cell_hash).is_file()

    def read_cell(self, cell_hash: str) -> dict:
        """The cell record; :class:`DamagedResultsError` (naming the file) when it is not a JSON object."""
        path = self.cell_path(cell_hash)
        record = _read_json(path)
        if not isinstance(record, dict):
            raise DamagedResultsError(path, f"expected a JSON object, got {type(record).__name__}")
        return record

    def cell_problem(self, cell: "Cell") -> str | None:
        """Why ``cell``'s file cannot be reused (None when it is a complete record of this cell):
        unreadable JSON, missing/ill-typed ``rows``, another cell's key/params/function, or rows
        that do not match the stored ``rows_sha256``."""
        try:
            record = self.read_cell(cell.hash)
        except DamagedResultsError as err:
            return err.reason
        rows = record.get("rows")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and all(c in r for c in REQUIRED_COLUMNS)
                                                  for r in rows):
            return "'rows' is not a list of rows with 'metric' and 'value'"
        if record.get("key") != json.loads(json.dumps(cell.key)):
            return f"it records key {record.get('key')!r}, not {cell.key!r}"
        if record.get("params") != json.loads(json.dumps(cell.params)) or record.get("fn", cell.fn_name) != cell.fn_name:
            return "it records other params or another cell function"
        stored = record.get("rows_sha256")          # absent in files written before checksums
        if stored is not None and stored != rows_checksum(rows):
            return "its rows do not match their 'rows_sha256' checksum"
        return None

    def write_cell(self, cell_hash: str, record: dict) -> Path:
        return atomic_write_json(self.cell_path(cell_hash), record, sort_keys=False)   # keeps column order

    def write_rows(self, rows: pd.DataFrame) -> Path:
        return atomic_write_csv(rows, self.rows_path)

    def read_rows(self) -> pd.DataFrame:
        if not self.rows_path.is_file():
            raise FileNotFoundError(f"{self.rows_path} does not exist: run the experiment first "
                                    f"(python -m analysis {self.experiment})")
        rerun = f"re-run `python -m analysis {self.experiment}` to rebuild it"
        try:
            rows = pd.read_csv(self.rows_path)
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise DamagedResultsError(self.rows_path, f"{str(err).splitlines()[0]}; {rerun}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
        if missing:
            raise DamagedResultsError(self.rows_path, f"no column(s) {missing}; {rerun}")
        return rows

    def write_meta(self, meta: dict) -> Path:
        return atomic_write_json(self.meta_path, meta)

    def read_meta(self) -> dict:
        meta = _read_json(self.meta_path)
        if not isinstance(meta, dict):
            raise DamagedResultsError(self.meta_path, f"expected a JSON object, got {type(meta).__name__}")
        return meta

    @contextlib.contextmanager
    def lock(self):
        """Hold ``<experiment>/.lock`` exclusively (non-blocking ``flock``) for the ``with`` block;
        :class:`ResultsLockedError` when another process holds it.  The kernel releases the lock when
        the holder exits, however it exits, so a killed run never leaves a stale lock.  The file
        names the holder (pid, host, start time) for the error message; it is never deleted (that
        would let two runs lock two different files)."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip()
                    raise ResultsLockedError(self.path, holder) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {platform.node()} since "
                          f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n".encode(), 0)
            yield lock_path
        finally:
            os.close(fd)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete ``.*.tmp`` files left in the store by a writer that was killed mid-write (call
        only while holding :meth:`lock`)."""
        stale = [p for d in (self.path, self.cells_dir) if d.is_dir() for p in d.glob(".*.tmp")]
        for p in stale:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return stale


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
    remaining arguments (settings shared by many cells).  Both enter the cell's hash.
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
        blob = json.dumps({"fn": self.fn_name, "key": self.key, "params": self.params}, sort_keys=True)
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


def execute_cell(fn: Callable, key: dict, params: dict) -> dict:
    """Run one cell (in whatever process the executor chose); returns a picklable record."""
    t0 = time.perf_counter()
    rows = normalise_rows(fn(**key, **params), key)
    return {"rows": rows, "wall_s": time.perf_counter() - t0, "host": platform.node(), "pid": os.getpid()}


def _worker_init(threads: int) -> None:
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

    def summary(self) -> str:
        if self.n_run == 0:
            return (f"[{self.experiment}] all {self.n_cells} cells already done, nothing to run; "
                    f"{len(self.rows)} rows in {self.path / 'rows.csv'}")
        return (f"[{self.experiment}] {self.n_run} cells run, {self.n_skipped} skipped (already done), "
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
            and meta.get("rows_sha256", rows_sha) == rows_sha)


def _reusable(store: ResultStore, cell: Cell, experiment: str, log) -> bool:
    """Whether ``cell`` has a sound file; a damaged one is named, moved aside and its cell re-run."""
    path = store.cell_path(cell.hash)
    if not path.is_file():
        return False
    problem = store.cell_problem(cell)
    if problem is None:
        return True
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    log(f"[{experiment}] {path} is damaged ({problem}); moved to {aside.name}, re-running cell {cell.label()}")
    return False


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
    todo = [c for c in cells if force or not _reusable(store, c, experiment, log)]
    n_skipped = len(cells) - len(todo)
    failures: dict[str, str] = {}

    def save(cell: Cell, record: dict) -> None:
        store.write_cell(cell.hash, {"key": cell.key, "params": cell.params, "fn": cell.fn_name,
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
                    initializer=_worker_init, initargs=(threads,))
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
    done_cells = [c for c in cells if store.has_cell(c.hash)]
    cell_wall = sum(store.read_cell(c.hash).get("wall_s", 0.0) for c in done_cells)
    meta_record = {
        "experiment": experiment,
        "status": "complete" if not failures else "incomplete",
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": wall,
        "cells": {"total": len(cells), "run": len(todo) - len(failures), "skipped": n_skipped,
                  "failed": len(failures), "cell_wall_s_total": cell_wall},
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        "seeds": sorted({c.key["seed"] for c in cells if "seed" in c.key}),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
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
    result = SweepResult(experiment, store.path, rows, len(cells), len(todo), n_skipped, wall)
    log(result.summary())
    return result


def read_rows(experiment: str, results_dir: str | Path = DEFAULT_RESULTS_DIR) -> pd.DataFrame:
    """``rows.csv`` of a finished experiment."""
    return ResultStore(experiment, results_dir).read_rows()
