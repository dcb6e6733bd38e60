# Developer entry points. `make test` bootstraps .venv on a fresh machine and runs everything CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build to install; override e.g. TORCH_SPEC="torch torchvision" on machines without a local wheel.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv mm kernels-check pytest test test-gpu demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	touch $@

# Optional OpenMMLab stack for detection/ and segmentation/: the `mm` extra, mmengine and mmcv
# (built from source, wheel cached; CUDA ops where a GPU is visible or FORCE_CUDA=1, see tools/install_mm.sh).
mm: $(VENV)/.mm-installed

$(VENV)/.mm-installed: $(VENV)/.installed tools/install_mm.sh tools/check_mm.py
	VENV=$(VENV) bash tools/install_mm.sh
	touch $@

# Compile the CUDA selective-scan extension (no GPU needed) so build breakage shows up everywhere.
kernels-check: venv
	@if command -v nvcc >/dev/null 2>&1; then MAX_JOBS=$${MAX_JOBS:-2} bash kernels/selective_scan/check_build.sh $(abspath $(PY)); \
	else echo "kernels-check: nvcc not found, CUDA extension build not checked"; fi

pytest: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Everything CI runs: environment, mm extra, extension build check, test suite.
test: venv mm kernels-check pytest

# GPU tests only (run on a CUDA machine).
test-gpu: venv
	$(PY) -m pytest -q -m cuda $(PYTEST_ARGS) tests

# Train on the bundled digits on CPU, re-evaluate the checkpoint, print where everything went.
demo: venv
	PYTHON=$(PY) bash classification/demo.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache
