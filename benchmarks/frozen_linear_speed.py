"""Speed of the frozen-linear path of the experiments (``analysis.fast_linear``) against ``F.linear``.

    python benchmarks/frozen_linear_speed.py [--quick] [--json out.json] [--threads N]

For the frozen layers the experiments spend their time in (MiniLM's FFN, SmolLM2's FFN and its
49,152-way LM head, at the token counts of a training step): forward plus the input gradient of a
frozen ``nn.Linear`` (``F.linear`` = MKL here) and of :class:`analysis.fast_linear.FrozenLinear` with the
path forced on (oneDNN, weight packed once), in the same run.  Reports the median time of each, the
ratio ``F.linear / FrozenLinear`` (> 1: the fast path is faster), the max relative difference of the
outputs and input gradients, and what this process's self-check decides (the experiments use the path
only where it measures at least ``REQUIRED_SPEEDUP`` on its probe shape).  Target: ratio ≥ 1 on every
shape wherever the self-check turns the path on (it must never be slower than what it replaces).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analysis.fast_linear as fast_linear  # noqa: E402
from analysis.fast_linear import onednn_available, use_onednn_for_frozen_linears  # noqa: E402

# (name, tokens, d_in, d_out): one training step's shapes
SHAPES = [("MiniLM up (FFN in)", 512, 384, 1536), ("MiniLM down (FFN out)", 512, 1536, 384),
          ("SmolLM2 up", 512, 576, 1536), ("SmolLM2 LM head", 480, 576, 49152)]
QUICK_SHAPES = SHAPES[:2]
MIN_RATIO = 1.0


def step_time(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):                       # the first call packs / warms up: not timed
        xi = x.detach().requires_grad_(True)
        start = time.perf_counter()
        torch.autograd.grad(layer(xi), xi, grad)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@contextlib.contextmanager
def path_mode(mode: str):
    """``TALKLORA_FAST_LINEAR=mode`` with a fresh self-check for the ``with`` block, then as before."""
    previous = os.environ.get(fast_linear.MODE_ENV)
    os.environ[fast_linear.MODE_ENV] = mode
    fast_linear.reset()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(fast_linear.MODE_ENV)
        else:
            os.environ[fast_linear.MODE_ENV] = previous
        fast_linear.reset()


def run(shapes=SHAPES, repeats: int = 10) -> dict:
    with path_mode("auto"):                                 # what the experiments decide in this process
        decision = fast_linear.fast_path_status()
    with path_mode("on"):                                   # the path itself, whatever the decision
        results = measure(shapes, repeats)
    return dict(threads=torch.get_num_threads(), onednn_available=onednn_available(), self_check=decision,
                results=results)


def measure(shapes, repeats: int) -> list[dict]:
    results = []
    for name, n, d_in, d_out in shapes:
        torch.manual_seed(0)
        ref = nn.Linear(d_in, d_out).requires_grad_(False)
        fast = copy.deepcopy(ref)
        switched = use_onednn_for_frozen_linears(fast)
        x, grad = torch.randn(n, d_in), torch.randn(n, d_out)
        t_ref, t_fast = step_time(ref, x, grad, repeats), step_time(fast, x, grad, repeats)
        xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yr, yf = ref(xr), fast(xf)
        (gr,), (gf,) = torch.autograd.grad(yr, xr, grad), torch.autograd.grad(yf, xf, grad)
        yr, yf = yr.detach(), yf.detach()
        rel = max(float((yf - yr).abs().max() / yr.abs().max()), float((gf - gr).abs().max() / gr.abs().max()))
        results.append(dict(shape=name, tokens=n, d_in=d_in, d_out=d_out, onednn=bool(switched),
                            f_linear_s=t_ref, frozen_linear_s=t_fast, ratio=t_ref / t_fast, max_rel_diff=rel))
    return results


def format_report(report: dict) -> str:
    lines = [f"frozen linear, forward + input gradient ({report['threads']} thread(s); oneDNN available: "
             f"{report['onednn_available']})",
             f"{'shape':24s} {'F.linear':>10s} {'FrozenLinear':>13s} {'ratio':>7s} {'max rel diff':>13s}"]
    for r in report["results"]:
        lines.append(f"{r['shape']:24s} {r['f_linear_s'] * 1e3:8.2f}ms {r['frozen_linear_s'] * 1e3:11.2f}ms "
                     f"{r['ratio']:7.2f} {r['max_rel_diff']:13.1e}")
    worst = min(r["ratio"] for r in report["results"])
    check = report["self_check"]
    lines.append(f"self-check (torch {check['torch']}): path {'ON' if check['enabled'] else 'OFF'} -- {check['reason']}")
    verdict = ("met" if worst >= MIN_RATIO else "NOT met") if check["enabled"] else "not applicable (path off here)"
    lines.append(f"target: ratio >= {MIN_RATIO:g} on every shape where the path is on -> {verdict} (worst {worst:.2f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="MiniLM shapes only, 3 repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as in a sweep worker)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 10)
    if repeats < 1:
        p.error(f"--repeats must be >= 1, got {repeats}")
    report = run(QUICK_SHAPES if args.quick else SHAPES, repeats)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
