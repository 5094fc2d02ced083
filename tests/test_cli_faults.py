"""Command-line and results-store faults: bad config files, unusable results directories, damaged
cell / rows / meta files, file permissions, two runs on one results directory, ``kill -9`` mid-sweep.

Subprocess tests run a tiny sweep from a module written into ``tmp_path`` (its cells sleep briefly
and count their calls in files), each bounded by a timeout.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import cli
from analysis.config import ConfigError, dumps_toml, load_config, load_profile
from analysis.results import (Cell, DamagedResultsError, ResultsLockedError, ResultStore, atomic_write_text,
                              rows_checksum, run_sweep, update_marked_section)

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(progress=False, log=lambda s: None)


def noisy_cell(seed: int, E: int) -> list[dict]:
    rng = np.random.default_rng([seed, E])
    return [{"eps": eps, "metric": "quotient", "value": float(rng.standard_normal())} for eps in (0.1, 0.2)]


def cells() -> list[Cell]:
    return [Cell(noisy_cell, {"seed": s, "E": E}) for s in range(3) for E in (4, 8)]


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line on stderr, got:\n{err}"
    return lines[0]


# ----------------------------------------------------------------------------- config files
QUICK = 'extends = "quick"\n'
BAD_CONFIGS = [
    # (file bytes, what the one-line error must say)
    (b"\xff\xfe[train]\nseeds = [1]\n", "not UTF-8"),
    (QUICK.encode() + "[train]\nseeds = [1]  # caf\xe9\n".encode("latin-1"), "not UTF-8"),
    (b"", "empty config"),
    (b"# only a comment\n", "empty config"),
    (b'profile = "mine"\n', "empty config"),
    (b"[train]\nseeds = [1]\n", "missing [perturb], train.tasks, train.methods"),
    (b'extends = ["quick"]\n', "extends: must be a profile name"),
    (b'extends = "../profiles/quick"\n', "extends: must be a profile name"),
    (b'extends = "quick"\nprofile = ["a", "b"]\n', "profile: must be a non-empty string"),
    (b'extends = "quick"\nperturb = [1, 2]\n', "[perturb]: must be a table"),
    (b'extends = "quick"\n[perturb]\ntalk = [["official"]]\n', "perturb.talk: must be a list of scalars"),
    (b'extends = "quick"\n[perturb]\ngrid = [4, 32]\n', "perturb.grid: must be a list of lists"),
    (b'extends = "quick"\n[perturb]\nn_tokens = [1024]\n', "perturb.n_tokens: must be a single int"),
    (b'extends = "quick"\n[twins]\ntalk_init = ["official"]\n', "twins.talk_init: must be a single str"),
    (b'extends = "quick"\n[train]\nmethods = "lora"\n', "train.methods: must be a list of scalars"),
    (b'extends = "quick"\n[train]\nseeds = {a = 1}\n', "train.seeds: must be a list of scalars"),
    (b'extends = "quick"\n[train\n', "invalid TOML"),
]


@pytest.mark.parametrize("content, message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "my.toml"
    path.write_bytes(content)
    for profile_args in ([], ["--profile", "paper"]):
        if not profile_args or content.startswith(b"extends") or b"\xff" in content:
            assert cli.main(["perturb", "--config", str(path), "--results-dir", str(tmp_path / "r"),
                             *profile_args]) == cli.EXIT_USAGE
            assert message in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()                      # refused before any work


def test_config_path_problems(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path)]) == 2
    assert "is a directory" in one_line_error(capsys.readouterr().err)
    assert cli.main(["train", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "file not found" in one_line_error(capsys.readouterr().err)
    assert cli.main(["train", "--config", str(tmp_path / ("x" * 300 + ".toml"))]) == 2
    assert "cannot read" in one_line_error(capsys.readouterr().err)
    if os.geteuid() != 0:
        unreadable = tmp_path / "secret.toml"
        unreadable.write_text('extends = "quick"\n')
        unreadable.chmod(0)
        assert cli.main(["train", "--config", str(unreadable)]) == 2
        assert "Permission denied" in one_line_error(capsys.readouterr().err)


def test_file_without_extends_is_complete_or_refused(tmp_path):
    quick = load_profile("quick")
    full = quick.to_dict()
    path = tmp_path / "full.toml"
    path.write_text(quick.to_toml())
    assert load_config(None, path) == quick                     # complete: accepted as is
    for section, fields in full.items():
        if not isinstance(fields, dict):
            continue
        for name in fields:                                      # drop any one field: refused, naming it
            partial = {k: ({f: v for f, v in t.items() if f != name} if k == section else t)
                       for k, t in full.items()}
            path.write_text(dumps_toml(partial))
            with pytest.raises(ConfigError, match=rf"missing {section}\.{name}\b"):
                load_config(None, path)
            assert load_config("quick", path) == quick          # ... but on top of a profile it is fine


def test_profiles_may_extend_profiles_but_not_in_a_cycle(tmp_path, monkeypatch):
    import analysis.config as config
    quick = load_profile("quick")
    (tmp_path / "base.toml").write_text(quick.to_toml())
    (tmp_path / "more.toml").write_text('extends = "base"\n[train]\nseeds = [9]\n')
    (tmp_path / "a.toml").write_text('extends = "b"\n')
    (tmp_path / "b.toml").write_text('extends = "a"\n')
    monkeypatch.setattr(config, "PROFILES_DIR", tmp_path)
    more = load_profile("more")
    assert more.train.seeds == [9] and more.perturb == quick.perturb and more.profile == "more"
    with pytest.raises(ConfigError, match=r"cycle: a -> b -> a"):
        load_profile("a")


def test_interrupt_is_one_line(tmp_path, capsys, monkeypatch):
    def run(config, **kw):
        raise KeyboardInterrupt
    fake_experiment(monkeypatch, run)
    assert cli.main(["perturb", "--results-dir", str(tmp_path)]) == cli.EXIT_INTERRUPTED == 130
    assert "run the same command again to resume" in one_line_error(capsys.readouterr().err)


def test_toml_decode_in_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\x80\x81 = 1\n")
    proc = subprocess.run([sys.executable, "-m", "analysis", "train", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "not UTF-8" in one_line_error(proc.stderr)


# ----------------------------------------------------------------------------- results directory
def fake_experiment(monkeypatch, run):
    real_import = cli.importlib.import_module

    def fake_import(name):
        if name == "analysis.perturb":
            return types.SimpleNamespace(__name__=name, run=run)
        return real_import(name)
    monkeypatch.setattr(cli.importlib, "import_module", fake_import)


def test_results_dir_that_cannot_be_created(tmp_path, capsys, monkeypatch):
    calls = []
    fake_experiment(monkeypatch, lambda config, **kw: calls.append(kw))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target, message in [(blocker, "is not a directory"), (blocker / "sub", "cannot be created")]:
        assert cli.main(["perturb", "--results-dir", str(target)]) == 2
        assert message in one_line_error(capsys.readouterr().err)
    if os.geteuid() != 0:                                        # root ignores permission bits
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        assert cli.main(["perturb", "--results-dir", str(locked / "new")]) == 2
        assert "Permission denied" in one_line_error(capsys.readouterr().err)
    assert calls == []
    assert cli.main(["perturb", "--results-dir", str(tmp_path / "a" / "b")]) == 0
    assert (tmp_path / "a" / "b").is_dir() and calls[0]["results_dir"] == tmp_path / "a" / "b"


def test_out_dir_sends_the_report_elsewhere_and_is_checked(tmp_path, capsys, monkeypatch):
    """figures / claims --out-dir DIR: the figures into DIR, CLAIMS.md and claims.csv into DIR (e.g.
    reports/paper); a DIR that cannot be made is a one-line usage error before any work; the
    experiments have no such option."""
    calls = []
    real_import = cli.importlib.import_module

    def fake_import(name):
        if name in ("analysis.figures", "analysis.claims"):
            return types.SimpleNamespace(__name__=name, run=lambda config, **kw: calls.append((name, kw)))
        return real_import(name)
    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    out = tmp_path / "reports" / "paper"
    assert cli.main(["figures", "--results-dir", str(tmp_path / "r"), "--out-dir", str(out / "figures")]) == 0
    assert cli.main(["claims", "--results-dir", str(tmp_path / "r"), "--out-dir", str(out)]) == 0
    (fig_name, fig_kw), (claims_name, claims_kw) = calls
    assert fig_name == "analysis.figures" and fig_kw["figures_dir"] == out / "figures" and (out / "figures").is_dir()
    assert claims_kw["out_md"] == out / "CLAIMS.md" and claims_kw["out_csv"] == out / "claims.csv"
    assert cli.main(["claims", "--results-dir", str(tmp_path / "r")]) == 0
    assert "out_md" not in calls[-1][1]                     # default: the repository root
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["claims", "--out-dir", str(blocker / "sub"), "--results-dir", str(tmp_path / "r")]) == 2
    assert "--out-dir" in one_line_error(capsys.readouterr().err) and len(calls) == 3
    with pytest.raises(SystemExit):
        cli.main(["train", "--out-dir", str(out)])
    assert "unrecognized arguments: --out-dir" in capsys.readouterr().err


def test_file_system_error_during_run_is_one_line(tmp_path, capsys, monkeypatch):
    def run(config, *, results_dir, **kw):
        run_sweep("perturb_synthetic", cells(), results_dir=results_dir / "blocked", **quiet)
    fake_experiment(monkeypatch, run)
    (tmp_path / "blocked").write_text("a file where the store's directory belongs")
    assert cli.main(["perturb", "--results-dir", str(tmp_path)]) == 2
    assert "blocked" in one_line_error(capsys.readouterr().err)


# ----------------------------------------------------------------------------- damaged files
def _damage_truncate(p: Path):
    p.write_bytes(p.read_bytes()[:40])


def _damage_bytes(p: Path):
    p.write_bytes(b"\xff\xfe" + p.read_bytes())


def _damage_array(p: Path):
    p.write_text("[1, 2, 3]\n")


def _damage_no_rows(p: Path):
    rec = json.loads(p.read_text())
    del rec["rows"]
    p.write_text(json.dumps(rec))


def _damage_other_key(p: Path):
    rec = json.loads(p.read_text())
    rec["key"] = {**rec["key"], "seed": 99}
    p.write_text(json.dumps(rec))


def _damage_value(p: Path):                                     # still valid JSON, checksum catches it
    rec = json.loads(p.read_text())
    rec["rows"][0]["value"] += 1.0
    p.write_text(json.dumps(rec))


def _damage_empty(p: Path):
    p.write_bytes(b"")


DAMAGES = {"truncated": (_damage_truncate, "not valid JSON"), "non-utf8": (_damage_bytes, "not UTF-8"),
           "array": (_damage_array, "expected a JSON object"), "no-rows": (_damage_no_rows, "'rows'"),
           "other-key": (_damage_other_key, "records key"), "checksum": (_damage_value, "rows_sha256"),
           "empty": (_damage_empty, "not valid JSON")}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_damaged_cell_file_is_named_and_rerun(tmp_path, name):
    damage, reason = DAMAGES[name]
    reference = run_sweep("exp", cells(), results_dir=tmp_path / "ref", **quiet).rows
    first = run_sweep("exp", cells(), results_dir=tmp_path / "run", **quiet)
    store = ResultStore("exp", tmp_path / "run")
    victim = cells()[3]
    damage(store.cell_path(victim.hash))
    assert store.cell_problem(victim) is not None and reason in store.cell_problem(victim)
    logged = []
    again = run_sweep("exp", cells(), results_dir=tmp_path / "run", progress=False, log=logged.append)
    assert again.n_run == 1 and again.n_skipped == 5
    msg = next(m for m in logged if "damaged" in m)
    assert str(store.cell_path(victim.hash)) in msg and reason in msg and victim.label() in msg
    assert (store.cells_dir / f"{victim.hash}.json.damaged").is_file()
    assert store.cell_problem(victim) is None
    pd.testing.assert_frame_equal(again.rows, reference)
    pd.testing.assert_frame_equal(again.rows, first.rows)
    assert run_sweep("exp", cells(), results_dir=tmp_path / "run", **quiet).n_run == 0


def test_cell_record_carries_checksum_of_its_rows(tmp_path):
    """A cell file without its checksum is damage (deleting the checksum must not skip the check)."""
    run_sweep("exp", cells()[:1], results_dir=tmp_path, **quiet)
    store = ResultStore("exp", tmp_path)
    rec = store.read_cell(cells()[0].hash)
    assert rec["rows_sha256"] == rows_checksum(rec["rows"]) and len(rec["rows_sha256"]) == 64
    edited = {k: v for k, v in json.loads(json.dumps(rec)).items() if k != "rows_sha256"}
    edited["rows"][0]["value"] += 1.0                                      # a hand edit that hides itself
    atomic_write_text(store.cell_path(cells()[0].hash), json.dumps(edited))
    assert "no 'rows_sha256'" in store.cell_problem(cells()[0])
    again = run_sweep("exp", cells()[:1], results_dir=tmp_path, **quiet)
    assert again.n_run == 1 and again.rows["value"].tolist() == [r["value"] for r in rec["rows"]]


@pytest.mark.parametrize("target, garbage", [("rows.csv", b"\xff\xfe\x00garbage"), ("rows.csv", b"seed,E\n1,2,3,4\n"),
                                             ("rows.csv", b""), ("meta.json", b"{not json"),
                                             ("meta.json", b"[]")])
def test_damaged_rows_or_meta_is_rebuilt_from_the_cells(tmp_path, target, garbage):
    first = run_sweep("exp", cells(), results_dir=tmp_path, **quiet)
    store = ResultStore("exp", tmp_path)
    (store.path / target).write_bytes(garbage)
    if target == "rows.csv":
        with pytest.raises(DamagedResultsError, match=r"rows\.csv is damaged"):
            store.read_rows()
    else:
        with pytest.raises(DamagedResultsError, match=r"meta\.json is damaged"):
            store.read_meta()
    again = run_sweep("exp", cells(), results_dir=tmp_path, **quiet)
    assert again.n_run == 0
    pd.testing.assert_frame_equal(again.rows, first.rows)
    assert store.read_meta()["status"] == "complete"


def test_hand_edited_rows_csv_is_noticed(tmp_path):
    """rows.csv still parses but no longer matches meta.json's checksum: rebuilt from the cells."""
    first = run_sweep("exp", cells(), results_dir=tmp_path, **quiet)
    store = ResultStore("exp", tmp_path)
    edited = first.rows.copy()
    edited.loc[0, "value"] = 123.0
    edited.to_csv(store.rows_path, index=False)
    pd.testing.assert_frame_equal(run_sweep("exp", cells(), results_dir=tmp_path, **quiet).rows, first.rows)


# ----------------------------------------------------------------------------- permissions
@pytest.fixture
def umask():
    def set_(mask):
        os.umask(mask)
    before = os.umask(0o022)
    yield set_
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    run_sweep("exp", cells()[:2], results_dir=tmp_path, **quiet)
    store = ResultStore("exp", tmp_path)
    files = [store.rows_path, store.meta_path, *store.cells_dir.glob("*.json")]
    assert len(files) == 4
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o077)
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- claims:start -->\nold\n<!-- claims:end -->\n")
    readme.chmod(0o664)
    assert update_marked_section(readme, "claims", "new")
    assert stat.S_IMODE(readme.stat().st_mode) == 0o664 and "new" in readme.read_text()


# ----------------------------------------------------------------------------- lock
def test_second_run_is_refused_while_locked(tmp_path, capsys, monkeypatch):
    store = ResultStore("perturb_synthetic", tmp_path)
    with store.lock():
        with pytest.raises(ResultsLockedError, match=rf"locked by another run \(pid {os.getpid()} "):
            run_sweep("perturb_synthetic", cells(), results_dir=tmp_path, **quiet)
        fake_experiment(monkeypatch, lambda config, *, results_dir, **kw: run_sweep(
            "perturb_synthetic", cells(), results_dir=results_dir, **quiet))
        assert cli.main(["perturb", "--results-dir", str(tmp_path)]) == cli.EXIT_LOCKED
        assert "locked by another run" in one_line_error(capsys.readouterr().err)
    assert not list(store.cells_dir.glob("*.json"))             # nothing was computed while locked
    assert cli.main(["perturb", "--results-dir", str(tmp_path)]) == 0
    assert len(list(store.cells_dir.glob("*.json"))) == 6


SCRIPT = '''
import os, sys, time
from pathlib import Path
from analysis.results import Cell, ResultsLockedError, run_sweep

def slow_cell(seed, log_dir):
    with open(Path(log_dir) / f"calls_{seed}.txt", "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(float(os.environ["FAULT_DELAY"]))     # not a param: a slower re-run is the same sweep
    end = time.monotonic() + 60                        # a test holds the cell while <log_dir>/hold exists
    held = seed >= int(os.environ.get("FAULT_HOLD_FROM", "0"))     # (only cells from this seed on)
    while held and (Path(log_dir) / "hold").exists() and time.monotonic() < end:
        time.sleep(0.05)
    return [{"metric": "x", "value": seed * 1.5}]

if __name__ == "__main__":
    results, log_dir, os.environ["FAULT_DELAY"] = sys.argv[1:4]
    cells = [Cell(slow_cell, {"seed": s}, {"log_dir": log_dir}) for s in range(6)]
    try:
        run_sweep("exp", cells, results_dir=results, progress=False, workers=int(os.environ.get("FAULT_WORKERS", "1")))
    except ResultsLockedError as err:
        print(err, file=sys.stderr)
        sys.exit(3)
'''


@pytest.fixture
def sweep_script(tmp_path):
    mod = tmp_path / "mod"
    mod.mkdir()
    (mod / "faultsweep.py").write_text(textwrap.dedent(SCRIPT))
    (tmp_path / "calls").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(mod)])}

    def start(delay, workers=1, hold_from=0):
        return subprocess.Popen([sys.executable, "-m", "faultsweep", str(tmp_path / "res"), str(tmp_path / "calls"),
                                 str(delay)], env={**env, "FAULT_WORKERS": str(workers),
                                                   "FAULT_HOLD_FROM": str(hold_from)}, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return start


def calls(tmp_path) -> dict[int, int]:
    return {int(p.stem.split("_")[1]): len(p.read_text().split()) for p in (tmp_path / "calls").glob("calls_*.txt")}


def wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_two_concurrent_runs_compute_each_cell_once(tmp_path, sweep_script):
    hold = tmp_path / "calls" / "hold"
    hold.touch()                                                   # A's first cell waits until B is done
    a = sweep_script(0.4)
    try:
        wait_for(lambda: calls(tmp_path))                          # A holds the lock and is computing
        b = sweep_script(0.4)
        _, err_b = b.communicate(timeout=60)
        hold.unlink()
        assert b.returncode == 3 and "locked by another run" in err_b and f"pid {a.pid}" in err_b
        _, err_a = a.communicate(timeout=60)
        assert a.returncode == 0, err_a
    finally:
        a.kill()
    assert calls(tmp_path) == {s: 1 for s in range(6)}
    c = sweep_script(0.0)                                           # afterwards: nothing left to compute
    out_c, _ = c.communicate(timeout=60)
    assert c.returncode == 0 and "nothing to run" in out_c and calls(tmp_path) == {s: 1 for s in range(6)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")                        # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_killed_sweep_takes_its_workers_with_it(tmp_path, sweep_script):
    """``kill -9`` of a ``--workers 2`` sweep: its worker processes exit too (they would otherwise go on
    computing orphaned cells and compete with the next run for the cores)."""
    hold = tmp_path / "calls" / "hold"
    hold.touch()                                                   # the workers' cells block while it exists
    a = sweep_script(0.0, workers=2)
    try:
        wait_for(lambda: len(calls(tmp_path)) >= 2)
        workers = {int(p.read_text().split()[0]) for p in (tmp_path / "calls").glob("calls_*.txt")}
        assert len(workers) == 2 and a.pid not in workers and all(_alive(w) for w in workers)
        os.kill(a.pid, signal.SIGKILL)
        a.communicate(timeout=30)
        wait_for(lambda: not any(_alive(w) for w in workers), timeout=30)
    finally:
        a.kill()
        hold.unlink(missing_ok=True)


def test_kill_9_mid_sweep_then_resume(tmp_path, sweep_script):
    store = ResultStore("exp", tmp_path / "res")
    a = sweep_script(0.3)
    try:
        wait_for(lambda: len(list(store.cells_dir.glob("*.json"))) >= 2)
        os.kill(a.pid, signal.SIGKILL)
        a.communicate(timeout=30)
    finally:
        a.kill()
    assert a.returncode == -signal.SIGKILL
    done = len(list(store.cells_dir.glob("*.json")))
    assert 2 <= done < 6 and not store.rows_path.exists()
    for f in store.cells_dir.glob("*.json"):                        # every file left is a whole record
        assert json.loads(f.read_text())["rows_sha256"]
    (store.cells_dir / ".deadbeef.json.abc.tmp").write_text('{"half')  # what a kill mid-write leaves
    b = sweep_script(0.0)                                            # the kernel released the lock
    out, err = b.communicate(timeout=60)
    assert b.returncode == 0, err
    assert f"{6 - done} of 6 cells to run" in out
    assert not list(store.path.rglob("*.tmp"))
    per_cell = calls(tmp_path)
    assert sorted(per_cell) == list(range(6)) and sum(per_cell.values()) <= 6 + 1   # at most the cell in flight twice
    rows = store.read_rows()
    assert rows["value"].tolist() == [s * 1.5 for s in range(6)] and rows["seed"].tolist() == list(range(6))
