# lmforge: the two commands a new user needs are `make demo` and `make test`.
# Everything heavy (Python wheels, the Go-built control plane) is cached under ~/.cache/lmforge.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
CACHE ?= $(HOME)/.cache/lmforge
export UV_CACHE_DIR ?= $(CACHE)/uv
export UV_LINK_MODE ?= copy
export UV_PYTHON_DOWNLOADS := never
# uv itself is pinned and kept outside the repo, one folder per version.
UV_VERSION := 0.13.9
UV := $(CACHE)/uv-$(UV_VERSION)/bin/uv
EXTRAS ?= test
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: install lock upgrade demo test test-unit test-e2e lint crds chart-crds e2e-kind cluster-up cluster-down clean gpu-wheels

install: $(STAMP)

$(UV):
	@echo ">> bootstrapping uv $(UV_VERSION) into $(CACHE)/uv-$(UV_VERSION)"
	@$(PYTHON) -m venv $(CACHE)/uv-$(UV_VERSION)
	@$(CACHE)/uv-$(UV_VERSION)/bin/python -m pip install -q "uv==$(UV_VERSION)"

# Exactly the versions in uv.lock (--locked also fails when uv.lock is stale against pyproject.toml:
# run `make lock`). The venv is re-synced only when one of the two changes.
$(STAMP): pyproject.toml uv.lock | $(UV)
	@echo ">> installing lmforge[$(EXTRAS)] from uv.lock into $(VENV) (first run downloads torch: several GB, cached in $(UV_CACHE_DIR))"
	@$(UV) sync --locked --extra $(EXTRAS) --python $(PYTHON)
	@rm -f $(VENV)/.installed-*
	@touch $@

# Re-resolve uv.lock after editing dependencies in pyproject.toml (keeps every other pin).
lock: | $(UV)
	$(UV) lock

# Re-resolve everything to the newest versions the index serves, install them, run the unit tests.
# Commit uv.lock (and raise the lower bounds in pyproject.toml) only when they pass.
upgrade: | $(UV)
	$(UV) lock --upgrade
	$(MAKE) test-unit

cluster-up: install
	$(BIN)/lmforge cluster up

cluster-down:
	-$(BIN)/lmforge cluster down

demo: install
	@$(BIN)/python -P -m lmforge.devcluster.demo

test: lint
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest -m "not e2e"

test-e2e: install
	$(BIN)/pytest -m e2e

# mypy reads lmforge through this symlink to the repository root (the editable install is an import
# hook no checker can follow; see [tool.mypy] in pyproject.toml). Relative, so a moved checkout keeps it.
SRC_LINK := $(VENV)/lmforge-src/lmforge

$(SRC_LINK): | $(STAMP)
	@mkdir -p $(@D)
	@ln -sfn ../.. $@

# Formatting, lint rules (complexity and bugbear included), then types: the order a reviewer reads in.
lint: install $(SRC_LINK)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Wheels for a lent GPU machine that has torch but no pytest and no registry: carry .gpu-wheels
# along and run `bash bench/gpu_session.sh` there.
gpu-wheels: install
	$(BIN)/python -m pip download -q --only-binary=:all: --dest .gpu-wheels pytest pytest-timeout

crds: install
	$(BIN)/python -P -m lmforge.operator.crd --out crds

# The chart ships a copy of the generated CRDs; tests/charts/ diffs them.
chart-crds: crds
	cp crds/*.yaml charts/lmforge/crds/

# Where Docker and kind exist: kind cluster, built images, the chart, real pods.
e2e-kind:
	e2e/kind/run.sh

clean:
	-$(BIN)/lmforge cluster down
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
