"""Export any istack_ds checkpoint as a Hugging Face directory that ``AutoModel`` loads.

Usage (`python tools/export_student.py` takes the same arguments):
    istack export --checkpoint runs/demo/checkpoints/step00000200 --out exports/demo-200
    istack export --checkpoint runs/demo --out exports/demo      # the run's latest checkpoint
    istack export --checkpoint CKPT --out DIR --teacher /models/hubert-base-ls960
    istack export --checkpoint runs/x --out DIR --probe runs/x/probe/probe.json --dataset DATASET_ID --language de

Any stage (the student is built at the checkpoint's depth, with its supervised
layers), any ZeRO stage (DeepSpeed's zero_to_fp32 merges the partitions; no
process group is needed) and universal checkpoints. The teacher directory is
read for its config.json (the CNN shape) and, for a `student.frontend: shared`
student, its CNN weights; default: the checkpoint config's teacher.path.

DIR then holds config.json + model.safetensors (a HubertModel), the feature
extractor config (the teacher's), heads.safetensors (distillation heads), a model card
README.md (Hub metadata: license, base_model when the teacher's Hub id is known,
datasets and language, feature-extraction, the probe results of --probe or of a
probe.json already in DIR), provenance.json (package versions, git commit) and
istack_student.json (depth, supervised layers, step, teacher). Load it with
    transformers.AutoModel.from_pretrained(DIR)
Re-running overwrites an earlier export in DIR; a DIR holding anything else (a teacher's
model, say) is refused, naming what is in it (exit 2), unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from istack_ds.commands import HelpFormatter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint dir as it is; a run dir or its checkpoints/ dir -> the latest complete checkpoint."""
    from istack_ds.checkpoint import META_FILE, Checkpointer

    if (path / META_FILE).exists():
        return path
    for ckpt_dir in (path / "checkpoints", path):
        latest = Checkpointer(ckpt_dir, keep=0).latest() if ckpt_dir.is_dir() else None
        if latest is not None:
            return latest
    raise SystemExit(
        f"{path} is neither a complete istack_ds checkpoint ({META_FILE}) nor a run or "
        "checkpoints directory holding one"
    )


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="checkpoint dir (.../checkpoints/stepNNNNNNNN[_universal]), or a run dir (latest)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (save_pretrained layout)")
    parser.add_argument("--teacher", default=None, help="teacher dir (default: the checkpoint config's teacher.path)")
    parser.add_argument(
        "--probe",
        type=Path,
        default=None,
        help="an `istack probe` probe.json: copied into DIR, its results in the card",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="Hub id of a training dataset, for the card (repeatable; default: LibriSpeech when the index says so)",
    )
    parser.add_argument("--language", default=None, help="language code of the training data, for the card (e.g. en)")
    parser.add_argument("--force", action="store_true", help="write into DIR even when it holds something else")
    args = parser.parse_args(argv)

    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from istack_ds.checkpoint import CheckpointError, read_meta
    from istack_ds.export import ExportError, export_checkpoint
    from istack_ds.models.teacher import TeacherError

    checkpoint = resolve_checkpoint(args.checkpoint)
    try:
        probe = json.loads(args.probe.read_text()) if args.probe is not None else None
    except (OSError, ValueError) as e:
        raise SystemExit(f"export_student: --probe {args.probe}: {e}") from None
    try:
        out = export_checkpoint(
            checkpoint, args.out, args.teacher, args.force, probe=probe, datasets=args.dataset, language=args.language
        )
    except ExportError as e:
        print(f"export_student: {e}", file=sys.stderr)
        return 2
    except TeacherError as e:
        raise SystemExit(f"export_student: {e} (pass --teacher DIR)") from None
    except CheckpointError as e:  # a corrupt or incomplete checkpoint, named: one line, not torch's trace
        print(f"export_student: {e}", file=sys.stderr)
        return 2
    meta = read_meta(checkpoint)
    print(
        f"exported {checkpoint} (step {meta['step']}, depth {meta['depth']}, supervised layers "
        f"{meta['supervised']}) to {out}: config.json, model.safetensors, preprocessor_config.json, "
        "heads.safetensors, README.md, provenance.json, istack_student.json"
    )
    print(f"load it with: transformers.AutoModel.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
