# kdpipe — common tasks. `make help` lists them.
# Everything runs inside .venv, which `make setup` creates; other targets call it when needed.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extras installed into the venv: the CPU onnxruntime build plus test tools. The GPU image uses
# `.[gpu]` instead; never both (see README, "GPU").
EXTRAS ?= cpu,dev
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
# dvc.yaml stages call `kdpipe`: put the venv first on PATH for them.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup repro push data test test-fast lint clean report compare exp bench gpu-check bench-large image constraints test-image pipeline retrain dvc-deps generate

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The stamp depends on pyproject.toml and the images' lock file: the venv is (re)installed only when
# the dependency spec changed, so `make setup` is cheap when nothing did. The lock is a constraint:
# every package the images hold is installed at the images' version, so CI, the retrain workflow and
# the images test and run the same stack (dev tools, which the images lack, resolve freely).
IMAGE_LOCK := docker/requirements-cpu.txt
$(STAMP): pyproject.toml $(IMAGE_LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (kdpipe needs Python 3.11; set PYTHON=...)"; exit 1; }
	@test -x $(BIN)/python || { echo "setup: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "setup: installing kdpipe and its pinned stack into $(VENV) (torch 2.14.1 alone is 5.5 GB: minutes on a first install); each package as pip collects it:"
	@$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
	@$(BIN)/python -m pip install -e '.[$(EXTRAS)]' --constraint $(IMAGE_LOCK) 2>&1 \
	  | grep --line-buffered -E '^(Collecting|Successfully installed|ERROR|error)' | sed -u 's/^/  /' || true
	@echo "setup: checking the installed stack (pip check, imports)"
	@$(BIN)/python -m pip check >/dev/null || { $(BIN)/python -m pip check; exit 1; }
	@$(BIN)/python -c "import kdpipe, torch, onnxruntime, dvc, mlflow, kfp"
	@touch $@
	@echo "setup: $(VENV) is ready"

setup: $(STAMP) ## create .venv and install kdpipe with its pinned stack (idempotent)
	@test -d .dvc || $(BIN)/dvc init --quiet
	@# grep first: each dvc call costs about a second, and this runs on every make call
	@grep -q 'analytics = false' .dvc/config || $(BIN)/dvc config core.analytics false
	@grep -q 'remote "local"' .dvc/config || $(BIN)/dvc remote add --default local dvc-remote

# Unlabeled data lives in append-only batch folders, each with its own .dvc file
# (data/unlabeled/batch-0001.dvc, ...; `kdpipe ingest` adds the next one).
data: setup ## make sure data/ holds data: pull it from the DVC remote, else write the demo set
	@if [ ! -d data/labeled ]; then \
	  $(BIN)/dvc pull --quiet data/labeled.dvc data/test.dvc $$(ls data/unlabeled/batch-*.dvc 2>/dev/null) 2>/dev/null \
	  || { echo "data/ is empty: writing the embedded demo data set"; \
	       $(BIN)/kdpipe demo-data data --force \
	       && $(BIN)/dvc add --quiet data/labeled data/test data/unlabeled/batch-0001; }; \
	fi

# S holds GROUP.KEY=VALUE settings written into params.yaml (validated, comments kept) before the run:
# make repro S="prepare.image_size=64 augment.flip=true"
# One run at a time, and its settings never change under it: the lock (flock on REPRO_LOCK, held for
# the whole recipe) is taken BEFORE S is written into params.yaml, so a second `make repro` stops
# before it writes anything. dvc repro ends with "Use \`dvc push\`..." although the push follows: that
# hint is filtered from its stdout only (the stages' progress bars are on stderr).
REPRO_LOCK := .dvc/tmp/kdpipe-repro.lock
repro: data ## run the whole pipeline (dvc repro) [S="group.key=value ..."]; a second run does nothing
	@mkdir -p $(dir $(REPRO_LOCK)); exec 9>$(REPRO_LOCK); \
	flock -n 9 || { echo "error: another 'make repro' is running in this project (it holds $(REPRO_LOCK)); nothing was changed: wait for it to finish"; exit 1; }; \
	if [ -n "$(S)" ]; then $(BIN)/kdpipe params --write $(foreach setting,$(S),-S $(setting)) || exit 1; fi; \
	set -o pipefail; $(BIN)/dvc repro | { grep --line-buffered -v '^Use `dvc push`' || true; } || exit 1; \
	$(MAKE) --no-print-directory push

# DVC's own message says why a push failed; the exit status says the outputs are not on the remote.
push: setup ## push the DVC-tracked data and outputs to the default DVC remote
	@$(BIN)/dvc push || { echo "error: dvc push failed (DVC's reason above): the outputs are in the local DVC cache, not on the default remote"; exit 1; }
	@echo "outputs pushed to the default DVC remote"

report: setup ## render the DVC plots to PNG offline + a one-page report in reports/summary/
	$(BIN)/kdpipe report --out reports/summary

compare: setup ## compare experiments and metrics with the last commit (dvc exp show, dvc metrics diff)
	$(BIN)/dvc exp show --no-pager --md --only-changed || true
	$(BIN)/dvc metrics diff --md HEAD

# `dvc exp run` straight from .venv/bin would not find `kdpipe` (the stages call it by name): this
# target runs it with the venv on PATH. S holds one or more GROUP.KEY=VALUE settings.
# An experiment runs in a temporary copy of the workspace (--temp: params.yaml and the outputs here are
# left as they are), never moves the registry's @champion (register.promote=false) and adds no registry
# version: its model stays with its MLflow run (register.new_version=false).
exp: setup ## run the pipeline as a DVC experiment: make exp S="train.recipe=cotrain train.mu=2" [NAME=...]
	@test -n "$(S)" || { echo 'usage: make exp S="train.recipe=cotrain [more GROUP.KEY=VALUE]" [NAME=name]'; exit 2; }
	$(BIN)/dvc exp run --temp $(if $(NAME),-n $(NAME)) -S register.promote=false -S register.new_version=false $(foreach setting,$(S),-S $(setting))

bench: setup ## quick benchmarks (needs `make repro` first; results in benchmarks/results/, see BENCHMARKS.md)
	$(BIN)/python -m benchmarks.inference
	$(BIN)/python -m benchmarks.throughput
	$(BIN)/python -m benchmarks.label_efficiency --quick
	$(BIN)/python -m benchmarks.pipeline_overhead
	$(BIN)/python -m benchmarks.ingest_load
	$(BIN)/python -m benchmarks.prepare_throughput
	$(BIN)/python -m benchmarks.batch_assembly
	$(BIN)/python -m benchmarks.memory_scaling

gpu-check: setup ## run every CUDA path once and write benchmarks/results/gpu_check.json (first thing on a new GPU machine; < 5 min)
	$(BIN)/python -m benchmarks.gpu_check

bench-large: setup ## the data-path benchmarks at scale (memory at N = 10k, 50k, 200k images: ~30 min)
	$(BIN)/python -m benchmarks.memory_scaling --large

retrain: data ## dvc pull + repro + push + metrics diff (with KDPIPE_KFP_HOST: run on Kubeflow, wait, pull the reports back)
	$(BIN)/kdpipe retrain

test: setup ## run the whole test suite (what CI runs); the 15 slowest tests are listed at the end
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup ## the inner loop: every test not marked slow (a few minutes on 2 cores)
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

lint: setup ## ruff (lint + format check) on the code, hadolint on the Dockerfile; `ruff format` fixes the format
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/hadolint Dockerfile

# Images (Dockerfile targets cpu and gpu). With docker, or else buildah (chroot isolation: no daemon
# needed). BASE_IMAGE, TORCH_INDEX_URL (PyTorch's CPU wheel index, for the cpu target) and CA_BUNDLE
# (a CA bundle for pip behind a TLS-intercepting proxy, passed as a build secret) are optional.
IMAGE_TAG ?= kdpipe:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE_IMAGE ?= debian:bookworm-slim
CA_BUNDLE ?=
BUILD_ARGS = --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) \
	$(if $(CA_BUNDLE),--secret id=ca$(comma)src=$(CA_BUNDLE))
comma := ,
image: ## build the cpu and gpu images (docker, else buildah); see the Dockerfile's header
	@if command -v docker >/dev/null && docker info >/dev/null 2>&1; then \
	  DOCKER_BUILDKIT=1 docker build --target cpu $(BUILD_ARGS) -t $(IMAGE_TAG)-cpu . && \
	  DOCKER_BUILDKIT=1 docker build --target gpu $(BUILD_ARGS) -t $(IMAGE_TAG)-gpu . ; \
	elif command -v buildah >/dev/null; then \
	  buildah bud --isolation=chroot --layers --target cpu $(BUILD_ARGS) -t $(IMAGE_TAG)-cpu . && \
	  buildah bud --isolation=chroot --layers --target gpu $(BUILD_ARGS) -t $(IMAGE_TAG)-gpu . ; \
	else echo "error: 'make image' needs docker (with a running engine) or buildah"; exit 1; fi

constraints: setup ## re-pin docker/requirements-{cpu,gpu}.txt from pyproject.toml (every package the images install)
	$(BIN)/python docker/lock.py

test-image: setup ## build the cpu image from a local base and run kdpipe in it (needs buildah; minutes)
	$(BIN)/python -m pytest -q -m image tests/test_image.py

dvc-deps: setup ## add dvc.yaml stages for new catalog steps, rewrite code deps from the imports (tested)
	$(BIN)/python tests/dvc_code_deps.py --write

generate: setup ## after a new setting or step: params.yaml's missing defaults, dvc.yaml stages and code deps, the compiled pipeline
	$(BIN)/kdpipe params --add-missing
	$(BIN)/python tests/dvc_code_deps.py --write
	KDPIPE_IMAGE=$(KDPIPE_IMAGE) $(BIN)/kdpipe pipeline compile

pipeline: setup ## compile the Kubeflow pipeline to pipelines/kdpipe_pipeline.yaml and components/*.yaml (commit them)
	KDPIPE_IMAGE=$(KDPIPE_IMAGE) $(BIN)/kdpipe pipeline compile

clean: ## remove generated artifacts (keeps data/ and the venv)
	rm -rf artifacts .pytest_cache
