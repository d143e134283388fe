# istack_ds: `make demo` runs the CPU demo end to end, `make test` runs the test suite.
# Both bootstrap .venv on a fresh machine: torch is installed FIRST and pinned
# (constraints.txt); without the pin a dependency can pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	bash launchers/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -ra

clean-demo:
	rm -rf runs/demo data/demo
