"""Communication structures of TalkLoRA's T (docs/method.md §1): one table of structures × generic
checks (PEFT style), hypothesis properties over E, m and the structure arguments, then the
structure-specific claims (doubly-stochastic after training, zeros of block / banded, low-rank start),
``set_weights`` semantics, argument errors, ``AdapterConfig`` and the adapter files."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from talklora_min import (AdapterConfig, MoELoRALinear, TalkLoRALinear, absorb_talk, export_official_state_dict,
                          inject, load_adapter, load_official_state_dict, moelora_from_identity_talk,
                          save_adapter, talklora_from_moelora)
from talklora_min.structures import TALK_STRUCTURES, TalkStructure, check_talk_structure, fold_unit, sinkhorn

DT = torch.float64
D_IN, D_OUT, RANK, E = 10, 7, 12, 6                      # m = 2

STRUCTURES = {                                            # name -> TalkLoRALinear keyword arguments
    "full": dict(talk_structure="full", talk_init="identity"),
    "broadcast": dict(talk_structure="broadcast"),
    "doubly-stochastic": dict(talk_structure="doubly-stochastic"),
    "block-2": dict(talk_structure="block", talk_groups=2),
    "block-3": dict(talk_structure="block", talk_groups=3),
    "banded-0": dict(talk_structure="banded", talk_bandwidth=0),
    "banded-2": dict(talk_structure="banded", talk_bandwidth=2),
    "low-rank-1": dict(talk_structure="low-rank", talk_rank=1),
    "low-rank-3": dict(talk_structure="low-rank", talk_rank=3),
}


def make(name, *, seed=0, E_=E, rank=RANK, dtype=DT, **extra):
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).to(dtype)
    return TalkLoRALinear(base, rank, E_, **{**STRUCTURES[name], **extra})


def randomize(layer, seed=1, names=None, scale=1.0):
    """Random values for the stored tensors ``names`` (default: all of them)."""
    gen = torch.Generator().manual_seed(seed)
    names = layer.weight_names if names is None else names
    layer.set_weights(**{n: scale * torch.randn(getattr(layer, n).shape, generator=gen, dtype=getattr(layer, n).dtype)
                         for n in names})


def experts_and_router(layer, seed=1):
    """Random A, C, B, W_r (the structure stays where it is)."""
    randomize(layer, seed, names=("A", "C", "B", "W_r"))


def moelora_twin(layer):
    twin = MoELoRALinear(layer.base, layer.rank, layer.num_experts, "code", layer.alpha, layer.dropout)
    twin.set_weights(**{n: getattr(layer, n).detach() for n in ("A", "C", "B", "W_r")})
    return twin


def structure_names(layer):
    return [n for n in layer.weight_names if n not in ("A", "C", "B", "W_r")]


def tokens(n=9, seed=3, dtype=DT, d=D_IN):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ============================================================================ generic table checks
@pytest.mark.parametrize("name", STRUCTURES)
def test_identity_point_is_moelora_code_exactly(name):
    layer = make(name)
    experts_and_router(layer)
    twin = moelora_twin(layer)
    assert torch.equal(layer.T, torch.eye(E, dtype=DT))
    x = tokens().requires_grad_(True)
    y, y_twin = layer(x), twin(x)
    assert torch.equal(y, y_twin)
    assert torch.equal(layer.gates(x), twin.gates(x))
    names = ("A", "C", "B", "W_r")
    grads = torch.autograd.grad(y.square().sum(), [x, *(getattr(layer, n) for n in names)])
    grads_twin = torch.autograd.grad(y_twin.square().sum(), [x, *(getattr(twin, n) for n in names)])
    for n, g, g_twin in zip(("x",) + names, grads, grads_twin):
        assert torch.equal(g, g_twin), n


@pytest.mark.parametrize("name", STRUCTURES)
def test_get_weights_T_is_talk_matrix_and_set_weights_round_trips(name):
    layer = make(name)
    randomize(layer)
    weights = layer.get_weights()
    assert torch.equal(weights["T"], layer.talk_matrix()) and torch.equal(layer.T, layer.talk_matrix())
    assert set(weights) == set(layer.weight_names) | {"T"}
    fresh = make(name)                                   # same base, adapter at its start
    fresh.set_weights(**weights)
    for n, t in fresh.get_weights().items():
        assert torch.equal(t, weights[n]), n
    x = tokens()
    assert torch.equal(fresh(x), layer(x))
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == set(layer.weight_names)


@pytest.mark.parametrize("name", STRUCTURES)
def test_absorption_map_equals_the_layer(name):
    layer = make(name)
    randomize(layer)
    x = tokens()
    absorbed = absorb_talk(layer)
    torch.testing.assert_close(absorbed(x), layer(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(absorbed.gates(x), layer.gates(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", STRUCTURES)
def test_gradients_reach_the_structure_parameters_at_and_away_from_the_identity(name):
    layer = make(name)
    experts_and_router(layer)                     # structure at its start (identity point)
    x = tokens(32)
    layer(x).square().sum().backward()
    for n in structure_names(layer):
        g = getattr(layer, n).grad
        if n in ("talk_V", "talk_logits"):        # multiplied by U = 0 / by 1 − α = 0 at the start:
            assert torch.equal(g, torch.zeros_like(g))    # U / α carry the first step
        else:
            assert g is not None and g.abs().max() > 0, n
    layer.zero_grad()
    randomize(layer)
    layer(x).square().sum().backward()
    for n in structure_names(layer):
        assert getattr(layer, n).grad.abs().max() > 0, n


def test_structures_table_covers_every_structure():
    assert {STRUCTURES[n]["talk_structure"] for n in STRUCTURES} == set(TALK_STRUCTURES)


# ============================================================================ hypothesis properties
@st.composite
def structure_config(draw):
    E_ = draw(st.integers(1, 8))
    m = draw(st.integers(1, 3))
    name = draw(st.sampled_from(TALK_STRUCTURES))
    args = {}
    if name == "block":
        args["talk_groups"] = draw(st.sampled_from([g for g in range(1, E_ + 1) if E_ % g == 0]))
    elif name == "banded":
        args["talk_bandwidth"] = draw(st.integers(0, (E_ - 1) // 2))
    elif name == "low-rank":
        args["talk_rank"] = draw(st.integers(1, E_))
    return E_, m, name, args, draw(st.integers(0, 2**16))


@given(structure_config())
def test_property_identity_point_equals_moelora_exactly(cfg):
    E_, m, name, args, seed = cfg
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).to(DT)
    layer = TalkLoRALinear(base, E_ * m, E_, alpha=4.0, talk_init="identity", talk_structure=name, **args)
    experts_and_router(layer, seed)
    x = tokens(5, seed)
    assert torch.equal(layer(x), moelora_twin(layer)(x))
    back = moelora_from_identity_talk(layer)                   # the exact C1 map accepts it
    assert torch.equal(back(x), layer(x))
    rebuilt = talklora_from_moelora(back, name, **args)
    assert rebuilt.talk_structure == name and torch.equal(rebuilt(x), layer(x))


@given(structure_config())
def test_property_effective_T_respects_the_structure_and_set_weights_round_trips(cfg):
    E_, m, name, args, seed = cfg
    torch.manual_seed(seed)
    layer = TalkLoRALinear(nn.Linear(D_IN, D_OUT).to(DT), E_ * m, E_, talk_structure=name, **args)
    randomize(layer, seed)
    T = layer.talk_matrix().detach()
    support = layer.structure.support()
    assert torch.equal(T[~support], torch.zeros_like(T[~support]))        # block / banded zeros exactly
    if name == "doubly-stochastic":
        assert (T > 0).all()
        torch.testing.assert_close(T.sum(0), torch.ones(E_, dtype=DT), atol=1e-5, rtol=0)
        torch.testing.assert_close(T.sum(1), torch.ones(E_, dtype=DT), atol=1e-5, rtol=0)
        assert torch.linalg.matrix_norm(T, ord=2) <= 1 + 1e-5
    if name == "low-rank":
        assert torch.linalg.matrix_rank(T - torch.eye(E_, dtype=DT)) <= args["talk_rank"]
    copy = TalkLoRALinear(nn.Linear(D_IN, D_OUT).to(DT), E_ * m, E_, talk_structure=name, **args)
    copy.set_weights(**layer.get_weights())
    assert torch.equal(copy.talk_matrix(), layer.talk_matrix())
    alone = TalkLoRALinear(nn.Linear(D_IN, D_OUT).to(DT), E_ * m, E_, talk_structure=name, **args)
    alone.set_weights(T=T)                                               # T alone: representable by construction
    torch.testing.assert_close(alone.talk_matrix(), T, atol=1e-6 if name == "doubly-stochastic" else 1e-10, rtol=0)


# ============================================================================ structure-specific claims
def train(layer, steps=50, lr=0.05, weight_decay=0.01, seed=0):
    """AdamW on a random regression target; returns the layer."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, D_IN, generator=gen, dtype=layer.A.dtype)
    target = torch.randn(64, D_OUT, generator=gen, dtype=layer.A.dtype)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        (layer(x) - target).square().mean().backward()
        opt.step()
    return layer


@pytest.mark.parametrize("start", ["identity", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_doubly_stochastic_stays_doubly_stochastic_after_50_adamw_steps(dtype, start):
    layer = make("doubly-stochastic", dtype=dtype)
    experts_and_router(layer) if start == "identity" else randomize(layer)
    T0 = layer.talk_matrix().detach().clone()
    train(layer, lr=0.1)
    T = layer.talk_matrix().detach()
    assert (T - T0).abs().max() > 0.05                          # it did move
    ones = torch.ones(E, dtype=dtype)
    torch.testing.assert_close(T.sum(0), ones, atol=1e-5, rtol=0)
    torch.testing.assert_close(T.sum(1), ones, atol=1e-5, rtol=0)
    assert (T >= 0).all()
    assert torch.linalg.matrix_norm(T.double(), ord=2) <= 1 + 1e-5


def test_plain_sinkhorn_reaches_the_identity_only_approximately_as_documented():
    """α = 0 is the plain ``Sinkhorn(exp Θ)``: ``Θ = c I`` gives ``max |T − I| = (E − 1) / (e^c + E − 1)``
    (c = 20: ``1.0e-8``, the layer is MoELoRA-code up to that, not exactly; from c ≈ 37 on float64
    rounds T to I); the identity weight α is what makes the structure's identity point exact."""
    layer = make("doubly-stochastic")
    experts_and_router(layer)
    eye = torch.eye(E, dtype=DT)
    for c in (2.0, 5.0, 9.0):
        layer.set_weights(talk_alpha=torch.tensor(0.0, dtype=DT), talk_logits=c * eye)
        assert math.isclose(float((layer.T.detach() - eye).abs().max()), (E - 1) / (math.exp(c) + E - 1), rel_tol=1e-6)
    layer.set_weights(talk_logits=20.0 * eye)
    assert math.isclose(float((layer.T.detach() - eye).abs().max()), 5 / (math.exp(20) + 5), rel_tol=1e-6)
    x = tokens()
    y, y_twin = layer(x), moelora_twin(layer)(x)
    assert not torch.equal(y, y_twin)
    torch.testing.assert_close(y, y_twin, atol=1e-6, rtol=1e-6)
    layer.set_weights(talk_alpha=torch.tensor(1.0, dtype=DT))         # the exact identity point, any Θ
    assert torch.equal(layer(x), y_twin)


def test_sinkhorn_normalises_rows_and_columns_and_starts_uniform():
    gen = torch.Generator().manual_seed(0)
    S = sinkhorn(3 * torch.randn(5, 5, generator=gen, dtype=DT))
    ones = torch.ones(5, dtype=DT)
    torch.testing.assert_close(S.sum(1), ones, atol=1e-12, rtol=0)
    torch.testing.assert_close(S.sum(0), ones, atol=1e-5, rtol=0)
    assert torch.equal(sinkhorn(torch.zeros(4, 4, dtype=DT)), torch.full((4, 4), 0.25, dtype=DT))


@pytest.mark.parametrize("name", ["block-2", "block-3", "banded-0", "banded-2"])
def test_block_and_banded_keep_their_zeros_after_training(name):
    layer = make(name)
    experts_and_router(layer)
    train(layer, lr=0.1)
    T = layer.talk_matrix().detach()
    support = layer.structure.support()
    assert torch.equal(T[~support], torch.zeros_like(T[~support]))
    assert (T[support] - torch.eye(E, dtype=DT)[support]).abs().max() > 0.01      # the free entries moved
    if name.startswith("banded"):
        b = layer.talk_bandwidth
        i, j = torch.meshgrid(torch.arange(E), torch.arange(E), indexing="ij")
        distance = torch.minimum((i - j).abs(), E - (i - j).abs())
        assert torch.equal(support, distance <= b)


def test_low_rank_starts_at_identity_and_trains():
    layer = make("low-rank-3")
    assert torch.equal(layer.T, torch.eye(E, dtype=DT))
    assert torch.equal(layer.talk_U, torch.zeros(E, 3, dtype=DT)) and layer.talk_V.abs().min() > 0
    experts_and_router(layer)
    train(layer, lr=0.1)
    D = layer.talk_matrix().detach() - torch.eye(E, dtype=DT)
    assert D.abs().max() > 0.01 and torch.linalg.matrix_rank(D) <= 3


def test_broadcast_alpha_folds_into_the_unit_interval():
    a = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.25, 2.0, 3.7], dtype=DT, requires_grad=True)
    alpha = fold_unit(a)
    torch.testing.assert_close(alpha, torch.tensor([0.5, 0.0, 0.3, 1.0, 0.75, 0.0, 0.3], dtype=DT))
    (grad,) = torch.autograd.grad(alpha.sum(), a)
    assert grad[3] == 1.0                                          # at the identity a = 1 the slope is +1
    assert set(grad.tolist()) <= {-1.0, 1.0}
    layer = make("broadcast", talk_init="uniform-mix:0.25")
    expected = 0.25 * torch.eye(E, dtype=DT) + 0.75 / E * torch.ones(E, E, dtype=DT)
    torch.testing.assert_close(layer.T, expected, atol=1e-15, rtol=0)
    layer.set_weights(talk_alpha=torch.tensor(1.5, dtype=DT))            # folds to α = 0.5
    torch.testing.assert_close(layer.T.sum(1), torch.ones(E, dtype=DT), atol=1e-15, rtol=0)
    torch.testing.assert_close(layer.T[0, 0] - layer.T[0, 1], torch.tensor(0.5, dtype=DT), atol=1e-15, rtol=0)


# ============================================================================ set_weights semantics
@pytest.mark.parametrize("name, T, match", [
    ("block-2", "full", r"talk_structure='block', talk_groups=2: entries outside the diagonal blocks must be exactly 0"),
    ("banded-0", "full", r"talk_structure='banded', talk_bandwidth=0: entries beyond the band must be exactly 0"),
    ("broadcast", "full", r"talk_structure='broadcast'"),
    ("broadcast", "mix-1.5", r"α = T\[0, 0\] − T\[0, 1\] = 1.5 is outside \[0, 1\]"),
    ("doubly-stochastic", "perm", r"entries must be > 0 .*, or T = I"),
    ("doubly-stochastic", "rows", r"rows and columns must sum to 1"),
    ("low-rank-1", "full", r"T − I has rank > talk_rank=1"),
])
def test_set_weights_refuses_a_T_the_structure_cannot_represent(name, T, match):
    layer = make(name)
    randomize(layer)
    before = layer.get_weights()
    eye = torch.eye(E, dtype=DT)
    value = {"full": torch.randn(E, E, dtype=DT, generator=torch.Generator().manual_seed(0)), "eye": eye,
             "mix-1.5": 1.5 * eye - 0.5 / E * torch.ones(E, E, dtype=DT),
             "rows": torch.full((E, E), 1.0 / E, dtype=DT) * 1.1,
             "perm": 0.5 * eye + 0.5 * eye.roll(1, 0)}[T]
    with pytest.raises(ValueError, match=match):
        layer.set_weights(T=value, A=torch.zeros(RANK, D_IN, dtype=DT))
    for n, t in layer.get_weights().items():                 # nothing copied
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("name", [n for n in STRUCTURES if n != "full"])
def test_set_weights_refuses_T_that_disagrees_with_the_parameters_given_with_it(name):
    layer = make(name)
    randomize(layer)
    weights = layer.get_weights()
    weights["T"] = weights["T"] + 0.01 * layer.structure.support().to(DT)
    with pytest.raises(ValueError, match="weight T does not match the .* parameters given with it"):
        layer.set_weights(**weights)


def test_set_weights_accepts_representable_T_alone():
    eye = torch.eye(E, dtype=DT)
    for name in STRUCTURES:
        layer = make(name)
        randomize(layer)
        layer.set_weights(T=eye)
        assert torch.equal(layer.T, eye), name
    low = make("low-rank-1")
    V = low.talk_V.detach().clone()
    low.set_weights(T=eye)                                        # T = I keeps V: still trainable
    assert torch.equal(low.talk_V, V) and torch.equal(low.talk_U, torch.zeros_like(low.talk_U))
    u, v = torch.randn(E, 1, dtype=DT), torch.randn(E, 1, dtype=DT)
    low.set_weights(T=eye + u @ v.t())
    torch.testing.assert_close(low.T, eye + u @ v.t(), atol=1e-12, rtol=0)
    ds = make("doubly-stochastic")
    mix = 0.3 * eye + 0.7 / E * torch.ones(E, E, dtype=DT)
    ds.set_weights(T=mix)
    torch.testing.assert_close(ds.T, mix, atol=1e-12, rtol=0)


# ============================================================================ argument errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(talk_structure="star"), r"talk_structure must be one of \('full', 'broadcast', 'doubly-stochastic', "
                                  r"'block', 'banded', 'low-rank'\), got 'star'"),
    (dict(talk_structure=None), "talk_structure must be one of"),
    (dict(talk_structure="block"), r"talk_groups must be a positive integer dividing num_experts=6 \(one of \[1, 2, 3, 6\]\)"),
    (dict(talk_structure="block", talk_groups=4), "talk_groups must be a positive integer dividing num_experts=6"),
    (dict(talk_structure="block", talk_groups=2.0), "talk_groups must be a positive integer"),
    (dict(talk_structure="block", talk_groups=True), "talk_groups must be a positive integer"),
    (dict(talk_structure="banded"), r"talk_bandwidth must be an integer in \[0, 2\]"),
    (dict(talk_structure="banded", talk_bandwidth=3), r"talk_bandwidth must be an integer in \[0, 2\] .* is talk_structure='full'"),
    (dict(talk_structure="banded", talk_bandwidth=-1), "talk_bandwidth must be an integer"),
    (dict(talk_structure="low-rank"), r"talk_rank must be an integer in \[1, num_experts=6\]"),
    (dict(talk_structure="low-rank", talk_rank=7), "talk_rank must be an integer in"),
    (dict(talk_structure="full", talk_groups=2), r"talk_groups is only used by talk_structure='block'"),
    (dict(talk_structure="block", talk_groups=2, talk_rank=1), r"talk_rank is only used by talk_structure='low-rank'"),
    (dict(talk_structure="broadcast", talk_bandwidth=1), "talk_bandwidth is only used by talk_structure='banded'"),
    (dict(talk_structure="block", talk_groups=2, talk_init="uniform-mix:0.5"),
     r"talk_init='uniform-mix:0.5' \(uniform mix\) is not representable by talk_structure='block', talk_groups=2"),
    (dict(talk_structure="low-rank", talk_rank=1, talk_init=0.2), "is not representable by talk_structure='low-rank'"),
    (dict(talk_structure="broadcast", talk_init="random"), "talk_init must be one of"),
])
def test_bad_structure_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TalkLoRALinear(nn.Linear(D_IN, D_OUT), RANK, E, **kwargs)


def test_structure_validation_function_normalises_numpy_integers():
    np = pytest.importorskip("numpy")
    assert check_talk_structure("block", 6, talk_groups=np.int64(3)) == ("block", 3, None, None)
    assert TalkStructure("banded", 5, bandwidth=np.int32(2)).offsets() == [-2, -1, 0, 1, 2]


# ============================================================================ AdapterConfig, files, official layout
class TwoProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(D_IN, D_IN), nn.Linear(D_IN, D_IN)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


CONFIG_STRUCTURES = {n: {k: v for k, v in kw.items() if k != "talk_init"} for n, kw in STRUCTURES.items()}


def injected(name, seed=0):
    torch.manual_seed(seed)
    model = TwoProj().to(DT)
    config = AdapterConfig(kind="talklora", rank=RANK, num_experts=E, target_modules=("q_proj", "v_proj"),
                           **CONFIG_STRUCTURES[name])
    inject(model, config)
    for layer in (model.q_proj, model.v_proj):
        randomize(layer, seed + 1)
    return model, config


@pytest.mark.parametrize("name", STRUCTURES)
def test_save_and_load_adapter_round_trip_the_structure_bit_identically(name, tmp_path):
    model, config = injected(name)
    assert model.q_proj.talk_structure == config.talk_structure
    assert AdapterConfig.from_json(config.to_json()) == config
    save_adapter(model, tmp_path, config)
    torch.manual_seed(9)
    fresh = TwoProj().to(DT)
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".base." in k})
    load_adapter(fresh, tmp_path)
    assert fresh.q_proj.talk_structure == config.talk_structure
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = tokens()
    assert torch.equal(fresh(x), model(x))


def test_save_adapter_refuses_a_config_with_another_structure(tmp_path):
    model, config = injected("block-2")
    other = AdapterConfig(**{**config.to_dict(), "talk_groups": 3})
    with pytest.raises(ValueError, match=r"talk_groups is 2 in the model but 3 in the config"):
        save_adapter(model, tmp_path, other)


@pytest.mark.parametrize("name", [n for n in STRUCTURES if n != "full"])
def test_official_layout_refuses_every_structure_but_full(name):
    model, _ = injected(name)
    structure = model.q_proj.talk_structure
    with pytest.raises(ValueError, match=rf"talk_structure='{structure}'; the official layout holds a free T"):
        export_official_state_dict(model)
    full, _ = injected("full")
    state = export_official_state_dict(full)
    with pytest.raises(ValueError, match=rf"talk_structure='{structure}'"):
        load_official_state_dict(model, state)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="moelora", talk_structure="broadcast"), "only meaningful for kind='talklora'"),
    (dict(kind="lora", talk_groups=2), "only meaningful for kind='talklora'"),
    (dict(kind="talklora", num_experts=4, talk_structure="block", talk_groups=3),
     r"AdapterConfig.talk_groups must be a positive integer dividing num_experts=4"),
    (dict(kind="talklora", num_experts=4, talk_structure="circle"), "AdapterConfig.talk_structure must be one of"),
    (dict(kind="talklora", num_experts=4, talk_structure="low-rank"), r"AdapterConfig.talk_rank must be an integer in \[1"),
])
def test_adapter_config_validates_the_structure_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(rank=8, **kwargs)
