"""Adversarial round two (library side): nothing lost, nothing silently wrong.  One test (or table)
per problem; each failed on the code before the fix.  Concurrency cases run real processes, as
tests/test_faults.py does.

1  save_adapter only removes files it provably wrote (foreign adapter_config.json & co. survive)
2  saves to one folder serialise; readers always see a complete adapter (2 writers + 1 reader)
4  a failed load_adapter leaves the model exactly as before (no aux hooks, no modules_to_save marks)
5  merged LoRA: disable_adapters, state_dict round trip, merge_and_unload all-or-nothing, fp16 overflow
6  hf.load_pretrained: dtype / overflow / complex refused, shard paths outside the folder refused
8  record_routing refuses a mask of another shape with the same number of elements
9  config sizes checked against the stored tensors before anything is allocated
12 float8 tensors load; NaN / Inf refused by load_adapter and load_official_state_dict, as by set_weights
13 load_pretrained errors name the file; official import accepts modules named lora_*
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file
from torch import nn

from talklora_min import (AdapterConfig, TalkLoRALinear, adapter_layers, disable_adapters,
                          export_official_state_dict, inject, load_adapter, load_official_state_dict,
                          merge_and_unload, save_adapter)
from talklora_min.io import MANIFEST_NAME, read_adapter

from test_io import Tiny, official_pair, random_official_state, randomise_adapters

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CONFIG = AdapterConfig(kind="talklora", rank=4, num_experts=2, target_modules=("q_proj", "up_proj"))


def small(seed: int) -> nn.Module:
    """A ~20 kB adapter whose values are determined by ``seed``."""
    model = Tiny(d=16, layers=2)
    inject(model, CONFIG)
    return randomise_adapters(model, seed)


def child(code: str) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT), str(TESTS)) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


def manifest_config(directory: Path, **changes) -> None:
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["config"].update(changes)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


def rewrite(directory: Path, tensors: dict) -> None:
    """Replace the weights (hash recorded in the manifest): passes the integrity check, wrong content."""
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    data = save(tensors)
    (directory / manifest["weights"]["file"]).write_bytes(data)
    manifest["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- 1: data loss
@pytest.mark.parametrize("config_text", ['{"model_type": "bert", "note": "another library"}', "not json {",
                                         '[1, 2, 3]', '{"kind": "lora"'], ids=["foreign", "invalid", "list", "cut"])
def test_save_leaves_files_it_did_not_write(tmp_path, config_text):
    foreign = {"adapter_config.json": config_text.encode(), "adapter_model.safetensors": save({"w": torch.ones(3)}),
               "talklora_weights.0000000000000000.safetensors": b"someone else's bytes"}
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
    save_adapter(small(1), tmp_path, CONFIG)
    save_adapter(small(2), tmp_path, CONFIG)
    for name, data in foreign.items():
        assert (tmp_path / name).read_bytes() == data, f"{name} was changed or removed"
    assert same_adapter(read_adapter(tmp_path)[1], small(2))


# ----------------------------------------------------------------------------- 2: concurrency
WRITER = """
import sys, torch
torch.set_num_threads(1)
from test_faults_round2 import small, CONFIG
from talklora_min import save_adapter
from test_io import randomise_adapters
model, errors = small(0), []
for i in range({saves}):
    randomise_adapters(model, {first} + i)
    try:
        save_adapter(model, {directory!r}, CONFIG)
    except Exception as err:
        errors.append(f"{{type(err).__name__}}: {{err}}")
print(len(errors), *errors[:3], sep="\\n", flush=True)
"""
READER = """
import os, torch
torch.set_num_threads(1)
from talklora_min.io import read_adapter
reads, errors = 0, []
while not os.path.exists({stop!r}):
    try:
        config, tensors = read_adapter({directory!r})
        assert len(tensors) == {n_tensors}, len(tensors)
        reads += 1
    except Exception as err:
        errors.append(f"{{type(err).__name__}}: {{err}}")
print(reads, len(errors), *errors[:3], sep="\\n", flush=True)
"""


def test_two_writers_and_a_reader_on_one_folder(tmp_path, record_property):
    directory = tmp_path / "adapter"
    save_adapter(small(0), directory, CONFIG)
    n_tensors = len(read_adapter(directory)[1])
    stop = tmp_path / "stop"
    reader = child(READER.format(directory=str(directory), stop=str(stop), n_tensors=n_tensors))
    writers = [child(WRITER.format(directory=str(directory), first=1000 * (k + 1), saves=80)) for k in range(2)]
    try:
        results = [w.communicate(timeout=300) for w in writers]
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
        for w in writers:
            w.kill()
    for (stdout, stderr), w in zip(results, writers):
        assert w.returncode == 0, stderr[-2000:]
        assert stdout.split("\n")[0] == "0", f"a writer failed: {stdout[:600]}"
    reads, failures = (int(v) for v in out.split("\n")[:2])
    record_property("reads", reads)
    assert reader.returncode == 0, err[-2000:]
    assert reads > 0 and failures == 0, f"{failures} of {reads + failures} reads failed: {out[:600]}"
    config, tensors = read_adapter(directory)                   # the folder is one complete adapter
    last = [randomise_adapters(small(0), 1000 * (k + 1) + 79) for k in range(2)]
    assert any(same_adapter(tensors, m) for m in last)
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == sorted(
        [MANIFEST_NAME, json.loads((directory / MANIFEST_NAME).read_text())["weights"]["file"]])


def same_adapter(tensors: dict, model) -> bool:
    """The file's tensors are exactly the model's adapter."""
    from talklora_min.io import adapter_tensors
    ours = adapter_tensors(model)
    return set(ours) == set(tensors) and all(torch.equal(tensors[k], v.detach()) for k, v in ours.items())


# ----------------------------------------------------------------------------- 4: failed loads
def test_a_failed_load_leaves_the_model_exactly_as_before(tmp_path):
    config = AdapterConfig(kind="moelora", rank=4, num_experts=2, target_modules=("q_proj",), balance_loss="cv",
                           aux_loss_weight=0.5, modules_to_save=("head",))

    class Wrapped(nn.Module):                     # a dict output with a loss, as transformers models return
        def __init__(self):
            super().__init__()
            self.body = Tiny(d=16, layers=2)

        def forward(self, x):
            return {"loss": self.body(x).pow(2).mean()}

    trained = Wrapped()
    inject(trained, config)
    randomise_adapters(trained, 3)
    save_adapter(trained, tmp_path / "good", config)
    save_adapter(trained, tmp_path / "bad", config)
    _, tensors = read_adapter(tmp_path / "bad")
    tensors["modules_to_save.body.head.weight"] = tensors["modules_to_save.body.head.weight"].to(torch.int64)
    rewrite(tmp_path / "bad", tensors)

    model = Wrapped()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="modules_to_save.body.head.weight"):
        load_adapter(model, tmp_path / "bad")
    assert not adapter_layers(model) and not model._forward_hooks and not model._forward_pre_hooks
    assert not any(k.startswith("_talklora") for m in model.modules() for k in vars(m))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    load_adapter(model, tmp_path / "good")                     # the aux term is added once, as in a fresh load
    reference = Wrapped()
    load_adapter(reference, tmp_path / "good")
    x = torch.randn(3, 16)
    assert torch.equal(model(x)["loss"], reference(x)["loss"])
    save_adapter(model, tmp_path / "again", config)           # and a later save loads back
    load_adapter(Wrapped(), tmp_path / "again")


# ----------------------------------------------------------------------------- 5: merged LoRA
def lora_model(dtype=torch.float32, scale=1.0):
    model = Tiny(d=16, layers=2).to(dtype)
    inject(model, AdapterConfig(kind="lora", rank=4, alpha=8.0, target_modules=("q_proj", "up_proj")))
    randomise_adapters(model, 5)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.B.mul_(scale)
    return model.eval()


def test_merged_layers_obey_disable_adapters_and_save_unmerged_state():
    x = torch.randn(4, 16)
    model = lora_model()
    base = Tiny(d=16, layers=2).eval()(x)
    adapted = model(x)
    for layer in adapter_layers(model).values():
        layer.merge()
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
    assert all(layer.merged for layer in adapter_layers(model).values())
    fresh = lora_model()
    with torch.no_grad():
        for layer in adapter_layers(fresh).values():
            layer.B.zero_()
    fresh.load_state_dict(model.state_dict())                   # holds W0, not W0 + s·BA
    torch.testing.assert_close(fresh(x), adapted, atol=1e-5, rtol=0)
    model.load_state_dict(fresh.state_dict())                   # into a merged model: merged again
    assert all(layer.merged for layer in adapter_layers(model).values())
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)


def test_merge_and_unload_is_all_or_nothing():
    model = lora_model()
    layers = list(adapter_layers(model).values())
    weights = [layer.base.weight.detach().clone() for layer in layers]
    with torch.no_grad():
        layers[-1].A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf; nothing was merged"):
        merge_and_unload(model)
    assert not any(layer.merged for layer in layers) and len(adapter_layers(model)) == len(layers)
    assert all(torch.equal(layer.base.weight, w) for layer, w in zip(layers, weights))


def test_merge_into_an_fp16_base_that_overflows_is_refused():
    model = lora_model(torch.float16, scale=2e4)
    layers = list(adapter_layers(model).values())
    weights = [layer.base.weight.detach().clone() for layer in layers]
    with pytest.raises(ValueError, match="overflows the base's torch.float16"):
        merge_and_unload(model)
    assert all(torch.equal(layer.base.weight, w) for layer, w in zip(layers, weights))
    assert all(torch.isfinite(layer.base.weight).all() for layer in layers)


# ----------------------------------------------------------------------------- 6, 13: load_pretrained
def _pretrained_folder(tmp_path):
    """A full-model folder as ``save_pretrained`` wrote it for an injected model (older versions)."""
    pytest.importorskip("transformers")
    from talklora_min.hf import load_pretrained
    model = Tiny(d=16, layers=1)
    inject(model, AdapterConfig(kind="lora", rank=2, target_modules=("q_proj",)))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    target = Tiny(d=16, layers=1, seed=1)
    inject(target, AdapterConfig(kind="lora", rank=2, target_modules=("q_proj",)))
    return load_pretrained, state, target


TAMPER = {
    "int64": (lambda t: (t * 100).to(torch.int64), "has dtype torch.int64"),
    "float64_1e300": (lambda t: t.double() * 1e300, "overflow the model's torch.float32"),
    "complex": (lambda t: t.to(torch.complex64), "has dtype torch.complex64"),
    "nan": (lambda t: t.masked_fill(torch.ones_like(t, dtype=torch.bool), float("nan")), "NaN/Inf"),
}


@pytest.mark.parametrize("case", TAMPER)
def test_load_pretrained_checks_values_not_only_shapes(tmp_path, case):
    load_pretrained, state, target = _pretrained_folder(tmp_path)
    make, message = TAMPER[case]
    key = "blocks.0.up_proj.weight"
    save_file({**state, key: make(state[key])}, tmp_path / "model.safetensors")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"model.safetensors.*{key}.*{message}|{message}"):
        load_pretrained(target, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_load_pretrained_refuses_shards_outside_the_folder(tmp_path, where):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    load_pretrained, state, target = _pretrained_folder(folder)
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    shard = "../outside.safetensors" if where == "parent" else str(tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in state}}))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="is not a file inside"):
        load_pretrained(target, folder)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("index, message", [
    ("{not json", "index.json: not a safetensors index"),
    ('{"metadata": {}}', "index.json: not a safetensors index"),
    ('{"weight_map": {"a": 3}}', "index.json: 'weight_map' must map"),
    ('{"weight_map": [1]}', "index.json: 'weight_map' must map"),
    (None, r"model.safetensors: not a readable safetensors file"),
])
def test_load_pretrained_errors_name_the_file(tmp_path, index, message):
    load_pretrained, _, target = _pretrained_folder(tmp_path)
    if index is None:
        (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    else:
        (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=message):
        load_pretrained(target, tmp_path)


def test_official_import_accepts_modules_named_lora_something():
    class WithLoraHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Tiny(d=16, layers=1)
            self.lora_head = nn.Linear(5, 3)                # an ordinary module whose name starts with lora_

        def forward(self, x):
            return self.lora_head(self.body(x))

    model = WithLoraHead()
    inject(model, AdapterConfig(kind="talklora", rank=8, num_experts=4, target_modules=("q_proj",)))
    randomise_adapters(model, 2)
    state = export_official_state_dict(model)
    assert "lora_head.weight" in state
    other = WithLoraHead()
    inject(other, AdapterConfig(kind="talklora", rank=8, num_experts=4, target_modules=("q_proj",)))
    load_official_state_dict(other, state)
    x = torch.randn(2, 16)
    assert torch.equal(other(x), model(x))


# ----------------------------------------------------------------------------- 8: record_routing masks
def test_record_routing_refuses_a_mask_of_another_shape_with_the_same_size():
    from talklora_min.probes import record_routing
    layer = TalkLoRALinear(nn.Linear(8, 8), 4, 2)
    x = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match=r"token mask has shape \(2, 6\).*leading shape \(3, 4\)"):
        with record_routing(layer, attention_mask=torch.ones(2, 6)) as rec:
            layer(x)
    mask = torch.rand(3, 4) > 0.3
    for given in (mask, mask.reshape(-1)):                  # the same tokens, flat or not: accepted
        with record_routing(layer, attention_mask=given) as rec:
            layer(x)
        assert rec.gates().shape[0] == int(mask.sum())


# ----------------------------------------------------------------------------- 9: sizes
SIZES = """
import resource, sys, torch
torch.set_num_threads(1)
from test_io import Tiny
from talklora_min import load_adapter
model = Tiny(d=16, layers=2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_adapter(model, {directory!r})
    print("LOADED")
except Exception as err:
    print(type(err).__name__, str(err)[:300].replace("\\n", " "))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_config_sizes_are_checked_against_the_tensors_before_allocating(tmp_path):
    save_adapter(small(1), tmp_path, CONFIG)
    manifest_config(tmp_path, rank=2048, num_experts=2048)      # a ~20 kB folder asking for ~130 MB
    proc = child(SIZES.format(directory=str(tmp_path)))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    outcome, grown_mb = out.strip().rsplit("\n", 1)
    assert outcome.startswith("ValueError") and "shape mismatch" in outcome, outcome
    assert int(grown_mb) < 30, f"the refused load grew the process by {grown_mb} MB"


@pytest.mark.parametrize("field, value", [("rank", 2**70), ("num_experts", 2**40), ("rank", 2**31)])
def test_absurd_sizes_in_a_manifest_are_refused_cleanly(tmp_path, field, value):
    from talklora_min.io import AdapterFormatError
    save_adapter(small(1), tmp_path, CONFIG)
    manifest_config(tmp_path, **{field: value})
    model = Tiny(d=16, layers=2)
    with pytest.raises(AdapterFormatError, match=rf"AdapterConfig.{field} must be at most"):
        load_adapter(model, tmp_path)
    assert not adapter_layers(model)


# ----------------------------------------------------------------------------- 12: float8, NaN / Inf
def test_float8_tensors_load_and_non_finite_values_are_refused_everywhere(tmp_path):
    model = small(1)
    save_adapter(model, tmp_path / "a", CONFIG)
    _, tensors = read_adapter(tmp_path / "a")
    key = "blocks.0.q_proj.A"
    rewrite(tmp_path / "a", {**tensors, key: tensors[key].to(torch.float8_e4m3fn)})
    fresh = Tiny(d=16, layers=2)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh.blocks[0].q_proj.A, tensors[key].to(torch.float8_e4m3fn).float())

    for bad in (float("nan"), float("inf")):
        for dtype in (torch.float32, torch.float8_e5m2):
            values = tensors[key].clone()
            values[0, 0] = bad
            rewrite(tmp_path / "a", {**tensors, key: values.to(dtype)})
            target = Tiny(d=16, layers=2)
            with pytest.raises(ValueError, match=rf"'{key}' contains 1 NaN/Inf"):
                load_adapter(target, tmp_path / "a")
            assert not adapter_layers(target)
            with pytest.raises(ValueError, match="NaN or Inf"):       # set_weights agrees
                small(1).blocks[0].q_proj.set_weights(A=values)

    official, reference = official_pair(Tiny)
    state = random_official_state(reference)
    name = next(k for k in state if k.endswith("lora_A_talk.default.weight"))
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    before = export_official_state_dict(official)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}' contains 1 NaN/Inf"):
        load_official_state_dict(official, state)
    assert all(torch.equal(export_official_state_dict(official)[k], v) for k, v in before.items())
