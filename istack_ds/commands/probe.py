"""`istack probe`: SUPERB-style probes of a frozen model: phoneme error rate, speaker accuracy, layer weights.

Usage (`python tools/probe.py` takes the same arguments):
    istack probe runs/demo/student --train-index data/labelled/train/index.json --out runs/demo/probe
    istack probe TEACHER_DIR --train-index T/index.json --valid-index V/index.json --out DIR --steps 400 --seed 1
    istack probe runs/demo --teacher TEACHER_DIR --train-index T/index.json --out DIR    # latest checkpoint
    istack probe EXPORT --train-index T/index.json --tasks sid --out DIR

MODEL is a save_pretrained directory (an istack_ds export or an HF HuBERT / WavLM / wav2vec 2.0 teacher), an
istack_ds checkpoint directory, or a run directory (its latest checkpoint; both are exported to a temporary
directory first, reading --teacher or the checkpoint config's teacher). The model stays frozen; its hidden
states are computed once per utterance and kept in memory.

The train index's members must carry `phonemes` (PR) and/or `speaker` (SID) in their json; a member without
the label is counted and left out. SID is fitted and scored on the same speakers (a fraction, --held-out, of
each speaker's utterances is held out for scoring); PR scores on --valid-index when given, else on the same
held-out utterances.

Writes into --out (re-running overwrites them):
    probe.json         PER, SID accuracy and chance, the learned layer weights per task, data counts, timings
    probe_layers.png   the layer weights per task, one bar per hidden state

Exit 2, one line naming the file: an index without the labels a task needs (found before any hidden state is
computed), a corrupt or incomplete checkpoint, a teacher that does not load.

A bounded-step proxy (istack_ds/evidence/probe.py says what it is and is not), deterministic for --seed: it ranks
models probed with the same index, steps and seed; it is not SUPERB.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from istack_ds.commands import HelpFormatter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve_model(path: Path) -> Path:
    """A save_pretrained or checkpoint dir as it is; a run dir (or its checkpoints/) -> its latest checkpoint."""
    from istack_ds.evidence.probe_data import is_checkpoint

    if (path / "config.json").is_file() or is_checkpoint(path):
        return path
    if not path.is_dir():
        raise SystemExit(f"probe: {path} does not exist")
    from istack_ds.commands.export import resolve_checkpoint

    return resolve_checkpoint(path)


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model", type=Path, help="export / teacher dir, checkpoint dir, or run dir (latest)")
    parser.add_argument("--train-index", required=True, type=Path, help="index.json of labelled shards (fit)")
    parser.add_argument("--valid-index", type=Path, default=None, help="index.json to score PR on (optional)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--tasks", default="pr,sid", help="comma-separated, from pr (phoneme recognition), sid (speaker identification)"
    )
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per task")
    parser.add_argument("--batch", type=int, default=8, help="utterances per step")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    parser.add_argument("--held-out", type=float, default=0.2, help="fraction of each speaker held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the probe heads")
    parser.add_argument("--max-utterances", type=int, default=None, help="read at most this many per index")
    parser.add_argument("--teacher", default=None, help="teacher dir for a checkpoint's export (default: its config's)")
    parser.add_argument("--device", default="cpu", help="torch device of the model; the probes train on CPU")
    args = parser.parse_args(argv)

    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from istack_ds.data.index import DataError
    from istack_ds.evidence.probe import run_probes
    from istack_ds.models.teacher import TeacherError

    try:
        run_probes(
            resolve_model(args.model),
            args.train_index,
            valid_index=args.valid_index,
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            held_out=args.held_out,
            seed=args.seed,
            max_utterances=args.max_utterances,
            teacher=args.teacher,
            device=args.device,
            out=args.out,
        )
    except (DataError, TeacherError, ValueError) as e:  # CheckpointError too: a corrupt checkpoint, named
        print(f"probe: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
