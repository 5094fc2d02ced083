"""analysis.fast_linear: frozen linears through oneDNN compute what F.linear computes (values and input
gradients), the path is on only where this process's self-check passes, any error of the private ops
falls back to F.linear for good (reason recorded), and runs record the status."""
import copy
import json
import time

import pytest
import torch
from torch import nn

import analysis.fast_linear as fl
from analysis.fast_linear import FrozenLinear, onednn_available, use_onednn_for_frozen_linears
from talklora_min import AdapterConfig, adapter_layers, inject

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
REAL_LINEAR = torch.ops.mkldnn._linear_pointwise
REAL_REORDER = torch.ops.mkldnn._reorder_linear_weight


@pytest.fixture(autouse=True)
def forced_on(monkeypatch):
    """The path forced on (its speed depends on the CPU; the tests check values and fallbacks), and
    a fresh self-check per test."""
    monkeypatch.setenv(fl.MODE_ENV, "on")
    fl.reset()
    yield
    fl.reset()


def frozen_linear(d_in=24, d_out=40, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias).requires_grad_(False)
    return layer


def value_and_input_grad(layer, x, g):
    xi = x.detach().clone().requires_grad_(True)
    y = layer(xi)
    (gx,) = torch.autograd.grad(y, xi, g)
    return y.detach(), gx


# ----------------------------------------------------------------------------- values
@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24), (1, 24), (2, 2, 3, 24)])
def test_values_and_input_gradients_equal_f_linear(bias, shape):
    ref = frozen_linear(bias=bias)
    fast = copy.deepcopy(ref)
    assert use_onednn_for_frozen_linears(fast) == 1 and type(fast) is FrozenLinear
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = fast(x), ref(x_ref)
    assert y.shape == y_ref.shape and not y.is_mkldnn
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (gx,), (gx_ref,) = torch.autograd.grad(y, x, g), torch.autograd.grad(y_ref, x_ref, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert fast.weight.grad is None


@needs_onednn
def test_falls_back_where_the_fast_path_does_not_apply():
    layer = frozen_linear()
    use_onednn_for_frozen_linears(layer)
    x = torch.randn(4, 24)
    assert layer.fast_path(x)
    assert not layer.fast_path(x.double()) and not layer.fast_path(x.half())
    torch.testing.assert_close(layer.double()(x.double()), nn.functional.linear(x.double(), layer.weight, layer.bias))
    trainable = frozen_linear()
    use_onednn_for_frozen_linears(trainable)
    trainable.weight.requires_grad_(True)                    # unfrozen afterwards: gradients must reach W
    assert not trainable.fast_path(x)
    trainable(x).sum().backward()
    torch.testing.assert_close(trainable.weight.grad, torch.ones(40, 1) * x.sum(0, keepdim=True))


@needs_onednn
def test_wrong_input_width_is_f_linear_s_error_and_keeps_the_path_on():
    layer = frozen_linear()
    use_onednn_for_frozen_linears(layer)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        layer(torch.randn(3, 23))
    assert fl.fast_path_status()["enabled"]                  # a caller's mistake is not a broken op


@needs_onednn
def test_repacks_after_an_in_place_update_and_deepcopies_without_the_cache():
    layer = frozen_linear()
    use_onednn_for_frozen_linears(layer)
    x = torch.randn(6, 24)
    layer(x)
    assert "_onednn_cache" in layer.__dict__
    twin = copy.deepcopy(layer)
    assert "_onednn_cache" not in twin.__dict__ and type(twin) is FrozenLinear
    with torch.no_grad():
        layer.weight.mul_(2.0)                              # in place: the packed copy must follow
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin(x), nn.functional.linear(x, twin.weight, twin.bias), rtol=1e-5, atol=1e-5)
    assert (layer(x) - twin(x)).abs().max() > 1e-3


@needs_onednn
def test_switches_only_frozen_plain_linears_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 3)).requires_grad_(False)
    inject(model, AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules=["0"]))
    model[3].requires_grad_(True)                           # a trainable head stays a plain Linear
    keys = list(model.state_dict())
    x = torch.randn(5, 16)
    for layer in adapter_layers(model).values():
        layer.set_weights(B=torch.randn_like(layer.B))
    before = model(x)
    assert use_onednn_for_frozen_linears(model) == 2        # the adapter's base and model[2]
    assert type(model[2]) is FrozenLinear and type(model[0].base) is FrozenLinear and type(model[3]) is nn.Linear
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    model(x).sum().backward()                               # adapter and head gradients still flow
    assert model[3].weight.grad is not None and all(p.grad is not None for p in model[0].parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- the self-check
def test_self_check_passes_and_reports_what_it_measured(monkeypatch):
    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv(fl.MODE_ENV, "auto")
    monkeypatch.setattr(fl, "REQUIRED_SPEEDUP", 0.0)        # the decision itself is CPU-specific
    fl.reset()
    start = time.perf_counter()
    status = fl.fast_path_status()
    took = time.perf_counter() - start
    assert status["enabled"] and status["reason"].startswith("self-check passed")
    assert status["speedup"] > 0 and 0 <= status["max_rel_diff"] <= fl.TOLERANCE
    assert status["torch"] == torch.__version__ and status["mode"] == "auto" and status["probe"] == list(fl.PROBE)
    assert fl.fast_path_status() is not None and fl._status is not None   # cached: decided once per process
    assert took < 5.0, f"the self-check took {took:.2f} s"                   # generous: CI machines are shared


def slower_op(*args):
    time.sleep(0.02)                                        # ~10x a probe GEMM: never 1.2x faster
    return REAL_LINEAR(*args)


def wrong_op(*args):
    return REAL_LINEAR(*args) * (1 + 1e-3)


def raising_op(*args):
    raise RuntimeError("mkldnn::_linear_pointwise() Expected a value of type 'str' for argument 'attr'")


def changed_signature_op(x, w):                             # a release that renamed / dropped arguments
    return REAL_LINEAR(x, w, None, "none", [], "")


def raising_reorder(*args):
    raise TypeError("_reorder_linear_weight() missing 1 required positional argument: 'batch_size'")


# (what is broken, what to patch, the mode, what the recorded reason must say)
SELF_CHECK_FAILURES = {
    "op raises": (("_linear_pointwise", raising_op), "on", "RuntimeError: mkldnn::_linear_pointwise()"),
    "op signature changed": (("_linear_pointwise", changed_signature_op), "on", "TypeError"),
    "packing raises": (("_reorder_linear_weight", raising_reorder), "on", "TypeError: _reorder_linear_weight()"),
    "wrong values": (("_linear_pointwise", wrong_op), "on", "differs from F.linear by 1.0e-03"),
    "slower": (("_linear_pointwise", slower_op), "auto", "< 1.2x required"),
    "no oneDNN in this build": (None, "auto", "has no packed oneDNN linear ops"),
    "switched off": (None, "off", "switched off (TALKLORA_FAST_LINEAR=off)"),
    "mode typo": (None, "yes", "TALKLORA_FAST_LINEAR must be one of ['auto', 'on', 'off'], got 'yes'"),
}


@pytest.mark.parametrize("case", list(SELF_CHECK_FAILURES))
def test_self_check_failure_keeps_f_linear(case, monkeypatch):
    """Each way the private path can be broken or not worth it: the path is off with the reason
    recorded, nothing is switched, and the model computes exactly F.linear."""
    patch, mode, reason = SELF_CHECK_FAILURES[case]
    if patch is not None and not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv(fl.MODE_ENV, mode)
    if patch is not None:
        monkeypatch.setattr(torch.ops.mkldnn, *patch)
    if case == "no oneDNN in this build":
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    fl.reset()
    status = fl.fast_path_status()
    assert not status["enabled"] and reason in status["reason"], status["reason"]
    assert status["torch"] == torch.__version__
    if case == "slower":
        assert 0 < status["speedup"] < fl.REQUIRED_SPEEDUP
    model = nn.Sequential(frozen_linear(), nn.Tanh(), frozen_linear(40, 8))
    reference = copy.deepcopy(model)
    assert use_onednn_for_frozen_linears(model) == 0 and all(type(m) is not FrozenLinear for m in model)
    x = torch.randn(5, 24)
    assert torch.equal(model(x), reference(x))


# ----------------------------------------------------------------------------- errors at call time
@needs_onednn
@pytest.mark.parametrize("where", ["forward", "backward", "packing"])
def test_error_at_call_time_falls_back_for_good(where, monkeypatch):
    """The self-check passed, then the private op fails in a real call: that call is computed by
    F.linear (same values and input gradients), the path stays off and says why."""
    layer = frozen_linear()
    assert use_onednn_for_frozen_linears(layer) == 1 and fl.fast_path_status()["enabled"]
    x, g = torch.randn(6, 24), torch.randn(6, 40)
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("oneDNN: unsupported format")
    name = "_reorder_linear_weight" if where == "packing" else "_linear_pointwise"
    if where == "backward":
        xi = x.clone().requires_grad_(True)
        y = layer(xi)                                        # forward on the fast path
        monkeypatch.setattr(torch.ops.mkldnn, name, broken)
        (gx,) = torch.autograd.grad(y, xi, g)
        y = y.detach()
    else:
        monkeypatch.setattr(torch.ops.mkldnn, name, broken)
        y, gx = value_and_input_grad(layer, x, g)
    torch.testing.assert_close(y, nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, g @ layer.weight, rtol=1e-5, atol=1e-5)
    status = fl.fast_path_status()
    assert not status["enabled"] and f"fell back to F.linear after an error in a {'forward' if where == 'packing' else where} call" \
        in status["reason"] and "oneDNN: unsupported format" in status["reason"]
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))     # stays fallen back
    assert len(calls) == 1                                   # the broken op is not tried again
    assert use_onednn_for_frozen_linears(frozen_linear()) == 0


# ----------------------------------------------------------------------------- metadata
def linear_cell(seed: int) -> list[dict]:
    """A sweep cell that runs a frozen linear (the path it took is the process's status)."""
    layer = frozen_linear(seed=seed)
    use_onednn_for_frozen_linears(layer)
    y = layer(torch.randn(4, 24, generator=torch.Generator().manual_seed(seed)))
    return [{"metric": "sum", "value": float(y.sum())}]


@pytest.mark.parametrize("mode", ["on", "off"])
def test_cells_and_meta_record_the_fast_path(tmp_path, monkeypatch, mode):
    from analysis.results import Cell, ResultStore, run_sweep
    monkeypatch.setenv(fl.MODE_ENV, mode)
    fl.reset()
    cells = [Cell(linear_cell, {"seed": s}) for s in range(3)]
    run_sweep("exp", cells, results_dir=tmp_path, progress=False, log=lambda s: None)
    store = ResultStore("exp", tmp_path)
    expected = fl.fast_path_status()
    for cell in cells:
        assert store.read_cell(cell.hash)["fast_linear"] == expected
    (entry,) = json.loads(store.meta_path.read_text())["fast_linear"]
    assert entry == {**expected, "cells": 3}
    assert entry["enabled"] is (mode == "on" and onednn_available())
    assert entry["torch"] == torch.__version__ and entry["reason"] and "speedup" in entry


# ----------------------------------------------------------------------------- a real training cell
@pytest.mark.real_models
def test_a_training_cell_gives_the_same_rows_with_the_path_on_and_off(tmp_path, monkeypatch):
    """One real (tiny) MiniLM training cell with the path forced on and forced off: the rows agree to
    float tolerance (the path changes only the summation order of the frozen GEMMs)."""
    from analysis import train
    from test_experiments import tiny_train_cfg
    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    cfg = tiny_train_cfg(steps=2, eval_every=2)
    rows = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(fl.MODE_ENV, mode)
        fl.reset()
        train.frozen_encoder.cache_clear()
        rows[mode] = [r for r in train.train_cell("talklora-official", 0, cfg, str(tmp_path / mode), "topic")
                      if r["metric"] != "wall_seconds"]
        assert fl.fast_path_status()["enabled"] is (mode == "on")
    train.frozen_encoder.cache_clear()
    assert len(rows["on"]) == len(rows["off"]) > 50
    for on, off in zip(rows["on"], rows["off"]):
        assert {k: v for k, v in on.items() if k != "value"} == {k: v for k, v in off.items() if k != "value"}
        assert on["value"] == pytest.approx(off["value"], rel=1e-4, abs=1e-6), (on, off)   # measured: <= 1e-5


def test_benchmark_runs_and_reports_ratios_and_differences(tmp_path, capsys):
    """benchmarks/frozen_linear_speed.py end to end at a tiny shape (so it cannot rot); speed itself is
    measured by `make bench`, not asserted here."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "frozen_linear_speed.py"
    spec = importlib.util.spec_from_file_location("frozen_linear_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.QUICK_SHAPES = [("tiny", 6, 8, 5)]
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--repeats", "2", "--json", str(tmp_path / "b.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "b.json").read_text())
    (row,) = report["results"]
    assert row["ratio"] > 0 and row["max_rel_diff"] < 1e-5 and row["onednn"] == onednn_available()
    assert set(report["self_check"]) >= {"enabled", "reason", "speedup", "torch"}
    out = capsys.readouterr().out
    assert "F.linear" in out and "self-check" in out
