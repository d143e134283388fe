"""Save a RANDOMLY INITIALISED teacher with the real HF classes, for tests and the demo.

Usage (`python tools/make_teacher.py` takes the same arguments):
    istack make-teacher --out data/demo/teacher                 # tiny HuBERT (8 x 96)
    istack make-teacher --out /tmp/hubert-base-random --size base
    istack make-teacher --out /tmp/wavlm-tiny --model-type wavlm

The weights are random: the teacher exercises the distillation machinery, it is
not a trained model (the directory holds RANDOM_WEIGHTS.txt saying so; give it a
name that says so too). `istack train` refuses it unless the config sets
`teacher.allow_random: true` (configs/demo.yaml does), and an export's model card
says the teacher was random. For real runs point `teacher.path` at a local
`save_pretrained` copy of e.g. HuBERT Base with its feature extractor (README,
"Getting a teacher").
Idempotent: an existing teacher directory is left as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from istack_ds.commands import HelpFormatter

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None, prog: str | None = None) -> int:
    from istack_ds.models.teacher import SUPPORTED_TEACHERS, make_random_teacher, read_teacher_info

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write (save_pretrained layout)")
    parser.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "base"],
        help="tiny: 8 layers x 96 (demo, tests); base: the real model's shape",
    )
    parser.add_argument("--model-type", default="hubert", choices=SUPPORTED_TEACHERS, help="the HF model class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--force", action="store_true", help="overwrite an existing teacher")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if (out / "config.json").exists() and not args.force:
        print(f"teacher already at {out} (use --force to rebuild)")
        return 0
    make_random_teacher(out, size=args.size, model_type=args.model_type, seed=args.seed)
    info = read_teacher_info(out)
    print(
        f"wrote a RANDOM {info.model_type} teacher ({info.num_layers} layers x {info.hidden_size}) to {out}; "
        "training on it needs teacher.allow_random=true"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
