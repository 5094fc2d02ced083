"""Hugging Face ecosystem (issue 11): Conv1D bases vs PEFT, from_peft, save_pretrained / Trainer
checkpoints with tied B, aux loss in Trainer, RoutingStatsCallback, modules_to_save, default targets,
parents reading ``.weight``, fp32 adapters over bf16 bases.  Tiny random models from configs only."""
from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from talklora_min import (AdapterConfig, LoRALinear, TalkLoRALinear, adapter_layers,  # noqa: E402
                          auxiliary_loss, disable_adapters, inject, load_adapter, merge_and_unload,
                          save_adapter, trainable_summary, unload)
from talklora_min.hf import RoutingStatsCallback, from_peft, load_pretrained  # noqa: E402
from talklora_min.probes import gini, load_entropy, record_routing  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64)


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, intermediate_size=48))


def t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0))


def vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=8,
        patch_size=4, num_channels=3, num_labels=3))


def bert():
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=64))


def ids(seed=0, shape=(2, 7)):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            if "B" in layer._parameters:
                layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.3)


def test_core_import_does_not_import_transformers():
    code = "import sys, talklora_min, talklora_min.probes; print('transformers' in sys.modules, 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------- Conv1D and PEFT
@pytest.mark.parametrize("rslora", [False, True])
def test_conv1d_lora_equals_peft_and_from_peft(rslora):
    torch.manual_seed(0)
    base = gpt2().eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                          init_lora_weights=False, use_rslora=rslora)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    x = ids()
    ref = pm(x).logits.detach()
    assert (ref - base(x).logits).abs().max() > 1e-3          # PEFT's adapter is not a no-op

    ours = copy.deepcopy(base)
    alpha = 16 if rslora else 8                               # rsLoRA: s = 8/√4 = 16/4
    report = inject(ours, AdapterConfig(kind="lora", rank=4, alpha=alpha, target_modules=("c_attn", "c_fc")))
    assert len(report.matched) == 4
    for name, layer in adapter_layers(ours).items():
        peer = pm.get_base_model().get_submodule(name)
        assert layer.fan_in_fan_out and layer.A.shape == (4, 32)
        layer.set_weights(A=peer.lora_A["default"].weight, B=peer.lora_B["default"].weight)
    torch.testing.assert_close(ours(x).logits, ref, atol=1e-6, rtol=0)

    converted = from_peft(pm)
    assert not any(type(m).__module__.startswith("peft.") for m in converted.modules())
    assert len(adapter_layers(converted)) == 4
    torch.testing.assert_close(converted(x).logits, ref, atol=1e-6, rtol=0)
    trainable = {n for n, p in converted.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)


def test_conv1d_merge_and_unload_equals_peft():
    torch.manual_seed(0)
    pm = peft.get_peft_model(gpt2().eval(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    x = ids()
    ref = pm(x).logits.detach()
    peft_merged = copy.deepcopy(pm).merge_and_unload()
    ours = merge_and_unload(from_peft(pm))
    assert not adapter_layers(ours)
    for block_ours, block_peft in zip(ours.transformer.h, peft_merged.transformer.h):
        assert type(block_ours.attn.c_attn).__name__ == "Conv1D"
        torch.testing.assert_close(block_ours.attn.c_attn.weight, block_peft.attn.c_attn.weight,
                                   atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x).logits, ref, atol=1e-5, rtol=0)


def test_merge_and_unload_conv1d_matches_unmerged_forward():
    torch.manual_seed(0)
    model = gpt2().eval()
    inject(model, AdapterConfig(kind="lora", rank=4, alpha=8, target_modules=("c_attn", "c_proj")))
    randomize_B(model)
    x = ids()
    ref = model(x).logits.detach()
    merged = merge_and_unload(model)
    assert not adapter_layers(merged)
    torch.testing.assert_close(merged(x).logits, ref, atol=1e-5, rtol=0)


def test_inject_refuses_peft_models():
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora_flags = {n: p.requires_grad for n, p in pm.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="PEFT modules .*from_peft"):
        inject(pm, AdapterConfig(kind="lora", rank=2, target_modules=("v_proj",)))
    assert all(lora_flags.values())
    assert {n: p.requires_grad for n, p in pm.named_parameters() if "lora_" in n} == lora_flags


def test_from_peft_linear_with_modules_to_save():
    torch.manual_seed(0)
    pm = peft.get_peft_model(llama().eval(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
        init_lora_weights=False)).eval()
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2.0)
    x = ids()
    ref = pm(x).logits.detach()
    model = from_peft(pm)
    assert type(model).__name__ == "LlamaForCausalLM" and isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert model.lm_head.weight.requires_grad
    torch.testing.assert_close(model(x).logits, ref, atol=1e-6, rtol=0)


def test_from_peft_refuses_what_lora_linear_cannot_hold():
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        from_peft(pm)
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        from_peft(llama())


# ----------------------------------------------------------------------------- checkpoints
def test_tied_B_save_pretrained_reload(tmp_path):
    torch.manual_seed(0)
    model = llama().eval()
    report = inject(model, AdapterConfig.official(rank=8))
    assert report.shared_B_groups and all(len(v) == 2 for v in report.shared_B_groups.values())
    randomize_B(model)
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert q1.B is q0.B and q1.B_is_tied and "B" not in q1._parameters
    x = ids()
    ref = model(x).logits.detach()
    model.save_pretrained(tmp_path)                          # the adapter only: the same base is needed
    torch.manual_seed(0)
    fresh = llama().eval()
    torch.manual_seed(1)
    inject(fresh, AdapterConfig.official(rank=8))
    assert (fresh(x).logits - ref).abs().max() > 1e-3
    load_pretrained(fresh, tmp_path)
    assert torch.equal(fresh(x).logits, ref)
    assert fresh.model.layers[1].self_attn.q_proj.B is fresh.model.layers[0].self_attn.q_proj.B
    # the adapter folder round-trips too, and a deep copy keeps the tie inside the copy
    clone = copy.deepcopy(model)
    assert clone.model.layers[1].self_attn.q_proj.B is clone.model.layers[0].self_attn.q_proj.B
    assert clone.model.layers[0].self_attn.q_proj.B is not q0.B


def test_load_pretrained_errors(tmp_path):
    model = llama()
    inject(model, AdapterConfig.official(rank=8))
    model.save_pretrained(tmp_path)
    other = llama()
    inject(other, AdapterConfig(kind="lora", rank=8))
    with pytest.raises(ValueError, match="kind.*'talklora' saved, 'lora' in the model.*was it injected with the "
                                         "same AdapterConfig"):
        load_pretrained(other, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(other, tmp_path / "missing")


def _dataset(n=8, length=6):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        x = torch.randint(0, 64, (length,), generator=g)
        mask = torch.ones(length, dtype=torch.long)
        mask[length - 1 - i % 2:] = 0
        rows.append({"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)})
    return rows


def _official_model():
    torch.manual_seed(0)
    model = llama()
    inject(model, AdapterConfig.official(rank=8, balance_loss="switch", aux_loss_weight=0.01))
    return model


def test_trainer_checkpoint_resume_and_callback(tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, save_steps=2, per_device_train_batch_size=2,
        logging_steps=2, report_to=[], use_cpu=True, learning_rate=1e-2, seed=0, data_seed=0)
    model = _official_model()
    callback = RoutingStatsCallback()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[callback])
    assert callback.attach(trainer).__class__ is RoutingStatsCallback
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        for key in ("routing/gini_mean", "routing/entropy_mean", "routing/dead_experts_mean",
                    "routing/model.layers.0.self_attn.q_proj/gini"):
            assert 0.0 <= entry[key] <= 1.0 if "dead" not in key else entry[key] >= 0
    assert 0.0 <= logs[1]["routing/churn"] <= 1.0               # the first log has no previous top-1
    assert not model.model.layers[0].self_attn.q_proj._routing_hooks  # removed at train end

    resumed = _official_model()
    trainer2 = transformers.Trainer(model=resumed, args=args, train_dataset=_dataset())
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_trainer_optimises_aux_loss(tmp_path):
    """Unchanged Trainer: the loss it backpropagates includes aux_loss_weight × mean balance loss."""
    model = _official_model().train()
    batch = {k: torch.stack([r[k] for r in _dataset(2)]) for k in ("input_ids", "attention_mask", "labels")}
    torch.manual_seed(0)
    out = model(**batch)
    losses = [m.aux_loss for m in adapter_layers(model).values()]
    assert len(losses) == 10 and all(v is not None for v in losses)
    torch.testing.assert_close(out.aux_loss, sum(losses) / 10)
    torch.testing.assert_close(auxiliary_loss(model, "mean"), out.aux_loss)
    with disable_adapters(model):
        torch.manual_seed(0)
        plain = model(**batch)
    assert plain.get("aux_loss") is None
    # CE is unchanged by the adapters at init (B = 0), so the difference is exactly the aux term
    torch.testing.assert_close(out.loss - plain.loss, 0.01 * out.aux_loss)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True))
    torch.manual_seed(0)
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), out.loss)
    out.loss.backward()
    W_r = model.model.layers[0].self_attn.q_proj.W_r
    assert W_r.grad is not None and W_r.grad.abs().sum() > 0    # the router learns from aux only (B = 0)


def test_routing_stats_callback_matches_record_routing():
    torch.manual_seed(0)
    model = llama().eval()
    inject(model, AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules=("q_proj", "v_proj")))
    rows = _dataset(4)
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    cb = RoutingStatsCallback(churn=False)
    cb.on_train_begin(None, None, None, model=model)
    with torch.no_grad(), record_routing(model) as rec:
        model(**batch)
    stats = cb.stats()
    cb.on_train_end(None, None, None)
    ginis = [gini(rec.load(n)) for n in rec.layer_names]
    assert rec.gates(rec.layer_names[0]).shape[0] == int(batch["attention_mask"].sum())   # padding out
    for name, g in zip(rec.layer_names, ginis):
        assert stats[f"routing/{name}/gini"] == pytest.approx(g, abs=1e-12)
        assert stats[f"routing/{name}/entropy"] == pytest.approx(load_entropy(rec.load(name)), abs=1e-12)
    assert stats["routing/gini_mean"] == pytest.approx(sum(ginis) / len(ginis))
    with pytest.raises(ValueError, match="prefix"):
        RoutingStatsCallback(prefix="")


# ----------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("make,expected", [
    (llama, ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")),
    (gpt2, ("c_attn", "c_proj", "c_fc")),
    (t5, ("q", "k", "v", "o", "wi", "wo")),
    (vit, ("q_proj", "k_proj", "v_proj")),
    (bert, ("query", "key", "value")),
], ids=["llama", "gpt2", "t5", "vit", "bert"])
def test_default_targets_per_architecture(make, expected):
    torch.manual_seed(0)
    model = make().eval()
    report = inject(model, AdapterConfig(kind="lora", rank=2, target_modules=None))
    assert report.target_modules == expected
    assert all(report.matched_by_pattern[p] for p in expected)
    randomize_B(model)
    model.zero_grad()
    if make is vit:
        out = model(pixel_values=torch.randn(2, 3, 8, 8)).logits
    elif make is bert:
        out = model(ids()).last_hidden_state
    elif make is t5:
        out = model(input_ids=ids(), decoder_input_ids=ids(1, (2, 3))).logits    # T5 reads wo.weight.dtype
    else:
        out = model(ids()).logits
    out.float().pow(2).mean().backward()
    assert all(layer.A.grad is not None for layer in adapter_layers(model).values())


def test_default_targets_error_lists_linear_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no default target .* linear layers: '0', '2'"):
        inject(model, AdapterConfig(kind="lora", rank=2, target_modules=None))
    assert all(p.requires_grad for p in model.parameters())


def test_vit_modules_to_save_trained_and_saved(tmp_path):
    torch.manual_seed(0)
    model = vit()
    cfg = AdapterConfig(kind="lora", rank=2, target_modules=None, modules_to_save=("classifier",))
    report = inject(model, cfg)
    assert report.modules_to_save == ["classifier"]
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert "modules_to_save classifier" in trainable_summary(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    randomize_B(model)
    x = torch.randn(2, 3, 8, 8)
    ref = model.eval()(pixel_values=x).logits
    save_adapter(model, tmp_path, cfg)
    torch.manual_seed(0)
    fresh = vit().eval()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(pixel_values=x).logits, ref)
    unload(fresh)
    assert not adapter_layers(fresh) and fresh.classifier.weight.requires_grad


def test_bf16_base_keeps_fp32_adapters_and_autocast():
    torch.manual_seed(0)
    model = llama().to(torch.bfloat16)
    inject(model, AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules=("q_proj",)))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.A.dtype == layer.B.dtype == layer.T.dtype == torch.float32
    assert layer.weight.dtype == torch.bfloat16                 # the base's weight is exposed as is
    out = model(ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().mean().backward()
    assert layer.A.grad.dtype == torch.float32 and torch.isfinite(layer.A.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(ids()).logits.float()).all()


def test_gradient_checkpointing_and_generate_with_adapters():
    torch.manual_seed(0)
    model = llama()
    inject(model, AdapterConfig(kind="moelora", rank=4, num_experts=2, target_modules=None))
    model.gradient_checkpointing_enable()
    model.train()
    model(ids(), labels=ids()).loss.backward()
    assert all(l.A.grad is not None for l in adapter_layers(model).values())
    model.eval()
    out = model.generate(ids(shape=(1, 4)), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (1, 7)


def test_ddp_with_tied_B(tmp_path):
    """One-process gloo DDP: tied B is one registered parameter, so DDP's bucket sees it once."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    model = _official_model()
    try:
        ddp = DistributedDataParallel(model)
        try:
            batch = {k: torch.stack([r[k] for r in _dataset(2)]) for k in ("input_ids", "attention_mask", "labels")}
            ddp(**batch).loss.backward()
            seen = sum(p is model.model.layers[0].self_attn.q_proj.B for p in ddp.parameters())
        finally:
            # DDP's reducer holds the process group: free it first, or its destructor can deadlock
            # on the group's mutex after destroy_process_group (seen under CPU contention)
            del ddp
            gc.collect()
    finally:
        dist.destroy_process_group()
    B = model.model.layers[0].self_attn.q_proj.B
    assert B is model.model.layers[1].self_attn.q_proj.B and B.grad is not None
    assert seen == 1
