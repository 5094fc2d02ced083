"""What the layer benchmarks share: threads and clock, interleaved timing, peak memory of a step.

Timing.  A *step* is forward + backward of a layer (or model) on fixed inputs that require grad,
as inside a network.  The methods compared are timed **interleaved**: every round times each method
once, in an order that alternates from round to round, so slow drifts of a shared machine hit all
methods alike; a ratio is the median over rounds of the *paired* ratio ``t_a / t_b`` of one round.
The clock is the thread's CPU time (``time.thread_time``) when one intra-op thread runs: on a
machine shared with other jobs it excludes the time the thread waits for a core (wall time is used
with several threads, whose CPU time would count OpenMP spin-waits).

Allocator.  glibc's malloc returns large freed blocks to the system (blocks above its mmap
threshold, and the heap's top beyond its trim threshold), so a later step touches fresh pages and
pays first-touch page faults — kernel time counted in the thread's CPU time, and varying from step
to step with the allocator's state: two methods timed in one round then differ by up to ±15 % at
a few MiB per tensor.  :func:`steady_allocator` (called by :func:`setup`) keeps freed memory for
reuse (``mallopt``: mmap threshold 32 MiB, no trimming), as the jemalloc / tcmalloc setups
recommended for PyTorch on CPU do; tensors above 32 MiB are still mapped per allocation.  On
other C libraries it changes nothing, and reports so.

Memory.  :func:`peak_step_bytes` tracks every tensor storage allocated during one step (a
``TorchDispatchMode`` sees each op's outputs; a storage leaves the count when it is freed) and
returns the peak of live bytes — the step's own peak, excluding what existed before it (inputs,
parameters, the base weight).  Deterministic, independent of the allocator.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def available_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                                   # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def steady_allocator() -> str:
    """Make glibc's malloc keep freed memory for reuse (see the module doc); returns what was done,
    for the report.  ``M_TRIM_THRESHOLD = -1`` disables trimming the heap's top, ``M_MMAP_THRESHOLD``
    at glibc's maximum (32 MiB on 64-bit) serves smaller blocks from the heap."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (no mallopt in this C library)"
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    return "glibc mallopt: mmap threshold 32 MiB, no trim" if ok else "default (mallopt refused)"


def setup(threads: int | None, clock: str | None) -> tuple[int, Callable[[], float], str, str]:
    """Set the intra-op thread count (default 1), keep freed memory for reuse
    (:func:`steady_allocator`) and pick the clock (``"cpu"`` for one thread, else ``"wall"``);
    returns ``(threads, clock function, clock name, allocator)``."""
    threads = 1 if threads is None else max(1, int(threads))
    torch.set_num_threads(threads)
    allocator = steady_allocator()
    clock = clock or ("cpu" if threads == 1 else "wall")
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    if clock == "cpu" and threads > 1:
        raise ValueError("clock='cpu' needs threads=1 (the CPU time of several threads counts their spin-waits)")
    return threads, (time.thread_time if clock == "cpu" else time.perf_counter), clock, allocator


def interleaved(steps: dict[str, Callable[[], None]], repeats: int, clock: Callable[[], float],
                warmup: int = 1) -> dict[str, list[float]]:
    """``{name: [seconds per round]}``: ``warmup`` untimed rounds, then ``repeats`` rounds, each timing
    every step once (order reversed on every other round)."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = clock()
            steps[name]()
            times[name].append(clock() - start)
    return times


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``t_a / t_b`` measured in the same round."""
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def paired_median_interval(times: dict[str, list[float]], a: str, b: str, z: float = 1.96) -> tuple[float, float]:
    """Distribution-free ~95 % interval of the median paired ratio: the order statistics
    ``n/2 ∓ z √n / 2`` of the ``n`` paired ratios (the whole range when n is small)."""
    ratios = sorted(ta / tb for ta, tb in zip(times[a], times[b]))
    n = len(ratios)
    half = z * math.sqrt(n) / 2
    return ratios[max(0, math.floor(n / 2 - half))], ratios[min(n - 1, math.ceil(n / 2 + half) - 1)]


def layer_step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``layer`` on ``x`` (which requires grad), gradients cleared after."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        layer(x).backward(grad)
        for p in params:
            p.grad = None
        x.grad = None
    return step


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: not an allocation (nor is a storage
        # that existed before the step, seen first through a view of it)
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._alive and key not in inputs:
                    self._alive.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_step_bytes(step: Callable[[], None]) -> int:
    """Peak bytes of the tensors a step allocates and holds at once (see the module doc)."""
    step()                                                   # warm: lazily created state is not the step's
    with _LiveBytes() as mode:
        step()
    return mode.peak


def saved_tensor_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages saved for backward by one forward (parameters, buffers and the input
    excluded: they exist anyway) — the activation memory the layer keeps between forward and backward."""
    exclude = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers(), x)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    return sum(seen.values())


def choose_repeats(round_seconds: float, budget_seconds: float, lo: int, hi: int) -> int:
    """As many rounds as fit the budget, within ``[lo, hi]``."""
    return int(min(hi, max(lo, budget_seconds // max(round_seconds, 1e-9))))


def report_never_failing(produce: Callable[[], Any], show: Callable[[Any], None]) -> int:
    """``show(produce())`` and exit status 0 whatever happens: a benchmark reports, it never fails a
    pipeline, so an error is printed to stderr instead of raised."""
    try:
        show(produce())
    except Exception as err:
        print(f"benchmark error: {type(err).__name__}: {err}", file=sys.stderr)
    return 0


def print_report(report: dict, format_report: Callable[[dict], str], json_path: Path | None) -> None:
    """Print ``format_report(report)``; with ``json_path`` also write the report there as JSON."""
    print(format_report(report))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {json_path}")
