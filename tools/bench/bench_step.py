"""One training step of istack_ds beside a bare PyTorch loop doing the same math.

Usage:
    python tools/bench/bench_step.py                    # paper shape: 12 x 384 student, HuBERT-Base-shaped teacher
    python tools/bench/bench_step.py --depth 3 --frontend shared --steps 6
    python tools/bench/bench_step.py --json bench_step.json

Both sides use the same random HuBERT-Base-shaped teacher (made once under
data/bench/), the same student weights and the same fixed batches (--utterances
x --seconds of audio). istack_ds: the real Trainer.train_step (a DeepSpeed ZeRO-2
engine on one CPU rank, the non-finite check, the bookkeeping). Bare: teacher
forward + student forward + the same loss + backward + gradient clipping + torch's
fused AdamW (what istack_ds steps too) + the same LR schedule, no DeepSpeed. The
two are timed alternately, step by step, so machine noise hits both; the medians
and their ratio are printed.
Goal: istack_ds / bare <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import torch


class BareStep:
    """The same distillation step in plain PyTorch: no DeepSpeed, no trainer."""

    def __init__(self, trainer):
        from istack_ds.engine import param_groups
        from istack_ds.models.student import Student

        cfg = trainer.cfg
        self.cfg, self.teacher = cfg, trainer.teacher
        self.student = Student(
            cfg.student, cfg.loss, trainer.teacher.info, trainer.student.depth, trainer.student.supervised
        )
        self.student.load_state_dict(trainer.engine.module.state_dict())
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.student, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True
        )  # plain PyTorch's fastest AdamW, as ours
        warmup, total = max(1, o.warmup_steps), o.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup))
        )
        self.teacher_s = 0.0

    def step(self, batch: dict) -> float:
        from istack_ds.models.losses import l2l_loss
        from istack_ds.models.sfm import length_mask

        audio, lens = batch["audio"], batch["audio_lens"]
        t0 = time.perf_counter()
        audio = self.teacher.prepare_input(audio, lens)  # as Trainer.train_step
        features = self.teacher.cnn(audio) if self.cfg.student.frontend == "shared" else None
        targets = self.teacher(audio, lens, features)
        self.teacher_s += time.perf_counter() - t0
        pred = self.student(audio, lens, features)
        mask = length_mask(self.teacher.frame_lengths(lens), next(iter(targets.values())).shape[1])
        loss, _ = l2l_loss(pred, targets, mask, self.cfg.loss.inter_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12, help="student depth (no growth during the benchmark)")
    p.add_argument("--frontend", default="trainable", choices=("trainable", "shared"))
    p.add_argument("--teacher-dtype", default="fp32", choices=("fp32", "bf16", "int8"))
    p.add_argument("--zero", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage of the istack_ds engine")
    p.add_argument("--utterances", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after 2 warm-up steps each)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)

    benchlib.init_single_process()
    teacher, index = benchlib.paper_teacher(), benchlib.bench_shards()
    batches = benchlib.fixed_batches(4, args.utterances, args.seconds)
    out = Path(tempfile.mkdtemp(prefix="bench_step_"))
    trainer = benchlib.make_trainer(
        benchlib.paper_overrides(
            teacher,
            index,
            out,
            **{
                "growth.operator": "none",
                "growth.depths": f"[{args.depth}]",
                "loss.teacher_layers": "[4,8,12]" if args.depth >= 3 else "[12]",
                "student.frontend": args.frontend,
                "teacher.dtype": args.teacher_dtype,
                "deepspeed.zero_stage": args.zero,
            },
        ),
        batches,
    )
    bare = BareStep(trainer)

    def time_istack() -> float:
        t0 = time.perf_counter()
        trainer.advance()
        return time.perf_counter() - t0

    def time_bare(i: int) -> float:
        t0 = time.perf_counter()
        bare.step(batches[i % len(batches)])
        return time.perf_counter() - t0

    for i in range(2):  # warm-up: allocator, Adam state creation
        time_istack(), time_bare(i)
    trainer.teacher_timer.collect()
    bare.teacher_s = 0.0
    ours, theirs = [], []
    for i in range(args.steps):
        ours.append(time_istack())
        theirs.append(time_bare(i))
    ratio = statistics.median(ours) / statistics.median(theirs)
    result = {
        "depth": args.depth,
        "frontend": args.frontend,
        "teacher_dtype": args.teacher_dtype,
        "zero": args.zero,
        "batch": f"{args.utterances} x {args.seconds} s",
        "steps": args.steps,
        "istack_step_s": statistics.median(ours),
        "bare_step_s": statistics.median(theirs),
        "istack_teacher_s": trainer.teacher_timer.collect() / args.steps,
        "bare_teacher_s": bare.teacher_s / args.steps,
        "ratio": ratio,
        "threads": torch.get_num_threads(),
    }
    print(
        f"student {args.depth} x 384 ({args.frontend} front end, ZeRO {args.zero}), "
        f"teacher HuBERT-Base-shaped {args.teacher_dtype}, "
        f"batch {result['batch']}, {args.steps} steps, {result['threads']} threads"
    )
    print(f"  istack_ds step  {result['istack_step_s']:.3f} s (teacher {result['istack_teacher_s']:.3f} s)")
    print(f"  bare PyTorch    {result['bare_step_s']:.3f} s (teacher {result['bare_teacher_s']:.3f} s)")
    print(f"  istack_ds / bare = {ratio:.3f}   (goal <= 1.05)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    benchlib.close_trainer(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
