"""``make lab`` starts JupyterLab, also as root (containers): the test starts it on a free port over a
copy of one notebook, waits for HTTP 200 on /lab, then stops it.  Bounded in time: 120 s to come up,
30 s to stop (then SIGKILL of its process group)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.notebooks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def make(*args: str, **kwargs) -> list[str]:
    # -o: never rebuild the environment from a test (it is set up: the tests run in it)
    return ["make", "-o", ".venv/.installed", *args]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_allow_root_is_added_only_as_root():
    dry = subprocess.run(make("-n", "lab"), cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lab = [line for line in dry.splitlines() if "jupyter lab" in line]
    assert len(lab) == 1
    assert ("--allow-root" in lab[0]) == (os.geteuid() == 0)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lab_serves_then_stops(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(ROOT / "notebooks" / "00_library_tour.py", notebooks)
    port = free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    lab_args = f"--no-browser --port={port} --ip=127.0.0.1 --IdentityProvider.token= --ServerApp.password="
    proc = subprocess.Popen(make("lab", f"NOTEBOOKS={notebooks}", f"LAB_ARGS={lab_args}"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, code = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            code = status(f"http://127.0.0.1:{port}/lab")
            if code == 200:
                break
            time.sleep(0.5)
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
    assert alive and code == 200, f"make lab did not serve /lab (HTTP {code}):\n{out[-3000:]}"
    assert (notebooks / "00_library_tour.ipynb").is_file()        # paired by jupytext first
    assert status(f"http://127.0.0.1:{port}/lab") is None          # stopped
