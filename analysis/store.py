"""The results store: one experiment's folder (``rows.csv``, ``meta.json``, one file per cell), its
checksums and lock errors, atomic writes with the user's umask, and provenance (package versions,
git commit).  Sweeps over cells live in :mod:`analysis.results`, which re-exports these names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from talklora_min._atomic import atomic_path

LOCATION_PARAMS = ("exp_dir",)   # where a cell keeps its caches, not what it computes


def computed_params(params: dict) -> dict:
    """A cell's params without the :data:`LOCATION_PARAMS`: what its hash and its reuse check compare
    (a results directory given as ``results`` or as an absolute path, or moved, keeps its cells)."""
    return {k: v for k, v in params.items() if k not in LOCATION_PARAMS}

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
        params = record.get("params")
        wanted = json.loads(json.dumps(computed_params(cell.params)))
        if not isinstance(params, dict) or computed_params(params) != wanted or record.get("fn", cell.fn_name) != cell.fn_name:
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


def read_rows(experiment: str, results_dir: str | Path = DEFAULT_RESULTS_DIR) -> pd.DataFrame:
    """``rows.csv`` of a finished experiment."""
    return ResultStore(experiment, results_dir).read_rows()
