"""save_adapter / load_adapter round trips and errors; official TalkLoRA layout import/export (docs/method.md §2)."""
import copy
import hashlib
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save
from torch import nn

from talklora_min import (AdapterConfig, adapter_layers, export_official_state_dict, inject, load_adapter,
                          load_adapter_weights, load_official_state_dict, save_adapter)
from talklora_min.io import (MANIFEST_NAME, AdapterFormatError, AdapterIntegrityError, read_adapter)
from talklora_min.reference import LoopMoELoRALinear, OfficialTalkLoRALinear, wrap_official

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


class Block(nn.Module):
    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d // 2, bias=bias)
        self.v_proj, self.o = nn.Linear(d, d // 2, bias=bias), nn.Linear(d // 2, d)
        self.up_proj, self.down_proj = nn.Linear(d, 2 * d, bias=bias), nn.Linear(2 * d, d, bias=bias)

    def forward(self, x):
        attn = torch.softmax(self.q_proj(x)[..., : self.k_proj.out_features] @ self.k_proj(x).transpose(-1, -2), -1)
        x = x + self.o(attn @ self.v_proj(x))
        return x + self.down_proj(torch.tanh(self.up_proj(x)))


class Tiny(nn.Module):
    """Embedding-free toy transformer: blocks.{i}.{q,k,v}_proj/o/up_proj/down_proj, a norm, a head."""

    def __init__(self, d: int = 16, layers: int = 3, bias: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block(d, bias) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 5)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def weights_file(directory):
    """The weights file the folder's manifest names."""
    return directory / json.loads((directory / MANIFEST_NAME).read_text())["weights"]["file"]


def rewrite_weights(directory, tensors=None, data=None):
    """Replace the weights by ``tensors`` (or raw ``data``) and record their hash in the manifest: a
    folder that passes the integrity check but holds wrong content."""
    data = save(tensors) if data is None else data
    weights_file(directory).write_bytes(data)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


@torch.no_grad()
def randomise_adapters(model, seed=1):
    """Random values for every adapter tensor (B included; a tied B is drawn once)."""
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for layer in adapter_layers(model).values():
        for name in layer.weight_names:
            p = getattr(layer, name)
            if id(p) not in seen:
                seen.add(id(p))
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def injected(config, model_fn=Tiny, seed=1):
    model = model_fn()
    inject(model, config)
    return randomise_adapters(model, seed).eval()


CONFIGS = {
    "lora": AdapterConfig(kind="lora", rank=4, target_modules=TARGETS, alpha=8.0),
    "moelora-code": AdapterConfig(kind="moelora", rank=4, num_experts=2, target_modules=TARGETS),
    "moelora-input": AdapterConfig(kind="moelora", rank=6, num_experts=3, router_input="input",
                                   target_modules=["up_proj", "head"], top_k=2),
    "talklora": AdapterConfig(kind="talklora", rank=8, num_experts=4, target_modules=TARGETS),
    "talklora-tied": AdapterConfig.official(rank=8),
    "lora-tied": AdapterConfig(kind="lora", rank=4, target_modules=TARGETS, share_B_across_layers=True),
}


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", CONFIGS)
def test_save_load_exact_round_trip(tmp_path, name):
    config = CONFIGS[name]
    model = injected(config)
    x = torch.randn(2, 7, 16)
    save_adapter(model, tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST_NAME, weights_file(tmp_path).name])

    fresh = Tiny()
    report = load_adapter(fresh, tmp_path)
    fresh.eval()
    assert report.matched == list(adapter_layers(model))
    for path, layer in adapter_layers(model).items():
        other = adapter_layers(fresh)[path]
        assert type(other) is type(layer)
        for key, value in layer.get_weights().items():
            assert torch.equal(other.get_weights()[key], value), (path, key)
    assert torch.equal(fresh(x), model(x))
    assert read_adapter(tmp_path)[0] == config
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["format"] == "talklora-min-adapter" and manifest["format_version"] == 1
    assert manifest["weights"]["sha256"] == hashlib.sha256(weights_file(tmp_path).read_bytes()).hexdigest()


def test_tied_B_saved_once_and_still_tied_after_load(tmp_path):
    config = CONFIGS["talklora-tied"]
    model = injected(config)
    save_adapter(model, tmp_path, config)
    stored = load_file(weights_file(tmp_path))
    assert sorted(k for k in stored if k.startswith("shared_B.")) == [f"shared_B.blocks.*.{t}" for t in sorted(TARGETS)]
    assert not any(k.endswith(".B") for k in stored)
    assert torch.equal(stored["shared_B.blocks.*.q_proj"], model.blocks[2].q_proj.B)
    assert stored["blocks.0.q_proj.T"].shape == (4, 4)
    fresh = Tiny()
    load_adapter(fresh, tmp_path)
    assert all(fresh.blocks[i].up_proj.B is fresh.blocks[0].up_proj.B for i in range(3))
    assert torch.equal(fresh.blocks[1].up_proj.B, model.blocks[1].up_proj.B)


def test_untied_keys_use_module_path_and_spec_names(tmp_path):
    config = CONFIGS["moelora-input"]
    save_adapter(injected(config), tmp_path, config)
    keys = set(load_file(weights_file(tmp_path)))
    expected = {f"{p}.{n}" for p in ["blocks.0.up_proj", "blocks.1.up_proj", "blocks.2.up_proj", "head"]
                for n in ("A", "C", "B", "W_g")}
    assert keys == expected


@settings(max_examples=8)
@given(kind=st.sampled_from(["lora", "moelora", "talklora"]), experts=st.sampled_from([1, 2, 4]),
       tied=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_property(tmp_path_factory, kind, experts, tied, seed):
    config = AdapterConfig(kind=kind, rank=4, num_experts=experts, target_modules=["q_proj", "down_proj"],
                           share_B_across_layers=tied, talk_init="identity")
    model = injected(config, seed=seed)
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(model, directory, config)
    fresh = Tiny()
    load_adapter(fresh, directory)
    x = torch.randn(3, 16)
    assert torch.equal(fresh.eval()(x), model(x))


def test_load_adapter_weights_into_injected_model(tmp_path):
    config = CONFIGS["talklora"]
    model = injected(config)
    save_adapter(model, tmp_path, config)
    target = injected(config, seed=7)
    assert not torch.equal(target.blocks[0].q_proj.A, model.blocks[0].q_proj.A)
    keys = load_adapter_weights(target, weights_file(tmp_path))
    assert len(keys) == 3 * 5 * 5
    assert torch.equal(target.blocks[0].q_proj.A, model.blocks[0].q_proj.A)
    target = injected(config, seed=7)
    assert load_adapter_weights(target, tmp_path) == keys                  # a folder works too
    assert torch.equal(target.blocks[2].down_proj.T, model.blocks[2].down_proj.T)


def saved(tmp_path, name="talklora"):
    config = CONFIGS[name]
    save_adapter(injected(config), tmp_path, config)
    return load_file(weights_file(tmp_path))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=MANIFEST_NAME):
        load_adapter(Tiny(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        load_adapter(Tiny(), tmp_path / "nowhere")
    saved(tmp_path)
    weights_file(tmp_path).unlink()
    with pytest.raises(FileNotFoundError, match="talklora_weights"):
        load_adapter(Tiny(), tmp_path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    tensors = saved(tmp_path)
    tensors["blocks.1.k_proj.W_r"] = torch.zeros(4, 9)
    rewrite_weights(tmp_path, tensors)
    model = Tiny()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"shape mismatch for 'blocks.1.k_proj.W_r': expected \(4, 8\), got \(4, 9\)"):
        load_adapter(model, tmp_path)
    # a failed load leaves the model as it was
    assert not adapter_layers(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_unknown_key(tmp_path):
    tensors = saved(tmp_path)
    tensors["blocks.0.o.A"] = torch.zeros(8, 8)
    rewrite_weights(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"unknown adapter key\(s\) \['blocks.0.o.A'\]"):
        load_adapter(Tiny(), tmp_path)


def test_missing_key(tmp_path):
    tensors = saved(tmp_path)
    del tensors["blocks.2.down_proj.T"]
    rewrite_weights(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"missing adapter key\(s\) \['blocks.2.down_proj.T'\]"):
        load_adapter(Tiny(), tmp_path)


def test_truncated_safetensors(tmp_path):
    saved(tmp_path)
    path = weights_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterIntegrityError, match=f"{path.name} do not match the SHA-256"):
        load_adapter(Tiny(), tmp_path)
    rewrite_weights(tmp_path, data=data[: len(data) // 2])        # hash fits, content unreadable
    with pytest.raises(AdapterIntegrityError, match=f"cannot read adapter weights .*{path.name}.*corrupted"):
        load_adapter(Tiny(), tmp_path)
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_adapter_weights(injected(CONFIGS["talklora"]), path)


def test_pickle_file_is_rejected(tmp_path):
    saved(tmp_path)
    torch.save({"blocks.0.q_proj.A": torch.zeros(8, 16)}, tmp_path / "pickled")
    rewrite_weights(tmp_path, data=(tmp_path / "pickled").read_bytes())
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_adapter(Tiny(), tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda text: text[:-5], "invalid adapter config .*talklora_adapter.json.*not valid JSON"),
    (lambda text: "[1, 2]", "invalid adapter config .*expected a JSON object, got list"),
    (lambda text: text.replace('"rank": 8', '"ranks": 8'),
     r"invalid adapter config .*unknown AdapterConfig field\(s\) \['ranks'\]"),
    (lambda text: text.replace('"rank": 8', '"rank": 6'), "invalid adapter config .*rank \\(6\\) must be divisible"),
    (lambda text: text.replace('"format_version": 1', '"format_version": 7'), "format_version 7 is not supported"),
    (lambda text: text.replace('"talklora-min-adapter"', '"other"'), "'format' is 'other'"),
    (lambda text: text.replace('"file": "', '"file": "../'), "'weights' must be"),
])
def test_bad_manifest(tmp_path, edit, message):
    saved(tmp_path)
    path = tmp_path / MANIFEST_NAME
    path.write_text(edit(path.read_text()))
    model = Tiny()
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(model, tmp_path)
    assert not adapter_layers(model)


def test_load_adapter_into_injected_model_raises(tmp_path):
    saved(tmp_path)
    model = injected(CONFIGS["lora"])
    with pytest.raises(ValueError, match="already has adapter layers.*load_adapter_weights"):
        load_adapter(model, tmp_path)
    assert len(adapter_layers(model)) == 15            # the existing adapters are untouched


def test_save_requires_adapters_and_config(tmp_path):
    with pytest.raises(ValueError, match="no adapter layers"):
        save_adapter(Tiny(), tmp_path, CONFIGS["lora"])
    with pytest.raises(TypeError, match="config must be an AdapterConfig"):
        save_adapter(injected(CONFIGS["lora"]), tmp_path, CONFIGS["lora"].to_dict())


def test_save_overwrites_atomically(tmp_path):
    config = CONFIGS["lora"]
    save_adapter(injected(config, seed=1), tmp_path, config)
    model = injected(config, seed=2)
    save_adapter(model, tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST_NAME, weights_file(tmp_path).name])
    assert torch.equal(load_file(weights_file(tmp_path))["blocks.0.q_proj.A"], model.blocks[0].q_proj.A)


# ----------------------------------------------------------------------------- official layout
def official_pair(model_fn, seed=0):
    """(ours, reference): the same float64 base model, ours injected with the official config."""
    base = model_fn().double().eval()
    reference = wrap_official(copy.deepcopy(base), TARGETS, rank=8, num_experts=4).eval()
    inject(base, AdapterConfig.official(rank=8))
    return base.eval(), reference


def expected_official_keys(path, bias, E=4):
    keys = {f"{path}.weight", f"{path}.lora_A.default.weight", f"{path}.lora_A_talk.default.weight",
            f"{path}.lora_A_route.default.weight"}
    keys |= {f"{path}.lora_A_experts.default.{e}.weight" for e in range(E)}
    keys |= {f"{path}.lora_B.default.{e}.weight" for e in range(E)}
    return keys | ({f"{path}.bias"} if bias else set())


def test_reference_state_dict_layout():
    layer = OfficialTalkLoRALinear(nn.Linear(16, 12), rank=8, num_experts=4)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"weight": (12, 16), "bias": (12,), "lora_A.default.weight": (8, 16),
                      "lora_A_talk.default.weight": (4, 4), "lora_A_route.default.weight": (4, 8),
                      **{f"lora_A_experts.default.{e}.weight": (2, 2) for e in range(4)},
                      **{f"lora_B.default.{e}.weight": (12, 2) for e in range(4)}}


def test_reference_matches_hand_computation():
    """The oracle itself against the docs/method.md §1 formula written out with explicit matrices."""
    torch.manual_seed(0)
    layer = OfficialTalkLoRALinear(nn.Linear(6, 5).double(), rank=4, num_experts=2).double()
    for p in layer.parameters():
        nn.init.normal_(p)
    x = torch.randn(3, 6, dtype=torch.float64)
    A, T = layer.lora_A["default"].weight, layer.lora_A_talk["default"].weight
    W_r = layer.lora_A_route["default"].weight
    C = [layer.lora_A_experts["default"][e].weight for e in range(2)]
    B = [layer.lora_B["default"][e].weight for e in range(2)]
    h = x @ A.T
    g = torch.softmax(h @ (W_r @ torch.kron(T, torch.eye(2, dtype=torch.float64))).T, -1)
    y = x @ layer.weight.T + layer.bias + sum(g[:, e:e + 1] * (h[:, 2 * e:2 * e + 2] @ C[e].T @ B[e].T)
                                             for e in range(2))
    assert torch.allclose(layer(x), y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("which", ["tiny", "llama"])
def test_export_reproduces_official_forward(which):
    model_fn = {"tiny": lambda: Tiny(bias=True), "llama": tiny_llama}[which]
    ours, reference = official_pair(model_fn)
    randomise_adapters(ours, seed=3)
    state = export_official_state_dict(ours)
    for path, layer in adapter_layers(ours).items():
        assert expected_official_keys(path, layer.base.bias is not None) <= set(state)
        assert not any(k.startswith(path + ".base") for k in state)
        assert torch.equal(state[f"{path}.lora_A_talk.default.weight"], layer.T)
        assert torch.equal(state[f"{path}.lora_B.default.3.weight"], layer.B[3])
    reference.load_state_dict(state, strict=True)
    x = torch.randint(0, 64, (2, 6)) if which == "llama" else torch.randn(2, 5, 16, dtype=torch.float64)
    out, ref = ours(x), reference(x)
    out, ref = (out.logits, ref.logits) if which == "llama" else (out, ref)
    assert out.dtype == torch.float64
    assert (out - ref).abs().max().item() <= 1e-10
    # the adapters matter: the comparison is not between two base models
    base = model_fn().double().eval()
    base_out = base(x).logits if which == "llama" else base(x)
    assert (ref - base_out).abs().max().item() > 1e-3
    # export clones: editing it leaves the model alone
    state[f"{next(iter(adapter_layers(ours)))}.lora_A.default.weight"].zero_()
    assert next(iter(adapter_layers(ours).values())).A.abs().sum() > 0


def random_official_state(reference, seed=5):
    """Random values for every parameter of the reference model, one B per projection type."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in reference.state_dict().items()}
    for target in TARGETS:
        keys = sorted(k for k in state if f".{target}.lora_B." in k)
        first = keys[0].split(".lora_B.")[0]                   # e.g. blocks.0.q_proj
        for k in keys:
            state[k] = state[f"{first}.lora_B.{k.split('.lora_B.')[1]}"]
    return state


@pytest.mark.parametrize("which", ["tiny", "llama"])
def test_import_reproduces_official_forward(which):
    model_fn = {"tiny": lambda: Tiny(bias=False), "llama": tiny_llama}[which]
    ours, reference = official_pair(model_fn)
    state = random_official_state(reference)
    reference.load_state_dict(state, strict=True)
    report = load_official_state_dict(ours, state)
    assert report.layers == list(adapter_layers(ours))
    assert {g.rpartition(".")[2] for g in report.shared_B_groups} == set(TARGETS) and report.not_loaded == []
    assert len(report.shared_B_groups) == len(TARGETS)
    x = torch.randint(0, 64, (2, 6)) if which == "llama" else torch.randn(2, 5, 16, dtype=torch.float64)
    out, ref = ours(x), reference(x)
    out, ref = (out.logits, ref.logits) if which == "llama" else (out, ref)
    assert (out - ref).abs().max().item() <= 1e-10
    # the base weights came from the state dict too (they were re-drawn at random)
    path = report.layers[0]
    assert torch.equal(ours.get_submodule(path).base.weight, state[f"{path}.weight"])

    # round trip export -> import -> export: identical tensors
    exported = export_official_state_dict(ours)
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)
    again, _ = official_pair(model_fn)
    load_official_state_dict(again, exported)
    assert all(torch.equal(v, exported[k]) for k, v in export_official_state_dict(again).items())


def test_official_import_errors():
    ours, reference = official_pair(Tiny)
    state = random_official_state(reference)

    bad = dict(state)
    bad["blocks.1.q_proj.lora_B.default.0.weight"] = state["blocks.1.q_proj.lora_B.default.0.weight"] + 1
    with pytest.raises(ValueError, match=r"ties B across its 'blocks.\*.q_proj' layers.*lora_B.default.0 in "
                                         r"'blocks.0.q_proj' and 'blocks.1.q_proj'"):
        load_official_state_dict(ours, bad)

    bad = dict(state, **{"blocks.0.v_proj.lora_A_experts.default.4.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="'blocks.0.v_proj': state dict has 5 experts.*num_experts=4"):
        load_official_state_dict(ours, bad)

    bad = dict(state, **{"blocks.0.o.lora_A.default.weight": torch.zeros(8, 8)})
    with pytest.raises(ValueError, match=r"unknown adapter key\(s\) \['blocks.0.o.lora_A.default.weight'\]"):
        load_official_state_dict(ours, bad)

    bad = {k: v for k, v in state.items() if k != "blocks.2.up_proj.lora_A_route.default.weight"}
    with pytest.raises(ValueError, match="missing adapter key 'blocks.2.up_proj.lora_A_route.default.weight'"):
        load_official_state_dict(ours, bad)

    bad = dict(state, **{"blocks.0.k_proj.lora_A.default.weight": torch.zeros(8, 15, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"shape mismatch for 'blocks.0.k_proj.lora_A.default.weight': "
                                         r"expected \(8, 16\).*got \(8, 15\)"):
        load_official_state_dict(ours, bad)

    bad = {k: v for k, v in state.items() if k != "head.weight"}
    with pytest.raises(ValueError, match=r"missing \['head.weight'\]"):
        load_official_state_dict(ours, bad)
    # the failed loads copied nothing; strict=False loads the rest and reports what it skipped
    key = "blocks.0.k_proj.lora_A.default.weight"
    assert not torch.equal(ours.blocks[0].k_proj.A, state[key])
    head = ours.head.weight.detach().clone()
    bad["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unknown \['extra.weight'\]"):
        load_official_state_dict(ours, bad)
    report = load_official_state_dict(ours, bad, strict=False)
    assert report.not_loaded == ["head.weight"] and report.unused == ["extra.weight"]
    assert torch.equal(ours.blocks[0].k_proj.A, state[key]) and torch.equal(ours.head.weight, head)


def test_official_wrong_experts_in_model():
    ours, _ = official_pair(Tiny)
    model = Tiny().double()
    inject(model, AdapterConfig.official(rank=8, num_experts=2))
    with pytest.raises(ValueError, match="state dict has 4 experts, the model layer has num_experts=2"):
        load_official_state_dict(model, export_official_state_dict(randomise_adapters(ours)))


@pytest.mark.parametrize("config, message", [
    (AdapterConfig(kind="moelora", rank=8, num_experts=4, target_modules=TARGETS), "is a MoELoRALinear"),
    (AdapterConfig(kind="talklora", rank=8, num_experts=4, alpha=16.0, target_modules=TARGETS),
     "needs alpha=None"),
])
def test_official_requires_talklora_with_unit_scaling(config, message):
    model = Tiny()
    inject(model, config)
    with pytest.raises(ValueError, match=message):
        export_official_state_dict(model)
    with pytest.raises(ValueError, match=message):
        load_official_state_dict(model, {})
    with pytest.raises(ValueError, match="no adapter layers"):
        export_official_state_dict(Tiny())


def test_loop_moelora_matches_batched_layer():
    from talklora_min import MoELoRALinear
    torch.manual_seed(0)
    base = nn.Linear(10, 7).double()
    loop = LoopMoELoRALinear(base, rank=6, num_experts=3, alpha=3.0).double()
    nn.init.normal_(loop.B)
    batched = MoELoRALinear(base, rank=6, num_experts=3, alpha=3.0)
    batched.set_weights(A=loop.A, C=loop.C, B=loop.B, W_r=loop.W_r)
    x = torch.randn(4, 10, dtype=torch.float64)
    assert (loop(x) - batched(x)).abs().max().item() <= 1e-12


# ----------------------------------------------------------------------------- format, integrity, atomicity
def test_integrity_refuses_a_changed_byte_and_changes_nothing(tmp_path):
    config = CONFIGS["talklora"]
    save_adapter(injected(config, seed=1), tmp_path, config)
    path = weights_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    target = injected(config, seed=2)
    before = {k: v.clone() for k, v in export_adapter(target).items()}
    with pytest.raises(AdapterIntegrityError, match=rf"{path.name} do not match the SHA-256 recorded in "):
        load_adapter_weights(target, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in export_adapter(target).items())


def export_adapter(model):
    from talklora_min.io import adapter_tensors
    return {k: v.detach() for k, v in adapter_tensors(model).items()}


@pytest.mark.parametrize("dtype, message", [
    (torch.int64, "'blocks.0.q_proj.A' has dtype torch.int64; it must be a floating-point tensor"),
    (torch.bool, "'blocks.0.q_proj.A' has dtype torch.bool"),
    (torch.complex64, "'blocks.0.q_proj.A' has dtype torch.complex64"),
])
def test_integer_bool_complex_tensors_are_refused_by_name(tmp_path, dtype, message):
    tensors = saved(tmp_path)
    tensors["blocks.0.q_proj.A"] = tensors["blocks.0.q_proj.A"].to(dtype)
    rewrite_weights(tmp_path, tensors)
    model = Tiny()
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path)
    assert not adapter_layers(model)


def test_values_the_model_dtype_cannot_hold_are_refused(tmp_path):
    tensors = saved(tmp_path)
    tensors = {k: v.double() for k, v in tensors.items()}
    tensors["blocks.1.up_proj.W_r"] = tensors["blocks.1.up_proj.W_r"] * 1e300     # float32 max is 3.4e38
    rewrite_weights(tmp_path, tensors)
    target = injected(CONFIGS["talklora"], seed=3)
    before = {k: v.clone() for k, v in export_adapter(target).items()}
    with pytest.raises(ValueError, match=r"'blocks.1.up_proj.W_r' holds values up to .*e\+300 that overflow "
                                         r"the model's torch.float32"):
        load_adapter_weights(target, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in export_adapter(target).items())
    # float64 values that float32 can hold load (rounded), as Tensor.copy_ does
    tensors["blocks.1.up_proj.W_r"] = tensors["blocks.1.up_proj.W_r"] / 1e300
    rewrite_weights(tmp_path, tensors)
    load_adapter_weights(target, tmp_path)
    assert torch.equal(target.blocks[1].up_proj.W_r, tensors["blocks.1.up_proj.W_r"].float())


def test_legacy_folder_loads_read_only_with_a_note_and_a_save_leaves_it(tmp_path):
    """Folders of earlier versions: adapter_config.json (our AdapterConfig JSON) + adapter_model.safetensors."""
    from safetensors.torch import save_file
    config = CONFIGS["talklora-tied"]
    model = injected(config)
    (tmp_path / "adapter_config.json").write_text(config.to_json())
    save_file({k: v.detach().contiguous() for k, v in export_adapter(model).items()},
              tmp_path / "adapter_model.safetensors")
    fresh = Tiny()
    with pytest.warns(UserWarning, match="old format .*without an integrity check"):
        load_adapter(fresh, tmp_path)
    x = torch.randn(3, 16)
    assert torch.equal(fresh.eval()(x), model(x))
    save_adapter(model, tmp_path, config)       # nothing marks the old pair as ours: it stays, the manifest wins
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [MANIFEST_NAME, weights_file(tmp_path).name, "adapter_config.json", "adapter_model.safetensors"])
    fresh = Tiny()
    load_adapter(fresh, tmp_path)                              # no warning: the current format is read
    assert torch.equal(fresh.eval()(x), model(x))


def peft_folder(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_our_loader_given_a_peft_folder_names_the_converter(tmp_path):
    directory = peft_folder(tmp_path / "peft")
    model = Tiny()
    with pytest.raises(AdapterFormatError, match=r"PEFT adapter folder .*peft.PeftModel.from_pretrained.*"
                                                 r"talklora_min\.hf\.from_peft\(peft_model\)"):
        load_adapter(model, directory)
    assert not adapter_layers(model)
    with pytest.raises(AdapterFormatError, match="talklora_min.hf.from_peft"):
        load_adapter_weights(injected(CONFIGS["lora"]), directory)
    with pytest.raises(AdapterFormatError, match="holds a PEFT adapter"):
        save_adapter(injected(CONFIGS["lora"]), directory, CONFIGS["lora"])


def test_peft_given_our_folder_says_it_finds_no_adapter_config(tmp_path):
    peft = pytest.importorskip("peft")
    config = CONFIGS["lora"]
    save_adapter(injected(config), tmp_path, config)
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        peft.PeftModel.from_pretrained(Tiny(), str(tmp_path))


def test_files_get_the_users_umask_and_keep_an_existing_mode(tmp_path):
    import os
    from talklora_min import _atomic
    old = os.umask(0o022)
    try:
        config = CONFIGS["lora"]
        save_adapter(injected(config), tmp_path / "a", config)
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
        assert set(modes.values()) == {0o644}, modes
        os.umask(0o077)
        save_adapter(injected(config), tmp_path / "b", config)
        assert {p.stat().st_mode & 0o777 for p in (tmp_path / "b").iterdir()} == {0o600}
        readme = tmp_path / "README.md"
        readme.write_text("old")
        readme.chmod(0o644)
        _atomic.write_text(readme, "regenerated")                # under umask 077 it stays 0644
        assert readme.read_text() == "regenerated" and readme.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_swaps_whole_folders(tmp_path, monkeypatch, exchange):
    from talklora_min import _atomic
    if not exchange:
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)    # the two-rename fallback
    target = tmp_path / "cells"
    _atomic.replace_dir(target, lambda d: (d / "a.json").write_text("1"))
    _atomic.replace_dir(target, lambda d: (d / "b.json").write_text("2"))
    assert [p.name for p in target.iterdir()] == ["b.json"]

    def half(d):
        (d / "c.json").write_text("3")
        raise RuntimeError("writer died")
    with pytest.raises(RuntimeError):
        _atomic.replace_dir(target, half)
    assert [p.name for p in target.iterdir()] == ["b.json"] and [p.name for p in tmp_path.iterdir()] == ["cells"]
    # a fallback swap killed between its two renames: the old folder is moved back, then replaced
    target.rename(tmp_path / ".cells.0a1b2c.old")
    _atomic.replace_dir(target, lambda d: (d / "d.json").write_text("4"))
    assert [p.name for p in target.iterdir()] == ["d.json"] and [p.name for p in tmp_path.iterdir()] == ["cells"]


@pytest.mark.parametrize("call, error, message", [
    (lambda: save_adapter(None, "x", CONFIGS["lora"]), TypeError, "model must be a torch.nn.Module"),
    (lambda: save_adapter(injected(CONFIGS["lora"]), None, CONFIGS["lora"]), TypeError, "directory must be"),
    (lambda: save_adapter(injected(CONFIGS["lora"]), 3, CONFIGS["lora"]), TypeError, "directory must be"),
    (lambda: load_adapter([1, 2], "x"), TypeError, "model must be a torch.nn.Module"),
    (lambda: load_adapter(Tiny(), ["x"]), TypeError, "directory must be"),
    (lambda: load_adapter_weights(None, "x"), TypeError, "model must be"),
    (lambda: load_official_state_dict(None, {}), TypeError, "model must be"),
    (lambda: export_official_state_dict("model"), TypeError, "model must be"),
    (lambda: load_official_state_dict(official_pair(Tiny)[0], None), TypeError, "state_dict must be a mapping"),
    (lambda: load_official_state_dict(official_pair(Tiny)[0], {}, strict="yes"), TypeError, "strict must be a bool"),
])
def test_io_arguments_are_checked_by_name(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_save_into_a_file_path_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        save_adapter(injected(CONFIGS["lora"]), tmp_path / "file", CONFIGS["lora"])
