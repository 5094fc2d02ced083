"""Execute every jupytext notebook in notebooks/ (each redraws the figures that declare it, against the saved
figure data in figures/data/; 00_library_tour uses the library on the bundled SmolLM2).

Set ``TALKLORA_FIGURES_DIR`` to run them against another figures directory (e.g. a scratch run).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.py"))
TOUR = "00_library_tour.py"               # the library tour: no figure of its own
BENCH = "05_cost.py"                      # redraws F13, measured by `make bench` (no claim cites it)
FIGURES_DIR = Path(os.environ.get("TALKLORA_FIGURES_DIR", ROOT / "figures"))

pytestmark = pytest.mark.notebooks


def test_every_figure_has_a_notebook():
    from analysis.claims import FIGURES
    assert {f.notebook for f in FIGURES} == {p.name for p in NOTEBOOKS} - {TOUR, BENCH}
    assert "draw_f13(" in (ROOT / "notebooks" / BENCH).read_text()
    for f in FIGURES:        # the figure's own drawing function, imported from its claim module
        module = f.draw.__module__.rsplit(".", 1)[1]
        assert f"{module}.draw_{f.id.lower()}(" in (ROOT / "notebooks" / f.notebook).read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    # figures/data is committed (the quick profile's results): a missing file is a failure
    assert (FIGURES_DIR / "data").is_dir(), (f"{FIGURES_DIR / 'data'} is absent: run `python -m analysis "
                                             f"figures` first (or set TALKLORA_FIGURES_DIR)")
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nb = jupytext.read(path)
    # the kernel inherits the environment: point it at the data, and let it use the inline backend
    # (a headless MPLBACKEND=Agg, as `make` exports, would draw nothing into the notebook)
    monkeypatch.setenv("TALKLORA_FIGURES_DIR", str(FIGURES_DIR))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"
