# nsdprep: NSD + COCO decoding dataset, rebuilt reproducibly with DataLad. `make help` lists the
# targets and the options. The options (SUBJECTS=01, JOBS=2, ...) belong to nsdprep, which declares,
# checks and documents them (code/nsdprep/options.py); this file only hands them on.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# Two `datalad run` at once in one dataset corrupt its history: never run targets in parallel.
.NOTPARALLEL:

PYTHON_BOOT ?= python3
VENV ?= $(CURDIR)/.venv
export PATH := $(abspath $(VENV))/bin:$(PATH)
# The dataset's own code is what runs (also inside `datalad run` and `datalad rerun`).
export PYTHONPATH := $(CURDIR)/code
# Deterministic outputs: one BLAS/OpenMP thread per process, workers are explicit (JOBS).
export OMP_NUM_THREADS := 1
export OPENBLAS_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
export PYTHONHASHSEED := 0
# No process writes bytecode: a .pyc cut short by a full disk would break every later import.
# It is written once, when the environment is installed (nsdprep.drive.bytecode).
export PYTHONDONTWRITEBYTECODE := 1

PY := $(abspath $(VENV))/bin/python
STAMP := $(abspath $(VENV))/.nsdprep-installed

# The variables of make's command line, as shell words NAME='value', for nsdprep.
OPTIONS = $(foreach v,$(sort $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))),$(v)='$(subst ','\'',$($(v)))')
# nsdprep checks them (standard library only: with the venv's Python once it exists, which starts
# faster than a version manager's python3 shim, else the system's) and names the targets it makes.
CHECK_PY := $(firstword $(wildcard $(PY)) $(PYTHON_BOOT))
MAKE_SPEC := $(shell PYTHONPATH='$(CURDIR)/code' $(CHECK_PY) -m nsdprep.makefile $(OPTIONS) 2>&1)
ifneq ($(firstword $(MAKE_SPEC)),targets:)
$(error $(MAKE_SPEC))
endif
BUILD_TARGETS := $(wordlist 2,$(words $(MAKE_SPEC)),$(MAKE_SPEC))

.PHONY: help venv check-identity demo test test-slow test-slurm lint format bench bench-load \
	bench-pipeline bench-decode bench-conventions $(BUILD_TARGETS)

help:
	@PYTHONPATH='$(CURDIR)/code' $(CHECK_PY) -m nsdprep.makefile --help

# uv (pinned in requirements.txt too) installs the pins with parallel downloads: about 12 s where pip
# takes 75 s. Where uv cannot run, pip installs the same pins.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check "$$(grep -m1 '^uv==' requirements.txt)" && \
	  UV_LINK_MODE=copy $(PY) -m uv pip install --quiet --python $(PY) -r requirements.txt || { \
	  echo "uv could not install the environment; installing with pip" >&2; \
	  $(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt; }
	@PYTHONDONTWRITEBYTECODE= $(PY) -m nsdprep.drive.bytecode code tests
	@touch $@

venv: $(STAMP)

# Without an identity git-annex writes user.name=root into the dataset and commits as 'root <root>'.
check-identity: venv
	@{ [ -n "$${GIT_AUTHOR_NAME:-}" ] || git config user.name >/dev/null; } && \
	 { [ -n "$${GIT_AUTHOR_EMAIL:-}" ] || git config user.email >/dev/null; } || { \
	  echo "nsdprep: error: git has no identity (commits need one); set it once:" \
	    "git config --global user.name 'Your Name' && git config --global user.email you@example.org" >&2; \
	  exit 2; }

# Every pipeline target (inputs, get, 3mm, curated, publish, ...): nsdprep plans and runs it.
$(BUILD_TARGETS): check-identity
	$(PY) -m nsdprep build $@ $(OPTIONS)

demo: venv
	$(PY) -m nsdprep.testing.demo --source $(CURDIR) --venv $(abspath $(VENV))

test: MARKS := not slow and not slurm
test-slow: MARKS := slow and not slurm
test-slurm: MARKS := slurm
test test-slow test-slurm: venv
	@rc=0; $(PY) -m pytest -q -n auto -m "$(MARKS)" $(PYTEST_ARGS) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is an error here"; fi; exit $$rc

lint: venv
	$(PY) -m ruff check code tests bench
	$(PY) -m ruff format --check code tests bench

format: venv
	$(PY) -m ruff format code tests bench
	$(PY) -m ruff check --fix code tests bench

bench: BENCH := resample
bench-load: BENCH := load
bench-pipeline: BENCH := pipeline
bench-decode: BENCH := decode
bench-conventions: BENCH := conventions
bench bench-load bench-pipeline bench-decode bench-conventions: venv
	$(PY) bench/bench_$(BENCH).py $(OPTIONS)
