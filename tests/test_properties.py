"""Hypothesis property tests: the docs/method.md §3 maps (C1–C3) and structural identities of the layers.

Every test draws shapes (E in 1..6, m in 1..4, r = E·m, d_in / d_out in 1..24, leading shapes
``()``, ``(n,)``, ``(b, s)``, ``(a, b, s)``), a dtype (float32 / float64), a scaling (``alpha``
None or 16) and a seed for the weights and inputs (``B`` is always non-zero), then compares VALUES.

Tolerances (relative to the size of the reference output):
``max |y − y_ref| ≤ tol · (1 + max |y_ref|)`` with ``tol = 1e-10`` (float64), ``1e-5`` (float32);
identities that are exact in floating point are checked with ``torch.equal``.
The example budget comes from the registered Hypothesis profile (tests/conftest.py).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from talklora_min import (LoRALinear, MoELoRALinear, TalkLoRALinear, absorb_talk, absorbed_router,
                          code_router_from_input, input_router_from_code, is_code_representable,
                          moelora_from_identity_talk, non_representable_counterexample,
                          rowspace_residual, talklora_from_moelora)
from talklora_min.reparam import default_tolerance



TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
#: a constructed counterexample must have a residual far from round-off; ours gives 1/√2 ≈ 0.707
COUNTEREXAMPLE_MIN_RESIDUAL = 0.5

LEADING = st.one_of(
    st.just(()),
    st.tuples(st.integers(1, 6)),
    st.tuples(st.integers(1, 3), st.integers(1, 4)),
    st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)),
)


@st.composite
def configs(draw, min_experts=1, max_experts=6, min_d_in=1):
    E = draw(st.integers(min_experts, max_experts))
    m = draw(st.integers(1, 4))
    return dict(E=E, m=m, r=E * m,
                d_in=draw(st.integers(min_d_in, 24)), d_out=draw(st.integers(1, 24)),
                lead=draw(LEADING), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                alpha=draw(st.sampled_from([None, 16])), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


class Rand:
    """Seeded tensors in a dtype (all randomness of a test goes through here)."""

    def __init__(self, cfg):
        self.gen = torch.Generator().manual_seed(cfg["seed"])
        self.dtype = cfg["dtype"]

    def __call__(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale).to(self.dtype)


def make_base(cfg, rand) -> nn.Linear:
    base = nn.Linear(cfg["d_in"], cfg["d_out"], bias=cfg["bias"]).to(cfg["dtype"])
    with torch.no_grad():
        base.weight.copy_(rand(cfg["d_out"], cfg["d_in"], scale=1 / math.sqrt(cfg["d_in"])))
        if base.bias is not None:
            base.bias.copy_(rand(cfg["d_out"]))
    return base


def random_moe_weights(layer: MoELoRALinear, rand) -> None:
    """Random A, C, B (non-zero), router; routing is far from uniform (router scale 2)."""
    E, m, r = layer.num_experts, layer.expert_rank, layer.rank
    w = dict(A=rand(r, layer.in_features, scale=1 / math.sqrt(layer.in_features)),
             C=rand(E, m, m, scale=1 / math.sqrt(m)),
             B=rand(E, layer.out_features, m, scale=1 / math.sqrt(m)))
    if layer.router_input == "code":
        w["W_r"] = rand(E, r, scale=2 / math.sqrt(r))
    else:
        w["W_g"] = rand(E, layer.in_features, scale=2 / math.sqrt(layer.in_features))
    if isinstance(layer, TalkLoRALinear):
        w["T"] = rand(E, E)
    layer.set_weights(**w)


def talk(cfg, rand, base=None, **kw) -> TalkLoRALinear:
    layer = TalkLoRALinear(base or make_base(cfg, rand), cfg["r"], cfg["E"], alpha=cfg["alpha"], **kw)
    random_moe_weights(layer, rand)
    return layer.eval()


def moe(cfg, rand, router_input="code", base=None, **kw) -> MoELoRALinear:
    layer = MoELoRALinear(base or make_base(cfg, rand), cfg["r"], cfg["E"], router_input,
                          alpha=cfg["alpha"], **kw)
    random_moe_weights(layer, rand)
    return layer.eval()


def inputs(cfg, rand):
    return rand(*cfg["lead"], cfg["d_in"])


def assert_close(actual, expected, dtype):
    tol = TOL[dtype]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = float((actual - expected).abs().max()) if actual.numel() else 0.0
    scale = 1.0 + (float(expected.abs().max()) if expected.numel() else 0.0)
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:g} · {scale:.3g}"


# ----------------------------------------------------------------------------- C1
@given(configs())
def test_c1_identity_talk_equals_moelora_code(cfg):
    rand = Rand(cfg)
    layer = talk(cfg, rand)
    layer.set_weights(T=torch.eye(cfg["E"], dtype=cfg["dtype"]))
    moe_layer = moelora_from_identity_talk(layer)
    assert type(moe_layer) is MoELoRALinear and moe_layer.router_input == "code"
    assert moe_layer.base is layer.base                          # documented: the base is shared
    for name in ("A", "C", "B", "W_r"):
        assert torch.equal(moe_layer.get_weights()[name], layer.get_weights()[name])
    x = inputs(cfg, rand)
    with torch.no_grad():
        assert_close(moe_layer(x), layer(x), cfg["dtype"])
        assert_close(moe_layer.gates(x), layer.gates(x), cfg["dtype"])
        # and back: MoELoRA-code -> TalkLoRA(T = I) is the same function again
        back = talklora_from_moelora(moe_layer)
        assert torch.equal(back.T, torch.eye(cfg["E"], dtype=cfg["dtype"]))
        assert_close(back(x), moe_layer(x), cfg["dtype"])


@given(configs(min_experts=2))
def test_c1_rejects_non_identity_talk(cfg):
    layer = talk(cfg, Rand(cfg))                                      # random T, not I
    with pytest.raises(ValueError, match="T is not the identity.*absorb_talk"):
        moelora_from_identity_talk(layer)


# ----------------------------------------------------------------------------- C2
@given(configs())
def test_c2_talk_absorption_for_arbitrary_T(cfg):
    rand = Rand(cfg)
    layer = talk(cfg, rand)
    absorbed = absorb_talk(layer)
    assert type(absorbed) is MoELoRALinear and absorbed.router_input == "code"
    x = inputs(cfg, rand)
    with torch.no_grad():
        assert_close(absorbed.router_logits(x), layer.router_logits(x), cfg["dtype"])
        assert_close(absorbed.gates(x), layer.gates(x), cfg["dtype"])
        assert_close(absorbed(x), layer(x), cfg["dtype"])
    # the closed form W' = W_r (T ⊗ I_m) and the blockwise form Σ_e' T[e', e] W_r^{(e')} agree
    W_r, T, m, E = layer.W_r.detach(), layer.T.detach(), cfg["m"], cfg["E"]
    kron_form = absorbed_router(W_r, T, m)
    blocks = [sum(T[f, e] * W_r[:, f * m:(f + 1) * m] for f in range(E)) for e in range(E)]
    assert_close(kron_form, torch.cat(blocks, dim=1), cfg["dtype"])
    assert_close(absorbed.W_r.detach(), kron_form, cfg["dtype"])
    assert_close(layer.effective_router().detach(), kron_form, cfg["dtype"])


# ----------------------------------------------------------------------------- C3
@given(configs(), st.booleans())
def test_c3_code_router_included_in_input_router(cfg, from_talk):
    rand = Rand(cfg)
    src = talk(cfg, rand) if from_talk else moe(cfg, rand, "code")
    included = input_router_from_code(src)
    assert included.router_input == "input"
    W_code = src.effective_router().detach()
    assert_close(included.W_g.detach(), W_code @ src.A.detach(), cfg["dtype"])
    x = inputs(cfg, rand)
    with torch.no_grad():
        assert_close(included(x), src(x), cfg["dtype"])
    # W_g = W' A lies in rowspace(A): representable, and the way back reproduces the function
    assert rowspace_residual(included.W_g, included.A) <= default_tolerance(cfg["dtype"])
    assert is_code_representable(included)
    back = code_router_from_input(included)
    assert back.router_input == "code"
    with torch.no_grad():
        assert_close(back(x), src(x), cfg["dtype"])


@given(configs(min_experts=2))
def test_c3_softmax_shift_is_still_representable(cfg):
    """``W_g = W' A + 1 vᵀ`` has the same gates as ``W'``: representable although the plain residual
    of W_g against rowspace(A) is not small (when v has a component outside it)."""
    rand = Rand(cfg)
    src = moe(cfg, rand, "code")
    included = input_router_from_code(src)
    v = rand(cfg["d_in"])
    included.set_weights(W_g=included.W_g.detach() + v)            # the same v added to every row
    assert is_code_representable(included)
    back = code_router_from_input(included)
    x = inputs(cfg, rand)
    with torch.no_grad():
        assert_close(back.gates(x), src.gates(x), cfg["dtype"])
        assert_close(back(x), included(x), cfg["dtype"])


@given(configs(min_experts=2, min_d_in=2), st.integers(0, 2**31 - 1))
def test_c3_counterexample_is_not_representable(cfg, seed):
    rank = cfg["m"] * cfg["E"]
    d_in = rank + cfg["d_in"]                                        # d_in > rank
    layer = non_representable_counterexample(d_in, rank, cfg["E"], seed=seed, dtype=cfg["dtype"],
                                             d_out=cfg["d_out"] + 3)
    assert layer.router_input == "input"
    C = layer.C.detach().to(torch.float64)
    assert torch.linalg.matrix_rank(C).eq(cfg["m"]).all()           # every C_e invertible
    assert layer.B.detach().abs().max() > 0
    residual = rowspace_residual(layer.W_g, layer.A)
    assert residual > COUNTEREXAMPLE_MIN_RESIDUAL
    assert abs(residual - 1 / math.sqrt(2)) < 1e-4                   # the documented construction
    assert rowspace_residual(layer.W_g, layer.A, modulo_shift=True) > COUNTEREXAMPLE_MIN_RESIDUAL
    assert not is_code_representable(layer)
    with pytest.raises(ValueError, match=r"not in the row space of A: relative residual"):
        code_router_from_input(layer)
    # Direct witness: two tokens with the same code h = A x (they differ by a kernel direction of A)
    # get different gates and adapter outputs, which no code router (gates a function of h) can give.
    gen = torch.Generator().manual_seed(seed)
    A = layer.A.detach().to(torch.float64)
    x1 = torch.linalg.pinv(A) @ torch.randn(rank, generator=gen, dtype=torch.float64)
    logits1 = layer.W_g.detach().to(torch.float64) @ x1
    x1 = x1 / max(1.0, float((logits1 - logits1.mean()).norm()))    # near-uniform gates at x1
    kernel = torch.linalg.svd(A).Vh[rank:]                         # orthonormal basis of ker(A)
    W_perp = layer.W_g.detach().to(torch.float64) @ kernel.T       # how the logits see ker(A)
    _, sigma, Vh = torch.linalg.svd(W_perp - W_perp.mean(0))        # centred: what softmax sees
    x2 = x1 + (3.0 / sigma[0]) * (kernel.T @ Vh[0])                 # moves centred logits by 3
    x = torch.stack([x1, x2]).to(cfg["dtype"])
    with torch.no_grad():
        h, gates, out = layer.code(x), layer.gates(x), layer.adapter_output(x)
    assert_close(h[1], h[0], cfg["dtype"])
    assert 0.5 * float((gates[1] - gates[0]).abs().sum()) > 0.05     # total-variation distance
    assert float((out[1] - out[0]).norm()) > 1e-2 * float(out[0].norm())


def test_counterexample_argument_errors():
    with pytest.raises(ValueError, match="d_in > rank"):
        non_representable_counterexample(4, 4, 2, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_experts >= 2"):
        non_representable_counterexample(8, 4, 1, seed=0, dtype=torch.float64)


# ----------------------------------------------------------------------------- structure
@given(configs(), st.sampled_from(["lora", "code", "input", "talk"]))
def test_zero_B_gives_exactly_the_base_output(cfg, kind):
    rand = Rand(cfg)
    base = make_base(cfg, rand)
    if kind == "lora":
        layer = LoRALinear(base, cfg["r"], alpha=cfg["alpha"])
        layer.set_weights(A=rand(cfg["r"], cfg["d_in"]))
    else:
        layer = talk(cfg, rand, base) if kind == "talk" else moe(cfg, rand, kind, base)
    layer.set_weights(B=torch.zeros_like(layer.B))
    x = inputs(cfg, rand)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


@given(configs(min_experts=1, max_experts=1), st.booleans())
def test_single_expert_reduces_to_lora(cfg, use_talk):
    """E = 1: g ≡ 1, so MoELoRA / TalkLoRA is LoRA with ``B' = B_1 C_1`` and the same A."""
    rand = Rand(cfg)
    layer = talk(cfg, rand) if use_talk else moe(cfg, rand, "code")
    lora = LoRALinear(layer.base, cfg["r"], alpha=cfg["alpha"])
    lora.set_weights(A=layer.A.detach(), B=layer.B.detach()[0] @ layer.C.detach()[0])
    x = inputs(cfg, rand)
    with torch.no_grad():
        assert torch.equal(layer.gates(x), torch.ones(*cfg["lead"], 1, dtype=cfg["dtype"]))
        assert_close(layer(x), lora(x), cfg["dtype"])


def permute_experts(layer: MoELoRALinear, perm: torch.Tensor) -> dict:
    """Expert e of the result is expert perm[e] of ``layer``: C, B blocks, the row blocks of A,
    W_r rows and column blocks, W_g rows, T rows and columns."""
    w, m = layer.get_weights(), layer.expert_rank
    cols = (perm[:, None] * m + torch.arange(m)).reshape(-1)        # block permutation of the code
    out = dict(A=w["A"][cols], C=w["C"][perm], B=w["B"][perm])
    if "W_r" in w:
        out["W_r"] = w["W_r"][perm][:, cols]
    if "W_g" in w:
        out["W_g"] = w["W_g"][perm]
    if "T" in w:
        out["T"] = w["T"][perm][:, perm]
    return out


@given(configs(), st.sampled_from(["code", "input", "talk"]), st.randoms(use_true_random=False))
def test_permuting_experts_leaves_the_output_unchanged(cfg, kind, rnd):
    rand = Rand(cfg)
    layer = talk(cfg, rand) if kind == "talk" else moe(cfg, rand, kind)
    perm = list(range(cfg["E"]))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    permuted = talk(cfg, rand, layer.base) if kind == "talk" else moe(cfg, rand, kind, layer.base)
    permuted.set_weights(**permute_experts(layer, perm))
    x = inputs(cfg, rand)
    with torch.no_grad():
        assert_close(permuted(x), layer(x), cfg["dtype"])
        assert_close(permuted.gates(x), layer.gates(x)[..., perm], cfg["dtype"])


@given(configs())
def test_lora_merge_matches_forward_and_unmerge_is_bit_exact(cfg):
    rand = Rand(cfg)
    base = make_base(cfg, rand)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, cfg["r"], alpha=cfg["alpha"])
    layer.set_weights(A=rand(cfg["r"], cfg["d_in"]), B=rand(cfg["d_out"], cfg["r"]))
    x = inputs(cfg, rand)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged and not torch.equal(base.weight, original)
        assert_close(layer(x), unmerged, cfg["dtype"])
        layer.unmerge()
    assert torch.equal(base.weight, original)
    with torch.no_grad():
        assert torch.equal(layer(x), unmerged)


@given(configs(), st.sampled_from(["code", "input", "talk"]))
def test_merged_weight_at_uniform_gates_equals_forward_with_zero_router(cfg, kind):
    rand = Rand(cfg)
    layer = talk(cfg, rand) if kind == "talk" else moe(cfg, rand, kind)
    router = "W_g" if kind == "input" else "W_r"
    layer.set_weights(**{router: torch.zeros_like(getattr(layer, router))})   # g = 1/E exactly
    E = cfg["E"]
    x = inputs(cfg, rand)
    with torch.no_grad():
        gates = layer.gates(x)
        assert_close(gates, torch.full_like(gates, 1 / E), cfg["dtype"])
        W = layer.merged_weight_at_gates(torch.full((E,), 1 / E, dtype=cfg["dtype"]))
        assert_close(nn.functional.linear(x, W, layer.base.bias), layer(x), cfg["dtype"])


@given(configs(), st.booleans())
def test_top_k_with_k_equal_E_is_dense(cfg, use_talk):
    rand = Rand(cfg)
    dense = talk(cfg, rand) if use_talk else moe(cfg, rand, "code")
    kw = dict(top_k=cfg["E"])
    topk = (talk(cfg, rand, dense.base, **kw) if use_talk else moe(cfg, rand, "code", dense.base, **kw))
    topk.set_weights(**dense.get_weights())
    x = inputs(cfg, rand)
    with torch.no_grad():
        assert_close(topk.gates(x), dense.gates(x), cfg["dtype"])
        assert_close(topk(x), dense(x), cfg["dtype"])


@given(configs(), st.data())
def test_top_k_gates_sum_to_one_and_vanish_outside_the_top_k(cfg, data):
    rand = Rand(cfg)
    k = data.draw(st.integers(1, cfg["E"]), label="k")
    kind = data.draw(st.sampled_from(["code", "input", "talk"]), label="kind")
    layer = talk(cfg, rand, top_k=k) if kind == "talk" else moe(cfg, rand, kind, top_k=k)
    seen = []
    layer.add_routing_hook(lambda _, logits, gates, index: seen.append((logits, gates, index)))
    x = inputs(cfg, rand)
    with torch.no_grad():
        layer(x)
    (logits, gates, index), = seen
    assert index.shape == (*cfg["lead"], k)
    assert_close(gates.sum(-1), torch.ones(cfg["lead"], dtype=cfg["dtype"]), cfg["dtype"])
    selected = torch.zeros_like(gates, dtype=torch.bool).scatter(-1, index, True)
    assert torch.equal(gates[~selected], torch.zeros_like(gates[~selected]))
    # the selected experts are the k largest logits, weighted by the softmax over them
    kth = logits.sort(-1, descending=True).values[..., k - 1:k]
    assert (logits.masked_fill(~selected, math.inf) >= kth).all()
    expected = torch.softmax(logits.masked_fill(~selected, -math.inf), -1)
    assert_close(gates, expected, cfg["dtype"])


# ----------------------------------------------------------------------------- map conventions
def test_maps_share_the_base_copy_adapters_and_keep_hyper_parameters():
    torch.manual_seed(0)
    base = nn.Linear(10, 6).double()
    layer = TalkLoRALinear(base, 6, 3, alpha=16, dropout=0.1, top_k=2, gate_dropout=True,
                           balance_loss="cv").train()
    layer.set_weights(B=torch.randn(3, 6, 2, dtype=torch.float64))
    state = torch.get_rng_state()
    for new in (absorb_talk(layer), input_router_from_code(layer),
                talklora_from_moelora(absorb_talk(layer))):
        assert new.base is base and new.training
        assert (new.alpha, new.scaling, new.dropout, new.top_k, new.gate_dropout, new.balance_loss) == (
            16, 16 / 6, 0.1, 2, True, "cv")
        assert new.A is not layer.A and torch.equal(new.A, layer.A)
        new.A.data.add_(1.0)                                       # independent copies
        assert not torch.equal(new.A, layer.A)
    assert torch.equal(torch.get_rng_state(), state)               # the caller's RNG is untouched


def test_maps_reject_the_wrong_layer_kind():
    base = nn.Linear(8, 8)
    code, inp = MoELoRALinear(base, 4, 2), MoELoRALinear(base, 4, 2, router_input="input")
    talk_layer, lora = TalkLoRALinear(base, 4, 2), LoRALinear(base, 4)
    with pytest.raises(TypeError, match="expects a TalkLoRALinear, got MoELoRALinear"):
        absorb_talk(code)
    with pytest.raises(TypeError, match="expects a TalkLoRALinear, got LoRALinear"):
        moelora_from_identity_talk(lora)
    with pytest.raises(TypeError, match="expects a MoELoRALinear, got a TalkLoRALinear"):
        talklora_from_moelora(talk_layer)
    with pytest.raises(ValueError, match="expects router_input='code', got 'input'"):
        input_router_from_code(inp)
    with pytest.raises(ValueError, match="expects router_input='input', got 'code'"):
        code_router_from_input(code)
    with pytest.raises(ValueError, match="expects router_input='input'"):
        is_code_representable(code)
    with pytest.raises(ValueError, match="need W_g"):
        rowspace_residual(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="need T"):
        absorbed_router(torch.zeros(2, 4), torch.zeros(3, 3), 2)
    assert rowspace_residual(torch.zeros(2, 5), torch.randn(3, 5)) == 0.0


# ----------------------------------------------------------------------------- issue 11: Conv1D, unload
class Conv1D(nn.Module):
    """transformers' Conv1D layout, ``y = x W + b`` with ``W (d_in, d_out)`` (recognised by name)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.nf, self.nx = linear.out_features, linear.in_features
        self.weight = nn.Parameter(linear.weight.detach().t().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone() if linear.bias is not None
                                 else torch.zeros(self.nf, dtype=linear.weight.dtype))

    def forward(self, x):
        return x @ self.weight + self.bias


@given(configs(), st.sampled_from(["lora", "code", "input", "talk"]))
def test_conv1d_base_equals_linear_base(cfg, kind):
    rand = Rand(cfg)
    linear = make_base(cfg, rand)
    if linear.bias is None:
        linear = nn.Linear(cfg["d_in"], cfg["d_out"]).to(cfg["dtype"])
        with torch.no_grad():
            linear.bias.zero_()
            linear.weight.copy_(make_base(cfg, rand).weight)
    conv = Conv1D(linear)
    if kind == "lora":
        a, b = LoRALinear(linear, cfg["r"], cfg["alpha"]), LoRALinear(conv, cfg["r"], cfg["alpha"])
        a.set_weights(A=rand(cfg["r"], cfg["d_in"]), B=rand(cfg["d_out"], cfg["r"]))
    elif kind == "talk":
        a = talk(cfg, rand, base=linear)
        b = TalkLoRALinear(conv, cfg["r"], cfg["E"], alpha=cfg["alpha"]).eval()
    else:
        a = moe(cfg, rand, kind, base=linear)
        b = MoELoRALinear(conv, cfg["r"], cfg["E"], kind, alpha=cfg["alpha"]).eval()
    b.set_weights(**a.get_weights())
    x = inputs(cfg, rand)
    assert_close(b(x), a(x), cfg["dtype"])


@given(configs(), st.sampled_from(["lora", "moelora", "talklora"]))
def test_unload_restores_the_base_model(cfg, kind):
    from talklora_min import AdapterConfig, inject, unload
    rand = Rand(cfg)
    model = nn.Sequential(make_base(cfg, rand), nn.Tanh())
    x = inputs(cfg, rand)
    before = model(x)
    base = model[0]
    inject(model, AdapterConfig(kind=kind, rank=cfg["r"], num_experts=cfg["E"], alpha=cfg["alpha"],
                                target_modules=("0",), target_match="exact"))
    with torch.no_grad():
        model[0].B.copy_(rand(*model[0].B.shape))
    unload(model)
    assert model[0] is base and torch.equal(model(x), before)


@pytest.mark.parametrize("kind", ["moelora-code", "moelora-input", "talklora-official", "talklora-broadcast",
                                  "talklora-doubly-stochastic", "talklora-block", "talklora-low-rank"])
def test_formula_output_is_the_layer_forward_written_out(kind):
    """The oracle of the C1-C3 residuals (talklora_min.reference.formula_output: T mixes the code
    blocks term by term) equals the layer's fused forward, which folds T into the router."""
    from talklora_min import MoELoRALinear, TalkLoRALinear
    from talklora_min.reference import formula_output
    torch.manual_seed(3)
    base = torch.nn.Linear(10, 7, dtype=torch.float64)
    structure = dict(block=dict(talk_groups=2), banded=dict(talk_bandwidth=1), **{"low-rank": dict(talk_rank=1)})
    if kind.startswith("talklora"):
        name = kind.split("-", 1)[1]
        name = "full" if name == "official" else name
        layer = TalkLoRALinear(base, 8, 4, talk_structure=name, **structure.get(name, {}))
        with torch.no_grad():
            for n, p in layer.named_parameters():
                if n.startswith("talk_") or n == "T":
                    p.add_(0.3 * torch.randn_like(p))
    else:
        layer = MoELoRALinear(base, 8, 4, router_input=kind.split("-")[1])
    with torch.no_grad():
        layer.B.normal_()
    layer.eval()
    x = torch.randn(5, 3, 10, dtype=torch.float64)
    torch.testing.assert_close(formula_output(layer, x), layer(x).detach(), rtol=1e-12, atol=1e-12)
