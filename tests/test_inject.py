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
    ({"rank": [8]}, "rank must be a positive integer"),
    ({"rank": None}, "rank must be a positive integer"),
    ({"rank": "8"}, "rank must be a positive integer"),
    ({"rank": 8.0}, "rank must be a positive integer"),
    ({"num_experts": True}, "num_experts must be a positive integer"),
    ({"alpha": "16"}, "alpha must be None"),
    ({"alpha": float("nan")}, "alpha must be None"),
    ({"dropout": None}, "dropout must be a probability"),
    ({"target_modules": [3]}, "AdapterConfig.target_modules"),
    ({"aux_loss_weight": -0.1, "balance_loss": "switch"}, "aux_loss_weight must be a finite number"),
    ({"aux_loss_weight": float("inf"), "balance_loss": "switch"}, "aux_loss_weight must be a finite number"),
    ({"aux_loss_weight": "0.1", "balance_loss": "switch"}, "aux_loss_weight must be a finite number"),
    ({"aux_loss_weight": 0.1}, "aux_loss_weight > 0 needs a balance loss"),
    ({"aux_loss_weight": 0.1, "balance_loss": "switch", "kind": "lora"}, "aux_loss_weight > 0 needs"),
    ({"modules_to_save": [""]}, "AdapterConfig.modules_to_save"),
    ({"modules_to_save": None}, "AdapterConfig.modules_to_save"),
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


# ----------------------------------------------------------------------------- issue 11 / 12 (inject)
def test_config_new_fields_round_trip_and_numpy_scalars():
    np = pytest.importorskip("numpy")
    config = AdapterConfig(rank=np.int64(8), num_experts=np.int32(2), alpha=np.float32(16.0),
                           dropout=np.float64(0.1), top_k=np.int64(1), balance_loss="cv",
                           aux_loss_weight=np.float32(0.5), modules_to_save=["head"], target_modules=None)
    assert (type(config.rank), type(config.num_experts), type(config.alpha), type(config.top_k)) == \
        (int, int, float, int)
    assert config.aux_loss_weight == 0.5 and config.modules_to_save == ("head",)
    again = AdapterConfig.from_json(config.to_json())
    assert again == config and again.target_modules is None


def test_shared_module_is_adapted_once_and_stays_shared():
    torch.manual_seed(0)
    shared = nn.Linear(D, D)
    model = nn.ModuleDict({"a": nn.Sequential(OrderedDict(q_proj=shared)),
                           "b": nn.Sequential(OrderedDict(k_proj=shared))})
    report = inject(model, AdapterConfig(kind="lora", rank=2, target_modules=("q_proj",)))
    assert report.matched == ["a.q_proj"]
    assert model["a"].q_proj is model["b"].k_proj and isinstance(model["b"].k_proj, LoRALinear)
    assert model["a"].q_proj.base is shared
    assert count_parameters(model) == 2 * D + D * 2           # A and B once


def test_multihead_attention_out_proj_is_refused_before_any_change():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(D, 2), "fc": nn.Linear(D, D)})
    with pytest.raises(ValueError, match="MultiheadAttention reads out_proj.weight"):
        inject(model, AdapterConfig(kind="lora", rank=2, target_modules=("out_proj", "fc")))
    assert isinstance(model["fc"], nn.Linear) and all(p.requires_grad for p in model.parameters())


def test_parent_reading_weight_and_bias_keeps_working():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.wo = nn.Linear(D, D)

        def forward(self, x):
            return self.wo(x.to(self.wo.weight.dtype)) + self.wo.bias

    torch.manual_seed(0)
    model = Parent()
    base_w = model.wo.weight
    inject(model, AdapterConfig(kind="lora", rank=2, target_modules=("wo",)))
    assert model.wo.weight is base_w and model.wo.bias is model.wo.base.bias
    with torch.no_grad():
        model.wo.B.fill_(0.1)
    x = torch.randn(3, D)
    torch.testing.assert_close(model(x), model.wo.base(x) + model.wo.adapter_output(x) + model.wo.bias)


@pytest.mark.parametrize("layer", [nn.Linear(D, D), LoRALinear(nn.Linear(D, D), 2)], ids=["linear", "adapter"])
def test_bare_layer_as_model_gets_clear_error_and_is_not_frozen(layer):
    flags = [p.requires_grad for p in layer.parameters()]
    with pytest.raises(TypeError, match="model is itself a .*wrap it"):
        inject(layer, AdapterConfig(kind="lora", rank=2, target_modules=("x",)))
    assert [p.requires_grad for p in layer.parameters()] == flags


def test_tied_B_refuses_layers_of_different_dtypes():
    model = nn.Sequential(*[nn.Sequential(OrderedDict(up_proj=nn.Linear(D, D))) for _ in range(2)])
    model[1].up_proj.to(torch.float64)
    with pytest.raises(ValueError, match="different dtypes"):
        inject(model, AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules=("up_proj",),
                                    share_B_across_layers=True))
    assert all(isinstance(m.up_proj, nn.Linear) for m in model)


def test_tied_B_only_within_layer_stacks():
    """Two unrelated Linears of one nn.Sequential ('0', '1') are different types; stacked blocks tie."""
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Linear(D, D), nn.Linear(D, D))
    report = inject(flat, AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules=(r"\d+",),
                                        target_match="regex", share_B_across_layers=True))
    assert report.shared_B_groups == {} and flat[0].B is not flat[1].B
    stacked = nn.Sequential(*[nn.Sequential(OrderedDict(proj=nn.Linear(D, D))) for _ in range(3)])
    report = inject(stacked, AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules=("proj",),
                                           share_B_across_layers=True))
    assert report.shared_B_groups == {"*.proj": ["0.proj", "1.proj", "2.proj"]}
    assert stacked[2].proj.B is stacked[0].proj.B
    # registered once: the state dict and parameters hold B only in the first layer
    keys = [k for k in stacked.state_dict() if k.endswith(".B")]
    assert keys == ["0.proj.B"] and count_parameters(stacked) == 3 * (4 * D + 2 * 2 * 2 + 2 * 2 + 2 * 4) + 2 * D * 2


def test_modules_to_save_validation():
    with pytest.raises(ValueError, match="modules_to_save pattern 'nope'"):
        inject(mlp(), AdapterConfig(kind="lora", rank=2, target_modules=("up_proj",), modules_to_save=("nope",)))
    with pytest.raises(ValueError, match="overlap adapted target layers"):
        inject(mlp(), AdapterConfig(kind="lora", rank=2, target_modules=("up_proj",), modules_to_save=("block0",)))
    model = mlp()
    report = inject(model, AdapterConfig(kind="lora", rank=2, target_modules=("up_proj",), modules_to_save=("head",)))
    assert report.modules_to_save == ["head"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["block0.up_proj.A", "block0.up_proj.B", "block1.up_proj.A", "block1.up_proj.B",
                         "head.bias", "head.weight"]


def test_unload_merge_and_unload_disable_adapters():
    from talklora_min import disable_adapters, merge_and_unload, trainable_summary, unload
    x = torch.randn(5, D)
    model = mlp()
    bases = {n: model.get_submodule(n) for n in ("block0.up_proj", "block1.up_proj")}
    plain = model(x)
    inject(model, AdapterConfig(kind="lora", rank=2, target_modules=("up_proj",)))
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.B.normal_()
    adapted = model(x)
    assert (adapted - plain).abs().max() > 1e-3
    with disable_adapters(model):
        torch.testing.assert_close(model(x), plain)
    torch.testing.assert_close(model(x), adapted)
    summary = trainable_summary(model)
    assert f"trainable params: {2 * (2 * D + 2 * D * 2)} ||" in summary and "LoRALinear: 2 layers" in summary
    merged = merge_and_unload(model)
    assert merged is model and all(model.get_submodule(n) is m for n, m in bases.items())
    torch.testing.assert_close(model(x), adapted, atol=1e-6, rtol=0)

    moe = mlp()
    inject(moe, AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules=("up_proj",)))
    with pytest.raises(ValueError, match="merge_and_unload needs LoRA layers"):
        merge_and_unload(moe)
    assert len(adapter_layers(moe)) == 2
    unload(moe)
    assert not adapter_layers(moe)
    torch.testing.assert_close(moe(x), plain)


def test_aux_loss_weight_hook_on_dict_outputs():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, x):
            return {"loss": self.body(x).pow(2).mean(), "logits": self.body(x)}

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(6, D)
    inject(model, AdapterConfig(kind="moelora", rank=4, num_experts=2, target_modules=("up_proj", "down_proj"),
                                balance_loss="cv", aux_loss_weight=0.25))
    out = model(x)
    losses = [layer.aux_loss for layer in adapter_layers(model).values()]
    assert len(losses) == 4
    # the body runs twice per forward: the stored losses are those of the last run
    torch.testing.assert_close(out["aux_loss"], sum(losses) / 4)
    torch.testing.assert_close(out["loss"], model.body(x).pow(2).mean() + 0.25 * out["aux_loss"])
    from talklora_min import unload
    unload(model)
    assert "aux_loss" not in model(x)


def test_inject_keeps_eval_mode_of_the_replaced_modules():
    model = mlp().eval()
    inject(model, AdapterConfig(kind="talklora", rank=4, num_experts=2, dropout=0.5, target_modules=("up_proj",)))
    assert not any(layer.training for layer in adapter_layers(model).values())
    x = torch.randn(4, D)
    assert torch.equal(model(x), model(x))                     # no dropout in eval mode
