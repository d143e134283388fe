#!/usr/bin/env bash
# The GPU check (tools/bench/gpu_check.py: versions + a step, growth on the device for ZeRO-2/3, a universal
# resume on another world size, step times per depth) on a machine with torch + CUDA and no network:
#   bash tools/bench/gpu_check.sh [OUT_DIR] [gpu_check.py options]     # OUT_DIR default: $OUT, else runs/gpu_check
# writes OUT_DIR/gpu_check.json, OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.log. Wheels carried in .whl/ (made
# here by `make gpu-wheels`) are installed into /tmp/istack_site first, each only where the machine lacks that
# package or has an older version: the machine's own torch, transformers, numpy, ... stay.
# On a lent device (the `run` tool): command `bash tools/bench/gpu_check.sh $OUT`, carry [".whl"], timeout_s 540.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-runs/gpu_check}}
shift || true
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  missing=$($PY - .whl/*.whl <<'EOF'
import sys
from importlib import metadata
from pathlib import Path

from packaging.version import Version

for wheel in sys.argv[1:]:
    name, version = Path(wheel).name.split("-")[:2]
    try:
        if Version(metadata.version(name)) >= Version(version) and name not in ("istack_ds", "deepspeed"):
            continue
    except metadata.PackageNotFoundError:
        pass
    print(wheel)
EOF
)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/istack_site $missing
    export PYTHONPATH=/tmp/istack_site${PYTHONPATH:+:$PYTHONPATH}
    echo "installed from .whl/: $(echo $missing | xargs -n1 basename | tr '\n' ' ')"
  fi
elif ! $PY -c "import deepspeed" 2>/dev/null; then
  echo "deepspeed is not installed and no wheels are in .whl/: run 'make gpu-wheels' and carry .whl" >&2
  exit 2
fi
# The checkout's istack_ds comes first: the check measures this tree's code.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# 480 s: the 8-minute call it is sized for (stage 4 starts no new case after --budget-s, default 420 s).
timeout 480 $PY tools/bench/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
