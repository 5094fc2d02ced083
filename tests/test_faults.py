"""Fault suite (issue 12): kill -9 during adapter saves and sweeps, crashes between the steps of a save,
corrupted files, and every public function of ``talklora_min.io`` / ``talklora_min.probes`` over a
table of bad arguments — the answer is a clear error of a documented type that names the argument,
or a valid (finite) result; never NaN/Inf, a raw internal error, or a half-changed model."""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from talklora_min import (AdapterConfig, LoRALinear, adapter_layers, export_official_state_dict, inject,
                          load_adapter, load_adapter_weights, load_official_state_dict, save_adapter)
from talklora_min import _atomic, io
from talklora_min.io import MANIFEST_NAME, AdapterIntegrityError, read_adapter
from talklora_min.probes import (certified_lipschitz, coefficient_of_variation, dead_experts, gini, hard_load,
                                 load_entropy, load_metrics, local_lipschitz, max_mean_share,
                                 perturbation_response, router_lipschitz, soft_load, top1_churn)

from helpers import make_layer, tokens
from test_io import Tiny, official_pair, random_official_state, randomise_adapters

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SAVE_CONFIG = AdapterConfig(kind="talklora", rank=16, num_experts=4,
                            target_modules=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"))


# ----------------------------------------------------------------------------- helpers
def model_for_seed(seed: int) -> nn.Module:
    """A ~1 MB adapter whose every value is determined by ``seed`` (the kill tests' ground truth)."""
    model = Tiny(d=64, layers=3)
    inject(model, SAVE_CONFIG)
    return randomise_adapters(model, seed)


def adapter_values(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in io.adapter_tensors(model).items()}


def slow_cell(seed: int) -> list[dict]:
    """A sweep cell that takes a little time, so that a kill lands between cells or inside one."""
    time.sleep(0.03)
    rng = np.random.default_rng(seed)
    return [{"metric": f"m{i}", "value": float(rng.standard_normal())} for i in range(3)]


def sweep_cells():
    from analysis.results import Cell
    return [Cell(slow_cell, {"seed": s}) for s in range(30)]


def child(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child did not start in time")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- kill -9 during saves
SAVE_LOOP = """
import itertools, sys, torch
torch.set_num_threads(1)
from test_faults import model_for_seed, SAVE_CONFIG, randomise_adapters
from talklora_min import save_adapter
model = model_for_seed(0)
for seed in itertools.count():
    randomise_adapters(model, seed)
    save_adapter(model, {directory!r}, SAVE_CONFIG)
    print(seed, flush=True)
"""


def test_kill_9_during_saves_leaves_the_complete_old_or_new_adapter(tmp_path, record_property):
    """Three savers in a loop, each killed with SIGKILL at a random moment after its first complete
    save: the folder always loads (hash verified) as exactly one of the saved adapters, and the next
    save leaves nothing but the manifest and one weights file."""
    rng = random.Random(12)
    dirs = [tmp_path / f"adapter{i}" for i in range(3)]
    procs = [child(SAVE_LOOP.format(directory=str(d))) for d in dirs]
    try:
        for d, proc in zip(dirs, procs):
            wait_for(lambda: (d / MANIFEST_NAME).exists(), proc)
        time.sleep(0.2)
        for proc in procs:
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    leftovers = 0
    for d, proc in zip(dirs, procs):
        printed = [int(line) for line in proc.stdout.read().split()]
        assert printed, "the saver never completed a save"
        config, tensors = read_adapter(d)                       # integrity verified
        assert config == SAVE_CONFIG
        candidates = {printed[-1], printed[-1] + 1}             # killed after a save, before its print
        matches = [s for s in candidates
                   if all(torch.equal(tensors[k], v) for k, v in adapter_values(model_for_seed(s)).items())]
        assert len(matches) == 1, f"{d}: the folder is not one complete saved adapter"
        fresh = Tiny(d=64, layers=3)
        load_adapter(fresh, d)
        names = {p.name for p in d.iterdir()}
        leftovers += len(names) - 2
        save_adapter(model_for_seed(99), d, SAVE_CONFIG)
        assert len(list(d.iterdir())) == 2 and (d / MANIFEST_NAME).exists()
        assert all(torch.equal(read_adapter(d)[1][k], v) for k, v in adapter_values(model_for_seed(99)).items())
    record_property("kills_inside_a_save", leftovers)


def test_crash_between_weights_and_manifest_keeps_the_old_adapter(tmp_path, monkeypatch):
    """The exact failure of the old two-file save: new weights written, config not yet replaced."""
    old, new = model_for_seed(1), model_for_seed(2)
    save_adapter(old, tmp_path, SAVE_CONFIG)
    real = _atomic.write_text

    def die(path, text, encoding="utf-8"):
        if Path(path).name == MANIFEST_NAME:
            raise KeyboardInterrupt("killed before the manifest was replaced")
        return real(path, text, encoding)
    monkeypatch.setattr(_atomic, "write_text", die)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(new, tmp_path, SAVE_CONFIG)
    monkeypatch.setattr(_atomic, "write_text", real)
    assert len(list(tmp_path.iterdir())) == 3                    # manifest, old weights, orphan new weights
    _, tensors = read_adapter(tmp_path)
    assert all(torch.equal(tensors[k], v) for k, v in adapter_values(old).items())
    save_adapter(new, tmp_path, SAVE_CONFIG)
    assert len(list(tmp_path.iterdir())) == 2                    # the orphan is gone


def test_crash_inside_a_write_leaves_no_temporary(tmp_path, monkeypatch):
    save_adapter(model_for_seed(1), tmp_path, SAVE_CONFIG)
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(_atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model_for_seed(2), tmp_path, SAVE_CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # the temporary was removed


def test_leftovers_of_killed_saves_are_ignored_then_removed(tmp_path):
    """What a killed save leaves (temporaries named as _atomic names them, an orphan weights file with
    our header marker) is ignored by loads and removed by the next save; look-alikes that this library
    did not write (no marker, other names) are left alone."""
    model = model_for_seed(3)
    save_adapter(model_for_seed(4), tmp_path / "other", SAVE_CONFIG)
    save_adapter(model, tmp_path, SAVE_CONFIG)
    orphan = tmp_path / "talklora_weights.0123456789abcdef.safetensors"
    orphan.write_bytes(next((tmp_path / "other").glob("talklora_weights.*")).read_bytes())
    junk = [tmp_path / ".talklora_weights.0123456789abcdef.safetensors.a1b2c3d4e5f6.tmp",
            tmp_path / ".talklora_adapter.json.d4e5f6a1b2c3.tmp", orphan]
    foreign = [tmp_path / "talklora_weights.00000000deadbeef.safetensors", tmp_path / ".notes.a1b2c3.tmp",
               tmp_path / "notes.txt"]
    for p in junk[:2] + foreign:
        p.write_bytes(b"half a file")
    load_adapter(Tiny(d=64, layers=3), tmp_path)                  # ignored by loads
    save_adapter(model, tmp_path, SAVE_CONFIG)
    assert not any(p.exists() for p in junk)
    assert all(p.read_bytes() == b"half a file" for p in foreign)   # not provably ours: left alone


# ----------------------------------------------------------------------------- kill -9 during a sweep
SWEEP = """
import torch
torch.set_num_threads(1)
from test_faults import sweep_cells
from analysis.results import run_sweep
run_sweep("exp", sweep_cells(), results_dir={directory!r}, progress=False, log=lambda s: None)
"""


def test_kill_9_during_a_sweep_then_resume_gives_every_row_once(tmp_path):
    from analysis.results import run_sweep
    cells_dir = tmp_path / "run" / "exp" / "cells"
    proc = child(SWEEP.format(directory=str(tmp_path / "run")))
    try:
        wait_for(lambda: cells_dir.is_dir() and len(list(cells_dir.glob("*.json"))) >= 3, proc)
        time.sleep(random.Random(5).uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    done = len(list(cells_dir.glob("*.json")))
    assert 3 <= done < 30
    resumed = run_sweep("exp", sweep_cells(), results_dir=tmp_path / "run", progress=False, log=lambda s: None)
    reference = run_sweep("exp", sweep_cells(), results_dir=tmp_path / "ref", progress=False, log=lambda s: None)
    assert resumed.n_run == 30 - done
    assert resumed.rows.equals(reference.rows)
    assert not resumed.rows.duplicated(["seed", "metric"]).any() and len(resumed.rows) == 90


# ----------------------------------------------------------------------------- corrupted files
def test_flipped_byte_is_refused_and_the_model_unchanged(tmp_path):
    model = model_for_seed(4)
    save_adapter(model, tmp_path, SAVE_CONFIG)
    weights = next(tmp_path.glob("talklora_weights.*"))
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01                                            # one bit of one float
    weights.write_bytes(bytes(data))
    target = model_for_seed(5)
    before = adapter_values(target)
    with pytest.raises(AdapterIntegrityError, match="do not match the SHA-256"):
        load_adapter_weights(target, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in adapter_values(target).items())
    fresh = Tiny(d=64, layers=3)
    with pytest.raises(AdapterIntegrityError):
        load_adapter(fresh, tmp_path)
    assert not adapter_layers(fresh)


# ----------------------------------------------------------------------------- the argument table
LAYER = make_layer("talklora", seed=3)
X = tokens(6, 12, 1)
BAD = {
    "None": None, "str": "abc", "list": [1.0, 2.0], "nested": [[0.5, 0.5]], "dict": {"a": 1}, "bool": True,
    "np_int": np.int64(3), "np_float": np.float32(0.25), "zero": 0, "negative": -1, "nan": float("nan"),
    "inf": float("inf"), "huge": 1e308, "tiny": 5e-324,
    "empty_tensor": torch.zeros(0, 12, dtype=torch.float64), "int_tensor": torch.ones(4, 12, dtype=torch.int64),
    "nan_tensor": torch.full((4, 12), float("nan")), "huge_tensor": tokens(4, 12, 2, scale=1e300),
    "float32_tensor": tokens(4, 12, 2, dtype=torch.float32), "zero_width": torch.zeros(4, 0),
    "complex_tensor": torch.ones(4, 12, dtype=torch.complex64), "dtype_f16": torch.float16,
    "no_router_layer": LoRALinear(nn.Linear(12, 10), 4), "plain_module": nn.Linear(3, 3),
}
EXPECTED = (TypeError, ValueError, FileNotFoundError, NotADirectoryError)


def _official_model():
    model, reference = official_pair(Tiny)
    return model, random_official_state(reference)


def _io_case(name):
    """(function, valid kwargs) for the io functions, built fresh per call (they write files / models)."""
    def save(tmp):
        model = model_for_seed(1)
        return save_adapter, dict(model=model, directory=tmp / "out", config=SAVE_CONFIG)

    def load(tmp):
        save_adapter(model_for_seed(1), tmp / "saved", SAVE_CONFIG)
        return load_adapter, dict(model=Tiny(d=64, layers=3), directory=tmp / "saved")

    def load_weights(tmp):
        save_adapter(model_for_seed(1), tmp / "saved", SAVE_CONFIG)
        return load_adapter_weights, dict(model=model_for_seed(2), directory_or_file=tmp / "saved")

    def official(tmp):
        model, state = _official_model()
        return load_official_state_dict, dict(model=model, state_dict=state, strict=True)

    def export(tmp):
        return export_official_state_dict, dict(model=_official_model()[0])
    return {"save_adapter": save, "load_adapter": load, "load_adapter_weights": load_weights,
            "load_official_state_dict": official, "export_official_state_dict": export}[name]


PROBE_CASES = {
    "gini": (gini, dict(load=[1.0, 2.0, 3.0, 4.0], normalized=False)),
    "load_entropy": (load_entropy, dict(load=[1.0, 2.0, 0.0])),
    "coefficient_of_variation": (coefficient_of_variation, dict(load=[1.0, 2.0, 3.0])),
    "max_mean_share": (max_mean_share, dict(load=[1.0, 2.0, 3.0])),
    "dead_experts": (dead_experts, dict(load=[1.0, 0.0, 3.0], threshold=1e-3)),
    "load_metrics": (load_metrics, dict(load=[1.0, 2.0, 3.0])),
    "soft_load": (soft_load, dict(gates=[[0.5, 0.5], [0.9, 0.1]])),
    "hard_load": (hard_load, dict(gates=[[0.5, 0.5], [0.9, 0.1]])),
    "top1_churn": (top1_churn, dict(gates_a=[[0.4, 0.6]], gates_b=[[0.7, 0.3]])),
    "certified_lipschitz": (certified_lipschitz, dict(layer=LAYER, wrt="code", dtype=torch.float64)),
    "local_lipschitz": (local_lipschitz, dict(layer=LAYER, inputs=X, wrt="input", dtype=torch.float64)),
    "router_lipschitz": (router_lipschitz, dict(layer=LAYER, inputs=X, wrt="code", steps=2, step_size=0.5,
                                                radius=1e-3, seed=0, dtype=torch.float64)),
    "perturbation_response": (perturbation_response, dict(layer_or_model=LAYER, inputs=X, eps=0.1,
                                                          kind="adversarial", seed=0, block=None, pgd_steps=2,
                                                          dtype=torch.float64)),
}
IO_CASES = ("save_adapter", "load_adapter", "load_adapter_weights", "load_official_state_dict",
            "export_official_state_dict")


def finite(result) -> bool:
    """A valid result: every number in it finite (recursively through dicts, lists, dataclasses)."""
    if result is None or isinstance(result, (str, bool)):
        return True
    if isinstance(result, torch.Tensor):
        return not result.is_floating_point() or bool(torch.isfinite(result).all())
    if isinstance(result, (int, float, np.number)):
        return math.isfinite(float(result))
    if isinstance(result, dict):
        return all(finite(v) for v in result.values())
    if isinstance(result, (list, tuple)):
        return all(finite(v) for v in result)
    if hasattr(result, "__dataclass_fields__"):
        return all(finite(getattr(result, f)) for f in result.__dataclass_fields__)
    return True          # reports etc.


def outcome(fn, kwargs: dict, bad: dict) -> str | None:
    """None if the call handled ``bad`` (the replaced arguments) well, else what went wrong."""
    try:
        result = fn(**kwargs)
    except EXPECTED as err:
        message = str(err)
        named = [a for a in bad if a in message or (isinstance(bad[a], (str, os.PathLike)) and str(bad[a]) in message)]
        if isinstance(err, OSError) and not isinstance(bad.get("directory", bad.get("directory_or_file")),
                                                       (str, os.PathLike)):
            return f"{type(err).__name__} for a non-path argument: {message[:200]}"
        return None if named else f"{type(err).__name__} does not name {sorted(bad)}: {message[:200]}"
    except Exception as err:                                      # noqa: BLE001 - that is the finding
        return f"undocumented {type(err).__name__}: {str(err)[:200]}"
    return None if finite(result) else f"non-finite result {str(result)[:200]}"


def table_cases(name: str):
    fn, base = PROBE_CASES[name]
    for arg in base:
        for label, value in BAD.items():
            yield arg, label, fn, {**base, arg: value}


@pytest.mark.parametrize("name", list(PROBE_CASES))
def test_probe_argument_table(name, record_property):
    failures, n = [], 0
    for arg, label, fn, kwargs in table_cases(name):
        n += 1
        problem = outcome(fn, kwargs, {arg: kwargs[arg]})
        if problem:
            failures.append(f"{name}({arg}={label}): {problem}")
    record_property("cases", n)
    assert not failures, "\n".join(failures)


IO_BAD = {k: v for k, v in BAD.items() if k not in ("huge_tensor", "nan_tensor", "float32_tensor")}


@pytest.mark.parametrize("name", IO_CASES)
def test_io_argument_table(name, tmp_path, monkeypatch, record_property):
    monkeypatch.chdir(tmp_path)                                   # "abc" is a valid relative folder
    failures, n = [], 0
    fn, base = _io_case(name)(tmp_path)
    for arg in base:
        for label, value in IO_BAD.items():
            n += 1
            fn, base = _io_case(name)(tmp_path / f"{arg}-{label}")
            problem = outcome(fn, {**base, arg: value}, {arg: value})
            if problem:
                failures.append(f"{name}({arg}={label}): {problem}")
    record_property("cases", n)
    assert not failures, "\n".join(failures)


STATE_VALUES = {"numpy": lambda t: t.numpy(), "None": lambda t: None, "list": lambda t: t.tolist(),
                "int64": lambda t: t.to(torch.int64), "bool": lambda t: t > 0,
                "complex": lambda t: t.to(torch.complex64), "huge_for_float32": lambda t: t.double() * 1e300,
                "wrong_shape": lambda t: t[..., :-1]}


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_official_import_checks_everything_before_the_first_copy(which):
    """A bad entry anywhere (the first, a middle or the last key) is found before anything is copied."""
    for label, make in STATE_VALUES.items():
        model, state = _official_model()
        model.float() if label == "huge_for_float32" else None
        state = {k: (v.float() if label == "huge_for_float32" else v) for k, v in state.items()}
        keys = [k for k in state if ".lora_" in k]
        key = {"first": keys[0], "middle": keys[len(keys) // 2], "last": keys[-1]}[which]
        before = export_official_state_dict(model)
        bad = dict(state)
        bad[key] = make(state[key])
        with pytest.raises((TypeError, ValueError), match=key.replace(".", r"\.")):
            load_official_state_dict(model, bad)
        after = export_official_state_dict(model)
        assert all(torch.equal(after[k], v) for k, v in before.items()), f"{label}: a failed load changed the model"
    model, state = _official_model()
    with pytest.raises(TypeError, match="state_dict keys must be strings, got 3"):
        load_official_state_dict(model, {**state, 3: torch.zeros(1)})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_official_state_dict(model, list(state.items()))


# ----------------------------------------------------------------------------- Hypothesis over the table
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_combination_of_bad_arguments_is_handled(data):
    """Up to three arguments of any public io / probe function replaced at once (by table values or
    drawn numbers, NaN/Inf and the ends of the float range included): a valid result, or an error of a
    documented type naming one of them."""
    name = data.draw(st.sampled_from(sorted(PROBE_CASES) + list(IO_CASES)), label="function")
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)                                             # "abc" is a valid relative folder
        try:
            fn, base = PROBE_CASES[name] if name in PROBE_CASES else _io_case(name)(Path(tmp))
            args = data.draw(st.lists(st.sampled_from(sorted(base)), min_size=1, max_size=3, unique=True),
                             label="args")
            pool = BAD if name in PROBE_CASES else IO_BAD
            bad = {a: pool[data.draw(st.sampled_from(sorted(pool)), label=a)] for a in args}
            numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                                st.floats(1e300, 1.7e308), st.floats(0, 1e-300))
            for a in list(bad):
                if data.draw(st.booleans(), label=f"{a} is a drawn number"):
                    bad[a] = data.draw(numbers, label=f"{a} value")
            problem = outcome(fn, {**base, **bad}, bad)
        finally:
            os.chdir(cwd)
    assert problem is None, f"{name}({bad}): {problem}"
