"""Wall time of the same number of steps under full depth, interleaved EQL and PROP-1, per front end.

Usage:
    python tools/bench_schedules.py                     # 16 steps each, paper-shaped models, 2 x 4 s batches
    python tools/bench_schedules.py --steps 24 --utterances 4 --teacher-dtype bf16 --json schedules.json

Each run is the real Trainer (one CPU rank, a DeepSpeed ZeRO-2 engine, real
growths 3 -> 6 -> 9 -> 12 through the GrowthManager) fed the same fixed batches,
with the paper-shaped student (12 x 384) and a random HuBERT-Base-shaped teacher.
For each front end (`trainable`: the student's own CNN; `shared`: the teacher's
CNN output fed to both) it prints the wall time of `none` (full depth from step
0), `interleaved` EQL and PROP-1, their speed-ups over `none`, and the loss on
a held-out batch after the last step, so speed is never shown without quality.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import torch  # noqa: E402

SCHEDULES = {"none": {"growth.operator": "none"},
             "interleaved EQL": {"growth.operator": "interleaved", "growth.alpha": 0},
             "interleaved PROP-1": {"growth.operator": "interleaved", "growth.alpha": 1}}


def held_out_loss(trainer, batch) -> float:
    trainer.engine.eval()
    with torch.no_grad():
        audio, lens = batch["audio"], batch["audio_lens"]
        features, targets = trainer.teacher_pass(audio, lens)
        loss, _ = trainer.compute_loss(trainer.engine(audio, lens, features), targets, lens)
    trainer.engine.train()
    return loss.item()


def run(frontend: str, schedule: str, args, teacher, index, batches, held_out) -> dict:
    extra = {**SCHEDULES[schedule], "student.frontend": frontend, "teacher.dtype": args.teacher_dtype,
             "optim.total_steps": args.steps, "optim.lr": 1e-3}
    trainer = benchlib.make_trainer(benchlib.paper_overrides(teacher, index, Path(tempfile.mkdtemp()), **extra),
                                    batches)
    torch.manual_seed(0)
    pauses = 0.0
    start = time.perf_counter()
    while trainer.step < args.steps:  # Trainer.train()'s loop without logging, validation and checkpoints
        t0 = time.perf_counter()
        depth = trainer.student.depth
        trainer.maybe_grow()
        if trainer.student.depth != depth:
            pauses += time.perf_counter() - t0
        trainer.train_step()
        trainer.step += 1
    wall = time.perf_counter() - start
    result = {"frontend": frontend, "schedule": schedule, "steps": args.steps, "wall_s": wall, "growth_s": pauses,
              "held_out_loss": held_out_loss(trainer, held_out), "final_depth": trainer.student.depth}
    benchlib.close_trainer(trainer)
    print(f"  {frontend:9s} {schedule:18s} {wall:7.1f} s (growth pauses {pauses:4.1f} s)  "
          f"held-out loss {result['held_out_loss']:.4f}", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--utterances", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--teacher-dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--frontends", default="shared,trainable")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    benchlib.init_single_process()
    teacher, index = benchlib.paper_teacher(), benchlib.bench_shards()
    batches = benchlib.fixed_batches(8, args.utterances, args.seconds, seed=0)
    held_out = benchlib.fixed_batches(1, args.utterances, args.seconds, seed=99)[0]
    print(f"{args.steps} steps, batch {args.utterances} x {args.seconds} s, student 12 x 384 (3 -> 6 -> 9 -> 12), "
          f"teacher HuBERT-Base-shaped {args.teacher_dtype}, {torch.get_num_threads()} threads")
    results = [run(f, s, args, teacher, index, batches, held_out)
               for f in args.frontends.split(",") for s in SCHEDULES]
    wall = {(r["frontend"], r["schedule"]): r["wall_s"] for r in results}
    steady = {(r["frontend"], r["schedule"]): r["wall_s"] - r["growth_s"] for r in results}
    # Each growth pauses ~1 step (tools/bench_growth.py): a real run of 10^5 steps pays 3 of them,
    # a short benchmark pays them in full, so both figures are printed.
    print("\nspeed-up over full depth (same front end): with growth pauses | without (a long run's ratio)")
    for f in args.frontends.split(","):
        for s in ("interleaved EQL", "interleaved PROP-1"):
            print(f"  {f:9s} {s:18s} {wall[(f, 'none')] / wall[(f, s)]:.2f}x | "
                  f"{steady[(f, 'none')] / steady[(f, s)]:.2f}x")
    if ("trainable", "none") in wall and ("shared", "interleaved EQL") in wall:
        print(f"shared EQL over trainable full depth (DistilHuBERT-style): "
              f"{wall[('trainable', 'none')] / wall[('shared', 'interleaved EQL')]:.2f}x | "
              f"{steady[('trainable', 'none')] / steady[('shared', 'interleaved EQL')]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
