#!/usr/bin/env bash
# The CPU demo: demo corpus -> shards -> tiny random teacher -> 2-rank distillation with growth.
# Usage: bash launchers/demo.sh [--set key=value ...]     (make demo runs it)
#        MASTER_PORT=N bash launchers/demo.sh ...         (a port of your choosing; default: a free one)
# Re-running reuses the corpus, shards, teacher and, through checkpoint.resume=auto, the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=data/demo

export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
start=$(date +%s)
$PY tools/make_demo_corpus.py --out $DATA/corpus
$PY tools/shard_corpus.py --corpus $DATA/corpus --out $DATA/shards --valid-speakers 1 --shard-mb 0.5
$PY tools/make_teacher.py --out $DATA/teacher --size tiny
# The ranks meet on MASTER_PORT when set, else on a port free now: the launcher's fixed 29500 collides with
# any other job on the machine (a second demo included).
PORT=${MASTER_PORT:-$($PY -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
"$(dirname "$PY")/deepspeed" --num_gpus 2 --master_port "$PORT" launchers/train.py --config configs/demo.yaml "$@"
OUT=runs/demo
for arg in "$@"; do [[ $arg == run.out_dir=* ]] && OUT=${arg#run.out_dir=}; done
echo "demo finished in $(( $(date +%s) - start )) s: TensorBoard logs in $OUT/tb" \
     "(tensorboard --logdir $OUT/tb), student in $OUT/student, summary in $OUT/summary.json"
