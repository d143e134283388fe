#!/usr/bin/env bash
# Builds here, with one command, the wheels the lent GPU machine needs beyond its own packages, into .whl/
# (ignored by git; the device tool's `carry` takes it along):
#   bash tools/bench/build_gpu_wheels.sh [OUT_DIR]        # or: make gpu-wheels
# That machine runs CPython 3.12 with its own torch (2.11 + CUDA 13), transformers, numpy, scipy, tensorboard,
# matplotlib, pyyaml, tqdm, ... and reaches no index (/work/.library/device/KINDS.md lists its packages).
# Carried: istack_ds itself, deepspeed (an sdist: built here as a pure-Python wheel with no ops, DS_BUILD_OPS=0;
# the fused AdamW is torch's, so no op is ever compiled), and the packages that machine lacks: DeepSpeed's
# pydantic + hjson, the data stack (lhotse, webdataset, soundfile and what they import). Versions are the ones
# this repository's venv tests with; torch is never carried. The wheels are checked for CPython 3.12 here
# (python3.12 installs them all, which checks their tags, and imports the compiled pydantic_core and cffi; the
# others need numpy or toolz, which only the device has) and their total against LIMIT_MIB.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-.whl}
PY=${PYTHON:-python3}
# The device tool carries at most 64 MiB, the working tree included.
LIMIT_MIB=${LIMIT_MIB:-48}
DEEPSPEED=deepspeed==0.19.8
# Not on the device machine (checked against KINDS.md's package list); one version of each.
PACKAGES=(
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  lhotse==1.33.0 audioread==3.1.0 cytoolz==1.2.0 intervaltree==3.2.1
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
  webdataset==1.0.2 braceexpand==0.1.7
)
PLATFORMS=(manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64
  manylinux_2_31_x86_64 manylinux_2_34_x86_64)

rm -rf "$OUT"
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "istack_ds (this checkout)"
$PY -m pip wheel -q --no-deps --no-cache-dir -w "$OUT" . 2>&1 | grep -v "is ignored: it is neither" || true
echo "$DEEPSPEED (sdist -> wheel, no ops)"
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-cache-dir --no-binary deepspeed -w "$OUT" "$DEEPSPEED" 2>&1 |
  grep -v "is ignored: it is neither" || true
echo "${#PACKAGES[@]} packages for CPython 3.12 (binary wheels only)"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d "$OUT" "${PACKAGES[@]}" 2>&1 | grep -v "is ignored: it is neither" || true

whl=("$OUT"/*.whl)
expected=$((2 + ${#PACKAGES[@]}))
if [ "${#whl[@]}" -ne "$expected" ]; then
  echo "expected $expected wheels in $OUT, found ${#whl[@]}" >&2
  exit 1
fi
if compgen -G "$OUT/deepspeed-*.whl" >/dev/null && unzip -l "$OUT"/deepspeed-*.whl | grep -q '\.so$'; then
  echo "the deepspeed wheel holds compiled ops: it was built with DS_BUILD_OPS set" >&2
  exit 1
fi

# CPython 3.12 here: pip refuses a wheel whose tags it does not support; the compiled ones must import.
py312=${PY312:-}
for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do  # a pyenv shim may name one it cannot run
  [ -z "$py312" ] && "$c" -V >/dev/null 2>&1 && py312=$c
done
if [ -n "$py312" ]; then
  "$py312" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --target "$tmp/site" "$OUT"/*.whl
  PYTHONPATH="$tmp/site" "$py312" -c \
    "import pydantic, pydantic_core, _cffi_backend, hjson, audioread
print('CPython 3.12 imports pydantic', pydantic.VERSION, 'and cffi', _cffi_backend.__version__)"
else
  echo "no python3.12 here: the wheels' tags were chosen for CPython 3.12 but not installed to check" >&2
fi

bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
printf '%s: %d wheels, %.1f MiB (limit %d MiB); tracked tree %.1f MiB; together %.1f of the 64 MiB a call carries\n' \
  "$OUT" "${#whl[@]}" "$(echo "$bytes / 1048576" | bc -l)" "$LIMIT_MIB" "$(echo "$tree / 1048576" | bc -l)" \
  "$(echo "($bytes + $tree) / 1048576" | bc -l)"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "the wheels exceed $LIMIT_MIB MiB" >&2
  exit 1
fi
