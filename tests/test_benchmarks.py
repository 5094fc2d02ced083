"""Smoke tests of the cost benchmarks (``make bench``) at minuscule sizes, so they cannot rot, and exact
checks of their measuring tools (paired ratios, peak and saved bytes).  Speed targets are checked by
the benchmarks themselves, as ratios measured in one run — never here."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)                # the benchmarks set the thread count


def test_layer_speed_quick_grid_reports_every_shape():
    bench = load("layer_speed")
    report = bench.run(bench.QUICK_GRID, bench.QUICK_MEMORY_SHAPES, budget=0.2, log=lambda _: None)
    g = bench.QUICK_GRID
    expected = len(g["tokens"]) * len(g["d"]) * sum(r % E == 0 for r in g["ranks"] for E in g["experts"])
    assert len(report["grid"]) == expected
    for row in report["grid"]:
        for key in ("talk_over_lora", "moe_over_lora", "moe_over_talk"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["repeats"] >= 3
    s = report["summary"]
    assert s["talk_over_lora_worst"] >= s["talk_over_lora_median"] > 0
    (mem,) = report["memory"]
    assert mem["talklora_peak_bytes"] >= mem["lora_peak_bytes"] > 0
    assert "TalkLoRA / LoRA over 4 shapes" in bench.format_report(report)


def test_layer_speed_main_writes_json_and_exits_zero(tmp_path, capsys):
    bench = load("layer_speed")
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and data["clock"] == "cpu" and len(data["grid"]) == 4
    assert "MoELoRA-code / TalkLoRA" in capsys.readouterr().out


def test_paired_ratios_and_interleaving():
    common = load("common")
    times = {"a": [2.0, 4.0, 3.0], "b": [1.0, 1.0, 2.0]}
    assert common.paired_ratio(times, "a", "b") == 2.0                 # median of 2, 4, 1.5
    assert common.paired_median_interval(times, "a", "b") == (1.5, 4.0)         # n = 3: the whole range
    many = {"a": [float(i) for i in range(1, 101)], "b": [1.0] * 100}
    assert common.paired_median_interval(many, "a", "b") == (41.0, 60.0)         # 50 ∓ 9.8 of 100
    order, clock = [], iter(range(100))
    steps = {name: (lambda n=name: order.append(n)) for name in "xyz"}
    measured = common.interleaved(steps, repeats=2, clock=lambda: next(clock), warmup=1)
    assert order == list("xyz") + list("xyz") + list("zyx")            # warm-up, then alternating order
    assert all(len(t) == 2 and t[0] == 1 for t in measured.values())
    assert common.choose_repeats(2.0, 10.0, 3, 15) == 5 and common.choose_repeats(20.0, 10.0, 1, 15) == 1


def test_peak_step_bytes_counts_what_a_step_holds_at_once():
    common = load("common")
    x = torch.randn(1000)

    def step():
        a = x * 2                                                       # 4000 bytes
        b = a + 1                                                       # 4000 more, while a lives
        del a
        c = b * 3                                                       # a freed: peak stays 8000
        return c.sum()
    assert common.peak_step_bytes(step) == 8000 + 4                    # + the 0-d sum


def test_saved_bytes_of_the_fused_branch_are_loras_plus_gates_and_gated_code():
    from talklora_min import LoRALinear, MoELoRALinear, TalkLoRALinear
    common = load("common")
    base = nn.Linear(8, 6)
    x = torch.randn(5, 8, requires_grad=True)
    N, r, E, d_out = 5, 4, 2, 6
    assert common.saved_tensor_bytes(LoRALinear(base, r), x) == N * r * 4                 # the code h only
    per_token = N * (r + E + r)                                                   # + the gates and u
    assert common.saved_tensor_bytes(MoELoRALinear(base, r, E), x) == (per_token + d_out * r) * 4   # + W
    # TalkLoRA also keeps T ⊗ I_m (r × r) and W_eff (E × r): parameter-sized, not per token
    assert common.saved_tensor_bytes(TalkLoRALinear(base, r, E), x) == (per_token + d_out * r + r * r + E * r) * 4


def test_model_speed_quick_run():
    pytest.importorskip("peft")
    bench = load("model_speed")
    report = bench.run(bench.QUICK, batch=2, seq=8, rank=4, experts=2, repeats=2)
    assert set(report["median_s"]) == {"peft-lora", "lora", "talklora", "moelora-code"}
    assert report["trainable"]["lora"] == report["trainable"]["peft-lora"]     # same adapters, same size
    assert all(math.isfinite(v) and v > 0 for v in report["ratios"].values())
    assert "TalkLoRA / PEFT LoRA" in bench.format_report(report)


def test_cost_vs_experts_quick_writes_f13_and_its_readme_entry(tmp_path):
    bench = load("cost_vs_experts")
    readme = tmp_path / "README.md"
    readme.write_text("# Figures\n\n## F1: something\n\ntext\n\n## F13: cost vs experts\n\nold caption\n")
    data = bench.measure(bench.QUICK, budget=0.2, log=lambda _: None)
    written = bench.write(data, tmp_path)
    assert all(Path(p).is_file() for p in written.values())
    saved = pd.read_csv(tmp_path / "data" / "F13_cost_vs_experts.csv")
    methods = {"lora", "moelora-code", "talklora-full", "talklora-broadcast", "talklora-doubly-stochastic",
               "talklora-block", "talklora-banded", "talklora-low-rank"}
    assert set(saved["method"]) == methods
    assert sorted(saved["num_experts"].unique()) == list(bench.QUICK["experts"])
    lora = saved[saved["method"] == "lora"]
    assert (lora[lora["metric"].isin(["time_ratio", "memory_ratio"])]["value"] == 1.0).all()
    text = readme.read_text()
    assert text.count("## F13:") == 1 and "old caption" not in text and "## F1: something" in text
    assert "data/F13_cost_vs_experts.csv" in text and "notebooks/05_cost.py" in text
    bench.write(data, tmp_path)                                        # idempotent
    assert readme.read_text() == text
    from analysis.cost import draw_f13, f13_data
    assert draw_f13(f13_data(tmp_path)).axes


def test_cost_drawing_module_imports_no_torch():
    code = "import sys, analysis.cost; assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_steady_allocator_reuses_freed_memory_instead_of_faulting_fresh_pages():
    """After ``steady_allocator`` a 4 MiB tensor allocated and freed 40 times is served from memory
    kept by malloc once the heap has grown: fewer fresh-page faults in all than one 4 MiB block has
    pages (1,024); under glibc's defaults, which give memory back, the same loop faulted ~4,000 here.
    Run in a child process: mallopt changes the whole process."""
    code = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from common import steady_allocator
what = steady_allocator()
for _ in range(5):                     # the heap grows to its working size
    torch.ones(2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    torch.ones(2**20).sum()
print(what, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")], capture_output=True, text=True,
                         check=True).stdout.split()
    if not out[0] == "glibc":
        pytest.skip(f"not glibc: {' '.join(out[:-1])}")
    assert int(out[-1]) < 1024, f"{out[-1]} page faults in 40 rounds of a 4 MiB tensor"
