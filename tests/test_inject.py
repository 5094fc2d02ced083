"""inject(): target matching, freezing, tied B, parameter counts; AdapterConfig validation/JSON."""
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from talklora_min import (AdapterConfig, LoRALinear, MoELoRALinear, TalkLoRALinear, adapter_layers,
                          count_parameters, inject)

D = 8


def mlp(blocks: int = 2) -> nn.Module:
    """blockN.{up_proj (8->16), act, down_proj (16->8)}, plus an un-targeted head."""
    torch.manual_seed(0)
    layers = OrderedDict()
    for i in range(blocks):
        layers[f"block{i}"] = nn.Sequential(OrderedDict(
            up_proj=nn.Linear(D, 2 * D), act=nn.ReLU(), down_proj=nn.Linear(2 * D, D)))
    layers["head"] = nn.Linear(D, 3)
    return nn.Sequential(layers)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------- matching
@pytest.mark.parametrize("match, targets, expected", [
    ("exact", ["block0.up_proj"], ["block0.up_proj"]),
    ("exact", ["block1.down_proj", "head"], ["block1.down_proj", "head"]),
    ("suffix", ["up_proj"], ["block0.up_proj", "block1.up_proj"]),
    ("suffix", ["block1.down_proj"], ["block1.down_proj"]),
    ("regex", [r"block\d+\.(up|down)_proj"], ["block0.up_proj", "block0.down_proj",
                                              "block1.up_proj", "block1.down_proj"]),
    ("regex", [r"block1\..*", "head"], ["block1.up_proj", "block1.down_proj", "head"]),
])
def test_matching_modes(match, targets, expected):
    model = mlp()
    report = inject(model, AdapterConfig(kind="lora", rank=2, target_modules=targets, target_match=match))
    assert report.matched == expected
    assert list(adapter_layers(model)) == expected
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in expected)
    assert sum(len(v) for v in report.matched_by_pattern.values()) >= len(expected)


def test_suffix_does_not_match_partial_names():
    model = mlp()
    with pytest.raises(ValueError, match="'proj'"):
        inject(model, AdapterConfig(kind="lora", rank=2, target_modules=["proj"]))


@pytest.mark.parametrize("match, pattern", [("exact", "up_proj"), ("regex", "up_proj"),
                                            ("suffix", "gate_proj")])
def test_pattern_matching_nothing_raises_naming_it(match, pattern):
    model = mlp()
    with pytest.raises(ValueError, match=f"target pattern '{pattern}' \\({match} match\\) matched no"):
        inject(model, AdapterConfig(kind="lora", rank=2, target_modules=[pattern], target_match=match))
    assert not adapter_layers(model)            # nothing was replaced


def test_invalid_regex():
    with pytest.raises(ValueError, match=r"invalid regex '\(up'"):
        AdapterConfig(target_modules=["(up"], target_match="regex")


def test_llama_official_targets():
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 5))
    before = model(x).logits
    report = inject(model, AdapterConfig.official(rank=8))
    assert len(report.matched) == 2 * 5
    parents = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "up_proj": "mlp",
               "down_proj": "mlp"}
    for target, parent in parents.items():
        assert report.matched_by_pattern[target] == [f"model.layers.{i}.{parent}.{target}" for i in range(2)]
    assert all(isinstance(m, TalkLoRALinear) for m in adapter_layers(model).values())
    # B = 0 at init: the adapted model computes exactly the base model
    assert torch.equal(model(x).logits, before)
    assert set(report.shared_B_groups) == {f"model.layers.*.{parent}.{t}" for t, parent in parents.items()}


def test_double_injection_raises():
    model = mlp()
    inject(model, AdapterConfig(kind="lora", rank=2, target_modules=["up_proj"]))
    with pytest.raises(ValueError, match="already has adapter layers"):
        inject(model, AdapterConfig(kind="lora", rank=2, target_modules=["down_proj"]))


def test_type_errors():
    with pytest.raises(TypeError, match="config must be an AdapterConfig"):
        inject(mlp(), {"kind": "lora"})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        inject("model", AdapterConfig())


# ----------------------------------------------------------------------------- freezing, counts
@pytest.mark.parametrize("kind", ["lora", "moelora", "talklora"])
def test_only_adapter_parameters_trainable(kind):
    model = mlp()
    inject(model, AdapterConfig(kind=kind, rank=4, num_experts=2, target_modules=["up_proj", "down_proj"]))
    names = {"lora": {"A", "B"}, "moelora": {"A", "B", "C", "W_r"}, "talklora": {"A", "B", "C", "T", "W_r"}}[kind]
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.rpartition(".")[2] in names), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * len(names)


def test_count_parameters_talklora_untied():
    model = mlp()
    r, E = 4, 2
    inject(model, AdapterConfig(kind="talklora", rank=r, num_experts=E, target_modules=["up_proj"]))
    m = r // E
    per_layer = r * D + E * m * m + E * E + E * r + 2 * D * r      # A + C + T + W_r + B (d_out = 16)
    assert count_parameters(model) == 2 * per_layer
    base = sum(p.numel() for p in mlp().parameters())
    assert count_parameters(model, trainable_only=False) == base + 2 * per_layer


def test_share_B_across_layers_llama():
    model = tiny_llama()
    r, E = 8, 4
    report = inject(model, AdapterConfig.official(rank=r, dropout=0.0, gate_dropout=False))
    layers = adapter_layers(model)
    assert len(report.shared_B_groups) == 5
    for group in report.shared_B_groups:
        members = [layers[n] for n in report.shared_B_groups[group]]
        assert len(members) == 2
        assert all(layer.B is members[0].B for layer in members)
    # exact count: per layer A + C + T + W_r, plus B = (E, d_out, m) once per projection type
    m, cfg = r // E, model.config
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    d_in = {"q_proj": 32, "k_proj": 32, "v_proj": 32, "up_proj": 32, "down_proj": 64}
    d_out = {"q_proj": 32, "k_proj": kv, "v_proj": kv, "up_proj": 64, "down_proj": 32}
    per_layer = sum(r * d_in[t] + E * m * m + E * E + E * r for t in d_in)
    expected = 2 * per_layer + sum(d_out[t] * r for t in d_out)
    assert count_parameters(model) == report.trainable_parameters == expected

    # one gradient step moves the tied B of both q_proj layers together
    q0, q1 = (layers[f"model.layers.{i}.self_attn.q_proj"] for i in range(2))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = q0.B.detach().clone()
    model(torch.randint(0, 64, (2, 6))).logits.pow(2).mean().backward()
    assert q0.B.grad is not None and q0.B.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(q0.B, before)
    assert torch.equal(q0.B, q1.B) and q0.B is q1.B


def test_share_B_shape_mismatch_raises():
    # up_proj layers with different d_out cannot share B
    model = nn.Sequential(OrderedDict(layers=nn.ModuleList([
        nn.Sequential(OrderedDict(up_proj=nn.Linear(4, 8))), nn.Sequential(OrderedDict(up_proj=nn.Linear(4, 6)))])))
    with pytest.raises(ValueError, match=r"'layers\.\*\.up_proj' layers have different output sizes"):
        inject(model, AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules=["up_proj"],
                                    share_B_across_layers=True))
    # the check runs before any replacement: the model is untouched and still trainable
    assert not adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_injected_layer_hyperparameters():
    model = mlp()
    inject(model, AdapterConfig(kind="moelora", rank=6, num_experts=3, router_input="input", alpha=12.0,
                                top_k=2, target_modules=["head"]))
    layer = model.head
    assert isinstance(layer, MoELoRALinear) and not isinstance(layer, TalkLoRALinear)
    assert (layer.rank, layer.num_experts, layer.expert_rank, layer.top_k) == (6, 3, 2, 2)
    assert layer.scaling == 2.0 and layer.router_input == "input"
    assert tuple(layer.W_g.shape) == (3, D)


# ----------------------------------------------------------------------------- AdapterConfig
configs = st.builds(
    AdapterConfig,
    kind=st.sampled_from(["lora", "moelora", "talklora"]),
    rank=st.sampled_from([4, 8, 12]),
    num_experts=st.sampled_from([1, 2, 4]),
    target_modules=st.lists(st.sampled_from(["q_proj", "v_proj", "fc1"]), min_size=1, max_size=3, unique=True),
    alpha=st.none() | st.floats(0.5, 64),
    dropout=st.sampled_from([0.0, 0.05]),
    talk_init=st.sampled_from(["official", "identity", "uniform-mix:0.25"]) | st.floats(0, 1),
    share_B_across_layers=st.booleans(),
)


@given(configs)
def test_config_json_round_trip(config):
    text = config.to_json()
    again = AdapterConfig.from_json(text)
    assert again == config
    assert again.to_json() == text


@pytest.mark.parametrize("data, field", [
    ({"kind": "qlora"}, "AdapterConfig.kind"),
    ({"rank": 6, "num_experts": 4}, "rank \\(6\\) must be divisible by num_experts \\(4\\)"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"target_match": "glob"}, "AdapterConfig.target_match"),
    ({"target_modules": []}, "AdapterConfig.target_modules"),
    ({"alpha": -1.0}, "alpha must be None"),
    ({"dropout": 1.5}, "dropout must be a probability"),
    ({"router_input": "token"}, "router_input must be one of"),
    ({"kind": "talklora", "router_input": "input"}, "AdapterConfig.router_input must be 'code'"),
    ({"talk_init": "random"}, "talk_init must be one of"),
    ({"top_k": 5, "num_experts": 4}, "top_k \\(5\\) must be at most num_experts \\(4\\)"),
    ({"share_B_across_layers": "yes"}, "share_B_across_layers must be booleans"),
])
def test_config_bad_values_name_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        AdapterConfig.from_dict(data)


def test_config_unknown_field():
    with pytest.raises(ValueError, match=r"unknown AdapterConfig field\(s\) \['num_expert'\]"):
        AdapterConfig.from_json('{"num_expert": 4}')


def test_official_config():
    config = AdapterConfig.official()
    assert (config.kind, config.rank, config.num_experts, config.alpha) == ("talklora", 32, 4, None)
    assert config.share_B_across_layers and config.gate_dropout and config.dropout == 0.05
    assert AdapterConfig.official(rank=8).rank == 8


def test_share_B_groups_by_projection_type_not_last_name():
    """BERT names both FFN projections '...dense': they must form two groups, not one."""
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32))
    report = inject(model, AdapterConfig(kind="talklora", rank=4, num_experts=2, share_B_across_layers=True,
                                         target_modules=[r"encoder\.layer\.\d+\.(intermediate|output)\.dense"],
                                         target_match="regex"))
    assert sorted(report.shared_B_groups) == ["encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"]
    layers = adapter_layers(model)
    assert layers["encoder.layer.0.intermediate.dense"].B is layers["encoder.layer.1.intermediate.dense"].B
    assert layers["encoder.layer.0.output.dense"].B is not layers["encoder.layer.0.intermediate.dense"].B
