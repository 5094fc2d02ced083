# talklora-min — `make figures` sets everything up and regenerates all figures and CLAIMS.md;
# `make test` sets up what it needs and runs every test (unit, property, real-model, notebooks);
# `make paper` runs the larger paper profile into reports/paper/;
# `make lab` opens the notebooks in JupyterLab (each .py paired with an .ipynb by jupytext).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PROFILE ?= quick
WORKERS ?= 2
LAB_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: setup figures paper claims test test-fast bench lab clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/dev.txt requirements/assets.txt
	$(PYTHON) -m venv $(VENV)
	# CPU torch first (the pinned wheel on local disk); pyproject only asks torch>=2.3
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/assets.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

figures: setup
	$(BIN)/python -m analysis figures --profile $(PROFILE) --workers $(WORKERS)
	$(BIN)/python -m analysis claims --profile $(PROFILE) --workers $(WORKERS)

# The paper profile (official settings, more seeds and steps; ~80 min on 2 cores): results in results_paper/,
# figures (PNG + data; the PDFs are not tracked) and CLAIMS.md / claims.csv in reports/paper/.
paper: setup
	$(BIN)/python -m analysis figures --profile paper --workers $(WORKERS) --results-dir results_paper --out-dir reports/paper/figures
	$(BIN)/python -m analysis claims --profile paper --workers $(WORKERS) --results-dir results_paper --out-dir reports/paper

test: setup
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q -n 2 --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 -m "not real_models and not notebooks"

# Pair every notebooks/NN_*.py (the tracked source) with an .ipynb (jupytext formats ipynb,py:percent):
# created on first use, then synced with the newer of the two, keeping the .ipynb's outputs;
# JupyterLab's jupytext extension writes both on every save.  MPLBACKEND is unset so figures draw
# inline.  JupyterLab refuses to start as root (common in containers) unless given --allow-root:
# it is added only when make runs as root.  Extra options: make lab LAB_ARGS="--no-browser --port 8899";
# another folder of notebooks: make lab NOTEBOOKS=path
NOTEBOOKS ?= notebooks
LAB_ROOT := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root,)
lab: setup
	$(BIN)/jupytext --set-formats ipynb,py:percent --sync $(NOTEBOOKS)/[0-9]*.py
	env -u MPLBACKEND $(BIN)/jupyter lab --notebook-dir=$(NOTEBOOKS) $(LAB_ROOT) $(LAB_ARGS)

# Cost of the adapters (TalkLoRA / LoRA on the layer grid, memory, a SmolLM2-shaped model; F13 into
# figures/), then the probes and the frozen-linear path.  ~15 min on the 2-core machine.
bench: setup
	$(BIN)/python benchmarks/layer_speed.py
	$(BIN)/python benchmarks/model_speed.py
	$(BIN)/python benchmarks/cost_vs_experts.py
	$(BIN)/python benchmarks/probe_speed.py
	$(BIN)/python benchmarks/frozen_linear_speed.py

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
