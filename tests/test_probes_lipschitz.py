"""Router Lipschitz sandwich (docs/method.md §4, claim C4), closed forms and the torch.func cross-check."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from talklora_min import MoELoRALinear, TalkLoRALinear, talk_matrix
from helpers import make_layer, tokens
from talklora_min.probes import (ORDER_RTOL, certified_lipschitz, local_lipschitz, local_lipschitz_generic,
                                 router_lipschitz, softmax_jacobian)




KINDS = ("talklora", "moelora-code", "moelora-input")


def wrts(kind):
    return ("input",) if kind == "moelora-input" else ("code", "input")


def test_softmax_jacobian_closed_forms():
    for E in (2, 3, 5, 8):
        p = torch.full((E,), 1.0 / E, dtype=torch.float64)
        assert torch.linalg.matrix_norm(softmax_jacobian(p), ord=2) == pytest.approx(1 / E, rel=1e-12)
        two = torch.zeros(E, dtype=torch.float64)
        two[[0, E - 1]] = 0.5
        assert torch.linalg.matrix_norm(softmax_jacobian(two), ord=2) == pytest.approx(0.5, rel=1e-12)
    p = torch.softmax(torch.randn(7, 3, 4, dtype=torch.float64), -1)
    J = softmax_jacobian(p)
    assert J.shape == (7, 3, 4, 4)
    assert torch.allclose(J, J.transpose(-1, -2)) and torch.allclose(J.sum(-1), torch.zeros(7, 3, 4, dtype=J.dtype))
    auto = torch.autograd.functional.jacobian(lambda l: torch.softmax(l, -1), torch.log(p[0, 0]))
    assert torch.allclose(J[0, 0], auto, atol=1e-14)


@given(st.integers(2, 8), st.floats(0.0, 30.0), st.integers(0, 2**16))
def test_softmax_jacobian_norm_at_most_half(E, spread, seed):
    logits = spread * torch.randn(16, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    norms = torch.linalg.matrix_norm(softmax_jacobian(torch.softmax(logits, -1)), ord=2)
    assert (norms <= 0.5 + 1e-15).all()


@given(st.sampled_from(KINDS), st.integers(0, 2**16), st.sampled_from([(4, 2), (8, 4), (8, 2), (6, 3)]),
       st.sampled_from([0.3, 1.0, 5.0, 40.0]))
def test_sandwich_ordering_on_random_layers(kind, seed, rE, scale):
    r, E = rE
    layer = make_layer(kind, r=r, E=E, seed=seed, scale=scale)
    x = tokens(24, 12, seed + 1)
    for wrt in wrts(kind):
        res = router_lipschitz(layer, x, wrt)
        assert res.ordered()
        assert res.local_max <= res.certified * (1 + ORDER_RTOL)
        assert res.empirical <= res.certified * (1 + ORDER_RTOL)
        assert res.empirical >= 0.5 * res.local_max            # a weak attack would be a bug
        assert res.empirical >= 0.98 * res.local_max           # what the search actually achieves
        assert res.local.shape == (24,) and torch.equal(res.argmax_input, x[res.argmax_index])
        assert res.local_max == pytest.approx(float(res.local.max()))


def test_certified_values_and_effective_map_match_the_layer():
    for kind in KINDS:
        layer = make_layer(kind, seed=3)
        w = layer.get_weights()
        x = tokens(5, 12, 0)
        if kind == "moelora-input":
            W_eff, want = w["W_g"], {"input": 0.5 * torch.linalg.matrix_norm(w["W_g"], ord=2)}
            assert torch.allclose(x @ W_eff.T, layer.router_logits(x))
        else:
            T = w.get("T", torch.eye(4, dtype=torch.float64))
            W_eff = w["W_r"] @ torch.kron(T, torch.eye(2, dtype=torch.float64))
            want = {"code": 0.5 * torch.linalg.matrix_norm(W_eff, ord=2),
                    "input": 0.5 * torch.linalg.matrix_norm(W_eff @ w["A"], ord=2)}
            assert torch.allclose(x @ (W_eff @ w["A"]).T, layer.router_logits(x), atol=1e-12)
        for wrt, value in want.items():
            assert certified_lipschitz(layer, wrt) == pytest.approx(float(value), rel=1e-12)
            assert router_lipschitz(layer, x, wrt).certified == pytest.approx(float(value), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_generic_torch_func_path_agrees_with_closed_form(kind):
    layer = make_layer(kind, seed=5, scale=3.0)
    x = tokens(40, 12, 6)
    for wrt in wrts(kind):
        closed = local_lipschitz(layer, x, wrt)
        if wrt == "code":
            generic = local_lipschitz_generic(
                lambda h: layer.gates_from_logits(layer.router_logits(None, h))[0], layer.code(x).detach())
        else:
            generic = local_lipschitz_generic(layer.gates, x)
        assert torch.allclose(generic, closed, rtol=1e-10, atol=1e-14)
        assert torch.allclose(router_lipschitz(layer, x, wrt).local, closed, rtol=1e-12)


def test_generic_path_on_a_nonlinear_tanh_talk_router():
    gen = torch.Generator().manual_seed(0)
    E, m = 4, 2
    T, W_r = torch.randn(E, E, generator=gen, dtype=torch.float64), torch.randn(E, E * m, generator=gen, dtype=torch.float64)
    K = torch.kron(T, torch.eye(m, dtype=torch.float64))

    def router(h):                                   # g = softmax(W_r tanh((T ⊗ I) h))
        return torch.softmax(W_r @ torch.tanh(K @ h), -1)

    h = torch.randn(30, E * m, generator=gen, dtype=torch.float64)
    generic = local_lipschitz_generic(router, h)
    p = torch.softmax(torch.tanh(h @ K.T) @ W_r.T, -1)
    jac = softmax_jacobian(p) @ W_r @ torch.diag_embed(1 - torch.tanh(h @ K.T) ** 2) @ K
    assert torch.allclose(generic, torch.linalg.matrix_norm(jac, ord=2), rtol=1e-12)
    # its own certified bound ½‖W_r‖‖K‖ (|tanh'| ≤ 1) dominates
    assert generic.max() <= 0.5 * torch.linalg.matrix_norm(W_r, ord=2) * torch.linalg.matrix_norm(K, ord=2)


def test_topk_router_has_no_certified_bound_but_local_constants_match_generic():
    layer = make_layer("talklora", seed=7, top_k=2, scale=2.0)
    x = tokens(30, 12, 8)
    for wrt in ("code", "input"):
        res = router_lipschitz(layer, x, wrt)
        assert res.certified == math.inf and not res.certified_exists and res.ordered()
        assert certified_lipschitz(layer, wrt) == math.inf
        assert res.empirical >= 0.98 * res.local_max
    generic = local_lipschitz_generic(layer.gates, x)
    assert torch.allclose(generic, local_lipschitz(layer, x, "input"), rtol=1e-10, atol=1e-14)
    assert (generic <= 0.5 * torch.linalg.matrix_norm(layer.effective_router() @ layer.A, ord=2) + 1e-12).all()
    # top_k = E is dense routing: the certified bound exists again
    dense = make_layer("talklora", seed=7, top_k=4)
    assert certified_lipschitz(dense, "code") == certified_lipschitz(make_layer("talklora", seed=7), "code")


def permutation_matrices(E):
    return [torch.eye(E, dtype=torch.float64)[list(p)] for p in itertools.permutations(range(E))]


@given(st.integers(2, 4), st.integers(0, 2**16))
def test_doubly_stochastic_talk_never_raises_certified_bound(E, seed):
    gen = torch.Generator().manual_seed(seed)
    perms = permutation_matrices(E)
    weights = torch.rand(len(perms), generator=gen, dtype=torch.float64)
    weights = weights / weights.sum()                 # Birkhoff: convex combination of permutations
    T = sum(w * P for w, P in zip(weights, perms))
    assert torch.allclose(T.sum(0), torch.ones(E, dtype=T.dtype)) and torch.allclose(T.sum(1), torch.ones(E, dtype=T.dtype))
    layer = make_layer("talklora", r=2 * E, E=E, seed=seed)
    layer.set_weights(T=T)
    with_talk = certified_lipschitz(layer, "code")
    layer.set_weights(T=torch.eye(E, dtype=torch.float64))
    assert with_talk <= certified_lipschitz(layer, "code") * (1 + 1e-12)


@given(st.integers(2, 9), st.floats(0.0, 1.0))
def test_uniform_mix_column_norm(E, alpha):
    T = talk_matrix(E, alpha, dtype=torch.float64)
    col = T @ torch.eye(E, dtype=torch.float64)[:, 0]
    assert float(col @ col) == pytest.approx(alpha**2 + (1 - alpha**2) / E, rel=1e-12)
    assert torch.linalg.matrix_norm(T, ord=2) <= 1 + 1e-12


@pytest.mark.parametrize("alpha, a", [(1.0, 1.0), (0.5, 2.0), (0.2, 3.0), (0.0, 1.0)])
def test_worked_example_E2_m1(alpha, a):
    """E = 2, m = 1, W_r = a I, T = T_α: a code perturbation (ε, 0) at uniform routing moves
    the first gate by α a ε / 4 (to first order; exactly σ(α a ε) − ½)."""
    layer = TalkLoRALinear(nn.Linear(3, 3).double(), 2, 2, talk_init=alpha)
    layer.set_weights(W_r=a * torch.eye(2, dtype=torch.float64))
    gates = lambda h: layer.gates_from_logits(layer.router_logits(None, h))[0]
    h0 = torch.zeros(2, dtype=torch.float64)
    assert torch.allclose(gates(h0), torch.full((2,), 0.5, dtype=torch.float64))
    for eps in (1e-2, 1e-3, 1e-4):
        moved = float(gates(torch.tensor([eps, 0.0], dtype=torch.float64))[0].detach() - 0.5)
        predicted = alpha * a * eps / 4
        if alpha == 0.0:
            assert abs(moved) < 1e-15
        else:
            assert abs(moved - predicted) <= 1e-4 * abs(predicted)
    # at uniform routing J_s = ½ u uᵀ (u = (1, −1)/√2) and T_α u = α u: local = ‖J_s a T_α‖ = a α / 2;
    # certified = ½ a ‖T_α‖₂ = a / 2 (eigenvalues 1 and α)
    res = router_lipschitz(layer, torch.zeros(1, 3, dtype=torch.float64), "code")
    assert res.local_max == pytest.approx(a * alpha / 2, abs=1e-12)
    assert res.certified == pytest.approx(a / 2, rel=1e-12)


def test_argument_errors():
    code = make_layer("talklora")
    inp = make_layer("moelora-input")
    x = tokens(4, 12, 0)
    with pytest.raises(ValueError, match=r"accepted values for this layer: \('input',\)"):
        router_lipschitz(inp, x, "code")
    with pytest.raises(ValueError, match=r"wrt must be one of \('code', 'input'\), got 'h'"):
        router_lipschitz(code, x, "h")
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="inputs contains NaN or Inf"):
        router_lipschitz(code, bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        local_lipschitz(code, bad)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 12\)"):
        router_lipschitz(code, torch.randn(4, 5))
    with pytest.raises(ValueError, match="steps must be"):
        router_lipschitz(code, x, steps=-1)
    with pytest.raises(ValueError, match="radius must be"):
        router_lipschitz(code, x, radius=0.0)
    from talklora_min import LoRALinear
    with pytest.raises(TypeError, match="MoELoRALinear or TalkLoRALinear"):
        router_lipschitz(LoRALinear(nn.Linear(3, 3), 2), torch.randn(2, 3))
    with pytest.raises(ValueError, match="points contains NaN"):
        local_lipschitz_generic(lambda z: torch.softmax(z, -1), torch.tensor([[float("nan"), 1.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_huge_logits_saturated_gates_stay_finite_and_ordered(dtype, kind):
    layer = make_layer(kind, seed=11, scale=3e3, dtype=dtype)
    x = tokens(32, 12, 12, dtype=dtype, scale=3.0)
    logits = layer.router_logits(x).detach()
    assert logits.abs().max() > 1e3
    g = layer.gates(x).detach()
    assert ((g < 1e-30) | (g > 1 - 1e-6)).any()                    # some gates saturate at 0 / 1
    for wrt in wrts(kind):
        res = router_lipschitz(layer, x, wrt)
        assert all(math.isfinite(v) for v in (res.certified, res.local_max, res.empirical))
        assert torch.isfinite(res.local).all() and torch.isfinite(res.empirical_per_token).all()
        assert res.ordered()
    # exactly tied top gates under huge logits: the bound is attained (= ½‖M‖ along the tie)
    layer = make_layer("moelora-code", E=2, r=2, seed=0, dtype=dtype)
    layer.set_weights(W_r=torch.tensor([[1e4, 0.0], [0.0, 1e4]], dtype=dtype),
                      A=torch.eye(2, 12, dtype=dtype))
    res = router_lipschitz(layer, torch.ones(3, 12, dtype=dtype), "code")
    assert res.local_max == pytest.approx(res.certified, rel=1e-9) and res.certified == pytest.approx(5e3)
    assert res.ordered() and res.empirical >= 0.98 * res.local_max


def test_wide_layer_d4096():
    layer = make_layer("talklora", d=4096, r=32, E=4, seed=1, scale=4.0, dtype=torch.float32, d_out=8)
    x = tokens(16, 4096, 2, dtype=torch.float32)
    for wrt in ("code", "input"):
        res = router_lipschitz(layer, x, wrt)
        assert math.isfinite(res.empirical) and res.ordered()
        assert res.empirical >= 0.98 * res.local_max


def test_doubly_stochastic_talk_can_raise_the_bound_wrt_input():
    """The docs/method.md §4 statement is about the code bound ½‖W_r (T ⊗ I)‖₂ ≤ ½‖W_r‖₂.  W.r.t. x the
    bound is ½‖W_r (T ⊗ I) A‖₂ and a doubly stochastic T (here the swap permutation) CAN raise it:
    E = 2, m = 1, W_r = diag(1, 0), A = [e_1 / 10; e_2]  →  ½·0.1 with T = I, ½·1 with T = swap."""
    layer = TalkLoRALinear(nn.Linear(3, 3).double(), 2, 2, talk_init="identity")
    layer.set_weights(W_r=torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
                      A=torch.tensor([[0.1, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64))
    assert certified_lipschitz(layer, "input") == pytest.approx(0.05)
    code_identity = certified_lipschitz(layer, "code")
    layer.set_weights(T=torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    assert certified_lipschitz(layer, "input") == pytest.approx(0.5)            # raised 10×
    assert certified_lipschitz(layer, "code") == pytest.approx(code_identity)   # code bound not raised


@pytest.mark.parametrize("kind", ["talklora", "moelora-input"])
def test_dtype_argument_computes_in_that_dtype(kind):
    layer, x = make_layer(kind, seed=4), tokens(16, 12, 5)
    wrt = "input"
    r64 = router_lipschitz(layer, x, wrt)
    r32 = router_lipschitz(layer, x, wrt, dtype=torch.float32)
    assert r64.local.dtype == torch.float64 and r32.local.dtype == torch.float32
    assert r32.local_max == pytest.approx(r64.local_max, rel=1e-5)
    assert r32.certified == pytest.approx(r64.certified, rel=1e-6) and r32.ordered(rtol=1e-4)
    assert r32.local_max != r64.local_max                             # really computed in float32
    loc32 = local_lipschitz(layer, x, wrt, dtype=torch.float32)
    assert loc32.dtype == torch.float32 and torch.allclose(loc32.double(), r64.local, rtol=1e-5)
    assert certified_lipschitz(layer, wrt, dtype=torch.float32) == pytest.approx(r64.certified, rel=1e-6)
    # float32 inputs are evaluated in float64 by default (not in the inputs' precision)
    assert local_lipschitz(layer, x.float(), wrt).dtype == torch.float64
    with pytest.raises(ValueError, match=r"dtype must be one of \(torch.float32, torch.float64\)"):
        router_lipschitz(layer, x, wrt, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        local_lipschitz(layer, x, wrt, dtype="float64")


def test_numpy_numbers_accepted_and_wrong_types_named():
    layer, x = make_layer("talklora"), tokens(6, 12, 0)
    ref = router_lipschitz(layer, x, steps=4, step_size=0.5, radius=1e-3, seed=2)
    got = router_lipschitz(layer, x, steps=np.int64(4), step_size=np.float32(0.5), radius=np.float64(1e-3),
                           seed=np.uint8(2))
    assert got.empirical == ref.empirical and got.local_max == ref.local_max
    for kwargs, error, message in [({"steps": 2.0}, TypeError, "steps must be an integer"),
                                   ({"steps": None}, TypeError, "steps must be an integer"),
                                   ({"radius": "1e-3"}, TypeError, "radius must be a positive finite number"),
                                   ({"radius": float("inf")}, ValueError, "radius must be a positive finite"),
                                   ({"seed": -1}, ValueError, "seed must be an integer in"),
                                   ({"wrt": None}, TypeError, "wrt must be one of")]:
        with pytest.raises(error, match=message):
            router_lipschitz(layer, x, **kwargs)
    for bad in (None, [[0.0] * 12], "x"):
        with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
            router_lipschitz(layer, bad)
    with pytest.raises(ValueError, match="floating-point"):
        local_lipschitz(layer, torch.ones(3, 12, dtype=torch.int64))
    with pytest.raises(TypeError, match="p must be a tensor"):
        softmax_jacobian(None)
    with pytest.raises(TypeError, match="router_fn must be a callable"):
        local_lipschitz_generic(None, x)


def test_extreme_magnitudes_give_a_value_or_a_clear_error():
    layer = make_layer("talklora", seed=1)
    # saturated but finite logits: a correct (tiny) value, not NaN
    res = router_lipschitz(layer, tokens(8, 12, 1, scale=1e150))
    assert math.isfinite(res.local_max) and math.isfinite(res.empirical) and res.ordered()
    # logits beyond float64: a clear error instead of NaN
    steep = make_layer("talklora", seed=1, scale=1e20)
    with pytest.raises(ValueError, match="router logits is not finite .*overflow in torch.float64"):
        router_lipschitz(steep, tokens(8, 12, 1, scale=1e300))
    with pytest.raises(ValueError, match="router logits is not finite"):
        local_lipschitz(steep, tokens(8, 12, 1, scale=1e300))
    # float64 inputs that float32 cannot hold
    with pytest.raises(ValueError, match="inputs contains NaN or Inf; its values .* overflow torch.float32"):
        local_lipschitz(layer, tokens(8, 12, 1, scale=1e39), dtype=torch.float32)
    huge = make_layer("talklora", seed=1)
    huge.set_weights(W_r=torch.full((4, 8), 1e308, dtype=torch.float64), T=torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="‖M‖₂ is not finite"):             # ‖W_r‖₂ = 1e308·√32
        certified_lipschitz(huge, "code")
    with pytest.raises(ValueError, match="overflow"):
        certified_lipschitz(make_layer("talklora", seed=1, scale=1e100), dtype=torch.float32)
