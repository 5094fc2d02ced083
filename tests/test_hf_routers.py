"""record_routing on transformers' MoE base models, user-named routers, masks during generate, and
compiled modules (issue 11 item 5).  Tiny random models built from configs; nothing is downloaded."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from talklora_min import AdapterConfig, inject  # noqa: E402
from talklora_min.probes import gini, record_routing, routed_layers, top1_churn  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64)


def mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2))


def qwen2_moe():
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **SMALL, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        num_experts=4, num_experts_per_tok=2))


def olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **SMALL, intermediate_size=48, num_experts=4, num_experts_per_tok=2))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, intermediate_size=48))


def batch(seed=0, lengths=(6, 4)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, max(lengths) - n:] = 1        # left padding, as for generation
    return ids, mask


@pytest.mark.parametrize("make", [mixtral, qwen2_moe, olmoe], ids=["mixtral", "qwen2_moe", "olmoe"])
def test_moe_base_routers_are_recorded(make):
    torch.manual_seed(0)
    model = make().eval()
    names = list(routed_layers(model))
    assert len(names) == 2 and all(n.endswith("mlp.gate") for n in names)
    ids, mask = batch()
    seen = {}

    def spy(name):
        def hook(module, args, out):
            seen[name] = out[0].detach()
        return hook
    handles = [model.get_submodule(n).register_forward_hook(spy(n)) for n in names]
    with record_routing(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    n_real = int(mask.sum())
    for name in names:
        gates = rec.gates(name)
        assert gates.shape == (n_real, 4)
        # gates = softmax over all experts of the router's logits of the real tokens (flattened input)
        expected = torch.softmax(seen[name].float(), -1)[mask.reshape(-1).bool()]
        torch.testing.assert_close(gates, expected)
        assert rec.load(name).sum().item() == pytest.approx(n_real)
        # top-k indices come from the router's own output and are the k largest gates
        top = rec.topk_indices(name)
        assert top.shape == (n_real, 2)
        assert torch.equal(top.sort(-1).values, gates.topk(2, -1).indices.sort(-1).values)
        assert 0 <= gini(rec.load(name)) < 1


def test_moe_base_routers_next_to_adapters():
    torch.manual_seed(0)
    model = mixtral()
    inject(model, AdapterConfig(rank=4, num_experts=2, target_modules=("q_proj",)))
    names = list(routed_layers(model))
    assert sum(n.endswith("q_proj") for n in names) == 2 and sum(n.endswith("mlp.gate") for n in names) == 2
    ids, mask = batch()
    with record_routing(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    assert {rec.gates(n).shape[1] for n in names} == {2, 4}


def test_user_named_router():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scorer = nn.Linear(8, 3)
            self.out = nn.Linear(8, 8)

        def forward(self, x):
            w = torch.softmax(self.scorer(x), -1)
            return self.out(x) * w.sum(-1, keepdim=True)

    torch.manual_seed(0)
    block = Block()
    with pytest.raises(ValueError, match="no routed adapter layer .* and no MoE router"):
        routed_layers(block)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        routed_layers(block, routers=["nope"])
    with pytest.raises(ValueError, match="routers must be"):
        routed_layers(block, routers=[3])
    x = torch.randn(2, 5, 8)
    with record_routing(block, routers="scorer") as rec:
        block(x)
    torch.testing.assert_close(rec.gates("scorer"), torch.softmax(block.scorer(x), -1).reshape(-1, 3).detach())


@pytest.mark.parametrize("make,inject_first", [(mixtral, False), (llama, True)], ids=["mixtral", "llama-moelora"])
def test_masks_follow_generate(make, inject_first):
    """Prefill and every decode step are recorded; left padding never counts (issue 11)."""
    torch.manual_seed(0)
    model = make().eval()
    if inject_first:
        inject(model, AdapterConfig(kind="moelora", rank=4, num_experts=2, target_modules=("q_proj",)))
    ids, mask = batch(lengths=(6, 3))
    new = 3
    with record_routing(model, attention_mask=mask) as rec:       # the initial mask fits the prefill only
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    assert out.shape == (2, 6 + new)
    name = rec.layer_names[0]
    assert rec.num_forwards(name) == new                       # prefill + (new - 1) decode steps
    # every real prompt token plus the new tokens that were fed back: (new - 1) per sequence
    assert rec.gates(name).shape[0] == int(mask.sum()) + 2 * (new - 1)
    # the records of the real tokens equal those of an unpadded run of each sequence alone
    with record_routing(model) as alone:
        model(input_ids=ids[1:, -3:])
    torch.testing.assert_close(rec.gates(name)[6:9], alone.gates(name), atol=1e-5, rtol=1e-4)


def test_compiled_module_records_or_warns():
    torch.manual_seed(0)
    model = llama().eval()
    inject(model, AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules=("q_proj",)))
    ids, _ = batch(lengths=(5, 5))
    with torch.no_grad():
        with record_routing(model) as eager:
            model(input_ids=ids)
        compiled = torch.compile(model, backend="eager")
        compiled(input_ids=ids)                           # compiled before the recorder opens
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with record_routing(compiled) as rec:
                compiled(input_ids=ids)
    torch._dynamo.reset()
    silent = [n for n in rec.layer_names if rec.num_forwards(n) == 0]
    if silent:
        assert any("recorded nothing" in str(w.message) for w in caught)
    else:
        for name in eager.layer_names:
            torch.testing.assert_close(rec.gates("_orig_mod." + name), eager.gates(name))
            assert top1_churn(rec.gates("_orig_mod." + name), eager.gates(name)) == 0.0


def test_recorder_warns_when_a_hook_never_fires():
    torch.manual_seed(0)
    model = llama().eval()
    inject(model, AdapterConfig(kind="moelora", rank=4, num_experts=2, target_modules=("q_proj",)))
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.warns(RuntimeWarning, match="recorded nothing"):
        with record_routing(model) as rec:
            layer._routing_hooks.clear()                   # what a stale compiled graph amounts to
            model(input_ids=batch()[0])
    assert rec.num_forwards("model.layers.1.self_attn.q_proj") == 1


def test_record_routing_argument_errors():
    model = llama()
    inject(model, AdapterConfig(kind="moelora", rank=4, num_experts=2, target_modules=("q_proj",)))
    with pytest.raises(TypeError, match="attention_mask must be None, a torch.Tensor"):
        with record_routing(model, attention_mask=[[1, 1]]):
            pass
    with pytest.raises(TypeError, match="attention_mask must be None, a torch.Tensor"):
        with record_routing(model, attention_mask="all"):
            pass
    with pytest.raises(TypeError, match="device must be"):
        with record_routing(model, device=3):
            pass
