# lmforge: the two commands a new user needs are `make demo` and `make test`.
# Everything heavy (Python wheels, the Go-built control plane) is cached under ~/.cache/lmforge.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
CACHE ?= $(HOME)/.cache/lmforge
export UV_CACHE_DIR ?= $(CACHE)/uv
export PIP_CACHE_DIR ?= $(CACHE)/pip
export UV_LINK_MODE ?= copy
EXTRAS ?= test
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: install demo test test-unit test-e2e lint crds chart-crds e2e-kind cluster-up cluster-down clean gpu-wheels

install: $(STAMP)

# The venv is rebuilt only when pyproject.toml changes. uv is bootstrapped from PyPI into the venv.
$(STAMP): pyproject.toml
	@echo ">> creating $(VENV) and installing lmforge[$(EXTRAS)] (first run downloads torch: several GB, cached in $(UV_CACHE_DIR))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip uv
	@$(BIN)/uv pip install --python $(BIN)/python -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*
	@touch $@

cluster-up: install
	$(BIN)/lmforge cluster up

cluster-down:
	-$(BIN)/lmforge cluster down

demo: install
	@$(BIN)/python -m lmforge.demo

test: install
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest -m "not e2e"

test-e2e: install
	$(BIN)/pytest -m e2e

lint: install
	$(BIN)/ruff check .

# Wheels for a lent GPU machine that has torch but no pytest and no registry: carry .gpu-wheels
# along and run `bash bench/gpu_session.sh` there.
gpu-wheels: install
	$(BIN)/python -m pip download -q --only-binary=:all: --dest .gpu-wheels pytest pytest-timeout

crds: install
	$(BIN)/python -m lmforge.operator.crd --out crds

# The chart ships a copy of the generated CRDs; tests/charts/ diffs them.
chart-crds: crds
	cp crds/*.yaml charts/lmforge/crds/

# Where Docker and kind exist: kind cluster, built images, the chart, real pods.
e2e-kind:
	e2e/kind/run.sh

clean:
	-$(BIN)/lmforge cluster down
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
