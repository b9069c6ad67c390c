# gpucloud developer entry points. Everything installs what it needs on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup system-deps testbed-build testbed testbed-down crds lint test test-unit test-e2e test-kind bench demo demo-kind images kind-build kind kind-down clean

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

# Everything, the kind tier included (its cluster is created or reused first).
# The kind tier and the rest run side by side (hack/run-tests.sh says why).
test: setup system-deps testbed-build kind
	PYTEST=$(VENV)/bin/pytest bash hack/run-tests.sh $(PYTEST_ARGS)

test-unit: setup
	$(VENV)/bin/pytest -m "not e2e and not kind" $(PYTEST_ARGS)

test-e2e: setup system-deps testbed-build
	$(VENV)/bin/pytest -m "e2e and not kind" $(PYTEST_ARGS)

test-kind: setup system-deps kind
	$(VENV)/bin/pytest tests/kind $(PYTEST_ARGS)

bench: setup system-deps testbed-build
	$(PY) bench/run_all.py

demo: setup system-deps testbed-build
	$(PY) hack/demo.py

# The same tenant story on the kind tier: the chart installed from our images, real pods.
demo-kind: kind
	$(PY) hack/demo_kind.py

# Our images (operator, api, gateway, agent, fake-model-server) from the root
# Dockerfile on a Debian base built here; build/images.env names the content tag.
images: setup system-deps
	bash hack/images.sh

# The kind tier: a real cluster in Docker (control plane, two GPU workers with fake
# GPU device plugins, one CPU worker), everything built offline and cached in
# ~/.cache/gpucloud; our images pushed to its local registry (localhost:5001).
kind-build: setup system-deps testbed-build
	bash hack/testbed/build.sh kind-all
	bash hack/kind/node-image.sh >/dev/null

kind: kind-build
	bash hack/kind/kind.sh up

kind-down:
	bash hack/kind/kind.sh down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
