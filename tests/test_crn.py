"""Common random numbers (docs/method.md §5, training protocol): for one seed every method draws the same A, C, B, W_r,
head init and batch order in every adapted layer; T and W_g come from their own keyed streams; the
scale-matched control and the function-matched twin are built from the same draws.

A tiny random BERT stands in for MiniLM (the CRN logic only reads layer names and shapes)."""
import pytest
import torch
from torch import nn

from analysis import train
from talklora_min import adapter_layers
from talklora_min.layers import absorbed_router

transformers = pytest.importorskip("transformers")

CODE_ROUTED = ("moelora-code", "talklora-official", "switch", "topk-entropy")   # W_r as drawn
MOE = CODE_ROUTED + ("moelora-input", "talklora-identity", "moelora-code-scaled", "moelora-twin")
ADAPTED = ("lora",) + MOE


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


def cfg(**overrides):
    base = dict(rank=8, num_experts=4, alpha=0.0, dropout=0.0, adapt_top_layers=2, targets=["query", "value", "up"],
                matched_budget="same-rank")
    return {**base, **overrides}


def build(method, seed, encoder, **overrides):
    return train.build_model(method, seed, cfg(**overrides), encoder, num_labels=3)


def weights(model):
    return {train.short_name(n): layer.get_weights() for n, layer in adapter_layers(model).items()}


def test_every_method_draws_the_same_tensors_in_every_layer(encoder):
    models = {m: build(m, 5, encoder) for m in ADAPTED + ("head-only",)}
    ref = weights(models["moelora-code"])
    assert sorted(ref) == ["L1.query", "L1.up", "L1.value", "L2.query", "L2.up", "L2.value"]
    for method in ADAPTED:
        w = weights(models[method])
        assert sorted(w) == sorted(ref), method
        for layer, tensors in w.items():
            torch.testing.assert_close(tensors["A"], ref[layer]["A"], rtol=0, atol=0, msg=f"{method} {layer} A")
            assert not tensors["B"].any(), f"{method} {layer}: B must start at 0"
            if method != "lora":
                torch.testing.assert_close(tensors["C"], ref[layer]["C"], rtol=0, atol=0)
            if method in CODE_ROUTED + ("talklora-identity",):
                torch.testing.assert_close(tensors["W_r"], ref[layer]["W_r"], rtol=0, atol=0)
    for method, model in models.items():       # the head too, for every method incl. head-only
        torch.testing.assert_close(model.head.weight, models["lora"].head.weight, rtol=0, atol=0, msg=method)
        torch.testing.assert_close(model.head.bias, models["lora"].head.bias, rtol=0, atol=0, msg=method)
    # different layers and different seeds draw different tensors
    assert not torch.equal(ref["L1.query"]["A"], ref["L2.query"]["A"])
    assert not torch.equal(ref["L1.query"]["A"], weights(build("moelora-code", 6, encoder))["L1.query"]["A"])


def test_draws_do_not_depend_on_the_global_rng_or_on_what_was_built_before(encoder):
    torch.manual_seed(0)
    a = weights(build("talklora-official", 2, encoder))
    torch.manual_seed(123)
    torch.rand(1000)
    build("moelora-input", 9, encoder)                        # consumes nothing shared
    b = weights(build("talklora-official", 2, encoder))
    for layer in a:
        for name in a[layer]:
            torch.testing.assert_close(a[layer][name], b[layer][name], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["talklora-low-rank", "talklora-doubly-stochastic", "talklora-banded"])
def test_structure_starts_come_from_the_seed_stream_not_the_global_rng(encoder, method):
    """Low-rank's random V (and every structure's start) is keyed by (seed, layer, "talk"): the same
    seed gives the same tensors whatever the global RNG did before, another seed other V."""
    torch.manual_seed(0)
    a = {k: layer.get_weights() for k, layer in adapter_layers(build(method, 3, encoder)).items()}
    torch.manual_seed(987)
    torch.rand(4321)
    b = {k: layer.get_weights() for k, layer in adapter_layers(build(method, 3, encoder)).items()}
    for layer in a:
        for name in a[layer]:
            torch.testing.assert_close(a[layer][name], b[layer][name], rtol=0, atol=0, msg=f"{layer} {name}")
        torch.testing.assert_close(a[layer]["T"], torch.eye(4), rtol=0, atol=0)     # identity point
    if method == "talklora-low-rank":
        c = {k: layer.get_weights() for k, layer in adapter_layers(build(method, 4, encoder)).items()}
        layer = next(iter(a))
        assert a[layer]["talk_V"].abs().min() > 0
        assert not torch.equal(a[layer]["talk_V"], c[layer]["talk_V"])
        expected = torch.empty(4, 1).uniform_(-0.5, 0.5, generator=train.crn_generator(3, train.short_name(layer), "talk"))
        torch.testing.assert_close(a[layer]["talk_V"], expected, rtol=0, atol=0)


def test_talk_and_input_router_come_from_their_own_streams(encoder):
    talk = weights(build("talklora-official", 1, encoder))
    inp = weights(build("moelora-input", 1, encoder))
    code = weights(build("moelora-code", 1, encoder))
    for layer in talk:
        torch.testing.assert_close(talk[layer]["T"], train.official_talk(4, 1, layer), rtol=0, atol=0)
        bound = 4 ** -0.5
        assert talk[layer]["T"].abs().max() <= bound and not torch.equal(talk[layer]["T"], torch.eye(4))
        d_in = inp[layer]["W_g"].shape[1]
        assert inp[layer]["W_g"].abs().max() <= d_in ** -0.5
        # T is the first draw of its own keyed stream (seed, layer, "T"), computed here from the key
        # itself (not through train.official_talk, which a wrong key would change too) ...
        expected = torch.empty(4, 4).uniform_(-bound, bound, generator=train.crn_generator(1, layer, "T"))
        torch.testing.assert_close(talk[layer]["T"], expected, rtol=0, atol=0)
        # ... and not a rescaled piece of W_r's stream (U(±b) draws of one stream differ only by the scale b)
        w_r = code[layer]["W_r"].flatten()[:16] / 8 ** -0.5
        assert not torch.allclose(talk[layer]["T"].flatten() / bound, w_r, atol=1e-6)
        assert not torch.equal(inp[layer]["W_g"].flatten()[:d_in], code[layer]["A"][0])
    assert not torch.equal(talk["L1.query"]["T"], talk["L2.query"]["T"])
    g1 = train.crn_generator(1, "L1.query", "T")
    g2 = train.crn_generator(1, "L1.query", "W_r")
    assert not torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))


def test_scale_matched_control_and_twin_are_built_from_the_same_draws(encoder):
    talk = build("talklora-official", 4, encoder)
    scaled = weights(build("moelora-code-scaled", 4, encoder))
    twin = weights(build("moelora-twin", 4, encoder))
    code = weights(build("moelora-code", 4, encoder))
    norm = lambda W: torch.linalg.matrix_norm(W.double(), ord=2)
    for name, layer in adapter_layers(talk).items():
        key = train.short_name(name)
        W_eff = layer.effective_router().detach()
        W_r = code[key]["W_r"]
        # the control: same direction as W_r, the spectral norm of TalkLoRA's W_r (T ⊗ I)
        torch.testing.assert_close(norm(scaled[key]["W_r"]), norm(W_eff), rtol=1e-5, atol=0)
        ratio = scaled[key]["W_r"] / W_r
        torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5, atol=0)
        assert abs(float(norm(W_eff) / norm(W_r)) - 1) > 1e-3          # it is a real rescaling
        # the twin: the absorbed router of the same seed's T
        torch.testing.assert_close(twin[key]["W_r"], absorbed_router(W_r, layer.T.detach(), 2), rtol=1e-6, atol=1e-7)


def test_twin_computes_talklora_official_at_step_0_and_identity_talk_equals_moelora_code(encoder):
    hidden, mask = torch.randn(3, 7, 32), torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    out = {}
    for m in ("talklora-official", "moelora-twin", "talklora-identity", "moelora-code"):
        model = build(m, 8, encoder).eval()
        for layer in adapter_layers(model).values():        # B = 0 at init: give the experts an output
            layer.set_weights(B=torch.ones_like(layer.B) * 0.1)
        with torch.no_grad():
            out[m] = model.forward_top(hidden, mask)
    torch.testing.assert_close(out["moelora-twin"], out["talklora-official"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["talklora-identity"], out["moelora-code"], rtol=0, atol=1e-5)
    assert (out["talklora-official"] - out["moelora-code"]).abs().max() > 1e-4


def test_batch_order_is_shared_by_methods_and_covers_each_epoch():
    a = train.batch_order(50, 8, 20, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, train.batch_order(50, 8, 20, seed=3)))
    assert not all(torch.equal(x, y) for x, y in zip(a, train.batch_order(50, 8, 20, seed=4)))
    first_epoch = torch.cat(a)[:48]
    assert len(first_epoch.unique()) == 48 and all(len(b) == 8 for b in a)


def test_other_ranks_read_the_same_streams_with_other_shapes(encoder):
    w8 = weights(build("lora", 0, encoder, rank=8))
    w4 = weights(build("lora", 0, encoder, rank=4))
    assert w8["L1.query"]["A"].shape == (8, 32) and w4["L1.query"]["A"].shape == (4, 32)
    # same key, same stream: the smaller tensor is the start of the larger draw (row-major fill)
    torch.testing.assert_close(w4["L1.query"]["A"].flatten(), w8["L1.query"]["A"].flatten()[:128], rtol=0, atol=0)


def test_unknown_method_is_rejected(encoder):
    with pytest.raises(ValueError, match="method must be one of"):
        build("dora", 0, encoder)
