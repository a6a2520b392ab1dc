# medloc — the verbs. Every target installs what it needs into .venv first (nothing to set up by hand).
#   make demo                        the method in ~30 s on CPU: GRPO + MedLoc-R1's curriculum from the
#                                    embedded stand-in (built once, ~3 min), evaluation, summary, plots
#   make reproduce-table1            Table 1 on the embedded default (tiny Qwen2.5-VL + phantoms, CPU)
#   make reproduce-ablations         the four ablation tables as one sweep, with replay panels
#   make reproduce-beyond            beyond the paper: calibrated curriculum, hybrid and band rewards
#   make test                        the test suite (what CI runs); make test-slow: the heavy checks too
#   make bench                       a GRPO step against TRL's on the tiny model (CPU)
#   make bench-gpu                   the trainer's step against floors doing the same work (GPU)
#   make prepare                     only build (embedded) or check (PRESET=paper) every table's inputs
# PRESET=paper MODEL_DIR=/data/models DATA_ROOT=/data/medloc make reproduce-table1   (real data, GPUs)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medloc-installed
BENCH_STAMP := $(VENV)/.medloc-bench-installed
PRESET ?= embedded
QUICK ?= 0
JOBS ?= 2
MODEL_DIR ?= /data/models
DATA_ROOT ?= cache/data
PYTEST_ARGS ?=
# One thread per process: sweep cells run in parallel processes (more threads than cores is slower).
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1

.PHONY: help install test test-fast test-slow lint bench bench-gpu demo prepare reproduce-table1 \
        reproduce-ablations reproduce-scale reproduce-beyond reproduce-all clean

help:
	@sed -n '/^#/!q;p' Makefile

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The README's test command; CI runs it. Everything that fits a 2-core CPU machine (no GPU tests),
# on TEST_JOBS pytest-xdist workers; a test file stays on one worker (its module fixtures run once).
TEST_JOBS ?= 2
XDIST := -n $(TEST_JOBS) --dist loadfile
test: install
	$(PY) -m pytest -m "not gpu and not heavy" $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not gpu and not slow and not distributed and not heavy" $(XDIST) $(PYTEST_ARGS)

# Everything slow, including the "heavy" checks that repeat what a faster test of `make test` shows.
test-slow: install
	$(PY) -m pytest -m "slow or heavy" $(XDIST) $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check medloc eval data_prep experiments tests

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

# Median GRPO step time of this trainer vs TRL's GRPOTrainer on the same tiny model and data.
bench: $(BENCH_STAMP)
	$(PY) -m experiments.bench_grpo

# One GRPO step of the trainer against floors doing the same work, on a GPU (the random-weight
# 3B shape by default). BENCH_GPU_ARGS="--shape tiny" runs it on the CPU; "-- engine=zero3" etc.
BENCH_GPU_ARGS ?=
bench-gpu: install
	$(PY) -m experiments.bench_gpu $(BENCH_GPU_ARGS)

# Embedded: build the tiny models, the phantom datasets and the stand-in checkpoints every table's
# cells start from. PRESET=paper: check that every model folder and prepared dataset is there.
# TABLE=table1 (or a comma list): only those tables' inputs (Table 1 needs no 7B or 32B).
prepare: install
	$(PY) -m experiments.sweep prepare --preset $(PRESET) --jobs $(JOBS) --quick $(QUICK) \
	    --model-dir $(MODEL_DIR) --data-root $(DATA_ROOT) $(if $(TABLE),--tables $(TABLE))

# GRPO with MedLoc-R1's curriculum for 30 steps from the stand-in checkpoint every embedded run starts
# from (conf/debug/demo.yaml), then the evaluation, a summary and the training curves (runs/demo).
# One-time builds are announced first; the stand-in is built once (cached), a finished one is skipped.
demo: install
	@$(PY) -m medloc.prepare notes --standin cache/standin/tiny-1m/final
	$(PY) -m experiments.sweep standin --jobs $(JOBS)
	$(PY) -m medloc.train debug=demo hydra.run.dir=runs/demo force=true
	$(PY) -m eval.summary runs/demo

reproduce-table1: install
	$(PY) -m experiments.sweep table1 --preset $(PRESET) --jobs $(JOBS) --quick $(QUICK) \
	    --model-dir $(MODEL_DIR) --data-root $(DATA_ROOT)

# The four ablation tables (criteria, schedule, decay, refresh) as one sweep: the shared reference
# row runs once per seed. One table alone: .venv/bin/python -m experiments.sweep criteria
reproduce-ablations: install
	$(PY) -m experiments.sweep ablations --preset $(PRESET) --jobs $(JOBS) --quick $(QUICK) \
	    --model-dir $(MODEL_DIR) --data-root $(DATA_ROOT)

reproduce-scale: install
	$(PY) -m experiments.sweep scale --preset $(PRESET) --jobs $(JOBS) --quick $(QUICK) \
	    --model-dir $(MODEL_DIR) --data-root $(DATA_ROOT)

# Beyond the paper (docs/beyond.md): MedLoc-R1 against its calibrated curriculum and the hybrid and
# band rewards, 4 arms x 3 twins x 3 seeds; each twin is probed and calibrated first.
reproduce-beyond: install
	$(PY) -m experiments.sweep beyond --preset $(PRESET) --jobs $(JOBS) --quick $(QUICK) \
	    --model-dir $(MODEL_DIR) --data-root $(DATA_ROOT)

reproduce-all: reproduce-table1 reproduce-ablations reproduce-scale

clean:
	rm -rf runs outputs multirun .pytest_cache
