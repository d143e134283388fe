"""Step time per depth on one accelerator, both front ends: the numbers behind the stacking speed-up.

Usage (tools/bench/gpu_check.sh runs it on a GPU machine):
    python tools/bench/gpu_check.py --out gpu_check.md                 # paper shape, bf16, ZeRO 2
    python tools/bench/gpu_check.py --tiny --steps 2 --out /tmp/x.md   # a seconds-long smoke run (also on CPU)

For each front end (trainable, shared) and each depth of the paper's schedule
(3, 6, 9, 12) it builds the real Trainer (a DeepSpeed ZeRO-2 engine, bf16 on a
GPU) at that depth with a random HuBERT-Base-shaped teacher and times --steps
steps on fixed batches (--utterances x --seconds of audio). It prints and writes
step time, teacher fraction, audio seconds per second and an MFU estimate per
depth, and the EQL / PROP-1 speed-ups over full depth that those step times
project for a 3 -> 6 -> 9 -> 12 run (growth pauses excluded; they are measured
by tools/bench/bench_growth.py).
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

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def time_depth(depth: int, frontend: str, args, teacher, index, batches) -> dict:
    layers = "[4,8,12]" if not args.tiny else "[4,8]"
    extra = {
        "growth.operator": "none",
        "growth.depths": f"[{depth}]",
        "student.frontend": frontend,
        "loss.teacher_layers": layers,
        "teacher.dtype": "bf16" if args.bf16 else "fp32",
        "deepspeed.precision": "bf16" if args.bf16 else "fp32",
    }
    if args.tiny:
        extra.update({"student.hidden_size": 64, "student.intermediate_size": 128, "student.num_attention_heads": 4})
    trainer = benchlib.make_trainer(
        benchlib.paper_overrides(teacher, index, Path(tempfile.mkdtemp()), **extra), batches
    )
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    trainer.train_step()  # warm-up: kernels, allocator, Adam state
    sync()
    trainer.teacher_timer.collect()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    audio_s = args.utterances * args.seconds
    frames = audio_s * 50  # 20 ms frames
    student_params = sum(p.numel() for n, p in trainer.student.named_parameters() if "feature_extractor" not in n)
    teacher_params = sum(p.numel() for n, p in trainer.teacher.named_parameters() if "feature_extractor" not in n)
    # Transformer FLOPs (2 per parameter per frame forward, x3 with backward); CNN FLOPs left out.
    flops = frames * (6 * student_params + 2 * teacher_params)
    peak = peak_tflops()
    result = {
        "depth": depth,
        "frontend": frontend,
        "step_s": step_s,
        "teacher_frac": trainer.teacher_timer.collect() / sum(times),
        "audio_s_per_s": audio_s / step_s,
        "tflops": flops / step_s / 1e12,
        "mfu": (flops / step_s / 1e12 / peak) if peak else None,
    }
    benchlib.close_trainer(trainer)
    return result


def projected(step_s: dict[int, float], depths: list[int], alpha: float) -> float:
    """Full-depth time / stacked time for stage shares proportional to i**alpha."""
    shares = [(i + 1) ** alpha for i in range(len(depths))]
    stacked = sum(w * step_s[d] for w, d in zip(shares, depths)) / sum(shares)
    return step_s[depths[-1]] / stacked


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--utterances", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.6)
    p.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 instead of bf16")
    p.add_argument("--tiny", action="store_true", help="tiny teacher and student: a smoke run")
    p.add_argument("--out", default="gpu_check.md")
    args = p.parse_args(argv)
    if args.tiny:
        args.utterances, args.seconds = min(args.utterances, 2), min(args.seconds, 2.0)

    benchlib.init_single_process()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if args.tiny:
        from istack_ds.models.teacher import make_random_teacher

        teacher = Path(tempfile.mkdtemp()) / "teacher"
        make_random_teacher(teacher, size="tiny")
    else:
        teacher = benchlib.paper_teacher()
    index = benchlib.bench_shards()
    batches = benchlib.fixed_batches(4, args.utterances, args.seconds)
    depths = [2, 4, 8] if args.tiny else [3, 6, 9, 12]
    rows = [time_depth(d, f, args, teacher, index, batches) for f in ("trainable", "shared") for d in depths]

    lines = [
        f"# istack_ds GPU check: {device}",
        "",
        f"Random {'tiny' if args.tiny else 'HuBERT-Base-shaped'} teacher, "
        f"student {'tiny' if args.tiny else '12 x 384'}, "
        f"{'bf16' if args.bf16 else 'fp32'}, ZeRO 2, 1 rank, batch {args.utterances} x {args.seconds} s, "
        f"median of {args.steps} steps.",
        "",
        "| front end | depth | step (s) | teacher share | audio s/s | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['frontend']} | {r['depth']} | {r['step_s']:.4f} | {100 * r['teacher_frac']:.0f} % | "
            f"{r['audio_s_per_s']:.0f} | {r['tflops']:.1f} | {mfu} |"
        )
    lines += ["", "| front end | projected EQL speed-up | projected PROP-1 speed-up |", "|---|---|---|"]
    for f in ("trainable", "shared"):
        step_s = {r["depth"]: r["step_s"] for r in rows if r["frontend"] == f}
        lines.append(f"| {f} | {projected(step_s, depths, 0):.2f}x | {projected(step_s, depths, 1):.2f}x |")
    shared_full = next(r["step_s"] for r in rows if r["frontend"] == "shared" and r["depth"] == depths[-1])
    trainable_full = next(r["step_s"] for r in rows if r["frontend"] == "trainable" and r["depth"] == depths[-1])
    lines += ["", f"Full depth, shared over trainable front end: {trainable_full / shared_full:.2f}x faster per step."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
