"""Routing records (docs/method.md §4): exact concatenation, masking, hook hygiene."""
import pytest
import torch
from torch import nn

from talklora_min import AdapterConfig, MoELoRALinear, TalkLoRALinear, adapter_layers, inject
from talklora_min.probes import gini, record_routing, soft_load




class Tiny(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, attention_mask=None):
        return self.o_proj(torch.relu(self.q_proj(x)) + self.v_proj(x))


def tiny_model(seed=0, **cfg):
    torch.manual_seed(seed)
    model = Tiny()
    inject(model, AdapterConfig(**{"kind": "talklora", "rank": 8, "num_experts": 4,
                                   "target_modules": ("q_proj", "v_proj", "o_proj"), **cfg}))
    return model.eval()


def hooks_installed(model):
    return sum(len(m._routing_hooks) for m in adapter_layers(model).values())


def test_records_of_several_forwards_concatenate_exactly():
    model = tiny_model()
    x1, x2 = torch.randn(2, 5, 16), torch.randn(3, 4, 16)
    with record_routing(model) as rec:
        model(x1)
        model(x2)
    assert rec.layer_names == ["q_proj", "v_proj", "o_proj"]
    for name in ("q_proj", "v_proj"):
        layer = model.get_submodule(name)
        want = torch.cat([layer.gates(x1).reshape(-1, 4), layer.gates(x2).reshape(-1, 4)]).float()
        assert torch.equal(rec.gates(name), want.detach())
        want_logits = torch.cat([layer.router_logits(x1).reshape(-1, 4), layer.router_logits(x2).reshape(-1, 4)])
        assert torch.equal(rec.logits(name), want_logits.float().detach())
        assert rec.num_forwards(name) == 2
    g = rec.gates("q_proj")
    assert g.shape == (22, 4) and g.dtype == torch.float32 and g.device.type == "cpu" and not g.requires_grad
    assert torch.equal(rec.top1("q_proj"), g.argmax(-1))
    assert rec.pooled_gates().shape == (66, 4)
    assert torch.equal(rec.load("v_proj"), soft_load(rec.gates("v_proj")))
    assert 0.0 <= gini(rec.load("v_proj", "hard")) <= 0.75


def test_mask_excludes_padding_and_applies_to_following_forwards():
    model = tiny_model()
    x1, x2 = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mask1 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layer = model.q_proj
    with record_routing(model, attention_mask=mask1) as rec:
        model(x1)
        rec.set_mask(None)
        model(x2)
    want = torch.cat([layer.gates(x1)[mask1.bool()], layer.gates(x2).reshape(-1, 4)]).float().detach()
    assert torch.equal(rec.gates("q_proj"), want)
    assert rec.gates("q_proj").shape[0] == 8 + 10
    assert rec.mask("q_proj").sum() == 18 and rec.mask("q_proj").numel() == 20
    # padding content cannot leak into any statistic
    x1_padded = x1.clone()
    x1_padded[0, 3:] = 1e3
    with record_routing(model, attention_mask=mask1) as rec2:
        model(x1_padded)
    assert torch.equal(rec2.gates("q_proj"), layer.gates(x1)[mask1.bool()].float().detach())


def test_mask_shape_mismatch_raises_and_hooks_removed_on_exception():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"mask has shape \(3, 5\).*leading shape \(2, 5\)"):
        with record_routing(model, attention_mask=torch.ones(3, 5)):
            model(torch.randn(2, 5, 16))
    assert hooks_installed(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with record_routing(model):
            assert hooks_installed(model) == 3
            raise RuntimeError("boom")
    assert hooks_installed(model) == 0
    with pytest.raises(ValueError, match="only 0/1"):
        with record_routing(model, attention_mask=torch.tensor([[0.5, 1.0]])):
            pass


def test_single_layer_topk_and_errors():
    layer = MoELoRALinear(nn.Linear(8, 8), 8, 4, top_k=2)
    x = torch.randn(6, 8)
    with record_routing(layer) as rec:
        layer(x)
    assert rec.layer_names == ["layer"]
    idx = rec.topk_indices()
    assert idx.shape == (6, 2)
    assert torch.equal(idx.sort(-1).values, layer.router_logits(x).topk(2, -1).indices.sort(-1).values)
    g = rec.gates()
    assert torch.allclose(g.sum(-1), torch.ones(6)) and ((g > 0).sum(-1) == 2).all()
    dense = TalkLoRALinear(nn.Linear(8, 8), 8, 4)
    with record_routing(dense) as rec:
        with pytest.raises(ValueError, match="no records"):
            rec.gates()
        dense(x)
    with pytest.raises(ValueError, match="dense routing"):
        rec.topk_indices()
    with pytest.raises(KeyError, match="recorded layers"):
        rec.gates("nope")
    with pytest.raises(ValueError, match="no routed adapter layer"):
        with record_routing(nn.Linear(3, 3)):
            pass


def test_records_stay_on_device_when_asked_and_gate_dropout_not_recorded():
    layer = TalkLoRALinear(nn.Linear(8, 8), 8, 4, dropout=0.5, gate_dropout=True).train()
    x = torch.randn(50, 8)
    with record_routing(layer, device=None) as rec:
        layer(x)
    assert torch.allclose(rec.gates().sum(-1), torch.ones(50))   # recorded before gate dropout


def test_model_call_attention_mask_is_followed():
    model = tiny_model()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with record_routing(model) as rec:
        model(x, attention_mask=mask)            # no mask given to the recorder: the kwarg is used
        model(x[:, -2:], attention_mask=mask)    # a decode-style call: its last 2 columns
    want = torch.cat([model.q_proj.gates(x)[mask.bool()], model.q_proj.gates(x[:, -2:]).reshape(-1, 4)])
    torch.testing.assert_close(rec.gates("q_proj"), want.float().detach())
    explicit = torch.ones(2, 5, dtype=torch.bool)
    with record_routing(model, attention_mask=explicit) as rec:
        model(x, attention_mask=mask)            # a recorder mask that fits takes precedence
    assert rec.gates("q_proj").shape == (10, 4)


class SparseMoeBlock(nn.Module):
    """A MoE block in the old transformers style: ``gate`` is an nn.Linear over flattened tokens."""

    def __init__(self, d=16, n_experts=4):
        super().__init__()
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(n_experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        g = torch.softmax(self.gate(flat), -1)
        out = sum(g[:, e:e + 1] * expert(flat) for e, expert in enumerate(self.experts))
        return out.reshape(x.shape)


def test_linear_gate_of_a_moe_block_is_a_router_and_flat_inputs_take_the_mask():
    torch.manual_seed(0)
    model = nn.Sequential(SparseMoeBlock(), nn.Linear(16, 16))
    x = torch.randn(2, 3, 16)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with record_routing(model, attention_mask=mask) as rec:
        model(x)
    assert rec.layer_names == ["0.gate"]
    want = torch.softmax(model[0].gate(x), -1)[mask.bool()]
    torch.testing.assert_close(rec.gates("0.gate"), want.detach())
    assert rec.load("0.gate").sum().item() == pytest.approx(3.0)
