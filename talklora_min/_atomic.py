"""Crash-safe file writes: a reader sees the complete old or the complete new content, never a mix.

* :func:`write_bytes` / :func:`write_text` — write a temporary file next to the target
  (``.<name>.<random>.tmp``), ``fsync`` it, ``os.replace`` it over the target, ``fsync`` the folder.
  A new file gets the permissions of a plain ``open(path, "w")`` (``0o666`` minus the user's umask,
  applied by the kernel); an existing file keeps its mode.
* :func:`replace_dir` — build a folder's new content in a temporary sibling, then swap it in with one
  ``rename`` (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames with a recovery step).
* :func:`clean_leftovers` — remove the temporaries a killed writer left behind.
* :func:`folder_lock` — an advisory lock on a folder itself (``flock`` on its descriptor, no lock
  file): exclusive for a writer, shared for readers; the kernel releases it when the process dies.

A process killed at any point leaves at most a ``*.tmp`` file (or a ``.<name>.*.tmpdir`` /
``.<name>.*.old`` folder); the next write to the same place removes it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:       # pragma: no cover - Windows: no flock, folder_lock takes no lock
    fcntl = None

TMP_SUFFIX = ".tmp"
# flock not supported by this file system (some network mounts): proceed without the lock
_NO_FLOCK = {errno.ENOLCK, errno.EBADF, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _tmp_name(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:           # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:           # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _target_mode(path: Path) -> int:
    """The mode of a file written at ``path``: the existing file's, else ``0o666`` minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)          # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a fresh temporary path next to ``path`` for the caller to write; on success it is
    fsynced, given ``path``'s mode (see the module doc) and renamed over ``path``; on error it is
    removed and ``path`` is untouched (absent, or its previous complete version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, TMP_SUFFIX)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, _target_mode(path))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path, data: bytes) -> None:
    """Atomically replace ``path`` by ``data`` (see the module doc)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)


def write_text(path, text: str, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` by ``text`` encoded with ``encoding``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    write_bytes(path, text.encode(encoding))


def clean_leftovers(path) -> list[Path]:
    """Remove the temporaries of earlier writes to ``path`` (a file or folder name); returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for p in path.parent.glob(f".{path.name}.*"):
        if not p.name.endswith((TMP_SUFFIX, ".tmpdir", ".old")):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def recover_dir(path) -> None:
    """Finish a :func:`replace_dir` that was killed between its two renames (non-Linux fallback):
    if ``path`` is missing but its moved-away old version exists, move that back."""
    path = Path(path)
    if not path.exists():
        old = sorted(path.parent.glob(f".{path.name}.*.old"), key=lambda p: p.stat().st_mtime)
        if old:
            os.rename(old[-1], path)


def replace_dir(path, fill: Callable[[Path], None]) -> None:
    """Replace the folder ``path`` by a new one that ``fill(tmp_dir)`` writes, in one step.

    ``fill`` gets an empty temporary folder next to ``path``; if it raises, ``path`` is untouched and
    the temporary folder removed.  Readers see the complete old or the complete new folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    clean_leftovers(path)
    tmp = _tmp_name(path, ".tmpdir")
    os.mkdir(tmp, 0o777)                                     # the kernel applies the umask
    try:
        fill(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)                               # tmp now holds the old content
        else:
            old = _tmp_name(path, ".old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def folder_lock(directory, shared: bool = False):
    """Hold ``flock(LOCK_EX)`` (``shared``: ``LOCK_SH``) on the folder ``directory`` for the block.

    Writers of one folder run one after the other, and a reader holding the shared lock never sees
    a writer between its steps.  The lock lives on the folder's own descriptor: no lock file, so it
    works on read-only folders and leaves nothing behind; a killed holder's lock is released by the
    kernel.  Without ``flock`` (Windows, a file system that refuses it) or a folder that cannot be
    opened (missing: the caller's read reports it) the block runs without a lock."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in _NO_FLOCK:
                    raise
        yield
    finally:
        if fd is not None:
            os.close(fd)                  # releases the lock
