"""Convert an istack_ds checkpoint into a universal one that resumes on any number of ranks.

Usage:
    python tools/convert_checkpoint.py runs/demo/checkpoints/step00000200
    python tools/convert_checkpoint.py CKPT_DIR --out runs/demo/checkpoints/step00000200_universal

Then resume on the new world size (the global batch is kept: gradient
accumulation is set to old_ranks x old_accumulation / new_ranks, and reported):
    deepspeed --num_gpus 1 launchers/train.py --config configs/demo.yaml \\
        --set checkpoint.resume=runs/demo/checkpoints/step00000200_universal

It runs DeepSpeed's `ds_to_universal` (one folder per parameter with its fp32
value and Adam moments) and copies istack_ds's meta file, marked universal.
Idempotent: an existing complete conversion is left as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

META_FILE = "istack_meta.json"


def convert(checkpoint: Path, out: Path) -> Path:
    meta_file = checkpoint / META_FILE
    if not meta_file.exists():
        raise SystemExit(f"{checkpoint} is not a complete istack_ds checkpoint ({META_FILE} missing)")
    if (out / META_FILE).exists():
        print(f"universal checkpoint already at {out}")
        return out
    if out.exists():  # a conversion interrupted earlier
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # --inject_missing_state: 0.19.8 asserts on checkpoints saved without the universal info otherwise.
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint),
        "--output_folder",
        str(tmp),
        "--inject_missing_state",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ds_to_universal failed on {checkpoint}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    meta = json.loads(meta_file.read_text())
    meta.update(universal=True, converted_from=str(checkpoint))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))  # written last: marks the conversion complete
    tmp.rename(out)
    params = len(list((out / "zero").iterdir()))
    print(
        f"wrote universal checkpoint {out}: step {meta['step']}, depth {meta['depth']}, {params} parameters, "
        f"saved by {meta.get('world_size')} rank(s) x accumulation {meta.get('gradient_accumulation')}"
    )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a complete checkpoint directory (.../checkpoints/stepNNNNNNNN)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <checkpoint>_universal)")
    args = parser.parse_args(argv)
    convert(args.checkpoint, args.out or args.checkpoint.with_name(args.checkpoint.name + "_universal"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
