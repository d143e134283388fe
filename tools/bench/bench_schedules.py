"""Wall time of the same number of steps under full depth, interleaved EQL and PROP-1, per front end.

Usage:
    python tools/bench/bench_schedules.py               # 16 steps each, paper-shaped models, 2 x 4 s batches
    python tools/bench/bench_schedules.py --steps 40 --teacher-dtype int8 --json schedules.json

Each run is the real Trainer (one CPU rank, a DeepSpeed ZeRO-2 engine, real
growths 3 -> 6 -> 9 -> 12 through the GrowthManager) fed the same fixed batches;
the schedules of a front end step round-robin, one step each in turn, so the
machine's noise hits them alike (sequential runs on this CPU drift by ~10 %),
with the paper-shaped student (12 x 384) and a random HuBERT-Base-shaped teacher.
For each front end (`trainable`: the student's own CNN; `shared`: the teacher's
CNN output fed to both) it prints the wall time of `none` (full depth from step
0), `interleaved` EQL and PROP-1, their speed-ups over `none`, and the loss on
a held-out batch after the last step, so speed is never shown without quality
(always against the fp32 teacher's targets, so a bf16 or int8 teacher's error
shows in it).
Goals: shared EQL >= 1.25x and PROP-1 >= 1.15x over shared `none`; shared EQL
>= 2x over trainable `none` (the DistilHuBERT-style baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import torch

SCHEDULES = {
    "none": {"growth.operator": "none"},
    "interleaved EQL": {"growth.operator": "interleaved", "growth.alpha": 0},
    "interleaved PROP-1": {"growth.operator": "interleaved", "growth.alpha": 1},
}


def reference_targets(teacher_path: Path, batch: dict) -> dict:
    """The held-out batch through the fp32 teacher: quality is judged against these whatever the teacher dtype."""
    from istack_ds.config import LossConfig
    from istack_ds.models.teacher import Teacher

    teacher = Teacher(teacher_path, LossConfig().teacher_layers)
    lens = batch["audio_lens"]
    audio = teacher.prepare_input(batch["audio"], lens)  # held_out_loss prepares the raw batch the same way
    features = teacher.cnn(audio)
    return {**batch, "features": features, "targets": teacher(audio, lens, features)}


@torch.no_grad()
def held_out_loss(trainer, held_out: dict) -> float:
    """The student's loss (eval mode, no dropout) against `held_out`'s targets, made by :func:`reference_targets`
    from the raw audio (the teacher's CNN output is used with ``student.frontend: shared`` only)."""
    lens = held_out["audio_lens"]
    trainer.engine.eval()
    try:
        audio = trainer.teacher.prepare_input(held_out["audio"], lens)
        shared = held_out["features"] if trainer.cfg.student.frontend == "shared" else None
        loss, _ = trainer.compute_loss(trainer.engine(audio, lens, shared), held_out["targets"], lens)
    finally:
        trainer.engine.train()
    return loss.item()


class Timed:
    """One schedule's Trainer with its wall time and growth pauses so far."""

    def __init__(self, frontend: str, schedule: str, args, teacher, index, batches):
        extra = {
            **SCHEDULES[schedule],
            "student.frontend": frontend,
            "teacher.dtype": args.teacher_dtype,
            "optim.total_steps": args.steps,
            "optim.lr": 1e-3,
        }
        self.frontend, self.schedule = frontend, schedule
        self.trainer = benchlib.make_trainer(
            benchlib.paper_overrides(teacher, index, Path(tempfile.mkdtemp()), **extra), batches
        )
        self.wall = self.pauses = 0.0

    def step(self) -> None:
        """Trainer.train()'s loop body without logging, validation and checkpoints."""
        trainer = self.trainer
        t0 = time.perf_counter()
        depth = trainer.student.depth
        trainer.maybe_grow()
        if trainer.student.depth != depth:
            self.pauses += time.perf_counter() - t0
        trainer.train_step()
        trainer.step += 1
        self.wall += time.perf_counter() - t0

    def finish(self, args, held_out) -> dict:
        trainer = self.trainer
        result = {
            "frontend": self.frontend,
            "schedule": self.schedule,
            "steps": args.steps,
            "wall_s": self.wall,
            "growth_s": self.pauses,
            "held_out_loss": held_out_loss(trainer, held_out),
            "final_depth": trainer.student.depth,
        }
        benchlib.close_trainer(trainer)
        print(
            f"  {self.frontend:9s} {self.schedule:18s} {self.wall:7.1f} s (growth pauses {self.pauses:4.1f} s)  "
            f"held-out loss {result['held_out_loss']:.4f}",
            flush=True,
        )
        return result


def run(frontend: str, args, teacher, index, batches, held_out) -> list[dict]:
    """All schedules of one front end, stepped round-robin (one step each in turn): noise hits them alike."""
    runs = [Timed(frontend, schedule, args, teacher, index, batches) for schedule in SCHEDULES]
    torch.manual_seed(0)
    for _ in range(args.steps):
        for r in runs:
            r.step()
    return [r.finish(args, held_out) for r in runs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--utterances", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--teacher-dtype", default="fp32", choices=("fp32", "bf16", "int8"))
    p.add_argument("--frontends", default="shared,trainable")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    benchlib.init_single_process()
    teacher, index = benchlib.paper_teacher(), benchlib.bench_shards()
    batches = benchlib.fixed_batches(8, args.utterances, args.seconds, seed=0)
    held_out = reference_targets(teacher, benchlib.fixed_batches(1, args.utterances, args.seconds, seed=99)[0])
    print(
        f"{args.steps} steps, batch {args.utterances} x {args.seconds} s, student 12 x 384 (3 -> 6 -> 9 -> 12), "
        f"teacher HuBERT-Base-shaped {args.teacher_dtype}, {torch.get_num_threads()} threads"
    )
    results = [r for f in args.frontends.split(",") for r in run(f, args, teacher, index, batches, held_out)]
    wall = {(r["frontend"], r["schedule"]): r["wall_s"] for r in results}
    steady = {(r["frontend"], r["schedule"]): r["wall_s"] - r["growth_s"] for r in results}
    # Each growth pauses ~1 step (tools/bench/bench_growth.py): a real run of 10^5 steps pays 3 of them,
    # a short benchmark pays them in full, so both figures are printed.
    print("\nspeed-up over full depth (same front end): with growth pauses | without (a long run's ratio)")
    for f in args.frontends.split(","):
        for s in ("interleaved EQL", "interleaved PROP-1"):
            print(
                f"  {f:9s} {s:18s} {wall[(f, 'none')] / wall[(f, s)]:.2f}x | "
                f"{steady[(f, 'none')] / steady[(f, s)]:.2f}x"
            )
    if ("trainable", "none") in wall and ("shared", "interleaved EQL") in wall:
        print(
            f"shared EQL over trainable full depth (DistilHuBERT-style): "
            f"{wall[('trainable', 'none')] / wall[('shared', 'interleaved EQL')]:.2f}x | "
            f"{steady[('trainable', 'none')] / steady[('shared', 'interleaved EQL')]:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
