"""F13: cost of communication vs the number of experts, relative to LoRA (docs/method.md §6).

    python benchmarks/cost_vs_experts.py [--quick] [--figures-dir DIR] [--threads N] [--clock cpu|wall]
                                         [--budget SECONDS]

At a fixed rank budget r = 64, for E = 2, 4, …, 64 (m = r/E down to 1): one layer around a frozen
576 × 576 base (SmolLM2's width) on 2,048 tokens (input requiring grad), LoRA of rank 64, MoELoRA-code and TalkLoRA
with each communication structure (full, broadcast, doubly-stochastic, block with 2 groups, banded
with bandwidth 1 (0 at E = 2), low-rank with rank 2), every tensor random.  Per E the methods are
timed interleaved (``benchmarks/common.py``): time ratio = median of the paired ratios to LoRA
(and its ~95 % order-statistic interval); memory ratio = peak bytes held during one forward + backward over LoRA's.

Writes ``<figures-dir>/data/F13_cost_vs_experts.csv`` (tidy), draws ``F13_cost_vs_experts.png`` /
``.pdf`` with :func:`analysis.cost.draw_f13` and puts F13's entry into ``<figures-dir>/README.md``.
``--quick``: tiny sizes, for the smoke test.  Exits 0 whatever it finds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from analysis.cost import F13_NAME, caption, draw_f13  # noqa: E402
from common import (choose_repeats, interleaved, layer_step, paired_median_interval, paired_ratio,  # noqa: E402
                    peak_step_bytes, report_never_failing, setup)
from layer_speed import randomize  # noqa: E402
from talklora_min import LoRALinear, MoELoRALinear, TalkLoRALinear  # noqa: E402

SETTING = dict(d=576, tokens=2048, rank=64, experts=(2, 4, 8, 16, 32, 64))
QUICK = dict(d=32, tokens=64, rank=16, experts=(2, 4, 16))


def structures(E: int) -> dict[str, tuple[str, dict]]:
    """``method -> (label, TalkLoRALinear structure arguments)`` for E experts."""
    bandwidth = min(1, (E - 1) // 2)
    return {"talklora-full": ("TalkLoRA full T", dict(talk_structure="full")),
            "talklora-broadcast": ("broadcast", dict(talk_structure="broadcast")),
            "talklora-doubly-stochastic": ("doubly-stochastic", dict(talk_structure="doubly-stochastic")),
            "talklora-block": ("block (2 groups)", dict(talk_structure="block", talk_groups=2)),
            "talklora-banded": ("banded (b = 1)", dict(talk_structure="banded", talk_bandwidth=bandwidth)),
            "talklora-low-rank": ("low-rank (k = 2)", dict(talk_structure="low-rank", talk_rank=min(2, E)))}


def measure(setting=SETTING, *, threads=None, clock=None, budget: float = 12.0, log=print) -> pd.DataFrame:
    threads, clock_fn, clock_name, allocator = setup(threads, clock)
    d, tokens, r = setting["d"], setting["tokens"], setting["rank"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d, generator=gen).requires_grad_(True)
    grad = torch.randn(tokens, d, generator=gen)
    rows = []
    for E in setting["experts"]:
        torch.manual_seed(E)
        base = nn.Linear(d, d).requires_grad_(False)
        layers = {"lora": ("LoRA", LoRALinear(base, r)), "moelora-code": ("MoELoRA-code", MoELoRALinear(base, r, E))}
        for method, (label, args) in structures(E).items():
            layers[method] = (label, TalkLoRALinear(base, r, E, **args))
        for _, layer in layers.values():
            randomize(layer, gen)
        steps = {m: layer_step(layer, x, grad) for m, (_, layer) in layers.items()}
        steps["lora"]()
        start = clock_fn()
        steps["lora"]()
        repeats = choose_repeats((clock_fn() - start) * len(steps) * 1.3, budget, lo=5, hi=101)
        times = interleaved(steps, repeats, clock_fn, warmup=1)
        peaks = {m: peak_step_bytes(step) for m, step in steps.items()}
        setting_cols = dict(num_experts=E, rank=r, d=d, tokens=tokens, threads=threads, clock=clock_name,
                            allocator=allocator, repeats=repeats)
        for method, (label, _) in layers.items():
            lo, hi = paired_median_interval(times, method, "lora")
            values = [("time_ratio", "median", paired_ratio(times, method, "lora")),
                      ("time_ratio", "ci95_lo", lo), ("time_ratio", "ci95_hi", hi),
                      ("time_s", "median", statistics.median(times[method])),
                      ("memory_ratio", "value", peaks[method] / peaks["lora"]),
                      ("peak_bytes_per_token", "value", peaks[method] / tokens)]
            rows += [dict(method=method, label=label, metric=m, statistic=s, value=v, **setting_cols)
                     for m, s, v in values]
        summary = {m: round(paired_ratio(times, m, "lora"), 3) for m in layers if m != "lora"}
        log(f"[cost_vs_experts] E {E:3d} ({repeats} rounds): time / LoRA {summary}")
    return pd.DataFrame(rows)


def readme_entry(data: pd.DataFrame) -> str:
    name = F13_NAME
    return "\n".join([
        "## F13: cost vs experts", "", f"![F13]({name}.png)", "", caption(data), "",
        f"- image: [`{name}.png`]({name}.png) · [`{name}.pdf`]({name}.pdf)",
        f"- data: [`data/{name}.csv`](data/{name}.csv)",
        "- claims: none (cost, not a claim of the paper) · drawing function: `analysis.cost.draw_f13`",
        "- notebook: [`notebooks/05_cost.py`](../notebooks/05_cost.py)",
        "- drawn from: `make bench` (`benchmarks/cost_vs_experts.py`)", ""])


def put_readme_entry(readme: Path, entry: str) -> None:
    """Replace F13's section of the figures README (or append it), leaving every other entry as it is."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else "# Figures\n"
    lines = text.rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("## F13:")), None)
    if start is None:
        lines += [""] + entry.rstrip("\n").split("\n")
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = entry.rstrip("\n").split("\n") + ([""] if end < len(lines) else [])
    from analysis.results import atomic_write_text
    atomic_write_text(readme, "\n".join(lines) + "\n")


def write(data: pd.DataFrame, figures_dir: Path) -> dict:
    from analysis.figures import save_figure
    from analysis.plotting import set_style
    set_style()
    written = save_figure(draw_f13(data), data, F13_NAME, figures_dir)
    put_readme_entry(Path(figures_dir) / "README.md", readme_entry(data))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--figures-dir", type=Path, default=ROOT / "figures")
    parser.add_argument("--threads", type=int, help="intra-op threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"))
    parser.add_argument("--budget", type=float, default=12.0, help="seconds of timing per E")
    args = parser.parse_args(argv)
    def show(data):
        for path in write(data, args.figures_dir).values():
            print(f"[cost_vs_experts] wrote {path}")

    return report_never_failing(lambda: measure(QUICK if args.quick else SETTING, threads=args.threads,
                                                clock=args.clock, budget=0.5 if args.quick else args.budget), show)


if __name__ == "__main__":
    sys.exit(main())
