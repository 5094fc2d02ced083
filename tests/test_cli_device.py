"""``--device`` and ``--executor`` of the command line: device resolution, which commands take a
device, the Slurm executor's settings, and a real run through submitit's local executor."""
from __future__ import annotations

import os
import re
import shlex
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import cli
from analysis.results import Cell, run_sweep

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(progress=False, log=lambda s: None)


def fake_gpus(monkeypatch, cuda: bool, mps: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, requested, expected", [
    (False, False, "auto", "cpu"), (True, False, "auto", "cuda"), (False, True, "auto", "mps"),
    (True, True, "auto", "cuda"), (True, False, "cuda", "cuda"), (False, True, "mps", "mps"),
    (True, True, "cpu", "cpu"), (False, False, "cpu", "cpu"),
    (False, False, "cuda", "not available"), (False, True, "cuda", "not available"),
    (True, False, "mps", "not available"), (False, False, "tpu", "must be one of"),
])
def test_resolve_device(monkeypatch, cuda, mps, requested, expected):
    fake_gpus(monkeypatch, cuda, mps)
    if expected in cli.DEVICES:
        assert cli.resolve_device(requested) == expected
    else:
        with pytest.raises(cli.UsageError, match=expected):
            cli.resolve_device(requested)


def record_runs(monkeypatch) -> dict:
    """Replace every ``analysis.<command>`` module by one whose ``run`` records its arguments."""
    calls = {}
    real_import = cli.importlib.import_module

    def fake_import(name):
        command = name.rpartition(".")[2]
        if command in cli.EXPERIMENTS:
            return types.SimpleNamespace(__name__=name, run=lambda config, **kw: calls.__setitem__(command, kw))
        return real_import(name)
    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    return calls


@pytest.mark.parametrize("command", sorted(cli.EXPERIMENTS))
def test_device_goes_only_to_commands_that_take_it(monkeypatch, tmp_path, capsys, command):
    fake_gpus(monkeypatch, cuda=True, mps=False)
    calls = record_runs(monkeypatch)
    base = [command, "--results-dir", str(tmp_path)]
    if command in cli.TAKES_DEVICE:
        assert cli.main(base) == 0 and calls[command]["device"] == "cpu"          # default: CPU
        assert cli.main([*base, "--device", "auto"]) == 0 and calls[command]["device"] == "cuda"
        assert cli.main([*base, "--device", "cuda"]) == 0 and calls[command]["device"] == "cuda"
        assert calls[command]["executor"] is None and calls[command]["workers"] == 1
    else:
        assert cli.main(base) == 0 and "device" not in calls[command]
        with pytest.raises(SystemExit) as exit_:                  # no --device option to ignore silently
            cli.main([*base, "--device", "cpu"])
        assert exit_.value.code == 2 and "--device" in capsys.readouterr().err


def test_unavailable_device_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    fake_gpus(monkeypatch, cuda=False, mps=False)
    calls = record_runs(monkeypatch)
    for device in ("cuda", "mps"):
        assert cli.main(["train", "--device", device, "--results-dir", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--device {device}: not available" in err
    assert not (tmp_path / "r").exists()                          # refused before any work
    assert cli.main(["train", "--device", "auto", "--results-dir", str(tmp_path)]) == 0
    assert calls == {"train": {**calls["train"], "device": "cpu"}}


class RecordingAutoExecutor:
    """Stands in for ``submitit.AutoExecutor``: records the folder, cluster and parameters."""

    made: list = []

    def __init__(self, folder, cluster=None):
        self.folder, self.cluster, self.params = Path(folder), cluster, {}
        RecordingAutoExecutor.made.append(self)

    def update_parameters(self, **kw):
        self.params.update(kw)


@pytest.fixture
def fake_slurm(monkeypatch):
    submitit = pytest.importorskip("submitit")
    RecordingAutoExecutor.made = []
    monkeypatch.setattr(submitit, "AutoExecutor", RecordingAutoExecutor)
    monkeypatch.setattr(cli.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "sbatch" else None)
    return RecordingAutoExecutor.made


@pytest.mark.parametrize("options, params, device", [
    ([], dict(timeout_min=60, gpus_per_node=0, cpus_per_task=4), "cpu"),
    (["--partition", "gpu", "--time", "90", "--gpus-per-node", "2", "--cpus-per-task", "8", "--device", "cuda"],
     dict(slurm_partition="gpu", timeout_min=90, gpus_per_node=2, cpus_per_task=8), "cuda"),
    (["--device", "auto"], dict(gpus_per_node=1), "cuda"),          # auto on Slurm: the nodes' GPU
    (["--partition", "cpu", "--device", "cpu"], dict(slurm_partition="cpu", gpus_per_node=0), "cpu"),
])
def test_slurm_executor_settings(fake_slurm, monkeypatch, tmp_path, options, params, device):
    fake_gpus(monkeypatch, cuda=False, mps=False)                   # the login node has no GPU
    calls = record_runs(monkeypatch)
    assert cli.main(["perturb", "--executor", "slurm", "--results-dir", str(tmp_path), *options]) == 0
    (ex,) = fake_slurm
    assert ex.cluster == "slurm" and ex.folder == tmp_path / "slurm_logs"
    assert params.items() <= ex.params.items()
    assert calls["perturb"]["executor"] is ex and calls["perturb"]["device"] == device


@pytest.mark.parametrize("options, message", [
    (["--executor", "slurm", "--device", "cuda", "--gpus-per-node", "0"], "needs --gpus-per-node >= 1"),
    (["--executor", "slurm", "--device", "mps"], "not a Slurm device"),
    (["--executor", "slurm", "--workers", "2"], "--workers applies to --executor local only"),
    (["--partition", "gpu"], "--partition: Slurm options, used only with --executor slurm"),
    (["--time", "30", "--cpus-per-task", "2"], "--time, --cpus-per-task: Slurm options"),
])
def test_bad_executor_options_are_one_line_exit_2(fake_slurm, monkeypatch, tmp_path, capsys, options, message):
    calls = record_runs(monkeypatch)
    assert cli.main(["twins", "--results-dir", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert calls == {} and fake_slurm == []


def test_slurm_without_sbatch_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    pytest.importorskip("submitit")
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    calls = record_runs(monkeypatch)
    assert cli.main(["train", "--executor", "slurm", "--results-dir", str(tmp_path)]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err and calls == {}


def square_cell(x: int) -> list[dict]:
    return [{"metric": "square", "value": float(x * x)}, {"metric": "cube", "value": float(x ** 3)}]


def test_slurm_path_through_submitit_local_executor(monkeypatch, tmp_path):
    """``--executor slurm`` end to end with submitit's local cluster standing in for Slurm: the CLI
    builds the executor, the experiment's sweep submits one job per cell, rows equal the inline run."""
    submitit = pytest.importorskip("submitit")
    real = submitit.AutoExecutor
    made = []

    def local_auto_executor(folder, cluster=None):
        assert cluster == "slurm"
        made.append(real(folder=folder, cluster="local"))
        return made[-1]
    monkeypatch.setattr(submitit, "AutoExecutor", local_auto_executor)
    monkeypatch.setattr(cli.shutil, "which", lambda name: "/usr/bin/sbatch")
    # the jobs unpickle square_cell from this test module: put it (and the repository) on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), str(ROOT)]))
    cells = [Cell(square_cell, {"x": x}) for x in (1, 2, 3)]

    def run(config, *, results_dir, executor, device, **kw):
        assert device == "cpu"
        run_sweep("perturb_synthetic", cells, results_dir=results_dir, executor=executor, **quiet)
    real_import = cli.importlib.import_module
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: types.SimpleNamespace(__name__=name, run=run)
                        if name == "analysis.perturb" else real_import(name))
    assert cli.main(["perturb", "--executor", "slurm", "--time", "5", "--cpus-per-task", "1",
                     "--results-dir", str(tmp_path / "slurm")]) == 0
    assert made and (tmp_path / "slurm" / "slurm_logs").is_dir()
    assert len(list((tmp_path / "slurm" / "slurm_logs").glob("*_result.pkl"))) == 3   # three separate jobs
    inline = run_sweep("perturb_synthetic", cells, results_dir=tmp_path / "inline", **quiet).rows
    got = pd.read_csv(tmp_path / "slurm" / "perturb_synthetic" / "rows.csv")
    pd.testing.assert_frame_equal(got, inline)
    assert got["value"].tolist() == [1.0, 1.0, 4.0, 8.0, 9.0, 27.0]


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_commands_parse():
    """Every ``python -m analysis`` command in the README's scale-out section is accepted by the parser."""
    section = readme_section("Running on a GPU or a Slurm cluster")
    commands = [line.split("python -m analysis", 1)[1].split("#")[0]
                for line in section.splitlines() if "python -m analysis" in line and "`" not in line]
    assert len(commands) >= 3 and any("--executor slurm" in c for c in commands)
    for c in commands:
        args = cli.build_parser().parse_args(shlex.split(c))
        assert args.command in cli.EXPERIMENTS
    for status in ("0", "1", "2", "3", "130"):
        assert re.search(rf"\|\s*{status}\s*\|", section), f"exit status {status} is not documented"
    lab = readme_section("Notebooks (JupyterLab)")
    assert "make lab" in lab
    assert re.search(r"^lab:", (ROOT / "Makefile").read_text(), re.M)
