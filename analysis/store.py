"""The results store: one experiment's folder (``rows.csv``, ``meta.json``, one file per cell), its
checksums and lock errors, atomic writes with the user's umask, and provenance (package versions,
git commit).  Sweeps over cells live in :mod:`analysis.results`, which re-exports these names.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from talklora_min import __version__ as PACKAGE_VERSION
from talklora_min._atomic import atomic_path

from .files import FileProblem, parse_json, read_regular_file

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
MAX_RESULTS_FILE_BYTES = 1 << 30      # a cell file or meta.json; the largest cells write ~10 MB


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


# What computes results: generated outputs (figures, CLAIMS.md, the README table) being rewritten by
# the run itself must not mark the code as modified.
SOURCE_PATHS = (":/analysis", ":/talklora_min", ":/pyproject.toml", ":/requirements")


def git_dirty(cwd: str | Path | None = None) -> bool | None:
    """Whether tracked source files (``SOURCE_PATHS``) have uncommitted changes (None when git is
    unavailable)."""
    out = _git(["status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS], cwd)
    return None if out is None else bool(out)


# ----------------------------------------------------------------------------- code version
# The cell hash covers the function's name, key and params, not its code: a cell computed by older
# code would be reused silently.  So every cell records the code that computed it: the package
# version and a hash of each module of this project the cell function's module imports (directly,
# through other modules, or inside functions), found by reading the import statements.  A name
# imported from a package's __init__ counts as the submodule that defines it, so changing one
# module (plotting, claims, io) does not touch cells that never import it.  Hashes are of file
# contents with LF line ends: the same checkout gives the same record on every machine and path.
# (A cell function defined where there is no source file, e.g. interactively, records no modules.)
CODE_PACKAGES = ("analysis", "talklora_min")
# Modules that store results or read and validate configs: a cell's numbers depend on its params
# (hashed), never on how they were checked or where the rows are saved.
NOT_CELL_CODE = frozenset({"analysis.results", "analysis.store", "analysis.files", "analysis.config",
                           "analysis.sections", "analysis.cli", "analysis.__main__"})


def _package_dir(top: str) -> Path | None:
    spec = importlib.util.find_spec(top)
    locations = getattr(spec, "submodule_search_locations", None) if spec else None
    return Path(list(locations)[0]) if locations else None


def _source(module: str) -> Path | None:
    """The source file of a project module (``analysis.perturb`` -> ``.../analysis/perturb.py``), or None."""
    top, *rest = module.split(".")
    base = _package_dir(top) if top in CODE_PACKAGES else None
    if base is None:
        return None
    for path in (base.joinpath(*rest).with_suffix(".py") if rest else None, base.joinpath(*rest, "__init__.py")):
        if path is not None and path.is_file():
            return path
    return None


def _facts(path: Path, module: str) -> tuple[str, tuple]:
    """(SHA-256 of the file's content with LF line ends, the ``(module, names)`` of its imports)."""
    data = path.read_bytes().replace(b"\r\n", b"\n")
    digest = _sha256(data)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return digest, _imports(digest, package, data)


@functools.lru_cache(maxsize=256)
def _imports(digest: str, package: str, data: bytes) -> tuple:
    """Every import statement of a module's source ``data`` in package ``package``, as
    ``(absolute module, imported names)`` (cached by content: parsing is the slow part)."""
    try:
        tree = ast.parse(data)
    except SyntaxError:                  # edited on disk since it was imported: the hash shows the change
        return ()
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if node.module else parent
            imports.append((base, tuple(a.name for a in node.names)))
    return tuple(imports)


def _imported(module: str, names: tuple) -> list[str]:
    """The project modules ``from module import names`` (or ``import module``) brings in: a submodule
    of that name, else the submodule a package's ``__init__`` re-exports it from, else the module."""
    out = []
    for name in names or (None,):
        if name is not None and _source(f"{module}.{name}") is not None:
            out.append(f"{module}.{name}")
            continue
        path = _source(module)
        origin = None
        if name is not None and path is not None and path.name == "__init__.py":
            origin = next((m for m, ns in _facts(path, module)[1] if name in ns and m != module), None)
        out += _imported(origin, (name,)) if origin is not None else [module]
    return out


def code_version(fn) -> dict:
    """What computed a cell: ``{"package": <talklora_min version>, "modules": {module: sha256[:16]}}``
    for the module defining ``fn`` and every project module it imports (see the comment above)."""
    start = fn.__module__
    path = _source(start)
    if path is None:                                   # a test's or a script's own module
        file = getattr(sys.modules.get(start), "__file__", None)
        path = Path(file) if file and Path(file).is_file() else None
    modules, todo = {}, [(start, path)]
    while todo:
        module, path = todo.pop()
        if module in modules or module in NOT_CELL_CODE or path is None:
            continue
        digest, imports = _facts(path, module)
        modules[module] = digest[:16]
        todo += [(m, _source(m)) for target, names in imports for m in _imported(target, names)]
    return {"package": PACKAGE_VERSION, "modules": dict(sorted(modules.items()))}


def code_change(recorded, current: dict) -> str | None:
    """Why a cell recorded with code ``recorded`` is stale under ``current`` (None: the same code)."""
    if recorded == current:
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("modules"), dict):
        return "it records no code version (written before code versions were recorded)"
    changes = []
    if recorded.get("package") != current["package"]:
        changes.append(f"talklora_min {recorded.get('package')} -> {current['package']}")
    old, new = recorded["modules"], current["modules"]
    changes += [f"{m} changed" if m in old and m in new else f"{m} {'added' if m in new else 'no longer used'}"
                for m in sorted(set(old) | set(new)) if old.get(m) != new.get(m)]
    return "computed by other code: " + ", ".join(changes)


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
    """A results JSON file: a regular file of at most :data:`MAX_RESULTS_FILE_BYTES`, UTF-8 JSON nested
    at most :data:`~analysis.files.MAX_NESTING` deep; :class:`DamagedResultsError` otherwise."""
    try:
        return parse_json(read_regular_file(path, MAX_RESULTS_FILE_BYTES))
    except FileProblem as err:
        raise DamagedResultsError(path, str(err)) from None
    except IsADirectoryError:
        raise DamagedResultsError(path, "a directory, not a JSON file") from None


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
        stored = record.get("rows_sha256")
        if stored is None:                           # deleting the checksum must not skip the check
            return "it has no 'rows_sha256' checksum of its rows"
        if stored != rows_checksum(rows):
            return "its rows do not match their 'rows_sha256' checksum"
        return None

    def stale_reason(self, cell: "Cell", code: dict) -> str | None:
        """Why the (sound) file of ``cell`` was computed by other code than ``code`` (see
        :func:`code_version`); None when it records exactly this code."""
        return code_change(self.read_cell(cell.hash).get("code"), code)

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
            rows = pd.read_csv(self.rows_path, low_memory=False)   # one dtype per column (mixed-key rows)
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
        would let two runs lock two different files).  It is opened without following a symbolic
        link and must be a regular file with one link: writing the holder through a planted
        ``.lock`` -> ``~/.bashrc`` would overwrite that file, so such a lock is refused
        (:class:`DamagedResultsError`), never replaced (a run replacing it could delete another
        run's freshly made lock)."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / ".lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(lock_path, flags, 0o666)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise
            what = (f"a symbolic link (to {os.readlink(lock_path)!r})" if lock_path.is_symlink()
                    else "a directory" if lock_path.is_dir() else "not a regular file")
            raise DamagedResultsError(lock_path, f"it is {what}; the lock must be a regular file: "
                                                 f"remove it and run again") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
                raise DamagedResultsError(lock_path, f"it is {what}; the lock must be this store's own regular "
                                                     f"file: remove it and run again")
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
