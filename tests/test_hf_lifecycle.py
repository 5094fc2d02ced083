"""Adapter lifecycle as a PEFT user expects it (docs/method.md §8), on tiny random GPT-2 / BERT / T5 /
Llama models: the model remembers its config, config-less saves, configs that do not describe the
model refused, default and "all-linear" targets (checked against PEFT's own resolution), checkpoints
that hold the adapter, one-call loading, AutoModel refusing our folders, from_peft / to_peft round
trips, and RoutingStatsCallback on plain LoRA, with the aux loss and across a resume.

One table of architectures (ARCHS) × generic checks, as PEFT's tests do."""
from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from talklora_min import (AdapterConfig, adapter_config, adapter_layers, inject, load_adapter,  # noqa: E402
                          save_adapter)
from talklora_min.hf import RoutingStatsCallback, from_peft, from_pretrained, to_peft  # noqa: E402
from talklora_min.io import MANIFEST_NAME  # noqa: E402

MARKER = "talklora_min.hf.from_pretrained"


def resume_state(folder) -> dict:
    """What Trainer(resume_from_checkpoint=folder) loads: the entries of model.safetensors.index.json
    from the shard files it names (load_sharded_checkpoint)."""
    from safetensors.torch import load_file
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {name: load_file(folder / name) for name in set(weight_map.values())}
    return {k: shards[name][k] for k, name in weight_map.items()}


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
        intermediate_size=48))


def t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0))


def bert():
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=64))


def ids(seed=0, shape=(2, 7)):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def run(model, arch):
    """The model's main output on a fixed batch."""
    if arch == "bert":
        return model(ids()).last_hidden_state
    if arch == "t5":
        return model(input_ids=ids(), decoder_input_ids=ids(1, (2, 3))).logits
    return model(ids()).logits


# name: (constructor, AutoModel class, default targets, the architecture's output head or None)
ARCHS = {
    "gpt2": (gpt2, "AutoModelForCausalLM", ("c_attn", "c_proj", "c_fc")),
    "llama": (llama, "AutoModelForCausalLM", ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")),
    "t5": (t5, "AutoModelForSeq2SeqLM", ("q", "k", "v", "o", "wi", "wo")),
    "bert": (bert, "AutoModel", ("query", "key", "value")),
}


def fresh(arch, seed=0):
    torch.manual_seed(seed)
    return ARCHS[arch][0]().eval()


@torch.no_grad()
def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(model).values():
        for name in layer.weight_names:
            p = getattr(layer, name)
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model


# ----------------------------------------------------------------------------- config on the model
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["lora", "talklora"])
def test_model_remembers_its_config_and_saves_without_one(arch, kind, tmp_path):
    config = AdapterConfig(kind=kind, rank=4, num_experts=2, alpha=8.0)     # target_modules=None: per architecture
    model = fresh(arch)
    report = inject(model, config)
    assert report.target_modules == ARCHS[arch][2]
    assert adapter_config(model) == config and adapter_config(model) is not config
    randomise(model)
    ref = run(model, arch)
    save_adapter(model, tmp_path)                                           # no config: the model's own
    other = fresh(arch)
    assert not torch.equal(run(other, arch), ref)
    load_adapter(other, tmp_path)
    assert adapter_config(other) == config
    assert torch.equal(run(other, arch), ref)


def test_adapter_config_of_a_plain_model_names_the_fix():
    with pytest.raises(ValueError, match="no adapter config.*pass the AdapterConfig explicitly"):
        adapter_config(llama())
    with pytest.raises(ValueError, match="no adapter config"):
        save_adapter(llama(), "unused")


BASE = dict(kind="lora", rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), modules_to_save=("lm_head",))
WRONG = {                                    # field -> (value, what the message names)
    "rank": (2, "rank is 4 in the model but 2"),
    "alpha": (16.0, "scaling is 2.0 in the model but 4.0"),
    "use_rslora": (True, "scaling is 2.0 in the model but 4.0"),
    "rank_pattern": ({"v_proj": 2}, "rank is 4 in the model but 2"),
    "alpha_pattern": ({"q_proj": 4.0}, "scaling is 2.0 in the model but 1.0"),
    "target_modules": (("q_proj", "k_proj", "v_proj"), r"would also adapt \['model.layers.0.self_attn.k_proj'"),
    "target_match": ("exact", "target_modules"),
    "modules_to_save": ((), r"modules_to_save is \['lm_head'\] in the model but \[\]"),
    "dropout": (0.1, "dropout is 0.0 in the model but 0.1"),
    "kind": ("moelora", "kind is 'lora' in the model but 'moelora'"),
}


@pytest.mark.parametrize("field", WRONG)
def test_a_config_that_does_not_describe_the_model_is_refused(field, tmp_path):
    model = llama()
    inject(model, AdapterConfig(**BASE))
    value, message = WRONG[field]
    extra = {"num_experts": 2} if field == "kind" else {}
    wrong = AdapterConfig(**{**BASE, field: value, **extra})
    with pytest.raises(ValueError, match=message):
        save_adapter(model, tmp_path / "a", wrong)
    assert not (tmp_path / "a").exists()
    save_adapter(model, tmp_path / "a")                                     # its own config is fine


def test_aux_loss_weight_and_balance_loss_are_part_of_the_description(tmp_path):
    config = AdapterConfig(kind="moelora", rank=4, num_experts=2, balance_loss="switch", aux_loss_weight=0.1)
    model = llama()
    inject(model, config)
    for changes, message in [({"aux_loss_weight": 0.0}, "aux_loss_weight is 0.1 in the model but 0.0"),
                             ({"balance_loss": "cv"}, "balance_loss is 'switch' in the model but 'cv'")]:
        with pytest.raises(ValueError, match=message):
            save_adapter(model, tmp_path, AdapterConfig(**{**config.to_dict(), **changes}))


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_matches_peft_all_linear(arch):
    from peft.tuners.lora import LoraLayer
    model = fresh(arch)
    report = inject(model, AdapterConfig(kind="lora", rank=2, target_modules="all-linear"))
    theirs = peft.get_peft_model(fresh(arch), peft.LoraConfig(r=2, target_modules="all-linear"))
    expected = sorted(n for n, m in theirs.get_base_model().named_modules() if isinstance(m, LoraLayer))
    assert sorted(report.matched) == expected and expected
    head = getattr(model, "get_output_embeddings", lambda: None)()
    assert head is None or not any(layer.base is head for layer in adapter_layers(model).values())
    assert AdapterConfig(target_modules="ALL-LINEAR").to_dict()["target_modules"] == "all-linear"
    randomise(model)
    loss = run(model, arch).float().pow(2).mean()
    if arch == "bert":                              # the pooler is adapted too
        loss = loss + model(ids()).pooler_output.pow(2).mean()
    loss.backward()
    assert all(layer.A.grad is not None for layer in adapter_layers(model).values())


def test_default_config_picks_per_architecture():
    assert AdapterConfig().target_modules is None
    for arch, (_, _, expected) in ARCHS.items():
        assert inject(fresh(arch), AdapterConfig()).target_modules == expected, arch


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_holds_the_adapter_and_loads_in_one_call(arch, tmp_path):
    base = fresh(arch)
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    inject(model, AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules="all-linear"))
    randomise(model)
    ref = run(model, arch)
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert MANIFEST_NAME in files and "model.safetensors.index.json" in files and "config.json" in files
    assert "model.safetensors" not in files
    resume = resume_state(tmp_path / "adapter")
    assert not any(".base." in k or "embed" in k for k in resume)            # no frozen base weight
    trainable = dict(model.named_parameters())
    assert set(resume) == {n for n, p in trainable.items() if p.requires_grad}
    assert all(torch.equal(v, trainable[k]) for k, v in resume.items())
    # AutoModel on our folder refuses, naming the loader (never a silent re-initialisation)
    auto = getattr(transformers, ARCHS[arch][1])
    with pytest.raises(ValueError, match=re.escape(MARKER)):
        auto.from_pretrained(tmp_path / "adapter")
    # one call: a base folder or a base model, and the adapter folder
    loaded = from_pretrained(tmp_path / "base", tmp_path / "adapter")
    assert type(loaded) is type(model) and torch.equal(run(loaded.eval(), arch), ref)
    loaded = from_pretrained(fresh(arch), tmp_path / "adapter")
    assert torch.equal(run(loaded, arch), ref)
    with pytest.raises(ValueError, match="adapter folder, not a base model"):
        from_pretrained(tmp_path / "adapter", tmp_path / "adapter")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="base model folder not found"):
        from_pretrained(tmp_path / "nowhere", tmp_path)
    with pytest.raises(TypeError, match="base must be"):
        from_pretrained(3, tmp_path)
    with pytest.raises(FileNotFoundError):
        from_pretrained(llama(), tmp_path / "nowhere")


def _rows(n=12, length=6):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        x = torch.randint(0, 64, (length,), generator=g)
        mask = torch.ones(length, dtype=torch.long)
        mask[length - 1 - i % 2:] = 0
        rows.append({"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)})
    return rows


def _train(model, out, resume=None, steps=6, callbacks=()):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=2, logging_steps=1, per_device_train_batch_size=2,
        report_to=[], use_cpu=True, learning_rate=1e-2, seed=0, data_seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_rows(), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def _routed_llama(kind="talklora"):
    model = fresh("llama")
    torch.manual_seed(1)
    extra = {} if kind == "lora" else dict(num_experts=2, balance_loss="switch", aux_loss_weight=0.01,
                                           modules_to_save=("lm_head",))
    inject(model, AdapterConfig(kind=kind, rank=4, dropout=0.1, **extra))
    return model


def test_trainer_checkpoints_hold_the_adapter_and_resume_reproduces_losses_and_churn(tmp_path):
    whole = _train(_routed_llama(), tmp_path / "run", callbacks=[RoutingStatsCallback()])
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / MANIFEST_NAME).is_file()
    resume = resume_state(checkpoint)                  # the adapter and lm_head (modules_to_save), no base weight
    assert set(resume) == {n for n, p in _routed_llama().named_parameters() if p.requires_grad}
    assert "lm_head.weight" in resume
    resumed = _train(_routed_llama(), tmp_path / "run", resume=str(checkpoint), callbacks=[RoutingStatsCallback()])
    assert sorted(resumed) == sorted(whole) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4, 5, 6):                      # after the resume: the same losses, churn and aux loss
        for key in ("loss", "routing/churn", "routing/aux_loss", "routing/gini_mean"):
            assert resumed[step][key] == whole[step][key], (step, key)
    assert all(0.0 <= whole[s]["routing/churn"] <= 1.0 for s in whole)      # from the first log on
    assert whole[1]["routing/churn"] > 0


def test_callback_logs_the_mean_balance_loss_of_the_training_forwards(tmp_path):
    model = _routed_llama()
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(float(out["aux_loss"])) if m.training else None)
    logs = _train(model, tmp_path, steps=3, callbacks=[RoutingStatsCallback(churn=False)])
    assert len(seen) == 3
    for step in (1, 2, 3):
        assert logs[step]["routing/aux_loss"] == pytest.approx(seen[step - 1], rel=1e-6)


def test_callback_on_plain_lora_warns_once_and_logs_nothing(tmp_path):
    callback = RoutingStatsCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs = _train(_routed_llama("lora"), tmp_path, steps=2, callbacks=[callback])
        _train(_routed_llama("lora"), tmp_path / "again", steps=2, callbacks=[callback])
    mine = [w for w in caught if "RoutingStatsCallback" in str(w.message)]
    assert len(mine) == 1 and "no routed layer" in str(mine[0].message)
    assert len(logs) == 2 and not any(k.startswith("routing/") for h in logs.values() for k in h)


# ----------------------------------------------------------------------------- PEFT in both directions
def _peft_model(arch, rslora=True):
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "up_proj"]}[arch]
    pattern = {"gpt2": {"c_fc": 2}, "llama": {"v_proj": 2}}[arch]
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False,
                             use_rslora=rslora, rank_pattern=pattern, alpha_pattern={targets[0]: 3},
                             fan_in_fan_out=arch == "gpt2", modules_to_save=["lm_head"] if arch == "llama" else None)
    torch.manual_seed(2)
    return peft.get_peft_model(fresh(arch), config).eval()


def assert_same_as_peft(ours, theirs):
    """Our layers and PEFT's compute the same maths in a different float order (ours adds the adapter
    inside one fused GEMM): equal to float32 rounding, not bit for bit."""
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("rslora", [False, True])
def test_from_peft_save_load_is_identical_and_leaves_peft_usable(arch, rslora, tmp_path):
    pm = _peft_model(arch, rslora)
    if arch == "llama":
        with torch.no_grad():
            pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ref = run(pm, arch).detach()
    model = from_peft(pm)
    assert_same_as_peft(run(model, arch), ref)
    with pm.disable_adapter():                    # the PEFT model still works (from_peft copied it)
        assert torch.equal(run(pm, arch), run(fresh(arch), arch))
    assert torch.equal(run(pm, arch), ref)
    config = adapter_config(model)
    assert config.use_rslora is rslora and config.rank_pattern and config.alpha_pattern
    save_adapter(model, tmp_path)                  # rank / alpha patterns and rsLoRA: no config needed
    reloaded = fresh(arch)
    load_adapter(reloaded, tmp_path)
    assert_same_as_peft(run(reloaded, arch), ref)


def test_from_peft_inplace_is_opt_in():
    pm = _peft_model("llama")
    model = from_peft(pm, inplace=True)
    assert model is pm.get_base_model() and adapter_layers(model)


def test_from_peft_messages_for_what_it_cannot_convert():
    embedding = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="LoRA on an nn.Embedding.*leave embeddings out of target_modules"):
        from_peft(embedding)
    dora = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="uses DoRA.*no magnitude vector"):
        from_peft(dora)
    two = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    two.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"2 adapters \['default', 'other'\].*delete_adapter"):
        from_peft(two)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("settings", [
    dict(alpha=None),
    dict(alpha=6.0, use_rslora=True, rank_pattern={"c_fc": 2, "v_proj": 2}, alpha_pattern={"c_attn": 3.0, "q_proj": 3.0}),
], ids=["unit-scaling", "rslora-patterns"])
def test_to_peft_is_identical_and_round_trips_through_peft(arch, settings, tmp_path):
    targets = {"gpt2": ("c_attn", "c_fc"), "llama": ("q_proj", "v_proj")}[arch]
    saved = ("lm_head",) if arch == "llama" else ()
    patterns = {k: {p: v for p, v in settings.get(k, {}).items() if p in targets}
                for k in ("rank_pattern", "alpha_pattern")}
    config = AdapterConfig(kind="lora", rank=4, target_modules=targets, modules_to_save=saved,
                           **{**settings, **patterns})
    model = fresh(arch)
    inject(model, config)
    randomise(model)
    if saved:
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
    ref = run(model, arch)
    pm = to_peft(model)
    assert isinstance(pm, peft.PeftModel)
    assert_same_as_peft(run(pm, arch), ref)
    assert torch.equal(run(model, arch), ref)       # to_peft copied: ours still works
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    again = peft.PeftModel.from_pretrained(fresh(arch), tmp_path).eval()
    assert_same_as_peft(run(again, arch), ref)
    assert torch.equal(run(from_peft(again), arch), ref)


def test_to_peft_refuses_what_peft_lora_cannot_hold():
    moe = llama()
    inject(moe, AdapterConfig(kind="talklora", rank=4, num_experts=2))
    with pytest.raises(ValueError, match="TalkLoRALinear.*PEFT has no such layer"):
        to_peft(moe)
    tied = llama()
    inject(tied, AdapterConfig(kind="lora", rank=4, share_B_across_layers=True))
    with pytest.raises(ValueError, match="ties its B"):
        to_peft(tied)
