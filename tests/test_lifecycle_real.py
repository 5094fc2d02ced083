"""Adapter lifecycle on the bundled SmolLM2-135M (real weights, real text; docs/method.md §7–§8):
Trainer checkpoints hold the adapter (< 5 % of the model's size) and resume reproduces the losses,
one-call loading is bit-identical, AutoModel refuses our folders, rsLoRA from_peft → save → load and
to_peft → PEFT save / load are identical.  Small: the adapters sit in the top two layers (backward
stops there), sequences of 16 tokens, a few steps."""
from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from talklora_min import AdapterConfig, adapter_layers, inject, load_adapter, save_adapter  # noqa: E402
from talklora_min.hf import RoutingStatsCallback, from_peft, from_pretrained, to_peft  # noqa: E402

pytestmark = pytest.mark.real_models
TOP = r"model\.layers\.(28|29)\.(self_attn\.(q|k|v)_proj|mlp\.(up|down)_proj)"


@pytest.fixture(scope="module")
def smollm():
    from analysis.models import load_smollm, smollm_cache_path
    _, tokenizer = load_smollm()                  # makes the cached safetensors copy on first use
    return smollm_cache_path(), tokenizer


def base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def rows(smollm):
    from analysis.data import load_movie_reviews
    _, tokenizer = smollm
    texts = load_movie_reviews()["text"].tolist()[:8]
    enc = tokenizer(texts, max_length=16, truncation=True, padding="max_length", return_tensors="pt")
    return [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)}
            for i, m in zip(enc["input_ids"], enc["attention_mask"])]


def folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_smollm_checkpoints_are_small_resume_reproduces_and_load_in_one_call(smollm, rows, tmp_path, record_property):
    path, _ = smollm

    def adapted():
        model = base(path)
        torch.manual_seed(0)
        inject(model, AdapterConfig(kind="talklora", rank=8, num_experts=4, dropout=0.05, target_modules=[TOP],
                                    target_match="regex", balance_loss="switch", aux_loss_weight=0.01))
        return model

    def train(model, resume=None):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, logging_steps=1, per_device_train_batch_size=2,
            report_to=[], use_cpu=True, learning_rate=3e-3, seed=0, data_seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[RoutingStatsCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h for h in trainer.state.log_history if "loss" in h}

    model = adapted()
    whole = train(model)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    ratio = folder_bytes(checkpoint) / (path / "model.safetensors").stat().st_size
    record_property("checkpoint_bytes_over_model_bytes", ratio)
    assert ratio < 0.05
    resumed = train(adapted(), resume=str(checkpoint))
    for step in (3, 4):
        assert resumed[step]["loss"] == whole[step]["loss"]
        assert resumed[step]["routing/churn"] == whole[step]["routing/churn"]

    final = tmp_path / "run" / "checkpoint-4"
    batch = {k: torch.stack([r[k] for r in rows[:2]]) for k in ("input_ids", "attention_mask")}
    model.eval()
    ref = model(**batch).logits
    loaded = from_pretrained(path, final)
    assert torch.equal(loaded(**batch).logits, ref)
    with pytest.raises(ValueError, match=re.escape("talklora_min.hf.from_pretrained")):
        transformers.AutoModelForCausalLM.from_pretrained(final)


def test_smollm_checkpoint_of_the_default_config_is_under_5_percent(smollm, rows, tmp_path, record_property):
    """AdapterConfig() on all 30 layers (q/k/v/up/down, r = 8, E = 4): one step, one checkpoint."""
    path, _ = smollm
    model = base(path)
    inject(model, AdapterConfig())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, save_steps=1,
                                          per_device_train_batch_size=1, report_to=[], use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=rows[:1]).train()
    ratio = folder_bytes(tmp_path / "checkpoint-1") / (path / "model.safetensors").stat().st_size
    record_property("default_checkpoint_bytes_over_model_bytes", ratio)
    assert ratio < 0.05


def test_smollm_default_targets_and_peft_both_ways(smollm, rows, tmp_path):
    path, _ = smollm
    report = inject(base(path), AdapterConfig(kind="lora", rank=2))
    assert report.target_modules == ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    assert len(report.matched) == 150

    batch = {k: torch.stack([r[k] for r in rows[:2]]) for k in ("input_ids", "attention_mask")}
    top = ["model.layers.29.self_attn.q_proj", "model.layers.29.self_attn.v_proj", "model.layers.28.mlp.up_proj"]
    torch.manual_seed(1)
    pm = peft.get_peft_model(base(path), peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=top, use_rslora=True, rank_pattern={"up_proj": 2},
        init_lora_weights=False)).eval()
    ref = pm(**batch).logits.detach()
    model = from_peft(pm)
    save_adapter(model, tmp_path / "ours")
    reloaded = base(path)
    load_adapter(reloaded, tmp_path / "ours")
    # ours vs PEFT: the same maths in another float order (the fused branch) -- equal to float32 rounding
    torch.testing.assert_close(reloaded(**batch).logits, ref, rtol=1e-5, atol=1e-4)

    back = to_peft(reloaded)
    assert torch.equal(back(**batch).logits, ref)
    back.save_pretrained(tmp_path / "peft")
    again = peft.PeftModel.from_pretrained(base(path), tmp_path / "peft").eval()
    assert torch.equal(again(**batch).logits, ref)
    assert len(adapter_layers(reloaded)) == 3
