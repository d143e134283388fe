# istack_ds: `make demo` runs the CPU demo end to end, `make test` runs the test suite.
# Both bootstrap .venv on a fresh machine: torch is installed FIRST and pinned
# (constraints.txt); without the pin a dependency can pull a multi-GB CUDA build.
# `make test-fast` leaves out the tests that start process groups (marked procgroup): a loop while developing.
# `make lint` runs ruff (lint + format check) and mypy, as CI does.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Where torch comes from. Empty: pip's own index (plain PyPI serves the CUDA build on Linux, GBs);
# https://download.pytorch.org/whl/cpu gives the CPU build (README "Set-up"), .../whl/cu12X a CUDA one.
TORCH_INDEX_URL ?=

.PHONY: venv demo test test-fast lint format clean-demo

venv: $(STAMP)

# Some machines list local package mirrors that may be absent; pip warns once per package about them.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(QUIET_PIP)
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(QUIET_PIP)
	$(PIP) install -q -c constraints.txt -e ".[dev]" $(QUIET_PIP)
	touch $(STAMP)

demo: $(STAMP)
	bash launchers/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25

# Every test but those marked procgroup (torchrun, launchers, DeepSpeed engines on real ranks); `make test` runs all.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra --durations=10 -m "not procgroup"

# ruff (lint + format check) on the whole repo, mypy on istack_ds/; configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-demo:
	rm -rf runs/demo data/demo
