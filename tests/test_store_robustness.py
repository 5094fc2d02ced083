"""Hostile inputs to the results store and the config reader: a planted ``.lock`` link, cells computed
by other code, checksums deleted by hand, files nested absurdly deep, a FIFO or ``/dev/zero`` as a
config file, config values every cell would die on.  Each case: a clear error naming the file or field
(or a re-run that recomputes what cannot be trusted), never a traceback, a hang or an overwritten file."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis import cli, store as store_module
from analysis.config import ConfigError, ExperimentConfig, load_config, load_profile
from analysis.results import Cell, DamagedResultsError, ResultStore, code_version, run_sweep
from analysis.sections import MAX_SEED, TASK_CLASS_SIZES
from test_cli_faults import calls, cells, fake_experiment, one_line_error, quiet, sweep_script, wait_for  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ----------------------------------------------------------------------------- the lock file
def plant(kind: str, lock: Path, victim: Path) -> None:
    lock.parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(victim.with_name("not-yet"))
    elif kind == "hard link":
        os.link(victim, lock)
    elif kind == "directory":
        lock.mkdir()
    elif kind == "fifo":
        os.mkfifo(lock)


LOCK_PLANTS = {"symlink": "symbolic link", "dangling symlink": "symbolic link", "hard link": "2 hard links",
               "directory": "a directory", "fifo": "not a regular file"}


@pytest.mark.parametrize("kind", list(LOCK_PLANTS))
def test_planted_lock_is_refused_and_its_target_untouched(tmp_path, capsys, monkeypatch, kind):
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=$HOME/bin:$PATH\n")
    store = ResultStore("exp", tmp_path / "res")
    plant(kind, store.path / ".lock", victim)
    with pytest.raises(DamagedResultsError, match=LOCK_PLANTS[kind]) as err:
        run_sweep("exp", cells(), results_dir=tmp_path / "res", **quiet)
    assert str(store.path / ".lock") in str(err.value) and "remove it" in str(err.value)
    assert victim.read_text() == "export PATH=$HOME/bin:$PATH\n"
    assert not victim.with_name("not-yet").exists() and not list(store.cells_dir.glob("*.json"))
    fake_experiment(monkeypatch, lambda config, *, results_dir, **kw: run_sweep(
        "exp", cells(), results_dir=results_dir, **quiet))
    assert cli.main(["perturb", "--results-dir", str(tmp_path / "res")]) == cli.EXIT_USAGE
    assert ".lock is damaged" in one_line_error(capsys.readouterr().err)


def test_lock_swapped_for_a_link_while_a_run_holds_it(tmp_path, sweep_script):
    """Run A holds the lock; someone replaces ``.lock`` by a link to a victim file; run B refuses it
    (exit status 1 with the error, the victim intact); A finishes its cells unharmed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    hold = tmp_path / "calls" / "hold"
    hold.touch()
    a = sweep_script(0.0)
    try:
        wait_for(lambda: calls(tmp_path))                          # A holds the lock and is computing
        lock = tmp_path / "res" / "exp" / ".lock"
        lock.unlink()
        lock.symlink_to(victim)
        b = sweep_script(0.0)
        _, err_b = b.communicate(timeout=60)
        assert b.returncode == 1 and "symbolic link" in err_b and "DamagedResultsError" in err_b
        hold.unlink()
        _, err_a = a.communicate(timeout=60)
        assert a.returncode == 0, err_a
    finally:
        a.kill()
        hold.unlink(missing_ok=True)
    assert victim.read_text() == "precious\n" and calls(tmp_path) == {s: 1 for s in range(6)}


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupted_then_resumed_sweep_is_byte_identical(tmp_path, sweep_script, sig):
    """Ctrl-C or ``kill -9`` mid-sweep, then the same command: every cell computed once more at most,
    no cell reported stale, and rows.csv byte-identical to an uninterrupted run's."""
    import signal
    store = ResultStore("exp", tmp_path / "res")
    hold = tmp_path / "calls" / "hold"
    hold.touch()
    a = sweep_script(0.0, hold_from=2)       # cells 0 and 1 finish, cell 2 waits: interrupted mid-sweep for sure
    try:
        wait_for(lambda: len(list(store.cells_dir.glob("*.json"))) == 2 and 2 in calls(tmp_path))
        os.kill(a.pid, getattr(signal, sig))
        a.communicate(timeout=30)
    finally:
        a.kill()
        hold.unlink()
    assert a.returncode != 0 and not store.rows_path.exists()
    done = len(list(store.cells_dir.glob("*.json")))
    assert done == 2
    b = sweep_script(0.0)
    out, err = b.communicate(timeout=60)
    assert b.returncode == 0, err
    assert f"{6 - done} of 6 cells to run" in out and "stale" not in out
    reference = ResultStore("exp", tmp_path / "ref")
    shutil.move(tmp_path / "res", tmp_path / "interrupted")
    c = sweep_script(0.0)                                            # the same sweep, never interrupted
    c.communicate(timeout=60)
    shutil.move(tmp_path / "res", reference.path.parent)
    assert (tmp_path / "interrupted" / "exp" / "rows.csv").read_bytes() == reference.rows_path.read_bytes()


# ----------------------------------------------------------------------------- code versions
PKG = {
    "__init__.py": "from .helper import SCALE\n",
    "helper.py": "SCALE = 1.0\n",
    "plotting.py": "import matplotlib  # never imported by a cell\nCOLOUR = 'red'\n",
    "cellmod.py": textwrap.dedent('''
        from . import SCALE

        def cell(seed: int) -> list[dict]:
            return [{"metric": "x", "value": SCALE * seed}]
    '''),
}


@pytest.fixture
def cell_package(tmp_path, monkeypatch):
    """A package ``stalepkg`` counted as project code: ``cellmod.cell`` uses ``helper.SCALE``
    (re-exported by ``__init__``); ``plotting`` is imported by no cell."""
    root = tmp_path / "src"
    (root / "stalepkg").mkdir(parents=True)
    for name, text in PKG.items():
        (root / "stalepkg" / name).write_text(text)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(store_module, "CODE_PACKAGES", (*store_module.CODE_PACKAGES, "stalepkg"))
    importlib.invalidate_caches()
    yield root / "stalepkg"
    for name in [m for m in sys.modules if m == "stalepkg" or m.startswith("stalepkg.")]:
        del sys.modules[name]


def edit_and_reload(pkg: Path, name: str, old: str, new: str):
    path = pkg / name
    path.write_text(path.read_text().replace(old, new))
    importlib.invalidate_caches()
    for module in ("stalepkg.helper", "stalepkg", "stalepkg.cellmod"):
        importlib.reload(sys.modules[module]) if module in sys.modules else importlib.import_module(module)
    return importlib.import_module("stalepkg.cellmod")


def test_cells_computed_by_other_code_are_rerun_and_reported(tmp_path, cell_package):
    cellmod = importlib.import_module("stalepkg.cellmod")
    sweep = lambda: [Cell(cellmod.cell, {"seed": s}) for s in range(3)]   # noqa: E731
    first = run_sweep("exp", sweep(), results_dir=tmp_path / "r", **quiet)
    assert first.rows["value"].tolist() == [0.0, 1.0, 2.0]
    assert set(code_version(cellmod.cell)["modules"]) == {"stalepkg.cellmod", "stalepkg.helper"}

    cellmod = edit_and_reload(cell_package, "plotting.py", "'red'", "'blue'")      # unrelated module
    again = run_sweep("exp", sweep(), results_dir=tmp_path / "r", **quiet)
    assert again.n_run == 0

    cellmod = edit_and_reload(cell_package, "helper.py", "1.0", "10.0")           # code the cell runs
    logged = []
    changed = run_sweep("exp", sweep(), results_dir=tmp_path / "r", progress=False, log=logged.append)
    assert changed.n_run == 3 and changed.n_stale == 3
    assert changed.rows["value"].tolist() == [0.0, 10.0, 20.0]                   # not the old numbers
    assert any("3 of 3 cells are stale" in m and "stalepkg.helper changed" in m for m in logged), logged
    meta = ResultStore("exp", tmp_path / "r").read_meta()
    assert meta["cells"]["stale_rerun"] == 3 and meta["code"]["stalepkg.cellmod.cell"] == code_version(cellmod.cell)
    assert run_sweep("exp", sweep(), results_dir=tmp_path / "r", **quiet).n_run == 0

    cellmod = edit_and_reload(cell_package, "cellmod.py", "SCALE * seed", "SCALE * seed + 1")
    assert run_sweep("exp", sweep(), results_dir=tmp_path / "r", **quiet).rows["value"].tolist() == [1.0, 11.0, 21.0]


def test_cell_without_a_code_version_is_stale(tmp_path):
    first = run_sweep("exp", cells(), results_dir=tmp_path, **quiet)
    store = ResultStore("exp", tmp_path)
    victim = cells()[2]
    record = store.read_cell(victim.hash)
    del record["code"]                                          # a file written before code versions
    store.write_cell(victim.hash, record)
    logged = []
    again = run_sweep("exp", cells(), results_dir=tmp_path, progress=False, log=logged.append)
    assert again.n_run == 1 and again.n_stale == 1 and "records no code version" in " ".join(logged)
    pd.testing.assert_frame_equal(again.rows, first.rows)


def test_code_version_is_the_same_in_another_checkout(tmp_path):
    """Another copy of the repository (other path, other mtimes, CRLF line ends) in another process:
    the same code version, because it hashes contents by module name."""
    from analysis import perturb, train
    for package in ("analysis", "talklora_min"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    crlf = tmp_path / "analysis" / "perturb.py"
    crlf.write_bytes(crlf.read_bytes().replace(b"\n", b"\r\n"))
    code = ("import json; from analysis import perturb, train; from analysis.store import code_version; "
            "print(json.dumps([code_version(perturb.synthetic_cell), code_version(train.train_cell)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [code_version(perturb.synthetic_cell), code_version(train.train_cell)]


def test_cell_code_is_what_the_cell_imports_and_nothing_else():
    from analysis import lm, perturb, train
    for fn in (perturb.synthetic_cell, train.train_cell, lm.lm_cell):
        modules = set(code_version(fn)["modules"])
        assert fn.__module__ in modules and "talklora_min.layers" in modules
        # talklora_min.hf is in: inject() routes a transformers model's save_pretrained through it
        assert not modules & {"analysis.plotting", "analysis.claims", "analysis.figures", "analysis.evidence",
                              "analysis.results", "analysis.store", "analysis.config", "analysis.cli",
                              "talklora_min"}, modules
    assert "analysis.fast_linear" in code_version(train.train_cell)["modules"]
    assert "analysis.fast_linear" not in code_version(perturb.synthetic_cell)["modules"]


def test_meta_without_rows_checksum_means_rows_are_rebuilt(tmp_path):
    """Deleting ``rows_sha256`` from meta.json must not let a hand-edited rows.csv through."""
    first = run_sweep("exp", cells(), results_dir=tmp_path, **quiet)
    store = ResultStore("exp", tmp_path)
    meta = store.read_meta()
    del meta["rows_sha256"]
    store.write_meta(meta)
    edited = first.rows.copy()
    edited.loc[0, "value"] = 123.0
    edited.to_csv(store.rows_path, index=False)
    again = run_sweep("exp", cells(), results_dir=tmp_path, **quiet)
    pd.testing.assert_frame_equal(again.rows, first.rows)
    assert "rows_sha256" in store.read_meta()


# ----------------------------------------------------------------------------- nesting, FIFOs, devices
DEEP = 100_000


@pytest.mark.parametrize("target", ["cell", "meta.json"])
def test_deeply_nested_results_file_is_damage_not_a_recursion_error(tmp_path, target):
    first = run_sweep("exp", cells(), results_dir=tmp_path, **quiet)
    store = ResultStore("exp", tmp_path)
    path = store.cell_path(cells()[1].hash) if target == "cell" else store.meta_path
    path.write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(DamagedResultsError, match="nested more than 32 levels"):
        store.read_cell(cells()[1].hash) if target == "cell" else store.read_meta()
    path.write_text('{"rows": ' + "[" * 40 + "]" * 40 + "}")      # parses, but deeper than any record
    with pytest.raises(DamagedResultsError, match="nested more than 32 levels"):
        store.read_cell(cells()[1].hash) if target == "cell" else store.read_meta()
    again = run_sweep("exp", cells(), results_dir=tmp_path, **quiet)
    assert again.n_run == (1 if target == "cell" else 0)
    pd.testing.assert_frame_equal(again.rows, first.rows)


def test_meta_json_fifo_does_not_hang_a_run(tmp_path):
    """A FIFO where meta.json belongs: the run reads it as damaged (no writer would ever come) and
    replaces it; in a subprocess, so that a regression fails by timeout instead of hanging pytest."""
    run_sweep("exp", cells(), results_dir=tmp_path, **quiet)
    meta = ResultStore("exp", tmp_path).meta_path
    meta.unlink()
    os.mkfifo(meta)
    code = ("import sys; sys.path.insert(0, 'tests'); from test_cli_faults import cells; "
            f"from analysis.results import run_sweep; r = run_sweep('exp', cells(), results_dir={str(tmp_path)!r}, "
            "progress=False); print(r.n_run)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0" and meta.is_file() and json.loads(meta.read_text())["status"] == "complete"


def deep_toml(kind: str, n: int = DEEP) -> str:
    return {"arrays": 'extends = "quick"\nx = ' + "[" * n + "]" * n + "\n",
            "inline tables": 'extends = "quick"\nx = ' + "{a = " * n + "1" + "}" * n + "\n",
            "dotted key": 'extends = "quick"\n' + "a." * n + "a = 1\n",
            "table header": 'extends = "quick"\n[' + "a." * n + "a]\n",
            "quoted dotted key": 'extends = "quick"\n' + '"a".' * n + '"a" = 1\n'}[kind]


@pytest.mark.parametrize("kind", ["arrays", "inline tables", "dotted key", "table header", "quoted dotted key"])
def test_deeply_nested_config_is_one_clear_error(tmp_path, kind):
    path = tmp_path / "deep.toml"
    path.write_text(deep_toml(kind))
    start = time.perf_counter()
    proc = run_cli("train", "--config", path)
    assert proc.returncode == 2 and "nested more than 32 levels" in one_line_error(proc.stderr)
    assert time.perf_counter() - start < 30                         # a dotted key must not cost O(n²)
    path.write_text(deep_toml(kind, 33))                            # just over the limit: the same error
    with pytest.raises(ConfigError, match="nested more than 32 levels"):
        load_config(None, path)


def test_nesting_within_the_limit_still_parses(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('extends = "quick"\n# a comment with [[[[ and a.b.c.d.e = 1\n[perturb]\n'
                    'talk = ["uniform-mix:0.5", "official"]  # [[[\ngrid = [[4, 32], [8, 32]]\n')
    assert load_config(None, path).perturb.talk == ["uniform-mix:0.5", "official"]


def test_deep_json_config_and_profile_are_config_errors(tmp_path, monkeypatch):
    import analysis.config as config
    with pytest.raises(ConfigError, match="nested more than 32 levels"):
        ExperimentConfig.from_json("[" * DEEP + "]" * DEEP)
    (tmp_path / "deep.toml").write_text(deep_toml("dotted key"))
    monkeypatch.setattr(config, "PROFILES_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"deep\.toml: nested more than 32 levels"):
        load_profile("deep")


@pytest.mark.parametrize("kind, message", [("fifo", "a FIFO (named pipe), not a regular file"),
                                           ("/dev/zero", "a character device, not a regular file"),
                                           ("2 MiB", "larger than 1,048,576 bytes")])
def test_config_that_is_not_a_small_regular_file(tmp_path, kind, message):
    if kind == "fifo":
        path = tmp_path / "pipe.toml"
        os.mkfifo(path)
    elif kind == "2 MiB":
        path = tmp_path / "big.toml"
        path.write_text('extends = "quick"\n' + "# padding\n" * 220_000)
    else:
        path = Path(kind)
    proc = run_cli("train", "--config", path, timeout=60)          # a FIFO used to block forever here
    assert proc.returncode == 2 and message in one_line_error(proc.stderr) and str(path) in proc.stderr


# ----------------------------------------------------------------------------- run-time limits in configs
# (section, override, the field the error names, what the message must say) -- each of these passed
# validation before and then failed in every cell (or exhausted the memory).
RUNTIME_LIMITS = [
    ("perturb", {"grid": [[2, 4]]}, "perturb.grid", "E >= 3"),
    ("perturb", {"grid": [[128, 256], [4, 32]]}, "perturb.grid", "E <= 64"),
    ("perturb", {"grid": [[4, 4096]]}, "perturb.grid", "r <= 1024"),
    ("perturb", {"seeds": [2**64]}, "perturb.seeds", "[0, 4294967295]"),
    ("perturb", {"d_in": 10**12}, "perturb.d_in", "[1, 8192]"),
    ("perturb", {"d_out": 10**6}, "perturb.d_out", "[1, 8192]"),
    ("perturb", {"n_tokens": 10**7}, "perturb.n_tokens", "[1, 174762]"),
    ("perturb", {"adversarial_steps": 10**6}, "perturb.adversarial_steps", "[1, 1000]"),
    ("perturb", {"n_sentences": 10**5}, "perturb.n_sentences", "[1, 1024]"),
    ("perturb", {"mc_draws": 10**9}, "perturb.mc_draws", "[1, 200000]"),
    ("perturb", {"mc_experts": [2, 4096]}, "perturb.mc_experts", "[1, 64]"),
    ("train", {"seeds": [0, 2**63]}, "train.seeds", "[0, 4294967295]"),
    ("train", {"split_seed": 2**70}, "train.split_seed", "[0, 4294967295]"),
    ("train", {"steps": 10**9}, "train.steps", "[1, 1000000]"),
    ("train", {"batch_size": 10**6}, "train.batch_size", "[1, 4096]"),
    ("train", {"rank": 4096, "num_experts": 4}, "train.rank", "[1, 384]"),
    ("train", {"rank": 128, "num_experts": 128}, "train.num_experts", "[1, 64]"),
    ("train", {"budget_ranks": [8, 1024]}, "train.budget_ranks", "up to 384"),
    ("train", {"n_val": 250, "n_test": 2000}, "train.n_test", "task 'topic'"),
    ("train", {"n_val": 6000, "n_test": 7000, "tasks": ["sentiment"], "budget_tasks": ["sentiment"]},
     "train.n_test", "task 'sentiment'"),
    ("twins", {"seeds": [-1]}, "twins.seeds", "[0, 4294967295]"),
    ("twins", {"steps": 10**8}, "twins.steps", "[1, 1000000]"),
    ("lm", {"seeds": [2**40]}, "lm.seeds", "[0, 4294967295]"),
    ("lm", {"rank": 4096, "num_experts": 4}, "lm.rank", "[1, 576]"),
    ("lm", {"batch_size": 10**5}, "lm.batch_size", "[1, 4096]"),
    ("planted", {"steps": 10**8}, "planted.steps", "[1, 1000000]"),
    ("planted", {"seeds": [-1]}, "planted.seeds", "[0, 4294967295]"),
]


@pytest.mark.parametrize("section, override, field, message", RUNTIME_LIMITS,
                         ids=[f"{f}={list(o.values())[-1]}" for _, o, f, _ in RUNTIME_LIMITS])
def test_run_time_limits_are_checked_before_any_work(tmp_path, capsys, section, override, field, message):
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in override.items())
    path = tmp_path / "my.toml"
    path.write_text(f'extends = "quick"\n[{section}]\n{table}\n')
    with pytest.raises(ConfigError, match=rf"^{field}: must be") as err:
        load_config(None, path)
    assert message in str(err.value)
    assert cli.main(["perturb", "--config", str(path), "--results-dir", str(tmp_path / "r")]) == cli.EXIT_USAGE
    assert field in one_line_error(capsys.readouterr().err) and not (tmp_path / "r").exists()


def test_twins_tasks_must_fit_the_train_split():
    quick = load_profile("quick").to_dict()
    quick["train"].update(tasks=["sentiment"], budget_tasks=["sentiment"], n_val=250, n_test=2500)
    quick["twins"]["tasks"] = ["sentiment"]
    ExperimentConfig.from_dict(quick)                                  # sentiment alone has room
    quick["twins"]["tasks"] = ["topic"]
    with pytest.raises(ConfigError, match=r"^twins\.tasks: .*task 'topic'"):
        ExperimentConfig.from_dict(quick)


def test_the_bounds_themselves_are_usable():
    """The largest accepted seed still makes every derived generator seed the cells use; the largest
    accepted held-out split of the smallest task still leaves training examples."""
    import torch

    from analysis import lm, perturb
    layer = perturb.synthetic_layer(64, 64, "official", MAX_SEED, d_in=8, d_out=8)
    assert torch.isfinite(layer.T).all()
    perturb.talk_norm_streams(64, MAX_SEED)
    lm._layer_streams(MAX_SEED, 2 * 30)                                 # every SmolLM2 layer
    torch.Generator().manual_seed(MAX_SEED * 100_003 + 10**6)           # equivalence_cell's stream
    for profile in ("quick", "paper"):
        load_profile(profile)                                           # the profiles are far inside the bounds


@pytest.mark.real_models
def test_task_class_sizes_match_the_data_and_the_largest_split_works():
    from analysis.data import load_task, make_split, make_task_split
    for task, sizes in TASK_CLASS_SIZES.items():
        assert tuple(load_task(task).groupby("label").size()) == sizes
    quick = load_profile("quick").to_dict()
    n_test = max(n for n in range(1000, 2105) if _accepted(quick, 250, n))
    split = make_task_split("topic", 10_000, 250, n_test)
    assert (split.split == "train").groupby(split.label).sum().min() >= 1
    assert len(make_split(1024 // 2 + 7, 7, 7)) > 0                       # perturb.n_sentences = MAX_SENTENCES


def _accepted(config: dict, n_val: int, n_test: int) -> bool:
    config["train"].update(n_val=n_val, n_test=n_test)
    try:
        ExperimentConfig.from_dict(config)
    except ConfigError:
        return False
    return True


# ----------------------------------------------------------------------------- usage errors
# argv -> what the one line must name (the option and what it accepts)
USAGE_ERRORS = [
    ([], ["{perturb,train,twins,lm,planted,figures,claims,config}"]),
    (["nope"], ["invalid choice: 'nope'", "'perturb'", "'config'"]),
    (["train", "--workers", "x"], ["--workers", "must be a positive int"]),
    (["train", "--workers", "0"], ["--workers", "must be a positive int, got 0"]),
    (["train", "--profile", "huge"], ["--profile", "'paper', 'quick'"]),
    (["train", "--config"], ["--config", "FILE.toml"]),
    (["train", "--device", "tpu"], ["--device", "'cpu', 'cuda', 'mps', 'auto'"]),
    (["train", "--executor", "k8s"], ["--executor", "'local', 'slurm'"]),
    (["train", "--out-dir", "x"], ["unrecognized arguments: --out-dir x", "--results-dir", "--workers"]),
    (["figures", "--device", "cpu"], ["unrecognized arguments: --device cpu", "--out-dir"]),
    (["config", "--workers", "2"], ["python -m analysis config", "--workers", "--profile"]),
    (["train", "--time", "-5"], ["--time", "must be a positive int"]),
    (["train", "--p", "x"], ["ambiguous option: --p", "--profile", "--partition"]),
]


@pytest.mark.parametrize("argv, named", USAGE_ERRORS, ids=[" ".join(a) or "(none)" for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_exit_2(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert all(n in line for n in named), line
    assert "--help" in line


def test_usage_error_in_a_subprocess_is_one_line():
    proc = run_cli("train", "--workers", "many")
    assert proc.returncode == 2 and "--workers" in one_line_error(proc.stderr)


def test_atomic_write_csv_keeps_the_old_file_when_the_writer_dies_midway(tmp_path, monkeypatch):
    """A writer that has already written part of the new file when it fails: the path still holds the
    complete old table (a direct ``to_csv(path)`` would leave the torn half there)."""
    from analysis.store import atomic_write_csv
    path = tmp_path / "rows.csv"
    old = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    atomic_write_csv(old, path)
    before = path.read_bytes()
    real_to_csv = pd.DataFrame.to_csv

    def torn(self, target, *args, **kwargs):
        text = real_to_csv(self, None, *args, **kwargs)
        Path(target).write_text(text[: len(text) // 2])          # half of the new table reaches the disk
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", torn)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_csv(pd.DataFrame({"a": range(100), "b": ["new"] * 100}), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]        # no temporary left behind
