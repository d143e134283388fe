"""The GPU check: four stages that a lent GPU's few minutes should measure, each reported even when one fails.

Usage:
    bash tools/bench/gpu_check.sh [OUT_DIR]             # on the GPU machine (installs the carried .whl/ first)
    python tools/bench/gpu_check.py --out DIR [--stages 1,2,3,4] [--budget-s 420] [--steps 5]
    python tools/bench/gpu_check.py --smoke --out DIR   # every stage on the CPU with tiny shapes (a test runs it)
    python tools/bench/gpu_check.py --smoke --precision bf16 --stages 2,3 --out DIR    # the GPU's bf16 path

Every stage runs the REAL Trainer (a DeepSpeed engine, one rank in this process) on fixed batches with a RANDOM
teacher (HuBERT-Base-shaped; tiny with --smoke) and the paper's student (12 x 384; tiny with --smoke):
  1 versions: Python, torch (its CUDA, the device), DeepSpeed and its accelerator, transformers, NCCL; one step,
    which fails the stage when a GPU is visible but the engine runs elsewhere (a silent CPU fallback).
  2 growth: the growth surgery on the device for ZeRO-2 and ZeRO-3 (3 -> 6; one step before and after), the
    device's memory before and after (allocated, peak), where the optimizer states live, the pause.
  3 resume: 2 CPU ranks (torchrun, gloo) train 2 steps and save; this process resumes that checkpoint on 1 rank
    on the device (converted to a universal checkpoint: another world size) and takes a step; where the
    optimizer states (the fused AdamW `step` tensors too) live after the load.
  4 steps: step time per depth (3, 6, 9, 12) for both front ends (trainable, shared), with the teacher in fp32,
    fp32 + TF32 and bf16, at 2 and 8 utterances of 15.625 s per rank: teacher share, audio seconds per second,
    TFLOP/s and MFU (CNN and attention counted: tools/bench/gpu_costs.py states the formula), peak memory, host
    syncs per step (one extra step counted), and the EQL / PROP-1 speed-ups those per-depth times project.
The student trains in bf16 on a GPU (the recipes' deepspeed.precision), fp32 on the CPU. Writes DIR/gpu_check.json
(everything) and DIR/gpu_check.md (the short table) after every stage. Stage 4 stops starting new cases once
--budget-s seconds have passed since the start (the rest are listed as skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
import gpu_costs
import torch

TEACHERS = ("fp32", "fp32+tf32", "bf16")
FRONTENDS = ("trainable", "shared")


@dataclass
class Shapes:
    """What the check runs: the paper's shapes on a device, tiny ones with --smoke."""

    smoke: bool
    teacher: Path
    precision: str
    steps: int
    student: dict = field(default_factory=dict)
    layers: str = "[4,8,12]"
    growth: tuple[int, int] = (3, 6)
    depths: tuple[int, ...] = (3, 6, 9, 12)
    utterances: tuple[int, ...] = (2, 8)
    seconds: float = 15.625
    short_seconds: float = 4.0

    @classmethod
    def make(cls, smoke: bool, steps: int, teacher: Path | None = None, precision: str | None = None) -> Shapes:
        """`teacher` and `precision` default to a new random teacher and bf16 on a GPU (fp32 on the CPU)."""
        precision = precision or ("bf16" if torch.cuda.is_available() and not smoke else "fp32")
        if not smoke:
            return cls(False, teacher or benchlib.paper_teacher(), precision, steps)
        if teacher is None:
            from istack_ds.models.teacher import make_random_teacher

            teacher = Path(tempfile.mkdtemp()) / "teacher"
            make_random_teacher(teacher, size="tiny")
        student = {"student.hidden_size": 64, "student.intermediate_size": 128, "student.num_attention_heads": 4}
        return cls(True, teacher, precision, 1, student, "[4,8]", (2, 4), (2, 4), (1, 2), 1.0, 1.0)


def trainer_for(shapes: Shapes, out_dir: Path, batches: list[dict], **extra):
    """A started Trainer of `shapes` at one depth (growth.depths=[d]) or a schedule, fed `batches`."""
    sets = {
        "loss.teacher_layers": shapes.layers,
        "deepspeed.precision": shapes.precision,
        "growth.operator": "interleaved",
        **shapes.student,
        **extra,
    }
    overrides = benchlib.paper_overrides(shapes.teacher, benchlib.bench_shards(), out_dir, **sets)
    return benchlib.make_trainer(overrides, batches)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory() -> dict:
    """The device's memory now (GiB): allocated, reserved and the peak since the last reset; RSS on the CPU."""
    if not torch.cuda.is_available():
        from istack_ds.engine import rss_bytes

        return {"rss_gib": rss_bytes() / 2**30}
    sync()
    return {
        "allocated_gib": torch.cuda.memory_allocated() / 2**30,
        "reserved_gib": torch.cuda.memory_reserved() / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def step_loss(trainer) -> float:
    """The mean loss of the trainer's micro-batches since the last call (its log window, then emptied)."""
    window = trainer.window
    loss = float(window.loss) / max(window.micro, 1)
    trainer.window = type(window)()
    return loss


def state_devices(engine) -> list[str]:
    """Devices of every tensor in the optimizer's state (the fused AdamW `step` tensors included)."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sorted({str(v.device) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)})


def engine_device(trainer) -> str:
    return str(next(p.device for p in trainer.engine.module.parameters()))


def close(trainer) -> None:
    benchlib.close_trainer(trainer)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stage_versions(shapes: Shapes, tmp: Path) -> dict:
    import deepspeed
    import transformers
    from deepspeed.accelerator import get_accelerator

    import istack_ds

    cuda = torch.cuda.is_available()
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name() if cuda else "CPU",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "nccl": str(torch.cuda.nccl.version()) if cuda else None,  # a tuple, or an int in older torch
        "deepspeed": deepspeed.__version__,
        "accelerator": get_accelerator().device_name(),
        "transformers": transformers.__version__,
        "istack_ds": str(Path(istack_ds.__file__).parent),
    }
    trainer = trainer_for(
        shapes,
        tmp / "versions",
        benchlib.fixed_batches(1, 2, shapes.short_seconds),
        **{"growth.depths": f"[{shapes.growth[0]}]"},
    )
    try:
        trainer.train_step()
        out.update(smoke_loss=step_loss(trainer), engine_device=engine_device(trainer))
    finally:
        close(trainer)
    if not out["smoke_loss"] == out["smoke_loss"]:
        raise RuntimeError(f"the smoke step's loss is {out['smoke_loss']}")
    fallback = fallback_error(cuda, out["engine_device"])
    if fallback:
        raise RuntimeError(fallback)
    return out


def fallback_error(cuda_visible: bool, engine_device: str) -> str:
    """The error of an engine that runs off the GPU torch sees (DeepSpeed's CPU accelerator, say), else ""."""
    if cuda_visible and not engine_device.startswith("cuda"):
        return f"a GPU is visible but the engine runs on {engine_device} (a CPU fallback)"
    return ""


def stage_growth(shapes: Shapes, tmp: Path) -> dict:
    d0, d1 = shapes.growth
    batches = benchlib.fixed_batches(2, 2, shapes.short_seconds)
    out = {}
    for zero in (2, 3):
        reset_peak()
        trainer = trainer_for(
            shapes, tmp / f"growth{zero}", batches, **{"growth.depths": f"[{d0},{d1}]", "deepspeed.zero_stage": zero}
        )
        try:
            trainer.train_step()
            row = {"loss_before": step_loss(trainer), "memory_before": memory()}
            reset_peak()
            t0 = time.perf_counter()
            trainer.grow_to(d1)
            sync()
            row["pause_s"] = time.perf_counter() - t0
            row["memory_after_growth"] = memory()
            trainer.train_step()
            row.update(loss_after=step_loss(trainer), memory_after_step=memory(), depth=trainer.student.depth)
            row.update(engine_device=engine_device(trainer), optimizer_state_devices=state_devices(trainer.engine))
        finally:
            close(trainer)
        out[f"zero{zero}"] = row
        if row["depth"] != d1 or not row["loss_after"] == row["loss_after"]:
            raise RuntimeError(f"ZeRO-{zero}: depth {row['depth']} after growing to {d1}, loss {row['loss_after']}")
    return out


def save_worker(args) -> int:
    """Stage 3's other world size: under torchrun, 2 CPU ranks train 2 steps and save (this is each rank)."""
    from istack_ds.dist import init_distributed, setup_logging
    from istack_ds.startup import skip_shm_build

    # NOTE: the saving ranks train in the resuming process's precision: a resume keeps the checkpoint's config.
    shapes = Shapes.make(args.smoke, 1, Path(args.teacher), args.precision)
    skip_shm_build()
    setup_logging()
    init_distributed(600)
    trainer = trainer_for(shapes, Path(args.save_worker), benchlib.fixed_batches(2, 2, 2.0), **resume_sets(shapes))
    for _ in range(2):
        trainer.advance()
    trainer.save()
    close(trainer)
    return 0


def resume_sets(shapes: Shapes) -> dict:
    return {"growth.depths": f"[{shapes.growth[0]}]", "checkpoint.resume": "auto"}


def stage_resume(shapes: Shapes, tmp: Path) -> dict:
    run_dir = tmp / "resume"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2)),
    }
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # this process's single-rank group is not the workers'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    cmd += ["--save-worker", str(run_dir), "--teacher", str(shapes.teacher), "--precision", shapes.precision]
    cmd += ["--smoke"] if shapes.smoke else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"the 2-rank save exited {proc.returncode}: {proc.stderr[-2000:]}")
    out: dict = {"save_s": time.perf_counter() - t0}
    reset_peak()
    t0 = time.perf_counter()
    trainer = trainer_for(shapes, run_dir, benchlib.fixed_batches(2, 2, 2.0), **resume_sets(shapes))
    try:
        out.update(load_s=time.perf_counter() - t0, resumed_step=trainer.step, saved_path=str(trainer.saved_path))
        out["optimizer_state_devices_after_load"] = state_devices(trainer.engine)
        trainer.advance()
        sync()
        out.update(step_after=trainer.step, loss_after=step_loss(trainer), memory=memory())
        out["optimizer_state_devices_after_step"] = state_devices(trainer.engine)
    finally:
        close(trainer)
    if out["resumed_step"] != 2 or "universal" not in out["saved_path"]:
        raise RuntimeError(f"resumed at step {out['resumed_step']} from {out['saved_path']}, not the universal step 2")
    return out


def time_case(trainer, teacher, steps: int, utterances: int, seconds: float, count_syncs: bool) -> dict:
    """Step time and the rest with `teacher` (a Teacher, its tf32 set) in `trainer`, after one warm-up step."""
    trainer.teacher = teacher
    trainer.train_step()
    sync()
    trainer.teacher_timer.collect()
    reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    row = {"step_s": step_s, "teacher_frac": trainer.teacher_timer.collect() / sum(times), **memory()}
    row["audio_s_per_s"] = utterances * seconds / step_s
    if count_syncs:
        with gpu_costs.HostSyncs(device_only=torch.cuda.is_available()) as syncs:
            trainer.train_step()
            sync()
        row["host_reads_by_package"] = dict(syncs.by_package)
        row["host_reads"] = sum(syncs.by_package.values())
        row["cuda_syncs"] = syncs.cuda_syncs
    step_loss(trainer)
    return row


def stage_steps(shapes: Shapes, tmp: Path, deadline: float) -> dict:
    from istack_ds.models.teacher import Teacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = json.loads(shapes.layers)
    fp32 = Teacher(shapes.teacher, layers).to(device)
    bf16 = Teacher(shapes.teacher, layers, dtype=torch.bfloat16).to(device)
    peak = gpu_costs.peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    rows, skipped = [], []
    samples = int(shapes.seconds * 16000)
    for utterances in shapes.utterances:
        batches = benchlib.fixed_batches(2, utterances, shapes.seconds)
        for frontend in FRONTENDS:
            for depth in shapes.depths:
                case = {"utterances": utterances, "frontend": frontend, "depth": depth}
                if time.monotonic() > deadline:
                    skipped.append(case)
                    continue
                extra = {"growth.depths": f"[{depth}]", "student.frontend": frontend, "growth.operator": "none"}
                trainer = trainer_for(shapes, tmp / "steps", batches, **extra)
                try:
                    trainer.teacher = None  # the config's own teacher is freed: the variants below replace it
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    flops = gpu_costs.step_flops(trainer.student, fp32.model, samples, utterances, frontend == "shared")
                    for i, name in enumerate(TEACHERS):
                        teacher = bf16 if name == "bf16" else fp32
                        teacher.tf32 = name == "fp32+tf32"
                        row = {**case, "teacher": name, "flops": flops["total"], "teacher_flops": flops["teacher"]}
                        row.update(time_case(trainer, teacher, shapes.steps, utterances, shapes.seconds, i == 0))
                        row["tflops"] = flops["total"] / row["step_s"] / 1e12
                        row["mfu"] = row["tflops"] / peak if peak else None
                        rows.append(row)
                finally:
                    close(trainer)
    projections = project(rows, list(shapes.depths), shapes.utterances)
    return {"peak_bf16_tflops": peak, "cases": rows, "projections": projections, "skipped": skipped}


def project(rows: list[dict], depths: list[int], utterances: tuple[int, ...]) -> list[dict]:
    """Per batch, front end and teacher with every depth timed: the EQL / PROP-1 speed-ups over full depth, the
    full-depth step's speed-up over the IEEE fp32 teacher's, and EQL with this teacher over full depth with that
    one (what the teacher's precision and the schedule give together)."""
    out = []
    for u in utterances:
        for frontend in FRONTENDS:
            times = {
                name: {
                    r["depth"]: r["step_s"]
                    for r in rows
                    if (r["utterances"], r["frontend"], r["teacher"]) == (u, frontend, name)
                }
                for name in TEACHERS
            }
            for name, step_s in times.items():
                if len(step_s) < len(depths):
                    continue
                row = {"utterances": u, "frontend": frontend, "teacher": name}
                row.update(eql=gpu_costs.projected(step_s, depths, 0), prop1=gpu_costs.projected(step_s, depths, 1))
                if len(times["fp32"]) == len(depths):
                    full = times["fp32"][depths[-1]]
                    row["full_depth_vs_fp32"] = full / step_s[depths[-1]]
                    row["eql_vs_fp32_full_depth"] = row["full_depth_vs_fp32"] * row["eql"]
                out.append(row)
    return out


def run_stage(report: dict, name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    entry: dict = {"stage": name}
    try:
        entry.update(fn(*args))
        entry["ok"] = True
    except Exception as e:  # noqa: BLE001 -- every failure is reported and the next stage still runs
        entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-6000:])
        print(f"stage {name} FAILED: {entry['error']}", file=sys.stderr, flush=True)
    entry["seconds"] = time.perf_counter() - t0
    report["stages"].append(entry)


def table(report: dict) -> str:
    """The short Markdown summary of a report."""
    lines = [f"# istack_ds GPU check: {report['device']}", "", report["setup"], ""]
    lines += ["| stage | result | seconds |", "|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {'ok' if s['ok'] else 'FAILED: ' + s['error'][:200]} | {s['seconds']:.0f} |")
    by = {s["stage"]: s for s in report["stages"]}
    growth = by.get("2 growth", {})
    for zero in ("zero2", "zero3"):
        if zero in growth:
            g = growth[zero]
            lines.append(
                f"\nGrowth, {zero}: pause {g['pause_s']:.2f} s, memory before {_mem(g['memory_before'])}, "
                f"after {_mem(g['memory_after_step'])}, optimizer states on {g['optimizer_state_devices']}."
            )
    resume = by.get("3 resume", {})
    if "step_after" in resume:
        lines.append(
            f"\nResume 2 ranks -> 1: step {resume['resumed_step']} -> {resume['step_after']}, loss "
            f"{resume['loss_after']:.4f}, optimizer states on {resume['optimizer_state_devices_after_load']} "
            "after the load."
        )
    steps = by.get("4 steps", {})
    if steps.get("cases"):
        lines += [
            "",
            "| utt/rank | front end | teacher | depth | step (s) | teacher share | audio s/s | TFLOP/s | MFU "
            "| peak GiB | host reads / CUDA syncs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in steps["cases"]:
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
            peak = r.get("peak_gib", r.get("rss_gib", 0.0))
            syncs = f"{r['host_reads']} / {r['cuda_syncs']}" if "host_reads" in r else ""
            lines.append(
                f"| {r['utterances']} | {r['frontend']} | {r['teacher']} | {r['depth']} | {r['step_s']:.4f} | "
                f"{100 * r['teacher_frac']:.0f} % | {r['audio_s_per_s']:.0f} | {r['tflops']:.3g} | {mfu} | "
                f"{peak:.2f} | {syncs} |"
            )
        lines += [
            "",
            "| utt/rank | front end | teacher | projected EQL | projected PROP-1 | full depth vs fp32 teacher "
            "| EQL vs fp32-teacher full depth |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in steps["projections"]:
            vs = [f"{p[k]:.2f}x" if k in p else "n/a" for k in ("full_depth_vs_fp32", "eql_vs_fp32_full_depth")]
            lines.append(
                f"| {p['utterances']} | {p['frontend']} | {p['teacher']} | {p['eql']:.2f}x | {p['prop1']:.2f}x | "
                f"{vs[0]} | {vs[1]} |"
            )
        if steps["skipped"]:
            lines.append(f"\nSkipped (time budget): {steps['skipped']}")
    return "\n".join(lines) + "\n"


def _mem(m: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in m.items())


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(table(report))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".", help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, every stage, on whatever device is here")
    p.add_argument("--stages", default="1,2,3,4", help="which stages to run, comma-separated")
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage-4 case (after one warm-up)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no stage-4 case after this many seconds")
    p.add_argument("--save-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=("fp32", "bf16"), help="the student's (default: bf16 on a GPU, else fp32)")
    args = p.parse_args(argv)
    if args.save_worker:
        return save_worker(args)
    start = time.monotonic()
    out = Path(args.out)
    benchlib.init_single_process()
    shapes = Shapes.make(args.smoke, args.steps, precision=args.precision)
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "smoke": args.smoke,
        "setup": (
            f"Random {'tiny' if args.smoke else 'HuBERT-Base-shaped'} teacher, student "
            f"{'tiny' if args.smoke else '12 x 384'} in {shapes.precision}, ZeRO 2 (stage 2: also 3), 1 rank, "
            f"stage 4: {shapes.utterances} utterances x {shapes.seconds} s per step, median of {shapes.steps} steps."
        ),
        "stages": [],
    }
    wanted = set(args.stages.split(","))
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        stages = [
            ("1", "1 versions", stage_versions, ()),
            ("2", "2 growth", stage_growth, ()),
            ("3", "3 resume", stage_resume, ()),
            ("4", "4 steps", stage_steps, (start + args.budget_s,)),
        ]
        for key, name, fn, extra in stages:
            if key in wanted:
                run_stage(report, name, fn, shapes, tmp, *extra)
                write(report, out)
    print(table(report))
    return 0 if all(s["ok"] for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
