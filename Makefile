# The README's two commands: `make repro` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# Stage commands call `python`: the venv's. DVC must not phone home (no network here).
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
PIP_QUIET := 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2 || true)

.PHONY: help venv data repro repro-short repro-long repro-quality browser test test-fast lint bench gpu-check lock clean

help:
	@echo "make repro     set up the venv, materialize data/ if missing, run dvc repro (one local Ray for all stages: gm with-ray)"
	@echo "make repro-short after repro: the context-model codec's λ sweep at 4,000 steps (~22 min), as a DVC experiment"
	@echo "make repro-long  after repro: the context-model codec's λ sweep (~75 min), as a DVC experiment"
	@echo "make repro-quality after repro: longer runs and a 3-seed augmentation ablation (about 1 h), reports/quality/"
	@echo "make test      set up the venv and run the whole test suite"
	@echo "make test-fast the tests not marked slow"
	@echo "make lint      ruff check and format check"
	@echo "make bench     benchmarks (bench/), printing their figures"
	@echo "make gpu-check on a CUDA machine: every family with AMP and fp32, resume, DDP (bench/gpu_check.py)"

# Reinstalls only when pyproject.toml or requirements.lock change.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3 $(PIP_QUIET)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]' $(PIP_QUIET)
	@touch $@

venv: $(STAMP)

# data/ is tracked by data.dvc. Pull it from a DVC remote when one is configured, else
# materialize the default raw data from installed packages; then check it against data.dvc.
data: $(STAMP)
	@if [ ! -d data ]; then \
	  if [ -n "$$(dvc remote list)" ] && dvc pull --quiet data.dvc; then :; \
	  else gm data materialize --out data --quiet; fi; \
	fi
	gm data verify --dvc-file data.dvc

repro: data
	gm with-ray -- dvc repro

# A preset is one DVC experiment of the root pipeline (gm/preset.py): nothing is declared on
# main that only the preset makes, so `dvc status` after `make repro` is clean.
repro-short: repro
	gm with-ray -- python -m gm.preset presets/short/params.yaml --name short

repro-long: repro
	gm with-ray -- python -m gm.preset presets/long/params.yaml --name long

# The quality preset's keep section (its summary, evaluations, detection reports and sample
# grids) is copied to reports/quality/ (committed); the workspace holds the experiment until
# `dvc exp apply` of another.
repro-quality: repro
	gm with-ray -- python -m gm.preset presets/quality/params.yaml --name quality

# The browser test opens the MLflow UI in Debian's headless Chromium: installed here when it is
# missing on a Debian machine where we are root (CI); elsewhere that one test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test"; \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || \
	    echo "note: chromium could not be installed; the browser test will be skipped"; \
	  else echo "note: no chromium; the browser test will be skipped"; fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check gm pipelines tests bench
	$(BIN)/ruff format --check gm pipelines tests bench

# On a machine with a CUDA device: every family a few hundred steps at 64x64 with AMP, then fp32
# (images/s, peak memory, checkpoint resume), and a 2-process DDP run where two devices exist.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

bench: $(STAMP)
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_cpu.py --no-compile
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_progressive.py
	$(BIN)/python bench/bench_tune.py
	$(BIN)/python bench/bench_codec.py
	$(BIN)/python bench/bench_scale.py

# Regenerate the full pin set after changing pyproject.toml's dependencies.
lock:
	rm -rf /tmp/gm-lock && $(PYTHON) -m venv /tmp/gm-lock
	/tmp/gm-lock/bin/python -m pip install --quiet --upgrade pip==26.3 $(PIP_QUIET)
	/tmp/gm-lock/bin/python -m pip install --quiet -e '.[dev]' $(PIP_QUIET)
	/tmp/gm-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock

clean:
	rm -rf $(VENV)
