"""istack_ds training entry point for launchers (deepspeed, torchrun, srun): see istack_ds/cli.py.

    deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml [--set key=value ...]

Installed, the same command is `istack-train --config ...` (one process) or `python -m istack_ds.cli`.
"""

import sys
from pathlib import Path

# NOTE: a launcher starts this file by path on every node; the checkout's package comes first,
# so a node runs the code of this checkout even where an older istack_ds is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from istack_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
