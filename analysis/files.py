"""Reading files that someone else may have written or replaced: config files (``--config``,
profiles) and results-store JSON (cell files, ``meta.json``).

* :func:`read_regular_file` opens without blocking and reads only a regular file, at most
  ``max_bytes`` of it: a FIFO would block the run forever, ``/dev/zero`` would fill the memory.
* :func:`parse_json` / :func:`parse_toml` refuse nesting deeper than :data:`MAX_NESTING` lists or
  tables (the parsers recurse, so ten thousand ``[`` are a ``RecursionError``; a TOML dotted key
  ``a.a.a…`` of n parts costs tomllib O(n²) memory, so TOML is checked *before* parsing).

Every problem is a :class:`FileProblem` (a ``ValueError``) whose message says what is wrong and the
limit; callers turn it into their own error type naming the file.  A missing or unreadable file is
the ``OSError`` ``open`` raises.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

MAX_NESTING = 32            # lists / tables inside each other; configs use 4, results files 5


class FileProblem(ValueError):
    """A file that exists but is not something this program reads (wrong kind, too big, too deep)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes`` bytes (symbolic links
    to one are fine); :class:`FileProblem` for anything else, ``IsADirectoryError`` for a folder."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise FileProblem(f"{_kind(mode)}, not a regular file")
        chunks, size = [], 0
        while size <= max_bytes:                  # st_size may lie (procfs) or grow: count what comes
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise FileProblem(f"larger than {max_bytes:,} bytes, the most this file may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


def nesting_depth(value: Any, limit: int = MAX_NESTING) -> int:
    """How many lists / dicts ``value`` has inside each other (a scalar: 0), computed without
    recursion; :class:`FileProblem` as soon as it exceeds ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            raise FileProblem(f"nested more than {limit} levels deep (lists / tables inside each other)")
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def parse_json(data: bytes, limit: int = MAX_NESTING) -> Any:
    """UTF-8 JSON text -> value; :class:`FileProblem` when it is not UTF-8, not JSON, or too deep."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise FileProblem(f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise FileProblem(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise FileProblem(f"nested more than {limit} levels deep (lists / tables inside each other)") from None
    nesting_depth(value, limit)
    return value


# TOML strings and comments, so that brackets and dots inside them are not counted.  A multi-line
# string may end in up to five quotes (two of them content).
_TOML_SKIP = re.compile(r'"""(?:\\[\s\S]|[^\\])*?"{3,5}|\'\'\'[\s\S]*?\'{3,5}|"(?:\\.|[^"\\\n])*"|\'[^\'\n]*\'|#[^\n]*')


def toml_nesting(text: str) -> int:
    """An upper bound on the nesting of TOML ``text`` before parsing it: the deepest ``[``/``{``
    and the most parts of one dotted key or table header (``a.b.c = 1`` nests three tables)."""
    bare = _TOML_SKIP.sub(lambda m: "" if m.group().startswith("#") else "s", text)
    depth = deepest = 0
    for bracket in re.finditer(r"[\[\]{}]", bare):
        depth = depth + 1 if bracket.group() in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    parts = re.split(r"[\n{,]", bare)
    keys = [p.split("=", 1)[0] if "=" in p else p for p in parts if "=" in p or p.lstrip().startswith("[")]
    return max([deepest, *(k.count(".") + 1 for k in keys)])      # key parts and [table.header] parts


def parse_toml(text: str, limit: int = MAX_NESTING) -> dict:
    """TOML text -> dict; :class:`FileProblem` for nesting beyond ``limit`` (checked before parsing);
    ``tomllib.TOMLDecodeError`` for invalid TOML."""
    if toml_nesting(text) > limit:
        raise FileProblem(f"nested more than {limit} levels deep (tables, dotted keys or arrays inside each other)")
    try:
        data = tomllib.loads(text)
    except RecursionError:                                    # pragma: no cover - the scan above stops it
        raise FileProblem(f"nested more than {limit} levels deep") from None
    nesting_depth(data, limit)
    return data
