"""Smoke test: the layer benchmark runs end to end at a minuscule shape (so it cannot rot)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "layer_speed.py"
TINY = [(2, 3, 8, 4, 2)]                     # batch, seq, d, rank, experts


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("layer_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SHAPES", TINY)
    monkeypatch.setattr(module, "QUICK_SHAPES", TINY)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)           # the benchmark sets the thread count


def test_run_reports_finite_positive_ratios(bench):
    report = bench.run(TINY, repeats=2, warmup=1)
    (res,) = report["results"]
    assert {"lora", "moelora", "talklora", "loop-talk"} <= res["layers"].keys()
    for key in ("talklora/lora", "moelora/lora", "loop-talk/talklora", "mem talklora/lora",
                "mem moelora/lora", "mem loop-talk/talklora"):
        value = res["ratios"][key]
        assert math.isfinite(value) and value > 0, key
    for entry in res["layers"].values():
        assert entry["median_s"] > 0 and entry["saved_bytes"] > 0
    # the MoE layers save more for backward than LoRA (codes, gates, expert activations)
    assert res["layers"]["talklora"]["saved_bytes"] > res["layers"]["lora"]["saved_bytes"]
    assert "TalkLoRA/LoRA" in bench.format_report(report)


def test_main_writes_json_and_exits_zero(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--repeats", "1", "--json", str(out), "--profile"]) == 0
    data = json.loads(out.read_text())
    assert data["results"][0]["shape"] == dict(batch=2, seq=3, d=8, rank=4, experts=2)
    printed = capsys.readouterr().out
    assert "talklora/lora" in printed and "torch.profiler" in printed


def test_saved_tensor_bytes_counts_activations_not_parameters(bench):
    layer = bench.make_layers(8, 4, 2, "cpu")["lora"]
    x = torch.randn(5, 8, requires_grad=True)
    # LoRA with dropout 0 saves exactly its code h = A x (5 × 4 float32) for backward
    assert bench.saved_tensor_bytes(layer, x) == 5 * 4 * 4


def test_fused_talklora_proposal_is_the_same_function(bench):
    """The benchmark's proposed fast path must compute exactly TalkLoRA (values and gradients)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10).double()
    ours = bench.TalkLoRALinear(base, 8, 4, alpha=16)
    fused = bench.FusedTalkLoRALinear(base, 8, 4, alpha=16)
    gen = torch.Generator().manual_seed(1)
    ours.set_weights(**{n: torch.randn(t.shape, generator=gen, dtype=t.dtype)
                        for n, t in ours.get_weights().items()})
    fused.set_weights(**ours.get_weights())
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=gen)
    y_ours, y_fused = ours(x), fused(x)
    torch.testing.assert_close(y_fused, y_ours, atol=1e-12, rtol=1e-12)
    y_ours.square().sum().backward()
    y_fused.square().sum().backward()
    for name in ("A", "C", "B", "T", "W_r"):
        torch.testing.assert_close(getattr(fused, name).grad, getattr(ours, name).grad,
                                   atol=1e-10, rtol=1e-10, msg=name)
