# gpucloud developer entry points. Everything installs what it needs on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup system-deps testbed-build testbed testbed-down crds lint test test-unit test-e2e bench demo kind kind-down clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

system-deps:
	bash hack/install-system-deps.sh

# Builds kube-apiserver, controller-manager, scheduler, kubectl, etcd, kwok, kwokctl and
# helm from Go modules into ~/.cache/gpucloud/testbed (nothing when already cached).
testbed-build:
	bash hack/testbed/build.sh all

testbed: setup testbed-build
	$(PY) -m gpucloud.testing.testbed up

testbed-down: setup
	$(PY) -m gpucloud.testing.testbed down

crds: setup
	$(PY) hack/gen_crds.py
	$(PY) hack/sync_chart_crds.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) hack/gen_crds.py --check
	$(PY) hack/sync_chart_crds.py --check

test: setup system-deps testbed-build
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: setup
	$(VENV)/bin/pytest -m "not e2e" $(PYTEST_ARGS)

test-e2e: setup system-deps testbed-build
	$(VENV)/bin/pytest -m e2e $(PYTEST_ARGS)

bench: setup system-deps testbed-build
	$(PY) bench/run_all.py

demo: setup system-deps testbed-build
	$(PY) hack/demo.py

# For users with Docker: a kind cluster with kwok's fake GPU nodes and the chart
# installed. Not runnable on the development machines (no container engine); the kwok
# test bed above is the tested path.
kind: setup
	bash hack/kind/kind.sh

kind-down:
	bash hack/kind/kind.sh down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
