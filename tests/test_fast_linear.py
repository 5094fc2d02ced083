"""analysis.fast_linear: frozen linears through oneDNN compute what F.linear computes (values and input
gradients), fall back where the fast path does not apply, and survive deepcopy / in-place updates."""
import copy

import pytest
import torch
from torch import nn

from analysis.fast_linear import FrozenLinear, onednn_available, use_onednn_for_frozen_linears
from talklora_min import AdapterConfig, adapter_layers, inject

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def frozen_linear(d_in=24, d_out=40, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias).requires_grad_(False)
    return layer


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


def test_without_onednn_nothing_is_switched_and_switched_layers_fall_back(monkeypatch):
    import analysis.fast_linear as fl
    layer = frozen_linear()
    monkeypatch.setattr(fl, "onednn_available", lambda: False)
    assert use_onednn_for_frozen_linears(layer) == 0 and type(layer) is nn.Linear
    layer.__class__ = FrozenLinear                          # e.g. switched on another machine, then copied here
    x = torch.randn(3, 24)
    assert not layer.fast_path(x)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_benchmark_runs_and_reports_ratios_and_differences(tmp_path, capsys):
    """benchmarks/frozen_linear_speed.py end to end at a tiny shape (so it cannot rot); speed itself is
    measured by `make bench`, not asserted here."""
    import importlib.util
    import json
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
    (row,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert row["ratio"] > 0 and row["max_rel_diff"] < 1e-5 and row["onednn"] == onednn_available()
    assert "F.linear" in capsys.readouterr().out
