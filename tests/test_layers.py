"""Unit tests of the adapter layers (docs/method.md §1, §8): a PEFT-style table of configurations run through
generic checks, then per-feature tests (init, talk matrices, gate dropout, balance losses, routing
hooks) and bad-input tests that check the error messages.

Values are compared against a hand-written float64 reference of the docs/method.md §1 formulas with
``atol = rtol = 1e-10``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from talklora_min import LoRALinear, MoELoRALinear, TalkLoRALinear, balance_loss, talk_matrix
from talklora_min import layers as layers_module



D_IN, D_OUT, RANK, E = 12, 10, 8, 4
DT = torch.float64
LEADING_SHAPES = [(), (5,), (2, 3), (2, 2, 3)]


@dataclass
class Config:
    kind: str                       # "lora" | "moelora" | "talklora"
    kwargs: dict = field(default_factory=dict)

    def build(self, base: nn.Linear, alpha=None):
        if self.kind == "lora":
            return LoRALinear(base, RANK, alpha=alpha, **self.kwargs)
        if self.kind == "moelora":
            return MoELoRALinear(base, RANK, E, alpha=alpha, **self.kwargs)
        return TalkLoRALinear(base, RANK, E, alpha=alpha, **self.kwargs)

    @property
    def dropout(self) -> float:
        return self.kwargs.get("dropout", 0.0)


_BASE_CONFIGS = {
    "lora": Config("lora"),
    "moelora-code": Config("moelora", dict(router_input="code")),
    "moelora-input": Config("moelora", dict(router_input="input")),
    "moelora-top2": Config("moelora", dict(top_k=2)),
    "talklora-official": Config("talklora", dict(talk_init="official")),
    "talklora-identity": Config("talklora", dict(talk_init="identity")),
    "talklora-mix0.5": Config("talklora", dict(talk_init="uniform-mix:0.5")),
    "talklora-broadcast": Config("talklora", dict(talk_structure="broadcast")),
    "talklora-ds": Config("talklora", dict(talk_structure="doubly-stochastic")),
    "talklora-block": Config("talklora", dict(talk_structure="block", talk_groups=2)),
    "talklora-banded": Config("talklora", dict(talk_structure="banded", talk_bandwidth=1)),
    "talklora-lowrank": Config("talklora", dict(talk_structure="low-rank", talk_rank=2)),
}
TABLE = {f"{name}-alpha{alpha}": (cfg, alpha) for name, cfg in _BASE_CONFIGS.items() for alpha in (None, 16)}
TABLE.update({
    "lora-dropout": (Config("lora", dict(dropout=0.3)), None),
    "moelora-input-dropout": (Config("moelora", dict(router_input="input", dropout=0.3)), 16),
    "talklora-dropout-gatedrop": (Config("talklora", dict(dropout=0.3, gate_dropout=True)), None),
    "talklora-ds-dropout-gatedrop-top2": (Config("talklora", dict(dropout=0.3, gate_dropout=True, top_k=2,
                                                                  talk_structure="doubly-stochastic")), 16),
    "moelora-input-top2-gatedrop": (Config("moelora", dict(router_input="input", dropout=0.2, top_k=2,
                                                           gate_dropout=True)), 16),
})
DROPOUT_CONFIGS = [k for k, (c, _) in TABLE.items() if c.dropout > 0]


def make_base(seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT, bias=bias).to(DT)


def randomize(layer, seed=1, scale=1.0) -> None:
    """Random values for every adapter tensor (B non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    layer.set_weights(**{n: scale * torch.randn(getattr(layer, n).shape, generator=gen, dtype=getattr(layer, n).dtype)
                         for n in layer.weight_names})


def build(name, seed=0, random_weights=True):
    cfg, alpha = TABLE[name]
    layer = cfg.build(make_base(seed), alpha)
    if random_weights:
        randomize(layer, seed + 1)
    return layer


def reference_forward(layer, x):
    """docs/method.md §1 written out token-agnostically with explicit loops over experts (float64)."""
    w = layer.get_weights()
    W0, b = layer.base.weight.detach(), layer.base.bias
    y = x @ W0.T + (0 if b is None else b.detach())
    s = 1.0 if layer.alpha is None else layer.alpha / layer.rank
    if isinstance(layer, LoRALinear):
        return y + s * (x @ w["A"].T) @ w["B"].T
    n_exp, m = layer.num_experts, layer.rank // layer.num_experts
    h = x @ w["A"].T
    blocks = [h[..., e * m:(e + 1) * m] for e in range(n_exp)]
    if layer.router_input == "input":
        logits = x @ w["W_g"].T
    else:
        if "T" in w:
            mixed = [sum(w["T"][e, f] * blocks[f] for f in range(n_exp)) for e in range(n_exp)]
            code = torch.cat(mixed, -1)
        else:
            code = h
        logits = code @ w["W_r"].T
    if layer.top_k is not None:
        kth = logits.sort(-1, descending=True).values[..., layer.top_k - 1:layer.top_k]
        logits = logits.masked_fill(logits < kth, -math.inf)
    gates = torch.softmax(logits, -1)
    out = sum(gates[..., e:e + 1] * (blocks[e] @ w["C"][e].T @ w["B"][e].T) for e in range(n_exp))
    return y + s * out


def adapter_names(layer):
    """The stored (trainable) adapter tensors."""
    return set(layer.weight_names)


# ============================================================================ generic table checks
@pytest.mark.parametrize("name", TABLE)
@pytest.mark.parametrize("lead", LEADING_SHAPES, ids=str)
def test_forward_matches_reference_formula(name, lead):
    layer = build(name).eval()
    x = torch.randn(*lead, D_IN, dtype=DT, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*lead, D_OUT)
    torch.testing.assert_close(y, reference_forward(layer, x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", TABLE)
def test_zero_B_gives_base_output_in_train_and_eval(name):
    layer = build(name, random_weights=False)            # official init: B = 0
    assert torch.equal(layer.B, torch.zeros_like(layer.B))
    x = torch.randn(4, 3, D_IN, dtype=DT)
    for mode in (True, False):
        layer.train(mode)
        with torch.no_grad():
            assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("name", TABLE)
def test_gradients_reach_only_the_adapter(name):
    layer = build(name, random_weights=False)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == adapter_names(layer)
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    x = torch.randn(64, D_IN, dtype=DT, generator=torch.Generator().manual_seed(3))
    # at init (B = 0) only B receives a non-zero gradient
    layer(x).square().sum().backward()
    assert layer.B.grad is not None and layer.B.grad.abs().max() > 0
    for n in adapter_names(layer) - {"B"}:
        g = getattr(layer, n).grad
        assert g is None or torch.equal(g, torch.zeros_like(g)), n
    # once B != 0 every adapter tensor gets a non-zero gradient, the base none
    layer.zero_grad()
    randomize(layer)
    layer(x).square().sum().backward()
    for n in adapter_names(layer):
        g = getattr(layer, n).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, n
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


@pytest.mark.parametrize("name", TABLE)
def test_eval_is_deterministic_and_train_dropout_is_not(name):
    layer = build(name).eval()
    x = torch.randn(6, D_IN, dtype=DT)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        layer.train()
        torch.manual_seed(0)
        first = layer(x)
        second = layer(x)
        if name in DROPOUT_CONFIGS:
            assert not torch.equal(first, second)
            layer.eval()
            torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-10, rtol=1e-10)
        else:
            assert torch.equal(first, second)        # no dropout: train == eval
            assert torch.equal(first, layer.eval()(x))


@pytest.mark.parametrize("name", TABLE)
def test_get_set_weights_round_trip_and_errors(name):
    layer = build(name, random_weights=False)
    source = build(name, seed=5)
    weights = source.get_weights()
    expected_shapes = {"A": (RANK, D_IN), "B": (D_OUT, RANK)} if isinstance(layer, LoRALinear) else {
        "A": (RANK, D_IN), "C": (E, RANK // E, RANK // E), "B": (E, D_OUT, RANK // E), "T": (E, E),
        "W_r": (E, RANK), "W_g": (E, D_IN)}
    if isinstance(layer, TalkLoRALinear):
        expected_shapes.update(layer.structure.parameter_shapes())
    for n, t in weights.items():
        assert tuple(t.shape) == expected_shapes[n]
    layer.set_weights(**weights)
    got = layer.get_weights()
    assert got.keys() == weights.keys()
    for n in weights:
        assert torch.equal(got[n], weights[n])
        got[n].add_(1.0)                                   # copies, not views
        assert torch.equal(getattr(layer, n).detach(), weights[n])
    weights["A"].add_(1.0)                                 # set_weights copied as well
    assert not torch.equal(layer.A.detach(), weights["A"])

    with pytest.raises(ValueError, match=r"unknown weight name\(s\) \['W_x'\]"):
        layer.set_weights(W_x=torch.zeros(2))
    with pytest.raises(ValueError, match=r"weight B must have shape .* got \(3, 3\)"):
        layer.set_weights(B=torch.zeros(3, 3, dtype=DT))
    with pytest.raises(ValueError, match=r"weight A must have shape .* got list"):
        layer.set_weights(A=[[0.0]])
    before = layer.get_weights()
    with pytest.raises(ValueError, match="weight B"):      # checked before anything is copied
        layer.set_weights(A=torch.zeros(RANK, D_IN, dtype=DT), B=torch.zeros(1, dtype=DT))
    assert torch.equal(layer.A.detach(), before["A"])


@pytest.mark.parametrize("name", TABLE)
def test_state_dict_round_trip_into_a_fresh_layer(name):
    layer = build(name, seed=0).eval()
    fresh = build(name, seed=10, random_weights=False).eval()
    x = torch.randn(3, D_IN, dtype=DT)
    with torch.no_grad():
        assert not torch.equal(fresh(x), layer(x))
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(fresh(x), layer(x))
    for n, t in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[n], t), n


@pytest.mark.parametrize("name", [n for n in TABLE if not n.startswith("lora")])
def test_moe_merge_raises_because_gates_depend_on_the_input(name):
    layer = build(name)
    with pytest.raises(RuntimeError, match="cannot be merged.*gates g\\(x\\) depend on the input"):
        layer.merge()


@pytest.mark.parametrize("name", TABLE)
def test_nan_in_one_token_stays_in_that_token(name):
    """layers.py: NaN inputs propagate as through nn.Linear — only the offending token's row."""
    layer = build(name).eval()
    x = torch.randn(2, 4, D_IN, dtype=DT)
    x[1, 2, 5] = float("nan")
    with torch.no_grad():
        y = layer(x)
    assert torch.isnan(y[1, 2]).all()
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(y[mask]).all()


# ============================================================================ init and Talking Module
def test_official_init_bounds_and_zero_B():
    torch.manual_seed(0)
    d_in, r, n_exp = 256, 32, 4
    m = r // n_exp
    layers = {"code": MoELoRALinear(nn.Linear(d_in, 64), r, n_exp),
              "input": MoELoRALinear(nn.Linear(d_in, 64), r, n_exp, router_input="input"),
              "talk": TalkLoRALinear(nn.Linear(d_in, 64), r, n_exp)}

    def check_uniform(t, bound):
        t = t.detach()
        assert t.abs().max() <= bound
        assert t.abs().max() > 0.9 * bound                   # U(±bound), not a narrower law
        assert abs(float(t.mean())) < 0.1 * bound

    for layer in layers.values():
        check_uniform(layer.A, 1 / math.sqrt(d_in))
        check_uniform(layer.C, 1 / math.sqrt(m))
        assert torch.equal(layer.B, torch.zeros_like(layer.B))
    check_uniform(layers["code"].W_r, 1 / math.sqrt(r))
    check_uniform(layers["talk"].W_r, 1 / math.sqrt(r))
    check_uniform(layers["input"].W_g, 1 / math.sqrt(d_in))
    lora = LoRALinear(nn.Linear(d_in, 64), r)
    check_uniform(lora.A, 1 / math.sqrt(d_in))
    assert torch.equal(lora.B, torch.zeros_like(lora.B))


@pytest.mark.parametrize("n_exp", [2, 4, 8])
def test_official_talk_init_is_uniform_within_one_over_sqrt_E(n_exp):
    torch.manual_seed(n_exp)
    Ts = torch.stack([TalkLoRALinear(nn.Linear(4, 4), n_exp, n_exp).T.detach() for _ in range(50)])
    bound = 1 / math.sqrt(n_exp)
    assert Ts.abs().max() <= bound and Ts.abs().max() > 0.9 * bound
    eye = torch.eye(n_exp)
    assert all(not torch.allclose(T, eye) for T in Ts)
    assert (Ts < 0).any()                                   # not doubly stochastic either


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("spelling", ["uniform-mix:{}", "uniform-mix {}", "number"])
def test_uniform_mix_talk_matrix_formula(alpha, spelling):
    talk_init = alpha if spelling == "number" else spelling.format(alpha)
    layer = TalkLoRALinear(nn.Linear(4, 4).to(DT), 8, E, talk_init=talk_init)
    expected = alpha * torch.eye(E, dtype=DT) + (1 - alpha) * torch.ones(E, E, dtype=DT) / E
    torch.testing.assert_close(layer.T.detach(), expected, atol=1e-15, rtol=0)
    torch.testing.assert_close(layer.T.sum(0), torch.ones(E, dtype=DT), atol=1e-15, rtol=0)
    torch.testing.assert_close(layer.T.sum(1), torch.ones(E, dtype=DT), atol=1e-15, rtol=0)


def test_identity_talk_and_talk_matrix_function():
    layer = TalkLoRALinear(nn.Linear(4, 4), 6, 3, talk_init="identity")
    assert torch.equal(layer.T.detach(), torch.eye(3))
    assert torch.equal(talk_matrix(3, "uniform-mix:0.5"),
                       0.5 * torch.eye(3) + 0.5 * torch.full((3, 3), 1 / 3))
    layer.T.data.fill_(7.0)
    layer.reset_parameters()                               # re-applies talk_init
    assert torch.equal(layer.T.detach(), torch.eye(3))


# ============================================================================ gate dropout
def spy_mixed_gates(monkeypatch):
    """Record the gates that reach the experts (after any gate dropout): the router's gates times the
    gate-dropout multipliers handed to ``FusedAdapter``.  (A routing hook sees the gates *before*
    gate dropout, which always sum to 1.)"""
    seen, real = [], layers_module.FusedAdapter

    class Spy:
        @staticmethod
        def apply(*args):
            outputs = real.apply(*args[:-1], True)                    # ask for the router's gates
            keep = args[-2]
            gates = outputs[2].detach()
            seen.append(gates if keep is None else gates * keep)
            return outputs if args[-1] else outputs[0]

    monkeypatch.setattr(layers_module, "FusedAdapter", Spy)
    return seen


def test_gate_dropout_breaks_the_gate_sum_in_train_only(monkeypatch):
    layer = TalkLoRALinear(make_base(), RANK, E, dropout=0.5, gate_dropout=True)
    randomize(layer)
    mixed = spy_mixed_gates(monkeypatch)
    hooked = []
    layer.add_routing_hook(lambda _, logits, gates, index: hooked.append(gates))
    x = torch.randn(64, D_IN, dtype=DT)
    torch.manual_seed(0)
    layer.train()(x)
    ones = torch.ones(64, dtype=DT)
    torch.testing.assert_close(hooked[-1].sum(-1), ones)          # the router's softmax
    assert not torch.allclose(mixed[-1].sum(-1), ones)            # what the experts get
    assert (mixed[-1] == 0).any()
    layer.eval()(x)
    torch.testing.assert_close(mixed[-1].sum(-1), ones)            # inactive in eval
    torch.testing.assert_close(mixed[-1], hooked[-1])


def test_default_leaves_gates_undropped_in_train(monkeypatch):
    layer = TalkLoRALinear(make_base(), RANK, E, dropout=0.5)
    randomize(layer)
    mixed = spy_mixed_gates(monkeypatch)
    layer.train()(torch.randn(32, D_IN, dtype=DT))
    torch.testing.assert_close(mixed[-1].sum(-1), torch.ones(32, dtype=DT))


# ============================================================================ balance losses
def test_switch_loss_known_values():
    n = 4
    eye = torch.eye(n, dtype=DT)
    logits = torch.cat([eye, eye]) * 5                       # top-1 expert t mod E: f_e = 1/E
    assert balance_loss("switch", logits, torch.cat([eye, eye])) == 1.0          # P_e = 1/E
    collapsed = torch.zeros(8, n, dtype=DT)
    collapsed[:, 0] = 1
    assert balance_loss("switch", collapsed, collapsed) == n                    # all on expert 0
    uniform = torch.full((8, n), 1 / n, dtype=DT)
    torch.testing.assert_close(balance_loss("switch", torch.zeros(8, n, dtype=DT), uniform),
                               torch.tensor(1.0, dtype=DT))


def test_cv_loss_known_values():
    n, tokens = 4, 8
    uniform = torch.full((tokens, n), 1 / n, dtype=DT)
    assert balance_loss("cv", uniform.log(), uniform) == 0.0
    collapsed = torch.zeros(tokens, n, dtype=DT)
    collapsed[:, 0] = 1
    # load (T, 0, 0, 0): var = T²(E−1)/E², mean² = T²/E²  =>  cv² = E − 1
    torch.testing.assert_close(balance_loss("cv", collapsed, collapsed), torch.tensor(n - 1.0, dtype=DT))


def test_entropy_loss_known_values():
    g = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=DT)
    mean_h = 0.5 * math.log(2)
    batch_h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(balance_loss("entropy", g.log(), g), torch.tensor(mean_h - batch_h, dtype=DT))
    eye = torch.eye(3, dtype=DT)
    torch.testing.assert_close(balance_loss("entropy", eye, eye), torch.tensor(-math.log(3), dtype=DT))
    uniform = torch.full((5, 3), 1 / 3, dtype=DT)
    torch.testing.assert_close(balance_loss("entropy", uniform, uniform), torch.tensor(0.0, dtype=DT),
                               atol=1e-12, rtol=0)


def test_layer_stores_aux_loss_for_uniform_routing():
    """W_r = 0 ⇒ every gate is exactly 1/E: switch = 1 (all argmax ties go to expert 0: f = e_0,
    P = 1/E), cv = 0, entropy = 0."""
    x = torch.randn(2, 5, D_IN, dtype=DT)
    expected = {"switch": 1.0, "cv": 0.0, "entropy": 0.0}
    for kind, value in expected.items():
        layer = TalkLoRALinear(make_base(), RANK, E, balance_loss=kind)
        randomize(layer)
        layer.set_weights(W_r=torch.zeros(E, RANK, dtype=DT))
        assert layer.aux_loss is None
        layer(x)
        torch.testing.assert_close(layer.aux_loss, torch.tensor(value, dtype=DT), atol=1e-12, rtol=0)
        assert layer.aux_loss.requires_grad                  # usable as a training loss


def test_balance_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="balance loss kind must be one of"):
        balance_loss("gini", torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="balance_loss must be None or one of"):
        MoELoRALinear(make_base(), RANK, E, balance_loss="gini")


# ============================================================================ routing hooks
@pytest.mark.parametrize("top_k", [None, 2])
def test_routing_hook_receives_logits_gates_index_and_removes(top_k):
    layer = TalkLoRALinear(make_base(), RANK, E, top_k=top_k)
    randomize(layer)
    calls = []
    handle = layer.add_routing_hook(lambda mod, logits, gates, index: calls.append((mod, logits, gates, index)))
    x = torch.randn(3, 4, D_IN, dtype=DT)
    with torch.no_grad():
        layer(x)
    (mod, logits, gates, index), = calls
    assert mod is layer
    assert logits.shape == gates.shape == (3, 4, E)
    torch.testing.assert_close(logits, layer.router_logits(x))
    torch.testing.assert_close(gates, layer.gates(x))
    if top_k is None:
        assert index is None
        torch.testing.assert_close(gates, torch.softmax(logits, -1))
    else:
        assert index.shape == (3, 4, top_k)
        torch.testing.assert_close(index.sort(-1).values, logits.topk(top_k, -1).indices.sort(-1).values)
    handle.remove()
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1


# ============================================================================ merging
def test_lora_merge_unmerge_and_errors():
    layer = build("lora-alpha16")
    original = layer.base.weight.detach().clone()
    x = torch.randn(5, D_IN, dtype=DT)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, atol=1e-12, rtol=1e-12)
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()
        with pytest.raises(RuntimeError, match="unmerge"):
            layer.set_weights(A=torch.zeros(RANK, D_IN, dtype=DT))
        layer.unmerge()
        assert torch.equal(layer.base.weight, original)
        with pytest.raises(RuntimeError, match="not merged"):
            layer.unmerge()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lora_merge_rejects_non_finite_weights(bad):
    layer = build("lora-alphaNone")
    original = layer.base.weight.detach().clone()
    A = layer.A.detach().clone()
    A[0, 0] = bad
    with pytest.raises(ValueError, match="weight A contains NaN or Inf; set_weights needs finite values"):
        layer.set_weights(A=A)
    with torch.no_grad():                   # as a diverged training run would leave it
        layer.A[0, 0] = bad
    with pytest.raises(ValueError, match="cannot merge: the adapter weights A or B contain NaN or Inf"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, original)


def test_set_weights_refuses_values_that_overflow_the_layer_dtype():
    layer = build("lora-alphaNone").float()
    before = {k: v.clone() for k, v in layer.get_weights().items()}
    big = torch.full(layer.A.shape, 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weight A contains NaN or Inf after the cast to torch.float32"):
        layer.set_weights(B=torch.ones(layer.B.shape), A=big)
    assert all(torch.equal(v, before[k]) for k, v in layer.get_weights().items())      # nothing copied


def test_merged_weight_at_gates_errors():
    layer = build("talklora-official-alphaNone")
    with pytest.raises(ValueError, match=r"gates must have shape \(4,\)"):
        layer.merged_weight_at_gates(torch.ones(3))
    with pytest.raises(ValueError, match="gates must be finite"):
        layer.merged_weight_at_gates(torch.tensor([float("nan"), 0, 0, 1]))
    with torch.no_grad():                   # as a diverged training run would leave it
        layer.C[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="cannot merge: the adapter weights contain NaN or Inf"):
        layer.merged_weight_at_gates(torch.full((E,), 0.25))


def test_merged_weight_at_one_hot_gates_is_that_experts_lora():
    layer = build("moelora-code-alpha16")
    e, m = 2, RANK // E
    W = layer.merged_weight_at_gates(torch.eye(E, dtype=DT)[e])
    expected = layer.base.weight + (16 / RANK) * layer.B[e] @ layer.C[e] @ layer.A[e * m:(e + 1) * m]
    torch.testing.assert_close(W, expected, atol=1e-12, rtol=1e-12)


# ============================================================================ bad inputs
@pytest.mark.parametrize("make, exc, match", [
    (lambda b: MoELoRALinear(b, 6, 4), ValueError, r"rank \(6\) must be divisible by num_experts \(4\)"),
    (lambda b: TalkLoRALinear(b, 6, 4), ValueError, r"rank \(6\) must be divisible by num_experts \(4\)"),
    (lambda b: MoELoRALinear(b, 8, 0), ValueError, "num_experts must be a positive integer, got 0"),
    (lambda b: TalkLoRALinear(b, 8, -1), ValueError, "num_experts must be a positive integer, got -1"),
    (lambda b: LoRALinear(b, 0), ValueError, "rank must be a positive integer, got 0"),
    (lambda b: MoELoRALinear(b, -4, 2), ValueError, "rank must be a positive integer, got -4"),
    (lambda b: LoRALinear(b, True), ValueError, "rank must be a positive integer, got True"),
    (lambda b: MoELoRALinear(b, 8.0, 4), ValueError, r"rank must be a positive integer, got 8\.0"),
    (lambda b: MoELoRALinear(b, 8, 4.0), ValueError, r"num_experts must be a positive integer, got 4\.0"),
    (lambda b: MoELoRALinear(b, 8, 4, router_input="token"), ValueError, "router_input must be one of"),
    (lambda b: MoELoRALinear(b, 8, 4, top_k=5), ValueError, r"top_k \(5\) must be at most num_experts \(4\)"),
    (lambda b: MoELoRALinear(b, 8, 4, top_k=0), ValueError, "top_k must be a positive integer"),
    (lambda b: TalkLoRALinear(b, 8, 4, top_k=5), ValueError, r"top_k \(5\) must be at most"),
    (lambda b: TalkLoRALinear(b, 8, 4, talk_init="random"), ValueError, "talk_init must be one of"),
    (lambda b: TalkLoRALinear(b, 8, 4, talk_init="uniform-mix:1.5"), ValueError, "talk_init must be one of"),
    (lambda b: TalkLoRALinear(b, 8, 4, talk_init="uniform-mix:x"), ValueError, "talk_init must be one of"),
    (lambda b: TalkLoRALinear(b, 8, 4, talk_init=True), ValueError, "talk_init must be one of"),
    (lambda b: LoRALinear(b, 8, alpha=0), ValueError, "alpha must be None .* or a positive number"),
    (lambda b: LoRALinear(b, 8, alpha=-16), ValueError, "alpha must be None"),
    (lambda b: MoELoRALinear(b, 8, 4, alpha=float("nan")), ValueError, "alpha must be None"),
    (lambda b: MoELoRALinear(b, 8, 4, alpha=float("inf")), ValueError, "alpha must be None"),
    (lambda b: TalkLoRALinear(b, 8, 4, alpha="16"), ValueError, "alpha must be None"),
    (lambda b: TalkLoRALinear(b, 8, 4, alpha=True), ValueError, "alpha must be None"),
    (lambda b: LoRALinear(b, 8, dropout=1.0), ValueError, r"dropout must be a probability in \[0, 1\)"),
    (lambda b: MoELoRALinear(b, 8, 4, dropout=-0.1), ValueError, "dropout must be a probability"),
    (lambda b: TalkLoRALinear(b, 8, 4, dropout=True), ValueError, "dropout must be a probability"),
    (lambda b: LoRALinear(nn.Conv1d(4, 4, 1), 8), TypeError, "base must be an nn.Linear or a transformers Conv1D, got Conv1d"),
    (lambda b: TalkLoRALinear(b.weight, 8, 4), TypeError, "base must be an nn.Linear or a transformers Conv1D, got Parameter"),
    (lambda b: LoRALinear(None, 8), TypeError, "base must be an nn.Linear or a transformers Conv1D, got NoneType"),
    (lambda b: LoRALinear(b, [8]), ValueError, r"rank must be a positive integer, got \[8\]"),
    (lambda b: LoRALinear(b, None), ValueError, "rank must be a positive integer, got None"),
    (lambda b: LoRALinear(b, "8"), ValueError, "rank must be a positive integer, got '8'"),
    (lambda b: MoELoRALinear(b, 8, None), ValueError, "num_experts must be a positive integer, got None"),
    (lambda b: MoELoRALinear(b, 8, 4, top_k="2"), ValueError, "top_k must be a positive integer"),
    (lambda b: MoELoRALinear(b, 8, 4, gate_dropout=1), ValueError, "gate_dropout must be a bool"),
    (lambda b: LoRALinear(b, 8, dropout=None), ValueError, "dropout must be a probability"),
    (lambda b: LoRALinear(b, 8, dropout=[0.1]), ValueError, "dropout must be a probability"),
    (lambda b: LoRALinear(b, 8, dtype="float32"), ValueError, "dtype must be None or a floating torch.dtype"),
    (lambda b: LoRALinear(b, 8, dtype=torch.int64), ValueError, "dtype must be None or a floating torch.dtype"),
    (lambda b: LoRALinear(nn.Linear(0, 4), 2), ValueError, "zero-width weight"),
    (lambda b: MoELoRALinear(nn.Linear(4, 0), 2, 2), ValueError, "zero-width weight"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_constructor_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make(make_base())


@pytest.mark.parametrize("name", ["lora-alphaNone", "moelora-input-alphaNone", "talklora-official-alphaNone"])
@pytest.mark.parametrize("shape", [(3, D_IN + 1), (D_IN, 3), ()], ids=str)
def test_wrong_input_width_is_rejected(name, shape):
    layer = build(name)
    with pytest.raises(ValueError, match=rf"input must have shape \(\.\.\., d_in={D_IN}\), got"):
        layer(torch.randn(shape, dtype=DT))


# ============================================================================ issue 11 / 12: numbers, Conv1D, dtypes, ties
def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    layer = TalkLoRALinear(make_base(), np.int64(RANK), np.int32(E), alpha=np.float32(16.0),
                           dropout=np.float64(0.0), talk_init=np.float64(0.5), top_k=np.int64(2))
    assert (layer.rank, layer.num_experts, layer.top_k) == (RANK, E, 2)
    assert type(layer.rank) is int and type(layer.top_k) is int
    assert layer.scaling == pytest.approx(16.0 / RANK)
    ref = TalkLoRALinear(make_base(), RANK, E, alpha=16.0, talk_init=0.5, top_k=2)
    torch.testing.assert_close(layer.T, ref.T)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRALinear(make_base(), np.float64(8.0))
    with pytest.raises(ValueError, match="alpha must be None"):
        LoRALinear(make_base(), 8, alpha=np.bool_(True))


def test_non_tensor_input_and_weights_rejected_by_name():
    layer = build("talklora-official-alphaNone")
    with pytest.raises(TypeError, match="input x must be a torch.Tensor, got list"):
        layer([[0.0] * D_IN])
    with pytest.raises(ValueError, match=r"weight T must have shape \(4, 4\) \(a torch.Tensor\), got NoneType"):
        layer.set_weights(T=None)
    with pytest.raises(ValueError, match="weight T must be a real tensor"):
        layer.set_weights(T=torch.zeros(E, E, dtype=torch.complex64))


class Conv1D(nn.Module):
    """Stand-in with the layout of transformers' Conv1D (recognised by name and shapes)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=DT))
        self.bias = nn.Parameter(torch.randn(nf, dtype=DT))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize("name", ["lora-alpha16", "moelora-code-alphaNone", "talklora-official-alpha16"])
def test_conv1d_base_equals_linear_base(name):
    torch.manual_seed(0)
    conv = Conv1D(D_OUT, D_IN)
    linear = nn.Linear(D_IN, D_OUT).to(DT)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    cfg, alpha = TABLE[name]
    a, b = cfg.build(conv, alpha), cfg.build(linear, alpha)
    randomize(b)
    a.set_weights(**b.get_weights())
    assert a.fan_in_fan_out and (a.in_features, a.out_features) == (D_IN, D_OUT)
    assert a.weight is conv.weight and a.bias is conv.bias
    x = torch.randn(3, D_IN, dtype=DT)
    torch.testing.assert_close(a(x), b(x), atol=1e-12, rtol=0)
    if name.startswith("lora"):
        ref = a(x)
        a.merge()
        torch.testing.assert_close(conv(x), ref, atol=1e-12, rtol=0)
        a.unmerge()
    else:
        g = torch.full((E,), 0.25, dtype=DT)
        torch.testing.assert_close(a.merged_weight_at_gates(g), b.merged_weight_at_gates(g), atol=1e-12, rtol=0)


@pytest.mark.parametrize("base_dtype, adapter", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                 (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_adapter_dtype_over_half_precision_bases(base_dtype, adapter):
    base = nn.Linear(D_IN, D_OUT).to(base_dtype)
    layer = TalkLoRALinear(base, RANK, E)
    assert {p.dtype for n, p in layer.named_parameters() if not n.startswith("base.")} == {adapter}
    randomize(layer)
    x = torch.randn(3, D_IN).to(base_dtype)
    y = layer(x)
    assert y.dtype == base_dtype
    expected = base(x).double() + layer.adapter_output(x.to(adapter)).double()
    torch.testing.assert_close(y.double(), expected, atol=0.05 if base_dtype in (torch.bfloat16, torch.float16) else 1e-6, rtol=0.02)
    assert TalkLoRALinear(nn.Linear(D_IN, D_OUT).to(torch.bfloat16), RANK, E, dtype=torch.bfloat16).A.dtype == torch.bfloat16


def test_tie_B_registers_B_once_and_shares_gradients():
    a, b = build("talklora-official-alphaNone", seed=0), build("talklora-official-alphaNone", seed=1)
    b.tie_B(a)
    assert b.B is a.B and b.B_is_tied and "B" not in dict(b.named_parameters())
    pair = nn.ModuleList([a, b])
    assert [n for n, _ in pair.named_parameters() if n.endswith("B")] == ["0.B"]
    x = torch.randn(4, D_IN, dtype=DT)
    (a(x).sum() + b(x).sum()).backward()
    ga = torch.autograd.grad(a(x).sum(), a.B)[0] + torch.autograd.grad(b(x).sum(), a.B)[0]
    torch.testing.assert_close(a.B.grad, ga)
    c = build("talklora-official-alphaNone", seed=2)
    c.tie_B(b)                                                  # chains resolve to the owner
    assert c.__dict__["_B_owner"] is a
    with pytest.raises(ValueError, match="B shapes/dtypes differ"):
        LoRALinear(make_base(), 2).tie_B(LoRALinear(make_base(), 3))
    with pytest.raises(ValueError, match="owner must be another adapter layer"):
        a.tie_B(a)


def test_adapter_enabled_flag_gives_base_output():
    layer = build("moelora-code-alpha16")
    x = torch.randn(4, D_IN, dtype=DT)
    layer.adapter_enabled = False
    torch.testing.assert_close(layer(x), layer.base(x))
    layer.adapter_enabled = True
    assert (layer(x) - layer.base(x)).abs().max() > 1e-6


@pytest.mark.parametrize("name", TABLE)
def test_precomputed_base_output_gives_the_same_forward_and_gradients(name):
    """``forward(x, base_output=base(x))`` (a cached frozen base, e.g. on a cached prefix) is the same
    function with the same adapter gradients as ``forward(x)``."""
    torch.manual_seed(3)
    layer = build(name)
    x = torch.randn(2, 5, D_IN, dtype=DT, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cached = layer.base(x)
    for train_mode in (False, True):
        layer.train(train_mode)
        torch.manual_seed(5)
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), [p for p in layer.parameters() if p.requires_grad])
        torch.manual_seed(5)                                  # the same dropout masks
        y_cached = layer(x, base_output=cached)
        grads_cached = torch.autograd.grad(y_cached.square().sum(), [p for p in layer.parameters() if p.requires_grad])
        torch.testing.assert_close(y_cached, y, rtol=0, atol=1e-12)
        for g, gc in zip(grads, grads_cached):
            torch.testing.assert_close(gc, g, rtol=0, atol=1e-10)


def test_precomputed_base_output_is_checked():
    layer = build("talklora-official-alphaNone").eval()
    x = torch.randn(3, D_IN, dtype=DT)
    with pytest.raises(ValueError, match=r"base_output must be a tensor of shape \(3, 10\)"):
        layer(x, base_output=torch.zeros(3, D_OUT + 1, dtype=DT))
    with pytest.raises(ValueError, match="base_output must be a tensor"):
        layer(x, base_output=[0.0] * D_OUT)
    lora = build("lora-alphaNone").eval()
    lora.merge()
    with pytest.raises(RuntimeError, match="merged layer"):
        lora(x, base_output=lora.base(x))
    layer.adapter_enabled = False                         # disabled adapters: the given base output itself
    cached = layer.base(x).detach()
    assert layer(x, base_output=cached) is cached
