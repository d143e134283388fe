"""What a run tells its user: the lines it starts with, each log interval's values over all ranks, summary.json.

Reads the trainer, never changes it; the writing goes through :mod:`istack_ds.metrics` (rank 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from . import resume
from .data import read_index
from .device import describe_device
from .dist import all_reduce_sum, is_main, log0, topology, world_size
from .metrics import LogWindow
from .provenance import provenance

if TYPE_CHECKING:
    from .trainer import Trainer


def interval_values(window: LogWindow, data_counters, engine, depth: int, teacher_s: float) -> tuple[dict, dict]:
    """The TensorBoard values of the interval `window` summed up, over all ranks, and the raw sums.

    NOTE: a collective on every rank (losses are the ranks' mean; audio, utterances and data counters their sum).
    """
    w = window
    local = {
        **w.mean_losses(),
        "audio_s": w.audio_s,
        "samples": w.samples,
        "padded": w.padded,
        "utterances": float(w.utterances),
        "skipped": float(data_counters.skipped),
        "shards_done": float(data_counters.shards_done),
        "epoch": float(data_counters.epoch),
    }
    sums = all_reduce_sum(local)
    means = {k: v / world_size() for k, v in sums.items() if k.startswith("loss")}
    values = {
        "train/loss": means["loss"],
        **{f"train/{k}": v for k, v in means.items() if k != "loss"},
        "train/lr": engine.get_lr()[0],
        "model/depth": float(depth),
        "perf/step_s": w.mean_step_s,
        "perf/audio_s_per_s": sums["audio_s"] / max(1e-9, w.step_s),
        "perf/teacher_frac": teacher_s / max(1e-9, w.step_s),
        "perf/pad_frac": sums["padded"] / max(1.0, sums["samples"]),
        "data/utterances_per_step": sums["utterances"] / max(1, w.steps),
        "data/skipped": sums["skipped"],
        "data/shards_done": sums["shards_done"],
        "data/epoch": sums["epoch"] / world_size(),
    }
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        values["train/grad_norm"] = float(grad_norm)
    return values, sums


def log_run_start(trainer: Trainer) -> None:
    """The lines a run starts with: topology, batch plan, teacher, growth schedule."""
    topo = topology()
    workers = max(1, trainer.cfg.data.num_workers)
    shards = len(read_index(trainer.cfg.data.train_index).shards)
    log0(
        "topology: %d node(s) x %d rank(s) = %d ranks, %d data worker(s) per rank, %d shards (%.1f per worker); "
        "ZeRO %d, gradient accumulation %d; device: %s",
        topo["nodes"],
        topo["ranks_per_node"],
        topo["world_size"],
        workers,
        shards,
        shards / (topo["world_size"] * workers),
        trainer.cfg.deepspeed.zero_stage,
        trainer.plan.accumulation,
        describe_device(trainer.cfg, topo["world_size"]),
    )
    log0("batch: %s", trainer.plan.describe())
    log0("teacher: %s", trainer.teacher.describe())
    log0(
        "schedule: %s (%s)",
        ", ".join(f"depth {d} from step {s}" for d, s in zip(trainer.schedule.depths, trainer.schedule.starts)),
        trainer.cfg.growth.operator,
    )


def write_summary(trainer: Trainer, wall_s: float) -> dict:
    """summary.json (rank 0 writes it) and the closing lines: steps, time, audio, losses, where the outputs are."""
    summary = {
        "steps": trainer.step,
        "depth": trainer.student.depth,
        "wall_s": round(wall_s, 1),
        "audio_hours": round(trainer.audio_seconds_total / 3600, 4),
        "utterances_this_process": trainer.utterances_total,
        "batch": trainer.plan.describe(),
        "loss_first": trainer.first_loss,
        "loss_last": trainer.last_loss,
        "tensorboard": str(trainer.out_dir / "tb"),
        "student": str(trainer.out_dir / "student"),
        "checkpoints": str(trainer.checkpointer.dir),
        "provenance": provenance(),  # package versions and the git commit this run ran
    }
    if is_main():
        (trainer.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log0(
            "done: %d steps in %.1f s, %.3f h of audio, loss %.4f -> %.4f, final depth %d",
            trainer.step,
            wall_s,
            summary["audio_hours"],
            trainer.first_loss or float("nan"),
            trainer.last_loss or float("nan"),
            trainer.student.depth,
        )
        log0(
            "TensorBoard: tensorboard --logdir %s | student: %s | checkpoints: %s",
            summary["tensorboard"],
            summary["student"],
            summary["checkpoints"],
        )
    return summary


def log_student(trainer: Trainer) -> None:
    """The student's depth and size (TensorBoard `model/*` and a line), at the start and after each growth."""
    params = (
        trainer.student.num_parameters()
        if trainer.cfg.deepspeed.zero_stage < 3
        else sum(getattr(p, "ds_numel", p.numel()) for p in trainer.student.parameters())
    )
    trainer.metrics.scalars(trainer.step, {"model/depth": float(trainer.student.depth), "model/params": float(params)})
    log0(
        "student: depth %d, %.2fM parameters, supervised layers %s -> teacher %s",
        trainer.student.depth,
        params / 1e6,
        trainer.student.supervised,
        trainer.cfg.loss.teacher_layers,
    )


def log_resumed(trainer: Trainer, path: Path, meta: dict, data_note: str) -> None:
    """What a resume continues from: step, stage, depth, LR (this config's, from the first step), the config keys
    changed since the checkpoint, a kept global batch, the data position, a re-plan."""
    log0(
        "resumed from %s: step %d, stage %d, depth %d, lr %.3e",
        path,
        trainer.step,
        trainer.schedule.stage_at(trainer.step),
        trainer.student.depth,
        trainer.engine.get_lr()[0],
    )
    for change in resume.config_changes(resume.flat(meta.get("config", {})), resume.flat(trainer.cfg.to_dict())):
        log0("config changed since the checkpoint: %s", change)
    if "teacher_digest" not in meta:
        log0("checkpoint %s records no teacher digest (an older version saved it): the teacher is not checked", path)
    configured = resume.batch_plan(trainer.cfg, world_size())
    if trainer.plan.accumulation != configured.accumulation:
        log0(
            "checkpoint ran on %d rank(s); on %d the global batch is kept with gradient accumulation %d "
            "(configured %d)",
            meta["world_size"],
            world_size(),
            trainer.plan.accumulation,
            configured.accumulation,
        )
    log0("data: %s", data_note)
    if resume.replanned(meta, trainer.schedule, trainer.student.depth):
        log0(
            "schedule re-planned: the checkpoint has depth %d at step %d, this config's schedule has depth %d "
            "there; growing before the next step",
            trainer.student.depth,
            trainer.step,
            trainer.schedule.depth_at(trainer.step),
        )
