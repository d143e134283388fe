# istack_ds: `make demo` runs the CPU demo end to end, `make test` runs the test suite.
# Both bootstrap .venv on a fresh machine: torch is installed FIRST and pinned
# (constraints.txt); without the pin a dependency can pull a multi-GB CUDA build.
# `make test-fast` leaves out the tests that start process groups (marked procgroup): a loop while developing.
# `make lint` runs ruff (lint + format check) and mypy, as CI does.
# GPU: `make gpu-venv` installs the CUDA build of torch that this machine's driver runs, then the project, and
# checks that torch sees the GPU; `make gpu-check` measures (tools/bench/gpu_check.sh); `make gpu-wheels` builds
# the wheels a lent GPU machine with its own torch needs (tools/bench/build_gpu_wheels.sh). The demo stays on CPU.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Where torch comes from. Empty: pip's own index (plain PyPI serves the CUDA build on Linux, GBs);
# https://download.pytorch.org/whl/cpu gives the CPU build (README "Set-up"), .../whl/$(CUDA) a CUDA one.
TORCH_INDEX_URL ?=
# The CUDA build for `make gpu-venv`: the newest of cu130 / cu128 / cu126 that the driver runs, read from the
# "CUDA Version" nvidia-smi prints (the newest CUDA the driver supports); CUDA=cu126 (say) picks one by hand.
CUDA ?= $(shell nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | \
	awk '{v = $$1 * 10 + $$2; print (v >= 130 ? "cu130" : v >= 128 ? "cu128" : v >= 126 ? "cu126" : "")}')
# After a GPU install: the build's CUDA and whether torch can use the GPU (exit 3 when it cannot).
CUDA_CHECK := import torch; ok = torch.cuda.is_available(); \
	print("torch", torch.__version__, "torch.version.cuda", torch.version.cuda, "torch.cuda.is_available()", ok); \
	raise SystemExit(0 if ok else 3)

.PHONY: venv demo test test-fast lint format clean-demo gpu-venv gpu-check gpu-wheels

venv: $(STAMP)

# Some machines list local package mirrors that may be absent; pip warns once per package about them.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(QUIET_PIP)
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(QUIET_PIP)
	$(PIP) install -q -c constraints.txt -e ".[dev]" $(QUIET_PIP)
	touch $(STAMP)

# A CPU torch already in .venv (a venv made by `make venv`) is replaced by the CUDA build of the same version.
gpu-venv:
	@test -n "$(CUDA)" || { echo "no NVIDIA driver (nvidia-smi), or one older than CUDA 12.6: set CUDA=cu1XY" >&2; exit 2; }
	$(MAKE) venv TORCH_INDEX_URL=https://download.pytorch.org/whl/$(CUDA)
	$(PY) -c 'import torch; raise SystemExit(0 if torch.version.cuda else 1)' || \
		$(PIP) install -q --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/$(CUDA) $(QUIET_PIP)
	$(PY) -c '$(CUDA_CHECK)'

gpu-check: $(STAMP)
	PYTHON=$(PY) bash tools/bench/gpu_check.sh $(or $(OUT),runs/gpu_check)

gpu-wheels:
	bash tools/bench/build_gpu_wheels.sh

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
