"""Experiments end to end at tiny sizes: twins, top-k routers, synthetic/real perturbation cells,
training on real text.  Real-model tests are marked ``real_models`` (they run in ``make test``)."""
import contextlib
import math

import pandas as pd
import pytest
import torch
from torch import nn

from analysis import methods as registry
from analysis import perturb, train, twins
from analysis.protocol import cosine_schedule
from analysis.config import load_profile
from talklora_min import MoELoRALinear, adapter_layers


def tiny_train_cfg(**overrides):
    cfg = load_profile("quick").train.to_dict()
    cfg.update(steps=4, eval_every=2, n_train=14, n_val=7, n_test=9, n_probe=4, adapt_top_layers=1, max_length=24,
               batch_size=8, rank=16, dropout=0.05)
    cfg.update(overrides)
    return cfg


# ----------------------------------------------------------------------------- top-k router
def test_topk_router_selection_renormalisation_and_gradients():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(6, 5, dtype=torch.float64), rank=8, num_experts=4, top_k=2)
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5], [4.0, -2.0, 0.0, 3.9]], dtype=torch.float64, requires_grad=True)
    gates, index = layer.gates_from_logits(logits)
    assert index.tolist() == [[1, 3], [0, 3]]
    # zero outside the selected set, softmax over the selected logits inside it
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for row, sel in enumerate(index.tolist()):
        expected[row, sel] = torch.softmax(logits[row, sel].detach(), -1)
    torch.testing.assert_close(gates.detach(), expected, rtol=0, atol=1e-15)
    assert torch.allclose(gates.sum(-1), torch.ones(2, dtype=torch.float64))
    # gradients reach the selected logits only (hard selection, soft weights)
    (gates * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).sum().backward()
    unselected = torch.ones(2, 4, dtype=torch.bool)
    unselected[torch.arange(2).unsqueeze(1), index] = False
    assert torch.all(logits.grad[unselected] == 0)
    assert torch.all(logits.grad[~unselected] != 0)


def test_router_cell_reports_no_certified_bound_for_topk():
    rows = pd.DataFrame(perturb.router_cell("top2", 0, E=4, r=8, d_in=12, d_out=6, n_tokens=32, eps=[0.05],
                                            adversarial_steps=2))
    exists = rows[rows.metric == "certified_exists"].value
    assert exists.tolist() == [0.0]
    assert not ((rows.metric == "lipschitz") & (rows.statistic == "certified")).any()
    dense = pd.DataFrame(perturb.router_cell("dense", 0, E=4, r=8, d_in=12, d_out=6, n_tokens=32, eps=[0.05],
                                             adversarial_steps=2))
    certified = dense[(dense.metric == "lipschitz") & (dense.statistic == "certified")].value
    local = dense[(dense.metric == "lipschitz") & (dense.statistic == "local_max")].value
    assert len(certified) == 1 and float(local.iloc[0]) <= float(certified.iloc[0]) * (1 + 1e-9)


# ----------------------------------------------------------------------------- synthetic cells
def test_synthetic_layers_differ_only_in_T_and_identity_is_moelora_code():
    layers = {t: perturb.synthetic_layer(4, 8, t, 3, 10, 6) for t in ("identity", "official", "uniform-mix:0.5")}
    ref = layers["identity"].get_weights()
    for t, layer in layers.items():
        w = layer.get_weights()
        for name in ("A", "C", "B", "W_r"):
            assert torch.equal(w[name], ref[name]), (t, name)
    assert torch.equal(ref["T"], torch.eye(4, dtype=torch.float64))
    assert not torch.equal(layers["official"].T, ref["T"])
    code = MoELoRALinear(layers["identity"].base, 8, 4).double().eval()
    code.set_weights(**{k: v for k, v in ref.items() if k != "T"})
    x = perturb.synthetic_tokens(16, 10, 0)
    assert torch.equal(code(x), layers["identity"](x))


def test_synthetic_cell_is_deterministic_and_sandwich_ordered():
    args = dict(E=4, r=8, talk="official", seed=1, d_in=12, d_out=8, n_tokens=32, eps=[0.01, 0.1],
                kinds=["gaussian", "block", "adversarial"], adversarial_steps=3)
    a, b = perturb.synthetic_cell(**args), perturb.synthetic_cell(**args)
    assert a == b
    lip = {(r["kind"], r["statistic"]): r["value"] for r in a if r["metric"] == "lipschitz"}
    for wrt in ("lipschitz_code", "lipschitz_input"):
        assert lip[(wrt, "local_max")] <= lip[(wrt, "certified")] * (1 + 1e-9)
        assert lip[(wrt, "empirical")] <= lip[(wrt, "certified")] * (1 + 1e-9)
        assert lip[(wrt, "empirical")] >= 0.5 * lip[(wrt, "local_max")]


def test_talk_norm_cell_matches_direct_computation():
    rows = pd.DataFrame(perturb.talk_norm_cell(4, 0, draws=50, r_per_expert=3, chunk=16))
    norms = rows[rows.metric == "talk_norm"].value.to_numpy()
    ratios = rows[rows.metric == "certified_ratio"].value.to_numpy()
    g_T, g_W = perturb.talk_norm_streams(4, 0)
    T = (torch.rand(50, 4, 4, generator=g_T, dtype=torch.float64) * 2 - 1) / 2
    W = (torch.rand(50, 4, 12, generator=g_W, dtype=torch.float64) * 2 - 1) / math.sqrt(12)
    eye = torch.eye(3, dtype=torch.float64)
    direct = [float(torch.linalg.matrix_norm(w @ torch.kron(t, eye), ord=2) / torch.linalg.matrix_norm(w, ord=2))
              for t, w in zip(T, W)]
    assert norms == pytest.approx(torch.linalg.matrix_norm(T, ord=2).numpy(), rel=1e-12)
    assert ratios == pytest.approx(direct, rel=1e-10)
    assert 0 < (norms > 1).mean() < 1        # the official init can both raise and keep ‖T‖₂ ≤ 1
    share = rows[rows.metric.str.startswith("share_")].set_index("metric")
    assert share.loc["share_talk_norm_gt_1", "k"] == (norms > 1).sum() and (share.n == 50).all()
    assert share.loc["share_bound_rises", "k"] == (ratios > 1).sum()


def test_equivalence_cell_residuals():
    rows = pd.DataFrame(perturb.equivalence_cell(0, n_configs=3))
    f64 = rows[rows.dtype == "float64"].groupby("metric").value.max()
    assert f64["C1_identity_talk"] <= 1e-12 and f64["C2_absorption"] <= 1e-12 and f64["C3_inclusion"] <= 1e-12
    assert rows[rows.metric == "C3_counterexample_rowspace_residual"].value.min() > 1e-3


# ----------------------------------------------------------------------------- real models
@pytest.mark.real_models
def test_twins_are_identical_at_step_0_and_diverge_under_adamw(tmp_path):
    cfg = tiny_train_cfg()
    caches = train.prefix_caches(cfg, tmp_path, "sentiment")
    labels = train.split_labels(tmp_path, cfg, "sentiment")
    arms = list(registry.tagged("twin-arm"))
    models = twins.build_twins(0, cfg, train.frozen_encoder(), arms)
    assert list(models) == arms == ["talklora-official", "moelora-twin", "talklora-frozen-T",
                                    "talklora-identity-matched"]
    assert not any(layer.T.requires_grad for layer in adapter_layers(models["talklora-frozen-T"]).values())
    assert all(layer.T.requires_grad for layer in adapter_layers(models["talklora-official"]).values())
    hidden, mask = caches["val"].batch(torch.arange(len(caches["val"])))
    for model in models.values():          # B = 0 at init hides the router: give the experts an output
        for layer in adapter_layers(model).values():
            layer.set_weights(B=torch.full_like(layer.B, 0.05))
    with torch.no_grad():
        outs = {k: m.eval().forward_top(hidden, mask) for k, m in models.items()}
    for k, out in outs.items():
        assert (out - outs["talklora-official"]).abs().max() <= twins.MATCH_ATOL, k
    talk, twin = models["talklora-official"], models["moelora-twin"]
    for name, layer in adapter_layers(talk).items():
        torch.testing.assert_close(twin.get_submodule(name).W_r, layer.effective_router(), rtol=0, atol=1e-6)
    # same batches, AdamW: the parameterisations take different paths
    opts = {k: train.optimizer_for(m, "adamw", 1e-2, 1e-2, 0.01) for k, m in (("t", talk), ("w", twin))}
    for index in train.batch_order(len(caches["train"]), 8, 3, 0):
        train.train_step(talk, opts["t"], caches["train"], labels["train"], index)
        train.train_step(twin, opts["w"], caches["train"], labels["train"], index)
    with torch.no_grad():
        gap = (talk.eval().forward_top(hidden, mask) - twin.eval().forward_top(hidden, mask)).abs().max()
    assert gap > 1e-6


@pytest.mark.real_models
def test_twins_cell_rows_and_router_movement(tmp_path):
    cfg = tiny_train_cfg()
    spec = dict(models=["talklora-official", "moelora-twin"], steps=4, eval_every=2, lr_adamw=3e-4, lr_sgd=1e-3,
                head_lr_sgd=0.1, weight_decay=0.01)
    rows = pd.DataFrame(twins.twins_cell("adamw", 0, cfg, spec, str(tmp_path), "sentiment"))
    assert set(rows.split) == {"probe", "val", "test", "weights"}
    test = rows[rows.split == "test"].pivot_table(index="model", columns="metric", values="value")
    assert list(test.columns) == ["accuracy", "loss"] and (test["loss"] > 0).all()
    assert not ((rows.split == "probe") & (rows.step == 4) & (rows.metric == "accuracy")).any()
    step0 = rows[(rows.step == 0) & (rows.metric == "logit_maxabs_diff")].value
    assert (step0 <= twins.MATCH_ATOL).all()
    moved = rows[rows.metric == "router_rel_change"]
    assert len(moved) == 2 * 5 and (moved.value > 0).all() and (moved.value < 1).all()
    assert set(rows[rows.metric == "talk_rel_change"].model) == {"talklora-official"}


@pytest.mark.real_models
def test_a_diverging_twin_run_is_recorded_not_raised(tmp_path):
    """Plain SGD at an absurd lr blows up: the cell records which arm diverged at which step and ends
    without test rows (the report leaves that seed out), instead of failing the whole sweep."""
    cfg = tiny_train_cfg()
    spec = dict(models=["talklora-official", "moelora-twin"], steps=6, eval_every=2, lr_adamw=3e-4, lr_sgd=1e30,
                head_lr_sgd=1e30, weight_decay=0.0)
    rows = pd.DataFrame(twins.twins_cell("sgd", 0, cfg, spec, str(tmp_path), "sentiment"))
    gone = rows[rows.metric == "diverged"]
    assert set(gone.model) == {"talklora-official", "moelora-twin"} and gone.value.max() == 1.0
    assert gone.step.nunique() == 1 and 1 <= gone.step.iloc[0] <= 6
    assert not (rows.split == "test").any() and rows.value.map(math.isfinite).all()
    assert "domain" not in rows.columns


@pytest.mark.real_models
def test_train_cell_end_to_end_is_deterministic(tmp_path):
    cfg = tiny_train_cfg()
    a = train.train_cell("talklora-official", 0, cfg, str(tmp_path), "topic")
    b = train.train_cell("talklora-official", 0, cfg, str(tmp_path), "topic")
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows if r["metric"] != "wall_seconds"]
    assert strip(a) == strip(b)
    df = pd.DataFrame(a)
    final = df[(df.split == "val") & (df.step == cfg["steps"])]
    assert set(final.layer) - {"all"} == {"L5.query", "L5.key", "L5.value", "L5.up", "L5.down"}
    gini = final[final.metric == "gini"].value
    assert ((gini >= 0) & (gini <= 0.75 + 1e-12)).all()
    assert df[df.metric == "n_test"].value.item() == 9 and (df["rank"] == 16).all()
    test = df[(df.split == "test") & (df.layer == "all")].set_index("metric").value
    assert 0 <= test["accuracy"] <= 1 and test["loss"] > 0
    params = df[df.metric == "trainable_parameters"].value.item()
    # per adapted layer: A r·d_in + C E·m² + B d_out·r + T E² + W_r E·r   (r = 16, E = 4, m = 4)
    r, E, m = cfg["rank"], cfg["num_experts"], cfg["rank"] // cfg["num_experts"]
    dims = [(384, 384)] * 3 + [(384, 1536), (1536, 384)]
    assert params == sum(r * d_in + E * m * m + d_out * r + E * E + E * r for d_in, d_out in dims)
    lip = df[df.metric == "lipschitz"].pivot_table(index="layer", columns="statistic", values="value")
    assert (lip["local_max"] <= lip["certified"] * (1 + 1e-9)).all()
    # churn between consecutive checkpoints (steps 0, 2, 4) on the probe tokens, a share in [0, 1]
    churn = df[df.metric == "churn"]
    assert sorted(churn.step.unique()) == [2, 4] and churn.value.between(0, 1).all()
    moved = df[df.split == "weights"].pivot_table(index="layer", columns="metric", values="value")
    assert (moved["router_rel_change"] > 0).all() and (moved["talk_rel_change"] > 0).all()
    assert (tmp_path / "adapters" / "topic-talklora-official-seed0" / "talklora_adapter.json").is_file()


@pytest.mark.real_models
def test_train_cell_lora_has_no_routing_rows_and_head_only_trains_only_the_head(tmp_path):
    df = pd.DataFrame(train.train_cell("lora", 0, tiny_train_cfg(steps=2, eval_every=2), str(tmp_path)))
    assert not (df.metric == "gini").any() and (df.metric == "accuracy").any()
    assert df[df.metric == "trainable_parameters"].value.item() == 16 * (3 * 768 + 2 * 1920)
    head = pd.DataFrame(train.train_cell("head-only", 0, tiny_train_cfg(steps=2, eval_every=2), str(tmp_path)))
    assert head[head.metric == "trainable_parameters"].value.item() == 0 and (head["rank"] == 0).all()
    assert not (head.split == "weights").any() and (head.metric == "loss").any()


@pytest.mark.real_models
def test_budget_cell_matches_talklora_count_within_two_percent(tmp_path):
    cfg = tiny_train_cfg(steps=1, eval_every=1)
    rows = pd.DataFrame(train.train_cell("lora", 0, cfg, str(tmp_path), "sentiment", budget=8))
    gap = rows[rows.metric == "budget_gap"].value.item()
    count = rows[rows.metric == "trainable_parameters"].value.item()
    talk = train.method_parameters("talklora-official", 8, cfg)
    assert count == train.method_parameters("lora", int(rows["rank"].iloc[0]), cfg)
    assert rows[rows.metric == "closed_form_parameters"].value.item() == count
    assert gap == pytest.approx(count / talk - 1) and abs(gap) <= 0.02


@pytest.mark.real_models
@pytest.mark.parametrize("model", ["minilm", "smollm"])
def test_real_model_perturbation_cell(model):
    rows = pd.DataFrame(perturb.real_model_cell(model, "official", 0, n_sentences=4, max_length=12, eps=[0.05],
                                                kinds=["gaussian"], adversarial_steps=1,
                                                smollm_layers=[29]))
    assert len(rows.layer.unique()) == (30 if model == "minilm" else 5)
    q = rows[(rows.metric == "routing_quotient") & (rows.statistic == "median")].value
    assert (q > 0).all() and q.map(math.isfinite).all()


def test_matched_budget_rules():
    cfg = tiny_train_cfg(rank=8, num_experts=4, adapt_top_layers=1, targets=["query", "up"])
    assert {m: train.method_rank(m, cfg) for m in registry.METHODS} == {m: 8 for m in registry.METHODS}
    assert train.method_parameters("head-only", 8, cfg) == 0
    cfg["matched_budget"] = "match-params"
    count = lambda m, r: train.method_parameters(m, r, cfg)
    target = count("talklora-official", 8)
    for method in registry.METHODS:
        r = train.method_rank(method, cfg)
        step = 1 if method in ("lora", "head-only") else 4
        assert r % step == 0
        best = min(abs(count(method, k) - target) for k in range(step, 33, step))
        assert abs(count(method, r) - target) == best, method


def test_router_comparison_uses_an_expert_count_where_top2_is_sparse():
    assert perturb.router_grid_entry([[2, 16], [4, 16], [8, 32]]) == (4, 16)
    with pytest.raises(ValueError, match="E >= 3"):
        perturb.router_grid_entry([[2, 16]])


# ----------------------------------------------------------------------------- packed (padding-free) path
@pytest.mark.real_models
@pytest.mark.parametrize("method", ["lora", "talklora-official", "moelora-input", "topk-entropy"])
@pytest.mark.parametrize("adapt_top", [1, 2])
def test_packed_forward_equals_the_padded_forward(tmp_path, method, adapt_top):
    """``forward_packed`` (real tokens only, cached frozen q/k/v) is ``forward_top`` on the padded batch:
    the same logits, the same routing of every real token and the same adapter gradients."""
    from talklora_min.probes import record_routing
    cfg = tiny_train_cfg(adapt_top_layers=adapt_top, dropout=0.0)
    cache = train.prefix_caches(cfg, tmp_path, "sentiment")["val"]
    assert cache.base is not None and cache.base.shape == (len(cache.hidden), 3 * 384)
    model = train.build_model(method, 0, cfg, train.frozen_encoder())
    gen = torch.Generator().manual_seed(1)
    for layer in adapter_layers(model).values():                 # B = 0 hides the adapters: give them an output
        layer.set_weights(B=0.05 * torch.randn(layer.B.shape, generator=gen))
    index = torch.argsort(cache.lengths)[[3, 0, 6, 1]]           # unsorted, mixed lengths
    hidden, mask = cache.batch(index)
    assert len(set(mask.sum(1).tolist())) >= 3
    x, lengths, base = cache.packed(index)
    assert len(x) == int(mask.sum()) and lengths.tolist() == mask.sum(1).tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    outs = {}
    for name, run in {"padded": lambda: model.forward_top(hidden, mask),
                      "packed": lambda: model.forward_packed(x, lengths, base),
                      "packed-no-cache": lambda: model.forward_packed(x, lengths)}.items():
        model.train()
        logits = run()
        grads = torch.autograd.grad(logits.square().sum(), params)
        model.eval()
        with torch.no_grad(), (record_routing(model) if method != "lora" else contextlib.nullcontext()) as rec:
            if rec is not None and name == "padded":
                rec.set_mask(mask)
            eval_logits = run()
            gates = {} if rec is None else {n: rec.gates(n) for n in rec.layer_names}
        outs[name] = (logits, grads, eval_logits, gates)
    ref = outs["padded"]
    for name in ("packed", "packed-no-cache"):
        logits, grads, eval_logits, gates = outs[name]
        torch.testing.assert_close(logits, ref[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(eval_logits, ref[2], rtol=1e-4, atol=1e-5)
        for g, g_ref in zip(grads, ref[1]):
            torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-5)
        assert gates.keys() == ref[3].keys() and (method == "lora") == (not gates)
        for layer, g in gates.items():                          # same tokens, same order (example by example)
            torch.testing.assert_close(g, ref[3][layer], rtol=1e-4, atol=1e-5)


@pytest.mark.real_models
def test_packed_cache_rows_and_select_keep_the_frozen_base_rows(tmp_path):
    cfg = tiny_train_cfg()
    cache = train.prefix_caches(cfg, tmp_path, "sentiment")["test"]
    index = torch.tensor([4, 2, 2, 7])
    rows, lengths = cache.token_index(index)
    expected = torch.cat([torch.arange(int(cache.offsets[i]), int(cache.offsets[i + 1])) for i in index.tolist()])
    assert torch.equal(rows, expected) and torch.equal(lengths, cache.lengths[index])
    sub = cache.select(index)
    assert sub.ids == [cache.ids[i] for i in index.tolist()]
    assert torch.equal(sub.hidden, cache.hidden[expected]) and torch.equal(sub.base, cache.base[expected])
    layer = train.frozen_encoder().encoder.layer[-1]
    torch.testing.assert_close(sub.base, torch.cat([layer.attention.self.query(sub.hidden),
                                                    layer.attention.self.key(sub.hidden),
                                                    layer.attention.self.value(sub.hidden)], -1))


@pytest.mark.real_models
def test_head_only_cell_trains_the_head_on_the_frozen_model(tmp_path):
    """The head-only shortcut (pooled frozen features computed once) equals training the head of the
    full head-only model (no adapters, padded forward) on the same batches from the same CRN init."""
    cfg = tiny_train_cfg(steps=5)
    rows = pd.DataFrame(train.train_cell("head-only", 3, cfg, str(tmp_path), "topic"))
    caches = train.prefix_caches(cfg, tmp_path, "topic")
    labels = train.split_labels(tmp_path, cfg, "topic")
    model = train.build_model("head-only", 3, cfg, train.frozen_encoder(), num_labels=5).eval()
    opt = train.optimizer_for(model, "adamw", cfg["lr"], cfg["head_lr"], cfg["weight_decay"])
    schedule = cosine_schedule(opt, cfg["steps"])
    for index in train.batch_order(len(caches["train"]), cfg["batch_size"], cfg["steps"], 3):
        loss = torch.nn.functional.cross_entropy(model.forward_top(*caches["train"].batch(index)), labels["train"][index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        logits = model.forward_top(*caches["test"].batch(torch.arange(len(caches["test"]))))
    test = rows[(rows.split == "test") & (rows.step == cfg["steps"])]
    got = test[test.metric.isin(["accuracy", "loss"])].set_index("metric").value
    per_example = test[test.metric == "example_correct"].sort_values("example").value.to_numpy()
    assert per_example.tolist() == (logits.argmax(-1) == labels["test"]).double().tolist()
    assert got["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels["test"]).double().mean()))
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits.double(), labels["test"])), rel=1e-5)
