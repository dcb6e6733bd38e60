# Developer entry points. `make test` bootstraps .venv on a fresh machine and runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build to install; override e.g. TORCH_SPEC="torch torchvision" on machines without a local wheel.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv test test-gpu kernels-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	touch $@

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# GPU tests only (run on a CUDA machine).
test-gpu: venv
	$(PY) -m pytest -q -m cuda $(PYTEST_ARGS) tests

clean:
	rm -rf build dist *.egg-info .pytest_cache
