"""Cost of TalkLoRA and MoELoRA-code relative to LoRA of the same rank, one layer at a time.

    python benchmarks/layer_speed.py [--quick] [--json out.json] [--threads N] [--clock cpu|wall]
                                     [--budget SECONDS]

Every layer wraps the same frozen square base ``nn.Linear(d, d)``; the input requires grad (a layer
inside a network also returns ``∂L/∂x``), every adapter tensor is random and non-zero.  A step is
forward + backward; the methods of one (tokens, d) group — for each (rank, E) the triple LoRA,
TalkLoRA (official T), MoELoRA-code, timed next to each other — are timed interleaved in the same
rounds (``benchmarks/common.py``), and every ratio is the median over rounds of the paired ratio.

* **Grid**: tokens {512, 2048, 8192} × d {256, 576, 1024, 4096} × r {8, 32, 64} × E {2, 4, 8, 16}
  (E dividing r).  Targets: TalkLoRA / LoRA ≤ 1.10 at every shape and ≤ 1.05 wherever d ≥ 1024;
  MoELoRA-code within 3 % of TalkLoRA.  Rounds per group: as many as ``--budget`` seconds (of the
  clock) allow, 3 to 200; 2 when a round takes up to 2 budgets, 1 beyond (tokens 8192, d 4096: a
  step takes seconds, a round minutes); no warm-up round when a round takes more than 10 s.  The
  ratio of the fastest rounds (``min T/L``) is reported next to the median of paired ratios: on a
  loaded machine it is the steadier estimate where a group gets only a few rounds.
* **Memory** at the shapes where the old forward was measured: peak bytes held during one
  forward + backward (``common.peak_step_bytes``) and the bytes saved for backward.  Target:
  TalkLoRA's peak ≤ 1.10 × LoRA's.

Defaults: one intra-op thread and the thread's CPU time (the machine is shared; see
``benchmarks/common.py``).  ``--quick``: a tiny grid for the smoke test.  Exits 0 whatever it finds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):                  # runnable from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import (choose_repeats, interleaved, layer_step, paired_ratio, peak_step_bytes, print_report,
                    report_never_failing,  # noqa: E402
                    saved_tensor_bytes, setup)
from talklora_min import LoRALinear, MoELoRALinear, TalkLoRALinear  # noqa: E402

GRID = dict(tokens=(512, 2048, 8192), d=(256, 576, 1024, 4096), ranks=(8, 32, 64), experts=(2, 4, 8, 16))
QUICK_GRID = dict(tokens=(64,), d=(32, 48), ranks=(8,), experts=(2, 4))
MEMORY_SHAPES = [(1024, 256, 32, 4), (512, 576, 32, 4), (1024, 768, 64, 8), (4096, 768, 32, 4), (1024, 2048, 32, 4)]
QUICK_MEMORY_SHAPES = [(64, 32, 8, 4)]
TARGET_ALL, TARGET_WIDE, WIDE_D, TARGET_MOE, TARGET_MEMORY = 1.10, 1.05, 1024, 0.03, 1.10


def randomize(layer: nn.Module, gen: torch.Generator) -> nn.Module:
    """Every trainable tensor random and non-zero (B is zero at init)."""
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                fan_in = p.shape[-1] if p.dim() else 1
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / fan_in ** 0.5)
    return layer.train()


def group_layers(d: int, ranks, experts, seed: int = 0) -> dict[str, nn.Module]:
    """``lora r{r}``, ``talklora r{r} E{E}``, ``moelora r{r} E{E}`` on one shared frozen base."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(d, d).requires_grad_(False)
    layers = {}
    for r in ranks:
        layers[f"lora r{r}"] = randomize(LoRALinear(base, r), gen)
        for E in experts:
            if r % E == 0:
                layers[f"talklora r{r} E{E}"] = randomize(TalkLoRALinear(base, r, E), gen)
                layers[f"moelora r{r} E{E}"] = randomize(MoELoRALinear(base, r, E), gen)
    return layers


def bench_group(tokens: int, d: int, ranks, experts, *, clock, budget: float, max_repeats: int = 200) -> list[dict]:
    """One (tokens, d) group of the grid: a row per (r, E)."""
    layers = group_layers(d, ranks, experts)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d, generator=gen).requires_grad_(True)
    grad = torch.randn(tokens, d, generator=gen)
    # one (LoRA, TalkLoRA, MoELoRA) triple per (r, E), timed next to each other: the paired ratios
    # compare steps seconds apart, not a whole round apart (LoRA is re-timed for every E)
    steps = {}
    for r in ranks:
        for E in experts:
            if r % E == 0:
                for kind in ("lora", "talklora", "moelora"):
                    layer = layers[f"lora r{r}" if kind == "lora" else f"{kind} r{r} E{E}"]
                    steps[f"{kind} r{r} E{E}"] = layer_step(layer, x, grad)
    first = next(iter(steps.values()))
    first()                                                   # warms the base path and the allocator
    start = clock()
    first()
    round_seconds = (clock() - start) * len(steps)
    warmup = 1 if round_seconds < 10 else 0                   # a step of seconds has no start-up cost to hide
    lo = 3 if round_seconds <= budget else 2 if round_seconds <= 2 * budget else 1
    repeats = choose_repeats(round_seconds, budget, lo=lo, hi=max_repeats)
    times = interleaved(steps, repeats, clock, warmup=warmup)
    rows = []
    for r in ranks:
        for E in experts:
            if r % E:
                continue
            lora, talk, moe = (f"{kind} r{r} E{E}" for kind in ("lora", "talklora", "moelora"))
            rows.append(dict(tokens=tokens, d=d, rank=r, experts=E, repeats=repeats,
                             lora_s=statistics.median(times[lora]), talklora_s=statistics.median(times[talk]),
                             moelora_s=statistics.median(times[moe]),
                             talk_over_lora=paired_ratio(times, talk, lora),
                             moe_over_lora=paired_ratio(times, moe, lora),
                             moe_over_talk=paired_ratio(times, moe, talk),
                             min_talk_over_lora=min(times[talk]) / min(times[lora])))
    return rows


def memory_rows(shapes) -> list[dict]:
    rows = []
    for tokens, d, r, E in shapes:
        layers = group_layers(d, (r,), (E,))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(tokens, d, generator=gen).requires_grad_(True)
        grad = torch.randn(tokens, d, generator=gen)
        row = dict(tokens=tokens, d=d, rank=r, experts=E)
        for kind in ("lora", "talklora", "moelora"):
            layer = layers[f"lora r{r}" if kind == "lora" else f"{kind} r{r} E{E}"]
            row[f"{kind}_peak_bytes"] = peak_step_bytes(layer_step(layer, x, grad))
            row[f"{kind}_saved_bytes"] = saved_tensor_bytes(layer, x)
        row["talk_over_lora_peak"] = row["talklora_peak_bytes"] / row["lora_peak_bytes"]
        row["moe_over_lora_peak"] = row["moelora_peak_bytes"] / row["lora_peak_bytes"]
        rows.append(row)
    return rows


def summary(grid: list[dict], memory: list[dict]) -> dict:
    talk = [r["talk_over_lora"] for r in grid]
    wide = [r["talk_over_lora"] for r in grid if r["d"] >= WIDE_D]
    moe_gap = [abs(r["moe_over_talk"] - 1) for r in grid]
    out = {"talk_over_lora_worst": max(talk), "talk_over_lora_median": statistics.median(talk),
           "moe_over_talk_worst_gap": max(moe_gap), "moe_over_talk_median_gap": statistics.median(moe_gap),
           "moe_over_lora_worst": max(r["moe_over_lora"] for r in grid),
           "moe_over_lora_median": statistics.median(r["moe_over_lora"] for r in grid),
           "shapes_over_target": sum(t > TARGET_ALL for t in talk), "shapes": len(talk),
           "min_talk_over_lora_worst": max(r["min_talk_over_lora"] for r in grid),
           "min_talk_over_lora_median": statistics.median(r["min_talk_over_lora"] for r in grid)}
    if wide:
        out.update(talk_over_lora_worst_wide=max(wide), talk_over_lora_median_wide=statistics.median(wide),
                   wide_shapes_over_target=sum(t > TARGET_WIDE for t in wide), wide_shapes=len(wide))
    if memory:
        out["peak_talk_over_lora_worst"] = max(r["talk_over_lora_peak"] for r in memory)
    return out


def run(grid=GRID, memory_shapes=MEMORY_SHAPES, *, threads=None, clock=None, budget: float = 10.0,
        log=print) -> dict:
    threads, clock_fn, clock_name, allocator = setup(threads, clock)
    rows = []
    for tokens in grid["tokens"]:
        for d in grid["d"]:
            group = bench_group(tokens, d, grid["ranks"], grid["experts"], clock=clock_fn, budget=budget)
            rows += group
            log(f"[layer_speed] tokens {tokens:5d} d {d:5d}: TalkLoRA/LoRA "
                + " ".join(f"r{r['rank']}E{r['experts']}={r['talk_over_lora']:.3f}" for r in group)
                + f" ({group[0]['repeats']} rounds)")
    memory = memory_rows(memory_shapes)
    return {"threads": threads, "clock": clock_name, "allocator": allocator, "torch": torch.__version__,
            "budget_s": budget,
            "grid": rows, "memory": memory, "summary": summary(rows, memory)}


def format_report(report: dict) -> str:
    s = report["summary"]
    lines = [f"threads={report['threads']} clock={report['clock']} allocator: {report['allocator']} torch={report['torch']} "
             f"(interleaved rounds, median of paired ratios)", "",
             f"{'tokens':>6} {'d':>5} {'r':>3} {'E':>3} {'rounds':>6} {'LoRA ms':>9} {'Talk/LoRA':>9} "
             f"{'MoE/LoRA':>9} {'MoE/Talk':>9} {'min T/L':>8}"]
    for r in report["grid"]:
        lines.append(f"{r['tokens']:>6} {r['d']:>5} {r['rank']:>3} {r['experts']:>3} {r['repeats']:>6} "
                     f"{1e3 * r['lora_s']:>9.2f} {r['talk_over_lora']:>9.3f} {r['moe_over_lora']:>9.3f} "
                     f"{r['moe_over_talk']:>9.3f} {r['min_talk_over_lora']:>8.3f}")
    lines += ["", "peak memory of one forward + backward (MiB) and bytes saved for backward (KiB):"]
    for r in report["memory"]:
        lines.append(f"  tokens {r['tokens']} d {r['d']} r {r['rank']} E {r['experts']}: LoRA "
                     f"{r['lora_peak_bytes'] / 2**20:.2f} (saved {r['lora_saved_bytes'] / 2**10:.0f}), TalkLoRA "
                     f"{r['talklora_peak_bytes'] / 2**20:.2f} (saved {r['talklora_saved_bytes'] / 2**10:.0f}), "
                     f"MoELoRA {r['moelora_peak_bytes'] / 2**20:.2f}: TalkLoRA/LoRA {r['talk_over_lora_peak']:.3f}")

    def verdict(ok):
        return "OK" if ok else "ABOVE TARGET"
    lines += ["", f"TalkLoRA / LoRA over {s['shapes']} shapes: worst {s['talk_over_lora_worst']:.3f}, median "
              f"{s['talk_over_lora_median']:.3f} (target ≤ {TARGET_ALL}: "
              f"{verdict(s['talk_over_lora_worst'] <= TARGET_ALL)}, {s['shapes_over_target']} above)"]
    if "talk_over_lora_worst_wide" in s:
        lines.append(f"TalkLoRA / LoRA where d ≥ {WIDE_D} ({s['wide_shapes']} shapes): worst "
                     f"{s['talk_over_lora_worst_wide']:.3f}, median {s['talk_over_lora_median_wide']:.3f} "
                     f"(target ≤ {TARGET_WIDE}: {verdict(s['talk_over_lora_worst_wide'] <= TARGET_WIDE)}, "
                     f"{s['wide_shapes_over_target']} above)")
    lines.append(f"(ratio of the fastest rounds, less sensitive to load spikes where rounds are few: worst "
                 f"{s['min_talk_over_lora_worst']:.3f}, median {s['min_talk_over_lora_median']:.3f})")
    lines.append(f"MoELoRA-code / TalkLoRA: |ratio − 1| worst {s['moe_over_talk_worst_gap']:.3f}, median "
                 f"{s['moe_over_talk_median_gap']:.3f} (target ≤ {TARGET_MOE}: "
                 f"{verdict(s['moe_over_talk_worst_gap'] <= TARGET_MOE)}); MoELoRA-code / LoRA worst "
                 f"{s['moe_over_lora_worst']:.3f}, median {s['moe_over_lora_median']:.3f}")
    if "peak_talk_over_lora_worst" in s:
        lines.append(f"peak memory TalkLoRA / LoRA worst {s['peak_talk_over_lora_worst']:.3f} "
                     f"(target ≤ {TARGET_MEMORY}: {verdict(s['peak_talk_over_lora_worst'] <= TARGET_MEMORY)})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny grid (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--threads", type=int, help="intra-op threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), help="default: cpu with 1 thread, else wall")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timing per (tokens, d) group")
    args = parser.parse_args(argv)
    return report_never_failing(
        lambda: run(QUICK_GRID if args.quick else GRID, QUICK_MEMORY_SHAPES if args.quick else MEMORY_SHAPES,
                    threads=args.threads, clock=args.clock, budget=1.0 if args.quick else args.budget),
        lambda report: print_report(report, format_report, args.json))


if __name__ == "__main__":
    sys.exit(main())
