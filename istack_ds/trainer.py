"""The training loop: a class of small verbs whose ``train()`` reads top to bottom.

How the run starts (fresh or resumed) is decided in :mod:`istack_ds.resume`, data comes from
:mod:`istack_ds.data`, depth changes from :mod:`istack_ds.growth`, engines from :mod:`istack_ds.engine`,
what the run reports from :mod:`istack_ds.report`; this file only orders them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import __version__, faults, phase, preemption, report, resume
from .checkpoint import Checkpointer, CheckpointError, read_meta, saved_rank_states, seed_everything
from .config import Config
from .data import build_loader
from .data.loader import build_held_out_loader
from .deepspeed_json import deepspeed_json
from .diagnostics import LayerDiagnostics
from .dist import (
    all_ranks,
    all_reduce_sum,
    barrier,
    is_main,
    log0,
    next_on_all_ranks,
    rank,
    world_size,
)
from .engine import build_engine, destroy_engine
from .export import export_engine
from .growth import GrowthManager, Schedule
from .metrics import DataAudit, LogWindow, Metrics, RegionTimer
from .models.losses import distillation_loss
from .models.sfm import length_mask, receptive_field
from .models.student import LAYER_PREFIX, Student, init_student
from .models.teacher import Teacher, teacher_digest


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run saved a checkpoint and stopped."""


class Trainer:
    def __init__(self, cfg: Config, batches: Iterable[dict] | None = None):
        """Builds the teacher, the schedule and the loader; :meth:`start` builds the student and its engine.

        `batches`: a batch stream to train on instead of the configured shards (benchmarks feed
        fixed batches); the loader is built anyway, so its checks and log lines stay the same.
        """
        self.cfg = cfg
        self.out_dir = Path(cfg.run.out_dir)
        self.device = self._device()
        if is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out_dir / "config.yaml")
        self.teacher = Teacher.from_config(cfg.teacher, cfg.loss.teacher_layers).to(self.device)
        self.teacher_digest = teacher_digest(cfg.teacher.path)  # recorded in every checkpoint
        self.schedule = Schedule.from_config(cfg.growth, cfg.optim.steps)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", cfg.checkpoint.keep)
        self.teacher_timer = RegionTimer(self.device)  # perf/teacher_frac
        self.diagnostics = LayerDiagnostics(cfg.data, self.device) if cfg.eval.diagnostics else None
        self.audit = DataAudit(self.out_dir, rank()) if cfg.log.data_audit else None

        self.step = 0
        self.saved_step: int | None = None
        self.saved_path: Path | None = None
        self.nonfinite_total = self.nonfinite_run = 0
        # NOTE: the seed is the run's, never the step's: it fixes every epoch's shard order, which the
        # data position refers to. A resume on the same world size and workers continues where each worker was.
        # Shorter cuts would give the teacher no frame.
        self.min_samples = receptive_field(self.teacher.info.conv_kernel, self.teacher.info.conv_stride)
        # The micro-batch and accumulation of this world size (derived from data.global_batch when it is set);
        # a resume on another world size replaces it by one that keeps the checkpoint's global batch.
        self.plan = resume.batch_plan(cfg, world_size())
        self.loader = build_loader(
            cfg.data,
            cfg.data.train_index,
            rank=rank(),
            world_size=world_size(),
            seed=cfg.run.seed,
            min_samples=self.min_samples,
            plan=self.plan,
        )
        self.feed = batches
        self.engine: Any = None  # built by start()
        self.window = LogWindow()
        self.audio_seconds_total = 0.0
        self.utterances_total = 0  # over all ranks, since this process started
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    # ---- start: fresh or resumed ----------------------------------------------------------

    def start(self) -> None:
        """Builds the student and its engine: resumed from the first candidate checkpoint that loads on every
        rank (:func:`istack_ds.resume.agreed_candidates`; one that fails is reported and the previous one
        tried), or fresh. Then the monitors, which drop what was logged after the step resumed from."""
        if self.engine is not None:
            return
        failures = []
        for candidate in resume.agreed_candidates(self.cfg, world_size()):
            failure = self.resume_from(candidate)
            if not failure:
                break
            failures.append(failure)
        else:
            if failures:
                raise CheckpointError("no checkpoint could be loaded: " + " | ".join(failures))
            self.start_fresh()
        # NOTE: after the resume: the monitors drop what was logged after the step resumed from (saved_step),
        # and the loader's iterator starts at its restored position.
        self.metrics = Metrics.from_config(self.cfg, resume_step=self.saved_step)
        self.batches = iter(self.loader if self.feed is None else self.feed)

    def start_fresh(self) -> None:
        if is_main():  # what a run before it left in this directory is set aside
            self.checkpointer.start_timeline(None, None)
        barrier()
        self.build(None)
        # Dropout differs per rank from here on (a resume restores each rank's RNG instead).
        seed_everything(self.cfg.run.seed + 1000 * rank())

    def resume_from(self, candidate: Path) -> str:
        """Loads `candidate` (converted first when another world size saved it) on every rank; "" when it
        loaded, else every rank's error (the engine built for it is destroyed again)."""
        meta = read_meta(candidate)
        if unfit := resume.misfit(meta, self.cfg, candidate, world_size()):  # auto: the previous one is tried
            return unfit
        path = resume.loadable_copy(candidate, meta, world_size())
        meta = read_meta(path)
        self.plan = resume.batch_plan(self.cfg, world_size(), meta, path)
        self.build(meta)
        rank_state, errors = resume.load_on_every_rank(self.checkpointer, self.engine, path)
        if errors:
            log0("checkpoint %s did not load (%s): trying the previous one", path, "; ".join(errors))
            destroy_engine(self.engine)
            self.engine = None
            return f"{path}: {'; '.join(errors)}"
        if is_main():
            self.checkpointer.start_timeline(candidate, meta)
        barrier()
        self.load_state_dict(meta)
        self.saved_step, self.saved_path = self.step, path
        if rank_state is None:  # another world size: fresh per-rank randomness
            seed_everything(self.cfg.run.seed + 1000 * rank() + self.step)
        data_note = self.loader.restore(rank_state, saved_rank_states(path) if rank_state is None else [])
        report.log_resumed(self, path, meta, data_note)
        return ""

    def build(self, meta: dict | None) -> None:
        """The student and its engine (the DeepSpeed JSON of this run's batch plan): fresh (`meta` None, the
        student initialised per student.init) or at a checkpoint's depth, to load into."""
        self.ds_config = deepspeed_json(self.cfg, self.plan, load_universal=bool(meta and meta.get("universal")))
        if is_main():
            # The JSON DeepSpeed runs with (deepspeed.extra merged, a resume's accumulation), beside config.yaml.
            (self.out_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=1) + "\n")
        self.growth = GrowthManager(
            build_model=self.build_student,
            ds_config=self.ds_config,
            optim=self.cfg.optim,
            layer_prefix=LAYER_PREFIX,
            operator=self.cfg.growth.operator,
            carry=self.cfg.growth.carry,
            optimizer_state=self.cfg.growth.optimizer_state,
            pick=self.cfg.growth.pick,
        )
        # NOTE: the same seed on every rank: every rank must build the same initial student.
        seed_everything(self.cfg.run.seed)
        if meta is not None:
            self.student = self.build_student(meta["depth"], meta["supervised"])
        else:
            self.student = self.build_student(self.schedule.depth_at(0), None)
            log0(
                "student init (%s): %s",
                self.cfg.student.init,
                init_student(self.student, self.cfg.student, self.teacher),
            )
        self.engine = build_engine(self.student, self.ds_config, self.cfg.optim)

    def state_dict(self) -> dict:
        """What a checkpoint records of the run beside the engine's state and each rank's file (its marker)."""
        return {
            "step": self.step,
            "depth": self.student.depth,
            "supervised": self.student.supervised,
            "stage": self.schedule.stage_at(max(0, self.step - 1)),
            "gradient_accumulation": self.plan.accumulation,
            "nonfinite_steps": self.nonfinite_total,
            **resume.recorded_config(self.cfg, self.teacher_digest),
            "version": __version__,
        }

    def load_state_dict(self, meta: dict) -> None:
        """The run's counters from a checkpoint's marker (depth and batch were set when the engine was built)."""
        self.step = meta["step"]
        self.nonfinite_total = meta.get("nonfinite_steps", 0)

    # ---- the loop --------------------------------------------------------------------

    def train(self) -> dict:
        self.start()
        cfg = self.cfg
        start = time.time()
        summary_file = self.out_dir / "summary.json"
        if self.step >= cfg.optim.steps and summary_file.exists():
            log0("run already complete at step %d of %d: see %s", self.step, cfg.optim.steps, summary_file)
            self.close()
            return json.loads(summary_file.read_text())
        report.log_run_start(self)
        report.log_student(self)
        while self.step < cfg.optim.steps:
            self.advance()
            self.maybe_log()
            self.maybe_validate()
            self.maybe_save()
            preemption.stop_if_requested(self)  # SIGTERM / SIGUSR1 on any rank: every rank saves, then stops
        self.save()
        self.export()
        summary = report.write_summary(self, time.time() - start)
        self.close()
        return summary

    def advance(self) -> None:
        """One step of the run: grow when a stage starts, then one optimizer step."""
        faults.maybe("die", self.step + 1)
        self.maybe_grow()
        self.train_step()
        self.step += 1

    def train_step(self) -> None:
        """One optimizer step over `accumulation` finite micro-batches through teacher, student, loss.

        A non-finite loss (on any rank) skips its micro-batch before backward, so no bad gradient
        reaches the optimizer; `optim.max_nonfinite` in a row save a checkpoint marked diverged and stop the run.
        """
        t0 = time.perf_counter()
        done = attempts = 0
        while done < self.plan.accumulation:
            batch = self.next_batch()
            audio = batch["audio"].to(self.device, non_blocking=True)
            lens = batch["audio_lens"].to(self.device, non_blocking=True)
            audio = self.teacher.prepare_input(audio, lens)  # what the teacher's feature extractor says
            with self.teacher_timer:
                features, targets = self.teacher_pass(audio, lens)
            loss, parts = self.compute_loss(self.engine(audio, lens, features), targets, lens)
            if self.audit is not None:
                self.audit.write(self.step + 1, self.student.depth, batch)
            if faults.active("nan_all", self.step + 1) or (faults.active("nan", self.step + 1) and attempts == 0):
                loss = loss * float("nan")
            attempts += 1
            # NOTE: a collective: all ranks skip together or none does (ZeRO steps are collective).
            if not all_ranks(bool(torch.isfinite(loss))):
                self.skip_nonfinite()
                continue
            self.nonfinite_run = 0
            faults.in_backward(loss, self.step + 1)
            self.engine.backward(loss)
            self.engine.step()
            done += 1
            self.window.add_micro_batch(
                loss.detach(),  # on the device: the log line reads the sums (no host sync per micro-batch)
                {k: v.detach() for k, v in parts.items()},
                float(batch["seconds"]),
                samples=float(audio.numel()),
                pad_frac=float(batch.get("pad_frac", 0.0)),
                utterances=len(batch["cut_ids"]),
            )
        self.window.add_step(time.perf_counter() - t0)

    def next_batch(self) -> dict:
        """The next training batch (see :func:`next_on_all_ranks`)."""
        batch = next_on_all_ranks(self.batches, inject=faults.active("data_error", self.step + 1))
        if batch is None:
            raise StopIteration("the batch stream ended")
        return batch

    def skip_nonfinite(self) -> None:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        log0(
            "non-finite loss at step %d: micro-batch skipped (%d in a row, %d in all)",
            self.step + 1,
            self.nonfinite_run,
            self.nonfinite_total,
        )
        self.metrics.scalars(self.step + 1, {"train/nonfinite_steps": float(self.nonfinite_total)})
        if self.nonfinite_run >= self.cfg.optim.max_nonfinite:  # saved marked diverged: auto never resumes it
            what = f"{self.nonfinite_run} non-finite losses in a row at step {self.step + 1}"
            what += f" (optim.max_nonfinite={self.cfg.optim.max_nonfinite})"
            rank_state = {"data": self.loader.state_dict()}
            raise NonFiniteLossError(self.checkpointer.save_diverged(self.engine, self.state_dict(), rank_state, what))

    def teacher_pass(self, audio: torch.Tensor, lens: torch.Tensor):
        """The teacher's targets and, with a shared front end, the CNN features the student consumes too."""
        features = self.teacher.cnn(audio) if self.cfg.student.frontend == "shared" else None
        return features, self.teacher(audio, lens, features)

    def compute_loss(self, pred: dict, targets: dict, audio_lens: torch.Tensor):
        frames = self.teacher.frame_lengths(audio_lens)
        mask = length_mask(frames, max(t.shape[1] for t in targets.values()))
        return distillation_loss(self.cfg.loss, pred, targets, mask)

    def maybe_grow(self) -> None:
        """Grows to the schedule's depth at this step, through each stage's depth in turn (a re-planned
        resume can be more than one stage behind)."""
        while self.student.depth < self.schedule.depth_at(self.step):
            self.grow_to(next(d for d in self.schedule.depths if d > self.student.depth))

    def grow_to(self, new_depth: int) -> None:
        old_depth = self.student.depth
        # NOTE: every rank reaches this at the same optimizer step; the manager's gathers are collectives.
        result = self.growth.grow(self.engine, self.student, old_depth, new_depth, self.student.supervised)
        self.engine, self.student = result.engine, result.model
        event = (
            f"step {self.step}: depth {old_depth} -> {new_depth} ({self.cfg.growth.operator}), "
            f"lineage {result.lineage}, supervised layers {result.supervised}, pause {result.pause_s:.2f} s "
            f"(" + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()) + ")"
        )
        log0("growth: %s", event)
        self.metrics.text("growth/event", event, self.step)
        self.metrics.scalars(self.step, {"growth/pause_s": result.pause_s})
        report.log_student(self)
        if self.cfg.checkpoint.every:  # a checkpoint after each growth, unless checkpoints are off
            self.save()

    def maybe_log(self) -> None:
        if self.step % self.cfg.log.every and self.step != self.cfg.optim.steps:
            self.metrics.progress(self.step)
            return
        # NOTE: a collective on every rank; only the writing below is rank-0.
        values, sums = report.interval_values(
            self.window, self.loader.counters(), self.engine, self.student.depth, self.teacher_timer.collect()
        )
        self.metrics.scalars(self.step, values)
        self.metrics.line(self.step, values, self.student.depth, values["perf/step_s"], values["perf/audio_s_per_s"])
        self.metrics.progress(self.step)
        self.audio_seconds_total += sums["audio_s"]
        self.utterances_total += int(sums["utterances"])
        if self.first_loss is None:
            self.first_loss = values["train/loss"]
        self.last_loss = values["train/loss"]
        self.window = LogWindow()

    def maybe_validate(self) -> None:
        every = self.cfg.eval.every
        if self.cfg.data.valid_index and every and (self.step % every == 0 or self.step == self.cfg.optim.steps):
            with phase.waiting("validate"):
                self.validate()

    def maybe_save(self) -> None:
        every = self.cfg.checkpoint.every
        if every and self.step % every == 0 and self.step != self.cfg.optim.steps:
            self.save()

    # ---- validation ----------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Frame-weighted losses over up to eval.max_batches held-out batches per rank, all-reduced."""
        self.engine.eval()
        loader = build_held_out_loader(
            self.cfg.data,
            str(self.cfg.data.valid_index),
            rank=rank(),
            world_size=world_size(),
            seed=self.cfg.run.seed,
            min_samples=self.min_samples,
        )
        sums: dict[str, float] = {"frames": 0.0}
        batches = iter(loader)
        for _ in range(self.cfg.eval.max_batches):
            # NOTE: under ZeRO-3 every forward is a collective, so all ranks stop at the shortest stream.
            batch = next_on_all_ranks(batches)
            if batch is None:
                break
            audio, lens = batch["audio"].to(self.device), batch["audio_lens"].to(self.device)
            audio = self.teacher.prepare_input(audio, lens)
            features, targets = self.teacher_pass(audio, lens)
            loss, parts = self.compute_loss(self.engine(audio, lens, features), targets, lens)
            frames = float(self.teacher.frame_lengths(lens).sum())
            sums["frames"] += frames
            sums["loss"] = sums.get("loss", 0.0) + loss.item() * frames
            for name, value in parts.items():
                sums[f"loss_{name}"] = sums.get(f"loss_{name}", 0.0) + value.item() * frames
        if self.diagnostics is not None:
            # NOTE: every rank: the student forward is a collective under ZeRO-3; rank 0 computes and writes.
            self.diagnostics.run(self.engine.module, self.teacher, self.metrics, self.step)
        self.engine.train()
        keys = ["loss"] + [f"loss_L{t}" for t in self.cfg.loss.teacher_layers]
        totals = all_reduce_sum({k: sums.get(k, 0.0) for k in keys + ["frames"]})
        result = {f"valid/{k}": totals[k] / max(1.0, totals["frames"]) for k in keys}
        self.metrics.scalars(self.step, result)
        log0("valid at step %d: %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    # ---- checkpoints ----------------------------------------------------------------

    def save(self) -> Path:
        """A checkpoint of every rank's partition + per-rank RNG and data position (a collective)."""
        meta = self.state_dict()
        if self.saved_step != self.step:  # the final save may follow a periodic or growth save
            rank_state = {"data": self.loader.state_dict()}
            self.metrics.flush()  # the events up to this step are not logged again by a resume from it
            with phase.waiting("save"):  # a survivor names a rank stuck writing (a hung file system)
                self.saved_path = self.checkpointer.save(self.engine, meta, rank_state)
            self.saved_step = self.step
        assert self.saved_path is not None  # saved now or at this step before
        return self.saved_path

    # ---- export and reporting ---------------------------------------------------------

    def export(self) -> Path:
        """Writes the student as an HF save_pretrained dir (AutoModel loads it) + heads. A collective."""
        out = export_engine(
            self.engine,
            self.student,
            self.teacher.model.feature_extractor,
            self.out_dir / "student",
            teacher_path=self.cfg.teacher.path,
            step=self.step,
            config=self.cfg,
        )
        log0("exported student (depth %d) to %s", self.student.depth, out)
        return out

    # ---- building ---------------------------------------------------------------------

    def build_student(self, depth: int, supervised: list[int] | None) -> Student:
        return Student(self.cfg.student, self.cfg.loss, self.teacher.info, depth, supervised)

    def _device(self) -> torch.device:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())

    def close(self) -> None:
        """Flushes and closes what the run writes (TensorBoard, the data audit)."""
        self.metrics.close()
        if self.audit is not None:
            self.audit.close()
