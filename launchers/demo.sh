#!/usr/bin/env bash
# The CPU demo: demo corpus -> shards -> tiny random teacher -> 2-rank distillation with growth.
# Usage: bash launchers/demo.sh [--set key=value ...]     (make demo runs it)
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
"$(dirname "$PY")/deepspeed" --num_gpus 2 launchers/train.py --config configs/demo.yaml "$@"
echo "demo finished in $(( $(date +%s) - start )) s: TensorBoard logs in runs/demo/tb" \
     "(tensorboard --logdir runs/demo/tb), student in runs/demo/student, summary in runs/demo/summary.json"
