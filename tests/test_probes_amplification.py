"""Perturbation amplification (docs/method.md §4, claims C5/C10): grid, determinism, bounds, masking."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from talklora_min import AdapterConfig, MoELoRALinear, TalkLoRALinear, inject
from talklora_min.probes import (KINDS, ROW_KEYS, certified_lipschitz, local_lipschitz, perturbation_response,
                                 rows_to_frame)
from talklora_min.probes.amplification import _reduced_mixer
from talklora_min.probes._util import dtype_call

from helpers import make_layer, tokens


EPS = (1e-3, 1e-2, 0.1)


def value(rows, kind, eps, metric, statistic, layer="layer"):
    hits = [r["value"] for r in rows if (r["layer"], r["kind"], r["eps"], r["metric"], r["statistic"])
            == (layer, kind, eps, metric, statistic)]
    assert len(hits) == 1
    return hits[0]


def test_grid_rows_keys_and_determinism():
    layer = make_layer("talklora", seed=1, scale=3.0)
    x = tokens(64, 12, 2)
    rows = perturbation_response(layer, x, EPS, KINDS, seed=3)
    assert len(rows) == len(EPS) * len(KINDS) * 10
    assert all(tuple(r) == ROW_KEYS and r["n_tokens"] == 64 for r in rows)
    assert {(r["metric"], r["statistic"]) for r in rows} == {
        (m, s) for m in ("routing_quotient", "total_variation", "adapter_quotient") for s in ("median", "p95", "max")
    } | {("top1_flip_rate", "mean")}
    assert all(math.isfinite(r["value"]) and r["value"] >= 0 for r in rows)
    state = torch.random.get_rng_state()
    assert perturbation_response(layer, x, EPS, KINDS, seed=3) == rows            # identical numbers
    assert torch.equal(torch.random.get_rng_state(), state)                       # global RNG untouched
    assert perturbation_response(layer, x, EPS, KINDS, seed=4) != rows
    # one kind / one eps alone gives the same rows as inside the grid
    single = perturbation_response(layer, x, 1e-2, "gaussian_block", seed=3)
    assert single == [r for r in rows if r["kind"] == "gaussian_block" and r["eps"] == 1e-2]
    as_tensor = perturbation_response(layer, x, torch.tensor(EPS, dtype=torch.float64), list(KINDS), seed=3)
    assert as_tensor == rows                                                      # eps / kind containers
    frame = rows_to_frame(rows)
    assert list(frame.columns) == list(ROW_KEYS) and len(frame) == len(rows)


@pytest.mark.parametrize("eps, message", [(0.0, "eps = 0"), (-0.1, "positive finite"),
                                          (float("nan"), "positive finite"), ([0.1, 0.0], "eps = 0"), ([], "empty")])
def test_eps_validation(eps, message):
    with pytest.raises(ValueError, match=message):
        perturbation_response(make_layer("talklora"), tokens(4, 12, 0), eps, "gaussian_input")


def test_argument_validation():
    layer, x = make_layer("talklora"), tokens(4, 12, 0)
    with pytest.raises(ValueError, match=r"kind must be one of \('gaussian_input', 'gaussian_block', 'adversarial'\)"):
        perturbation_response(layer, x, 0.1, "uniform")
    with pytest.raises(ValueError, match=r"block must be None .* \[0, 4\)"):
        perturbation_response(layer, x, 0.1, "gaussian_block", block=4)
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        perturbation_response(layer, bad, 0.1, "gaussian_input")
    with pytest.raises(ValueError, match="pgd_steps"):
        perturbation_response(layer, x, 0.1, "adversarial", pgd_steps=-1)


@given(st.sampled_from(["talklora", "moelora-code", "moelora-input"]), st.integers(0, 2**16),
       st.sampled_from([0.5, 2.0, 8.0]))
def test_adversarial_dominates_gaussian_and_everything_below_certified(kind, seed, scale):
    layer = make_layer(kind, seed=seed, scale=scale)
    x = tokens(48, 12, seed + 1)
    rows = perturbation_response(layer, x, EPS, KINDS, seed=seed, pgd_steps=6)
    cert_x = certified_lipschitz(layer, "input")
    cert_h = cert_x if kind == "moelora-input" else certified_lipschitz(layer, "code")
    for eps in EPS:
        for stat in ("median", "p95", "max"):
            adv = value(rows, "adversarial", eps, "routing_quotient", stat)
            assert adv >= value(rows, "gaussian_input", eps, "routing_quotient", stat) - 1e-15
        assert value(rows, "adversarial", eps, "routing_quotient", "max") <= cert_x * (1 + 1e-9)
        assert value(rows, "gaussian_input", eps, "routing_quotient", "max") <= cert_x * (1 + 1e-9)
        assert value(rows, "gaussian_block", eps, "routing_quotient", "max") <= cert_h * (1 + 1e-9)
        for k in KINDS:
            assert value(rows, k, eps, "total_variation", "max") <= 1.0 + 1e-12
            assert 0.0 <= value(rows, k, eps, "top1_flip_rate", "mean") <= 1.0
    # at a small radius the attack reaches the local constant of the most sensitive token
    local_max = float(local_lipschitz(layer, x, "input").max())
    assert value(rows, "adversarial", 1e-3, "routing_quotient", "max") >= 0.9 * local_max


def test_block_kind_on_input_router_changes_no_gate():
    layer = make_layer("moelora-input", seed=2, scale=4.0)
    rows = perturbation_response(layer, tokens(40, 12, 3), EPS, "gaussian_block")
    for eps in EPS:
        for metric, stat in (("routing_quotient", "max"), ("total_variation", "max"), ("top1_flip_rate", "mean")):
            assert value(rows, "gaussian_block", eps, metric, stat) == 0.0
        assert value(rows, "gaussian_block", eps, "adapter_quotient", "median") > 0.0


def test_fixed_block_and_talk_spreading():
    """T = 0: the router never sees the code, no gate moves.  T = J / E: the router reads the mean
    of the blocks, so a perturbation confined to block 0 or to block 3 (same noise) moves the gates
    identically.  T = I: a block perturbation does move the gates."""
    layer = make_layer("talklora", seed=4, scale=3.0)
    x = tokens(30, 12, 5)
    layer.set_weights(T=torch.zeros(4, 4, dtype=torch.float64))
    rows = perturbation_response(layer, x, 0.1, "gaussian_block", block=1)
    assert value(rows, "gaussian_block", 0.1, "routing_quotient", "max") == 0.0
    assert value(rows, "gaussian_block", 0.1, "adapter_quotient", "max") > 0.0
    layer.set_weights(T=torch.full((4, 4), 0.25, dtype=torch.float64))
    r0, r3 = (perturbation_response(layer, x, 0.1, "gaussian_block", block=b) for b in (0, 3))
    for metric, stat in (("routing_quotient", "median"), ("routing_quotient", "max"), ("total_variation", "p95")):
        a, b = value(r0, "gaussian_block", 0.1, metric, stat), value(r3, "gaussian_block", 0.1, metric, stat)
        assert a == pytest.approx(b, rel=1e-9) and a > 0
    layer.set_weights(T=torch.eye(4, dtype=torch.float64))
    rows = perturbation_response(layer, x, 0.1, "gaussian_block", block=1)
    assert value(rows, "gaussian_block", 0.1, "routing_quotient", "median") > 1e-3


def test_gaussian_quotients_by_value_for_one_token():
    """One token, tiny ε: the Gaussian quotient is ‖J u‖ for the drawn unit direction u, so it lies
    in (0, local]; the adversarial one reaches the local constant ‖J_s(g) W_eff A‖₂."""
    layer = make_layer("moelora-code", seed=6, scale=2.0)
    x = tokens(1, 12, 7)
    rows = perturbation_response(layer, x, 1e-6, ["gaussian_input", "adversarial"])
    local = float(local_lipschitz(layer, x, "input")[0])
    q_gauss = value(rows, "gaussian_input", 1e-6, "routing_quotient", "median")
    q_adv = value(rows, "adversarial", 1e-6, "routing_quotient", "median")
    assert 0.0 < q_gauss <= q_adv and q_adv == pytest.approx(local, rel=1e-4)
    assert value(rows, "adversarial", 1e-6, "top1_flip_rate", "mean") == 0.0


def test_reduced_mixer_preserves_adapter_change_norm():
    layer = make_layer("talklora", seed=8, d_out=40)
    x, x2 = tokens(20, 12, 9), tokens(20, 12, 10)
    direct = (layer.adapter_output(x2) - layer.adapter_output(x)).norm(dim=-1)

    def reduced(L):
        mix = _reduced_mixer(L)
        return (mix(L.code(x2), L.gates(x2)) - mix(L.code(x), L.gates(x))).norm(dim=-1)
    assert torch.allclose(dtype_call(layer, reduced, dtype=torch.float64), direct.detach(), rtol=1e-10)


def test_topk_layer_flips_grow_with_eps():
    layer = make_layer("talklora", seed=9, top_k=1, scale=3.0)
    rows = perturbation_response(layer, tokens(200, 12, 1), [1e-3, 0.3], "adversarial")
    assert value(rows, "adversarial", 0.3, "top1_flip_rate", "mean") > value(rows, "adversarial", 1e-3, "top1_flip_rate", "mean")
    assert value(rows, "adversarial", 0.3, "top1_flip_rate", "mean") > 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_logits_no_nan(dtype):
    layer = make_layer("talklora", seed=3, scale=3e3, dtype=dtype)
    x = 3 * tokens(32, 12, 4, dtype=dtype)
    assert layer.router_logits(x).abs().max() > 1e3
    rows = perturbation_response(layer, x, [1e-4, 0.1], KINDS)
    assert all(math.isfinite(r["value"]) for r in rows)
    assert value(rows, "adversarial", 1e-4, "routing_quotient", "max") <= certified_lipschitz(layer, "input") * (1 + 1e-9)


class Tiny(nn.Module):
    def __init__(self, vocab=11, d=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return self.v_proj(torch.relu(self.q_proj(h)))


def test_model_path_captures_layer_inputs_and_excludes_padding():
    torch.manual_seed(0)
    model = Tiny()
    inject(model, AdapterConfig(kind="talklora", rank=8, num_experts=4, target_modules=("q_proj", "v_proj")))
    ids = torch.randint(0, 11, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    rows = perturbation_response(model, {"input_ids": ids, "attention_mask": mask}, [0.01, 0.1], KINDS)
    assert {r["layer"] for r in rows} == {"q_proj", "v_proj"}
    assert all(r["n_tokens"] == 11 for r in rows)
    # padding content cannot change anything
    ids2 = ids.clone()
    ids2[0, 4:] = (ids2[0, 4:] + 1) % 11
    ids2[2, 1:] = 0
    assert perturbation_response(model, {"input_ids": ids2}, [0.01, 0.1], KINDS,
                                 model_kwargs={"attention_mask": mask}) == rows
    # the layer path on the captured (masked) inputs gives the same numbers
    x = model.emb(ids).detach()
    layer_rows = perturbation_response(model.q_proj, x, [0.01, 0.1], KINDS, mask=mask)
    assert [dict(r, layer="q_proj") for r in layer_rows] == [r for r in rows if r["layer"] == "q_proj"]
    with pytest.raises(ValueError, match="attention_mask has shape"):
        perturbation_response(model, ids, 0.1, "gaussian_input", model_kwargs={"attention_mask": mask[:2]})


def test_dtype_argument_and_numpy_numbers():
    layer, x = make_layer("talklora", seed=2), tokens(12, 12, 1)
    rows64 = perturbation_response(layer, x, [1e-2, 0.1], list(KINDS), seed=3)
    rows32 = perturbation_response(layer, x, [1e-2, 0.1], list(KINDS), seed=3, dtype=torch.float32)
    assert [(r["kind"], r["eps"], r["metric"], r["statistic"]) for r in rows32] == \
        [(r["kind"], r["eps"], r["metric"], r["statistic"]) for r in rows64]
    close = [abs(a["value"] - b["value"]) <= 1e-3 * max(abs(b["value"]), 1e-3) for a, b in zip(rows32, rows64)]
    assert sum(close) >= 0.9 * len(close)              # float32 agrees (a few argmax near-ties may flip)
    assert rows32 != rows64                             # and was really computed in float32
    numpy_args = perturbation_response(layer, x, np.array([1e-2, 0.1]), list(KINDS), seed=np.int64(3),
                                       pgd_steps=np.int32(10))
    assert numpy_args == rows64
    assert perturbation_response(layer, x, np.float32(0.1), "gaussian_block", seed=3, block=np.int64(1)) == \
        perturbation_response(layer, x, float(np.float32(0.1)), "gaussian_block", seed=3, block=1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        perturbation_response(layer, x, 0.1, "gaussian_input", dtype=torch.bfloat16)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(kind=None), TypeError, "kind must be one of"),
    (dict(kind=["gaussian_input", 3]), TypeError, "kind must be one of"),
    (dict(eps=None), TypeError, "eps must be a positive finite number"),
    (dict(eps="0.1"), TypeError, "eps must be a positive finite number"),
    (dict(eps=[0.1, None]), TypeError, "eps must be a positive finite number"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(seed=None), TypeError, "seed must be an integer"),
    (dict(pgd_steps="10"), TypeError, "pgd_steps must be an integer"),
    (dict(block="1"), TypeError, "block must be an integer"),
    (dict(mask="all"), TypeError, "mask must be None"),
    (dict(inputs=[[0.0] * 12]), TypeError, "inputs for a layer must be a tensor"),
    (dict(inputs=None), TypeError, "inputs for a layer must be a tensor"),
])
def test_wrong_types_are_named(kwargs, error, message):
    args = dict(layer_or_model=make_layer("talklora"), inputs=tokens(4, 12, 0), eps=0.1, kind="gaussian_input")
    with pytest.raises(error, match=message):
        perturbation_response(**{**args, **kwargs})


def test_overflowing_perturbations_raise_instead_of_nan():
    layer = make_layer("talklora", seed=2)
    x = tokens(6, 12, 1)
    rows = perturbation_response(layer, x, 1e100, list(KINDS), seed=0)        # huge but representable
    assert all(math.isfinite(r["value"]) for r in rows)
    with pytest.raises(ValueError, match="perturbation_response .*kind 'gaussian_input', eps 1e\\+308.*not finite"):
        perturbation_response(layer, x, 1e308, "gaussian_input", seed=0)
    with pytest.raises(ValueError, match="not finite"):
        perturbation_response(layer, tokens(6, 12, 1, scale=1e306), 10.0, "gaussian_block", seed=0)
