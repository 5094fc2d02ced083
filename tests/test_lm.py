"""Causal-LM experiment (analysis/lm.py): config, data, metrics, and — marked ``real_models`` —
the cached-prefix path against the full SmolLM2 model, common random numbers and a tiny run."""
import math

import pandas as pd
import pytest
import torch

from analysis import lm
from analysis.config import ConfigError, ExperimentConfig, LMConfig, load_profile


@pytest.mark.parametrize("field, bad, message", [
    ("methods", ["lora", "dora"], "lm.methods:"),
    ("seeds", [], "lm.seeds:"),
    ("eval_every", 1000, "lm.eval_every:"),
    ("adapt_top_layers", 31, "lm.adapt_top_layers:"),
    ("rank", 30, "lm.rank:"),
    ("n_test", 1300, "lm.n_test:"),
    ("lr", 0.0, "lm.lr:"),
    ("loss_every_eval", 1, "lm.loss_every_eval:"),
])
def test_lm_config_rejects_bad_values_naming_the_field(field, bad, message):
    with pytest.raises(ConfigError, match=message):
        LMConfig(**{field: bad})


def test_lm_profiles_round_trip_and_use_the_official_layout():
    for name in ("quick", "paper"):
        cfg = load_profile(name)
        assert ExperimentConfig.from_toml(cfg.to_toml()) == cfg
        assert (cfg.lm.rank, cfg.lm.num_experts, cfg.lm.dropout) == (32, 4, 0.05)
        assert len(cfg.lm.seeds) >= 8 and set(cfg.lm.methods) == {"lora", "moelora-code", "moelora-code-scaled",
                                                                 "moelora-twin", "talklora-official"}
    assert load_profile("paper").lm.lr == 3e-4


def test_lm_split_is_balanced_disjoint_and_deterministic():
    a, b = lm.make_lm_split(5, 3, seed=1), lm.make_lm_split(5, 3, seed=1)
    assert a.equals(b)
    sizes = a.groupby(["split", "domain_name"]).size()
    assert sizes.to_dict() == {(s, d): n for s, n in (("test", 3), ("train", 5)) for d in lm.DOMAINS}
    assert not set(a[a.split == "train"].id) & set(a[a.split == "test"].id)
    math_text = a[a.domain_name == "math"].text.iloc[0]
    assert math_text.startswith("Question: ") and "\nAnswer: " in math_text
    assert not lm.make_lm_split(5, 3, seed=2).id.equals(a.id)
    with pytest.raises(ValueError, match="lm.n_train / lm.n_test"):
        lm.make_lm_split(1300, 100)


def test_mutual_information_closed_forms():
    d = torch.arange(3).repeat_interleave(4)
    assert lm.mutual_information_bits(d, d, 3, 4) == pytest.approx(math.log2(3), rel=1e-12)   # expert = domain
    z = torch.arange(4).repeat(3)                                                              # independent
    assert lm.mutual_information_bits(d, z, 3, 4) == pytest.approx(0.0, abs=1e-12)


def test_routing_rows_churn_and_layer_mean():
    g1 = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.2, 0.2, 0.5, 0.1], [0.4, 0.3, 0.2, 0.1]],
                      dtype=torch.float64)
    g2 = g1[:, [1, 0, 2, 3]]                      # swap experts 0 and 1: tokens 0, 1 and 3 change top-1
    domain = torch.tensor([0, 1, 2, 2])
    prev = {"L0.q_proj": g1, "L0.k_proj": g1, "_domain": domain}
    rows = pd.DataFrame(lm.routing_rows(6, {"L0.q_proj": g2, "L0.k_proj": g1, "_domain": domain}, prev))
    churn = rows[rows.metric == "top1_churn"].set_index("layer").value
    assert churn["L0.q_proj"] == pytest.approx(0.75) and churn["L0.k_proj"] == 0.0
    assert churn["mean"] == pytest.approx(0.375)
    first = pd.DataFrame(lm.routing_rows(0, prev, None))
    assert "top1_churn" not in set(first.metric)
    assert set(first.metric) == {"gini", "gini_normalized", "load_entropy", "token_entropy", "domain_expert_mi_bits"}


# ----------------------------------------------------------------------------- real model
@pytest.mark.real_models
def test_cached_prefix_top_model_reproduces_the_full_model():
    from analysis.models import load_smollm
    model, tok = load_smollm()
    split = lm.make_lm_split(3, 1, seed=0)
    cache, tokens = lm.compute_lm_prefix(model, tok, list(split.text), list(split.id), 24, first=28)
    index = torch.arange(len(cache))
    hidden, mask = cache.batch(index)
    ids = lm.padded_tokens(tokens, cache, index)
    top, first = lm.load_smollm_top(2)
    assert first == 28
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        ours = top.lm_head(lm.forward_top(top, hidden))
        real = mask.bool()
        torch.testing.assert_close(ours[real], full[real], rtol=1e-4, atol=1e-4)
        pairs = (mask[:, :-1] * mask[:, 1:]).bool()
        ref = torch.nn.functional.cross_entropy(full[:, :-1][pairs], ids[:, 1:][pairs], reduction="none")
        torch.testing.assert_close(lm.token_losses(top, hidden, mask, ids), ref, rtol=1e-4, atol=1e-4)
    assert len(tokens) == int(mask.sum()) and (lm.padded_tokens(tokens, cache, index)[real] == ids[real]).all()


@pytest.mark.real_models
def test_methods_share_common_random_numbers_and_the_control_matches_the_router_norm():
    from talklora_min import adapter_layers
    from talklora_min.layers import absorbed_router
    models = {m: lm.build_lm(m, 3, 1, 32, 4, 0.05)[0]
              for m in ("lora", "moelora-code", "moelora-code-scaled", "moelora-twin", "talklora-official")}
    layers = {m: adapter_layers(model) for m, model in models.items()}
    names = list(layers["talklora-official"])
    assert [n.split(".")[-1] for n in names] == list(lm.TARGETS)
    for name in names:
        talk, code, scaled, lora = (layers[m][name] for m in ("talklora-official", "moelora-code",
                                                              "moelora-code-scaled", "lora"))
        for w in ("A", "C", "W_r"):
            assert torch.equal(getattr(talk, w), getattr(code, w)), (name, w)
        assert torch.equal(lora.A, talk.A) and (talk.B == 0).all() and (lora.B == 0).all()
        W_eff = absorbed_router(talk.W_r.detach().double(), talk.T.detach().double(), talk.expert_rank)
        assert float(torch.linalg.matrix_norm(scaled.W_r.detach().double(), ord=2)) == pytest.approx(
            float(torch.linalg.matrix_norm(W_eff, ord=2)), rel=1e-5)
        c = (scaled.W_r / code.W_r).flatten()
        assert torch.allclose(c, c[0].expand_as(c), rtol=1e-5)
        twin = layers["moelora-twin"][name]            # function-matched: W' = W_r (T ⊗ I), same A and C
        assert torch.equal(twin.A, talk.A) and torch.equal(twin.C, talk.C)
        assert torch.allclose(twin.W_r.double(), W_eff, atol=1e-6)
        x = torch.randn(16, talk.in_features, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(twin.gates(x), talk.gates(x), atol=1e-6)
    # T has its own stream: another seed changes T, and T is not the identity
    other = adapter_layers(lm.build_lm("talklora-official", 4, 1, 32, 4, 0.05)[0])[names[0]]
    assert not torch.equal(other.T, layers["talklora-official"][names[0]].T)


@pytest.mark.real_models
def test_lm_cell_end_to_end_is_deterministic(tmp_path):
    cfg = LMConfig(methods=["talklora-official"], seeds=[0], steps=3, eval_every=2, batch_size=4, max_length=16,
                   adapt_top_layers=1, n_train=4, n_test=2).to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in ("methods", "seeds")}
    lm.prepare_prefix(cfg, tmp_path)
    a = pd.DataFrame(lm.lm_cell("talklora-official", 0, cfg, str(tmp_path)))
    b = pd.DataFrame(lm.lm_cell("talklora-official", 0, cfg, str(tmp_path)))
    timing = ["step_seconds", "wall_seconds", "cpu_seconds"]
    assert a[~a.metric.isin(timing)].equals(b[~b.metric.isin(timing)])
    loss = a[a.metric == "loss"].set_index("domain").value
    assert set(loss.index) == {*lm.DOMAINS, "all"} and (loss > 0).all()
    assert sorted(a[(a.metric == "gini") & (a.layer == "mean")].step.unique()) == [0, 2, 3]
    assert a[a.metric == "top1_churn"].value.between(0, 1).all()
    assert set(a[a.metric == "gini"].layer) == {f"L29.{t}" for t in lm.TARGETS} | {"mean"}
    base = pd.DataFrame(lm.lm_cell("base", -1, cfg, str(tmp_path)))
    tokens = a[a.metric == "tokens"].set_index("domain").value
    assert base[base.metric == "tokens"].set_index("domain").value.equals(tokens)
