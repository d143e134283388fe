"""2 ranks: the host syncs and collectives istack_ds itself issues in optimizer steps of the Trainer.

Usage (under torchrun; see tests/workers/__init__.py):
    step_syncs.py --teacher DIR --shards DIR --run-dir DIR --out JSON

Trains one step (warm-up), then counts over STEPS steps of 2 micro-batches each: every read of a tensor's value
on the host (item, tolist, cpu, bool, float, int, numpy) and every torch.distributed collective whose caller
(the first frame outside torch) is istack_ds code, by that caller. Reads in istack_ds/data (the loader's batches,
on the host on a GPU too) are left out. Each rank's result: the micro-batches counted, the reads by caller, the
collectives by caller and whether each was given dist.control_group() (as its group argument).
"""

import collections
import inspect
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from istack_ds import dist as istack_dist
from istack_ds.config import load_config
from istack_ds.dist import init_distributed
from istack_ds.trainer import Trainer
from tests.workers.protocol import finish_trainer, trainer_parser

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = str(ROOT / "istack_ds")
STEPS = 2
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "barrier",
    "gather",
    "scatter",
)


def caller() -> str | None:
    """`module:function` of the first frame outside torch and this file, when it is istack_ds code."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and name != __file__:
            if name.startswith(PACKAGE) and "/istack_ds/data/" not in name:
                return f"{Path(name).stem}:{frame.f_code.co_name}"
            return None
        frame = frame.f_back
    return None


class Counter:
    def __init__(self):
        self.on = False
        self.reads: collections.Counter = collections.Counter()
        self.collectives: collections.Counter = collections.Counter()

    def patch(self) -> None:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(t, *args, _original=original, _name=name, **kwargs):
                if self.on and (where := caller()):
                    self.reads[f"{where} {_name}"] += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, read)
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def collective(*args, _original=original, _name=name, **kwargs):
                if self.on and (where := caller()):
                    # NOTE: what the caller passed: under gloo control_group() is None, the default group's too
                    passed = inspect.signature(_original).bind(*args, **kwargs).arguments
                    on_control = "group" in passed and passed["group"] is istack_dist.control_group()
                    self.collectives[f"{where} {_name} {'control' if on_control else 'other'}"] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, collective)


def main(teacher_dir: str, shards: str, out_dir: str, out_json: str) -> None:
    overrides = [f"run.out_dir={out_dir}", f"teacher.path={teacher_dir}", f"data.train_index={shards}/train/index.json"]
    overrides += ["data.valid_index=null", "data.num_workers=1", "data.crop_seconds=2", "data.batch_seconds=6"]
    overrides += ["deepspeed.gradient_accumulation=2", "optim.total_steps=10", "checkpoint.resume=none"]
    cfg = load_config(ROOT / "configs/demo.yaml", overrides)
    init_distributed(120)
    trainer = Trainer(cfg)
    trainer.start()
    counter = Counter()
    counter.patch()
    trainer.train_step()  # warm-up: first batches, lazy buffers
    trainer.step += 1
    micro = trainer.window.micro
    counter.on = True
    for _ in range(STEPS):
        trainer.train_step()
        trainer.step += 1
    counter.on = False
    result = {
        "micro_batches": trainer.window.micro - micro,
        "reads": dict(counter.reads),
        "collectives": dict(counter.collectives),
        "loss_parts": len(trainer.window.parts),
    }
    finish_trainer(trainer, out_json, result)


if __name__ == "__main__":
    args = trainer_parser(__doc__.split("\n")[0]).parse_args()
    main(args.teacher, args.shards, args.run_dir, args.out)
