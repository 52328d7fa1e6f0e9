# nsdprep: NSD + COCO decoding dataset, rebuilt reproducibly with DataLad.
# Every target first makes sure the pinned environment in $(VENV) exists (idempotent, quick).
# `make help` lists the targets.

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

PY := $(abspath $(VENV))/bin/python
NSDPREP := $(PY) -m nsdprep
STAMP := $(abspath $(VENV))/.nsdprep-installed

# ---- site settings (real public locations by default; the demo and tests point at a mirror) ----
NSD_URL ?= https://natural-scenes-dataset.s3.amazonaws.com
COCO_URL ?= http://images.cocodataset.org/annotations/annotations_trainval2017.zip
# Subjects to process, e.g. SUBJECTS="01 02"; empty = every subject registered in inputs/nsd.
SUBJECTS ?=
JOBS ?= 2
DROP ?= 0
# Label rule: default (largest annotation), crop (largest inside the crop NSD showed), legacy.
# DROP=1: sessions downloaded ahead of the ones being processed (disk holds JOBS + PREFETCH sessions).
PREFETCH ?= 1
# bench-pipeline: the link bandwidth (MB/s) of the whole-NSD time projection.
RATE_MB_S ?= 50
LABELS ?= default
# make curated VALID=1: keep only voxels valid in every session (writes sub-XX_mask.nii.gz).
VALID ?= 0
FORCE ?= 0
# Experiment layout (real NSD: 12 runs of 63/62 trials). Smaller synthetic layouts are passed here.
RUNS_PER_SESSION ?= 12
TRIALS_PER_RUN ?= 63,62
# Decoding: trials per subject for a quick look (0 = all).
SUBSAMPLE ?= 0
# Decoding: label permutations per subject, each a full cross-validation (smallest p = 1/(N+1)).
PERMUTATIONS ?= 100
REV ?= HEAD
# Publishing: a RIA store URL (ria+file:///path or ria+ssh://host/path), the sibling name, the alias.
RIA ?=
RIA_SIBLING ?= ria
ALIAS ?= nsdprep
# Where the derivative targets run: local, or slurm (one job array per target, FAIRly-big workflow;
# needs RIA= once). SLURM_OPTS passes sbatch options; WAIT=1 waits for the result; SCRATCH is the
# job-local folder for the temporary clones (default $TMPDIR on the node, else /tmp).
BACKEND ?= local
SLURM_OPTS ?=
WAIT ?= 0
SCRATCH ?=

# Options a user may set on the command line: every `NAME ?= default` of this Makefile, and
# PYTEST_ARGS. Anything else (a typo such as SUBJETCS=01, which make would silently ignore and so
# process every subject) stops make before any target runs.
KNOWN_OPTIONS := $(sort $(shell sed -nE 's/^([A-Z_][A-Z0-9_]*) *\?=.*/\1/p' $(MAKEFILE_LIST)) PYTEST_ARGS)
UNKNOWN_OPTIONS := $(filter-out $(KNOWN_OPTIONS),$(foreach v,$(.VARIABLES),$(if \
	$(filter command line,$(origin $(v))),$(v))))
ifneq ($(strip $(UNKNOWN_OPTIONS)),)
$(error unknown option $(UNKNOWN_OPTIONS); known: $(KNOWN_OPTIONS) (see `make help`))
endif
BOOLEAN_VALUES := 0 1 yes no true false
$(foreach v,DROP FORCE VALID WAIT,$(if $(filter-out $(BOOLEAN_VALUES),$($(v))),$(error \
	$(v)=$($(v)) is not a yes/no value; use $(v)=1 or $(v)=0)))

STEP_OPTS = $(if $(strip $(SUBJECTS)),--subjects $(SUBJECTS)) --jobs $(JOBS) \
	$(if $(filter 1 yes true,$(DROP)),--drop) --prefetch $(PREFETCH) \
	$(if $(filter 1 yes true,$(FORCE)),--force) \
	$(if $(filter 1 yes true,$(VALID)),--valid) \
	--labels $(LABELS) --runs-per-session $(RUNS_PER_SESSION) --trials-per-run $(TRIALS_PER_RUN) \
	--subsample $(SUBSAMPLE) --permutations $(PERMUTATIONS)
BACKEND_OPTS = --backend $(BACKEND) $(if $(filter 1 yes true,$(WAIT)),--wait) \
	--slurm-opts='$(SLURM_OPTS)' --ria='$(RIA)' --ria-sibling $(RIA_SIBLING) --alias $(ALIAS) \
	--scratch='$(SCRATCH)'

.PHONY: help venv demo test test-slow test-slurm lint format inputs get drop 3mm coco-labels \
	curated decode bench bench-load bench-pipeline rerun publish repair check-identity all

help: ## list the targets
	@echo "nsdprep: NSD + COCO decoding dataset (DataLad). Targets:"
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z0-9-]+):.*## (.*)/  \1\t\2/' \
		| expand -t 16
	@echo "Variables: SUBJECTS=\"01 02\" JOBS=2 DROP=1 PREFETCH=1 LABELS=crop|legacy VALID=1 FORCE=1 PERMUTATIONS=100 NSD_URL=... COCO_URL=... RIA=..."
	@echo "           BACKEND=slurm SLURM_OPTS=\"--time=.. --mem=..\" WAIT=1 SCRATCH=... (see README)"
	@echo "A failing target prints one line 'nsdprep <command>: error: ...' and make exits 2 (README, Troubleshooting)."

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

venv: $(STAMP) ## create/update the pinned environment in .venv (datalad, git-annex, nibabel, ...)

# Without an identity git-annex writes user.name=root into the dataset and commits as 'root <root>'.
check-identity: venv
	@{ [ -n "$${GIT_AUTHOR_NAME:-}" ] || git config user.name >/dev/null; } && \
	 { [ -n "$${GIT_AUTHOR_EMAIL:-}" ] || git config user.email >/dev/null; } || { \
	  echo "nsdprep: error: git has no identity (commits need one); set it once:" \
	    "git config --global user.name 'Your Name' && git config --global user.email you@example.org" >&2; \
	  exit 2; }

demo: venv ## offline end-to-end run on synthetic data in a scratch clone (.demo/)
	$(PY) -m nsdprep.testing.demo --source $(CURDIR) --venv $(abspath $(VENV))

test: venv ## run the test suite (unit + end-to-end in temporary clones)
	@rc=0; $(PY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is an error here"; fi; exit $$rc

test-slow: venv ## run the slow tests only (kill loops, full-geometry data); CI runs it after `make test`
	@rc=0; $(PY) -m pytest -q -m "slow and not slurm" $(PYTEST_ARGS) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is an error here"; fi; exit $$rc

test-slurm: venv ## BACKEND=slurm end to end on a throw-away single-node SLURM (root; installs it)
	@rc=0; $(PY) -m pytest -q -m slurm tests/test_slurm.py $(PYTEST_ARGS) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no SLURM tests: that is an error here"; fi; exit $$rc

lint: venv ## ruff check + format check
	$(PY) -m ruff check code tests bench
	$(PY) -m ruff format --check code tests bench

format: venv ## format the code with ruff
	$(PY) -m ruff format code tests bench
	$(PY) -m ruff check --fix code tests bench

inputs: check-identity ## create/update inputs/nsd and inputs/coco, registered by URL (no download)
	$(NSDPREP) inputs --nsd-url $(NSD_URL) --coco-url $(COCO_URL) \
		$(if $(strip $(SUBJECTS)),--subjects $(SUBJECTS))

get: check-identity ## fetch the betas of SUBJECTS (e.g. make get SUBJECTS=01) and the experiment files
	$(NSDPREP) build get $(STEP_OPTS)

drop: check-identity ## drop the betas content of SUBJECTS again (frees disk; still registered)
	$(NSDPREP) build drop $(STEP_OPTS)

repair: check-identity ## re-fetch and verify damaged inputs of SUBJECTS, re-key them to their checksum
	$(NSDPREP) build repair $(STEP_OPTS)

3mm: check-identity ## resample 1 mm betas to 3 mm + GM mask -> derivatives/3mm (datalad run per subject)
	$(NSDPREP) build 3mm $(STEP_OPTS) $(BACKEND_OPTS)

coco-labels: check-identity ## COCO labels per NSD image -> derivatives/coco_categories.pkl (datalad run)
	$(NSDPREP) build coco-labels $(STEP_OPTS) $(BACKEND_OPTS)

curated: check-identity ## equalized trials per subject -> derivatives/curated_3mm (datalad run)
	$(NSDPREP) build curated $(STEP_OPTS) $(BACKEND_OPTS)

decode: check-identity ## run-grouped decoding baseline + report -> derivatives/decoding (datalad run)
	$(NSDPREP) build decode $(STEP_OPTS) $(BACKEND_OPTS)

all: 3mm coco-labels curated decode ## every derivative, in order
# With BACKEND=slurm each target needs the previous one merged: wait for each (no effect locally).
all: WAIT = 1

rerun: check-identity ## re-execute a recorded run (REV=<commit>, default HEAD) with datalad rerun
	$(NSDPREP) build rerun --rev $(REV)

publish: check-identity ## publish to a RIA store: make publish RIA=ria+file:///path/store [ALIAS=nsdprep]
	@[ -n "$(RIA)" ] || { echo "make publish needs RIA=<store URL>, e.g. RIA=ria+file:///data/ria-store"; exit 2; }
	$(NSDPREP) publish --ria "$(RIA)" --sibling $(RIA_SIBLING) --alias $(ALIAS)

bench: venv ## benchmark the 3 mm resample on a full-geometry synthetic session (bench/results/)
	$(PY) bench/bench_resample.py

bench-load: venv ## curated matrix vs streaming the 4D NIfTI on a full-size subject (bench/results/)
	$(PY) bench/bench_load.py

bench-pipeline: venv ## benchmark make 3mm DROP=1 (downloads overlapping compute) + whole-NSD projection
	$(PY) bench/bench_pipeline.py --jobs $(JOBS) --prefetch $(PREFETCH) --link-rate $(RATE_MB_S)
