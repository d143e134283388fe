#!/usr/bin/env bash
# The GPU check: step time per depth, teacher share, throughput, MFU and projected speed-ups.
# Usage (on a single-GPU machine with PyTorch+CUDA, transformers and tensorboard, no network):
#   bash tools/bench/gpu_check.sh [OUT_DIR]      # writes OUT_DIR/gpu_check.md (default: .)
# deepspeed (and its pure-Python dependencies: hjson, pydantic, pydantic_core, annotated_types,
# typing_inspection) is installed from wheels carried in .whl/ when the machine lacks it (prepare
# them here: `pip wheel --no-deps -w .whl deepspeed==0.19.8` builds a pure-Python wheel, and
# `pip download --no-deps --only-binary=:all: -d .whl ...` fetches the others).
set -euo pipefail
cd "$(dirname "$0")/../.."
# istack_ds is not installed on the GPU machine: the checkout's package is imported from the repo root.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${1:-${OUT:-.}}
mkdir -p "$OUT"
# The check feeds fixed batches through a stub shard index, so of the data stack it needs nothing.
if ! python3 -c "import deepspeed" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "deepspeed is not installed and no wheels are in .whl/ (carry them with the tree)" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/istack_site .whl/*.whl
  export PYTHONPATH=/tmp/istack_site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 480 python3 tools/bench/gpu_check.py --steps 10 --out "$OUT/gpu_check.md"
