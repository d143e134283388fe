"""The `istack-train` command (also `launchers/train.py`): parse, check, build, train, close.

One machine, 2 CPU ranks (the demo):
    deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml
One node, 8 GPUs:
    deepspeed --num_gpus 8 launchers/train.py --config configs/paper_interleaved_eql.yaml
Four nodes (hostfile lists each node and its slots):
    deepspeed --num_nodes 4 --num_gpus 8 --hostfile launchers/hostfile.example \\
        launchers/train.py --config configs/paper_interleaved_eql.yaml
torchrun works too (free port, good for tests):
    torchrun --standalone --nproc_per_node 2 launchers/train.py --config configs/demo.yaml
Any config value can be overridden:  --set optim.total_steps=1000 --set growth.alpha=1

Exit codes: 0 done, 2 bad config or input (nothing started), 3 too many non-finite losses
(a checkpoint was saved), 4 a collective failed (another rank died or stopped answering; the
message names it), 5 the data stream failed on a rank (every rank stops; the message names it).
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config
from .preflight import preflight


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="istack-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.total_steps=1000 (repeatable)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def _collective_failed(e: RuntimeError) -> bool:
    text = str(e).lower()
    return "gloo" in text or "nccl" in text or "timed out" in text or type(e).__name__ == "DistBackendError"


def main(argv=None) -> int:
    # No hub access at run time, ever: teachers load from local directories.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # Bad paths stop the run here, before any process group starts.
        preflight(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"istack_ds: {e}", file=sys.stderr)
        return 2

    from .data import DataError
    from .dist import init_distributed, rank, setup_logging, unresponsive_ranks
    from .trainer import NonFiniteLossError, Trainer

    setup_logging()
    init_distributed(cfg.deepspeed.dist_timeout_s)
    setup_logging()  # again: the rank is known only now
    try:
        Trainer(cfg).train()
    except NonFiniteLossError as e:
        print(f"istack_ds: rank {rank()}: {e}", file=sys.stderr)
        return 3
    except DataError as e:  # raised on every rank together, naming the rank whose data failed
        print(f"istack_ds: rank {rank()}: {e}", file=sys.stderr)
        return 5
    except RuntimeError as e:
        # A peer that died or hangs surfaces here as a failed collective (at the latest after
        # deepspeed.dist_timeout_s, which every process group has): say so plainly, naming the
        # rank whose heartbeat stopped, instead of leaving a bare backend trace.
        # NOTE: under NCCL the watchdog may abort the process first (TORCH_NCCL_ASYNC_ERROR_HANDLING);
        # the job still stops, with NCCL's own message instead of this one.
        if _collective_failed(e):
            print(
                f"istack_ds: rank {rank()}: a collective failed; {unresponsive_ranks()} "
                f"(deepspeed.dist_timeout_s={cfg.deepspeed.dist_timeout_s}): {e}",
                file=sys.stderr,
            )
            return 4
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
