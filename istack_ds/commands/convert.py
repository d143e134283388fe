"""Convert an istack_ds checkpoint into a universal one that resumes on any number of ranks.

Usage (`python tools/convert_checkpoint.py` takes the same arguments):
    istack convert runs/demo/checkpoints/step00000200
    istack convert CKPT_DIR --out runs/demo/checkpoints/step00000200_universal

A run does this by itself when it resumes on another world size (rank 0 converts, the
others wait on the job's store for up to 6 h); converting beforehand keeps the GPUs of a
large job from idling meanwhile. Then resume on the new world size as usual (the global
batch is kept: gradient accumulation becomes old_ranks x old_accumulation / new_ranks,
and is reported).

It runs DeepSpeed's `ds_to_universal` (one folder per parameter with its fp32 value and
Adam moments), copies the rank files and writes a marker listing every file. Idempotent:
an existing complete conversion is left as it is. A directory at --out that is not such
a conversion is never touched: the tool stops and names it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from istack_ds.checkpoint import CheckpointError, convert_to_universal, universal_path
from istack_ds.commands import HelpFormatter


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a complete checkpoint directory (.../checkpoints/stepNNNNNNNN)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <checkpoint>_universal)")
    args = parser.parse_args(argv)
    try:
        convert_to_universal(args.checkpoint, args.out or universal_path(args.checkpoint))
    except CheckpointError as e:
        print(f"convert_checkpoint: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
