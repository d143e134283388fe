"""2 plain ranks (no launcher) through `istack train`'s own exit path: rank 0 SIGKILLs itself in the middle of
training a real DeepSpeed engine (ZeRO-2 on gloo); rank 1 must exit 4 with its message and skip the interpreter's
finalization, where the broken process group's teardown could abort it (issue 23 item 10).

Usage (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the test; see tests/test_faults.py):
    survivor_exit.py OUT_DIR

The stand-in Trainer trains a small model, so a trial takes seconds, not a demo run's half minute. An atexit
handler writes OUT_DIR/finalized.r<rank>: its presence says the interpreter's finalization ran.
"""

import atexit
import os
import signal
import sys
from pathlib import Path

import torch

from istack_ds import trainer
from istack_ds.commands import train
from istack_ds.config import load_config
from istack_ds.dist import rank
from istack_ds.engine import build_engine

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}


class StandIn:
    """What train() calls of a Trainer: train(), here a small ZeRO-2 engine's loop until rank 0 dies at step 5."""

    def __init__(self, cfg):
        self.cfg = cfg

    def train(self) -> None:
        model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
        engine = build_engine(model, DS_CONFIG, self.cfg.optim)
        for step in range(10_000):
            if step == 5 and rank() == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            engine.backward(engine(torch.randn(1, 64)).square().sum())
            engine.step()


def main(out: Path) -> int:
    atexit.register(lambda: (out / f"finalized.r{rank()}").write_text("the interpreter's finalization ran"))
    trainer.Trainer = StandIn
    cfg = load_config(None, [f"run.out_dir={out}", "deepspeed.dist_timeout_s=15", "optim.total_steps=100"])
    return train.train(cfg)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
