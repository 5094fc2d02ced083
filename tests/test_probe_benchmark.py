"""The probe benchmark runs end to end at a tiny size (no timing assertions)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch




SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_speed.py"


def load_script():
    spec = importlib.util.spec_from_file_location("probe_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_benchmark_tiny(tmp_path):
    out_file = tmp_path / "bench.json"
    out = load_script().main(["--quick", "--d", "48", "--tokens", "32", "--json", str(out_file)])
    assert json.loads(out_file.read_text()) == json.loads(json.dumps(out))
    for key in ("sandwich_code_s", "sandwich_input_s", "sweep_s", "local_closed_s", "local_generic_s", "speedup",
                "local_closed64_s", "local_generic64_s", "speedup64"):
        assert math.isfinite(out[key]) and out[key] > 0
    for wrt in ("code", "input"):
        s = out[f"sandwich_{wrt}"]
        assert all(math.isfinite(v) for v in s.values())
        assert s["local_max"] <= s["certified"] * (1 + 1e-6) and s["empirical"] <= s["certified"] * (1 + 1e-6)
    assert out["sweep_rows"] == 3 * 8 * 10 and out["sweep_all_finite"]
    assert out["local_max_abs_diff"] < 1e-5 and out["local_max_abs_diff64"] < 1e-12
