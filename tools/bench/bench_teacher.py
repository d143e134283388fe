"""The teacher's forward pass per dtype: time side by side, and how far each dtype's targets move.

Usage:
    python tools/bench/bench_teacher.py                  # HuBERT-Base-shaped random teacher, 2 x 4 s, layers 4/8/12
    python tools/bench/bench_teacher.py --utterances 4 --dtypes fp32,int8 --json teacher.json

The teacher is the real istack_ds Teacher (truncated to its deepest target
layer, under inference_mode) in each `teacher.dtype`; the CNN front end is timed
apart because `student.frontend: shared` computes it once for teacher and
student. The dtypes are timed round-robin, repeat by repeat, so machine noise
hits all of them; medians are printed with their ratio to fp32. Fidelity: the
relative L2 error and mean cosine of each target layer against fp32 on the same
audio (what the student is trained to match).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import benchlib
import torch


def load(path: Path, layers: list[int], dtype: str):
    from istack_ds.config import TeacherConfig
    from istack_ds.models.teacher import Teacher

    return Teacher.from_config(TeacherConfig(path=str(path), dtype=dtype), layers)


def timed(teacher, audio: torch.Tensor, lens: torch.Tensor) -> tuple[float, float, dict]:
    audio = teacher.prepare_input(audio, lens)  # identity unless the teacher's extractor normalizes
    t0 = time.perf_counter()
    features = teacher.cnn(audio)
    t1 = time.perf_counter()
    targets = teacher(audio, lens, features)
    return t1 - t0, time.perf_counter() - t1, targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="fp32,bf16,int8")
    p.add_argument("--layers", default="4,8,12", help="target layers (the teacher runs up to the deepest)")
    p.add_argument("--utterances", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per dtype (after one warm-up)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    dtypes, layers = args.dtypes.split(","), [int(x) for x in args.layers.split(",")]
    if dtypes[0] != "fp32":
        p.error("--dtypes must start with fp32 (the reference)")
    path = benchlib.paper_teacher()
    teachers = {d: load(path, layers, d) for d in dtypes}
    batch = benchlib.fixed_batches(1, args.utterances, args.seconds)[0]
    audio, lens = batch["audio"], batch["audio_lens"]
    cnn = {d: [] for d in dtypes}
    encoder = {d: [] for d in dtypes}
    targets = {}
    for r in range(args.repeats + 1):
        for d in dtypes:
            c, e, targets[d] = timed(teachers[d], audio, lens)
            if r:
                cnn[d].append(c)
                encoder[d].append(e)

    print(
        f"teacher HuBERT-Base-shaped (random), layers {layers}, batch {args.utterances} x {args.seconds} s, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"  {'dtype':5s} {'CNN':>8s} {'encoder':>8s} {'total':>8s} {'x fp32':>7s}  target fidelity vs fp32")
    ref = targets["fp32"]
    ref_total = statistics.median(cnn["fp32"]) + statistics.median(encoder["fp32"])
    results = []
    for d in dtypes:
        c, e = statistics.median(cnn[d]), statistics.median(encoder[d])
        fidelity = {
            i: {
                "rel_l2": ((targets[d][i] - ref[i]).norm() / ref[i].norm()).item(),
                "cosine": torch.nn.functional.cosine_similarity(targets[d][i], ref[i], dim=-1).mean().item(),
            }
            for i in layers
        }
        note = (
            "reference"
            if d == "fp32"
            else "  ".join(f"L{i}: {f['rel_l2'] * 100:.1f} % / cos {f['cosine']:.4f}" for i, f in fidelity.items())
        )
        print(f"  {d:5s} {c:7.3f}s {e:7.3f}s {c + e:7.3f}s {ref_total / (c + e):6.2f}x  {note}")
        results.append(
            {"dtype": d, "cnn_s": c, "encoder_s": e, "speedup_vs_fp32": ref_total / (c + e), "fidelity": fidelity}
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
