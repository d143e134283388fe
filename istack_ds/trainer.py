"""The training loop: a class of small verbs whose ``train()`` reads top to bottom.

Data comes from :mod:`istack_ds.data`, depth changes from :mod:`istack_ds.growth`,
DeepSpeed surgery from :mod:`istack_ds.engine`; this file only orders them.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from . import __version__, faults
from .batching import plan_batches
from .checkpoint import (
    Checkpointer,
    CheckpointError,
    check_compatible,
    check_depth,
    convert_to_universal,
    gradient_accumulation_for,
    read_meta,
    saved_rank_states,
    universal_path,
    verify,
)
from .config import Config
from .data import DataError, build_loader, check_shard_count, read_index
from .diagnostics import LayerDiagnostics
from .dist import (
    all_ranks,
    all_reduce_sum,
    barrier,
    broadcast_from_main,
    gather_all,
    is_main,
    log0,
    rank,
    run_on_main,
    topology,
    world_size,
)
from .engine import build_engine, deepspeed_config, destroy_engine
from .export import export_engine
from .growth import GrowthManager, Schedule
from .metrics import DataAudit, LogWindow, Metrics, RegionTimer
from .models.losses import distillation_loss
from .models.sfm import length_mask, receptive_field
from .models.student import LAYER_PREFIX, Student, init_student
from .models.teacher import Teacher

#: How long the other ranks wait for rank 0 to convert a checkpoint of another world size.
CONVERT_WAIT_S = 6 * 3600


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run saved a checkpoint and stopped."""


def next_on_all_ranks(batches: Iterator[dict], inject: bool = False) -> dict | None:
    """Every rank's next batch, or None on every rank when any rank's stream ended (a collective).

    A data failure on any rank raises DataError on every rank, naming each failed rank and its
    error. NOTE: called before the forward, which under ZeRO-3 is itself a collective: a rank that
    raised alone would leave the others waiting in it. `inject`: fault injection (ISTACK_FAULTS).
    """
    batch, error = None, ""
    try:
        if inject:
            raise DataError("injected by ISTACK_FAULTS")
        batch = next(batches, None)
    except DataError as e:
        error = f"rank {rank()}: {e}"
    status = all_reduce_sum({"ended": float(batch is None and not error), "failed": float(bool(error))})
    if status["failed"]:
        raise DataError("the data stream failed: " + " | ".join(e for e in gather_all(error) if e))
    return None if status["ended"] else batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, batches: Iterable[dict] | None = None):
        """Builds teacher, student and engine, resuming per ``checkpoint.resume``.

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
        # The micro-batch and accumulation of this world size (derived from data.global_batch when it is set).
        self.batches_plan = plan_batches(cfg.data, cfg.deepspeed, world_size())
        self.loader = build_loader(
            cfg.data,
            cfg.data.train_index,
            rank=rank(),
            world_size=world_size(),
            seed=cfg.run.seed,
            min_samples=self.min_samples,
            plan=self.batches_plan,
        )
        # Resume builds the student at the checkpoint's depth first, then loads into it.
        self._resume()
        # NOTE: built after _resume: TensorBoard and the CSV monitor purge what was logged after the checkpoint
        # resumed from (saved_step; None for a fresh run), which only _resume knows.
        self.metrics = Metrics.from_config(cfg, resume_step=self.saved_step)
        self.batches = iter(self.loader if batches is None else batches)
        self.window = LogWindow()
        self.audio_seconds_total = 0.0
        self.utterances_total = 0  # over all ranks, since this process started
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    # ---- resume ------------------------------------------------------------------------

    def _resume(self) -> None:
        """Builds the student and engine, fresh or from the first checkpoint that loads on every rank.

        Rank 0 chooses the candidates (``checkpoint.resume``: `auto` = every complete checkpoint that
        verifies, newest first; a path = that one only) and broadcasts them. One that fails to load
        is reported and the previous one tried; a checkpoint of another world size is converted
        first (rank 0; the others wait). What was newer than the one resumed is set aside.
        """
        resume = self.cfg.checkpoint.resume
        plan = None
        if is_main():
            try:
                plan = (*self._candidates(resume), "")
            except (CheckpointError, OSError) as e:  # raised on every rank below, not on rank 0 alone
                plan = ([], [], str(e))
        paths, notes, error = broadcast_from_main(plan)
        for note in notes:
            log0("checkpoint: %s", note)
        if error:
            raise CheckpointError(error)
        failures = []
        for candidate in map(Path, paths):
            meta = read_meta(candidate)
            check_compatible(meta, self.cfg.to_dict(), candidate)
            check_depth(meta, self.schedule.depth_at(meta["step"]), candidate)
            path = self._loadable_copy(candidate, meta)
            meta = read_meta(path)
            self._build(meta)
            rank_state, errors = self._load(path)
            if not errors:
                if is_main():
                    self.checkpointer.start_timeline(candidate, meta)
                barrier()
                self._restore(path, meta, rank_state)
                return
            failures.append(f"{path}: {'; '.join(errors)}")
            log0("checkpoint %s did not load (%s): trying the previous one", path, "; ".join(errors))
            destroy_engine(self.engine)
            del self.engine, self.student
        if failures:
            raise CheckpointError("no checkpoint could be loaded: " + " | ".join(failures))
        if is_main():  # a fresh run: what a run before it left in this directory is set aside
            self.checkpointer.start_timeline(None, None)
        barrier()
        self._build(None)
        # Dropout differs per rank from here on (a resume restores each rank's RNG instead).
        seed_everything(self.cfg.run.seed + 1000 * rank())

    def _candidates(self, resume: str) -> tuple[list[str], list[str]]:
        """Rank 0: the checkpoints to try, newest first, and why others were passed over."""
        if resume == "none":
            return [], []
        if resume == "auto":
            good, notes = self.checkpointer.candidates(world_size())
            if notes and not good:
                # NOTE: never a silent restart from step 0 over a run's checkpoints (and its TensorBoard history)
                raise CheckpointError(
                    "no checkpoint in "
                    f"{self.checkpointer.dir} verifies ({'; '.join(notes)}); to start the run over, set "
                    "checkpoint.resume=none (the old checkpoints are then set aside, not deleted)"
                )
            return [str(p) for p in good], notes
        verify(resume)  # an explicit choice: no fallback, the error names what is wrong with it
        return [resume], []

    def _loadable_copy(self, path: Path, meta: dict) -> Path:
        """`path`, or its universal conversion when it was saved by another world size (made by rank 0)."""
        if meta.get("world_size", world_size()) == world_size() or meta.get("universal"):
            return path
        log0(
            "checkpoint %s was saved by %d rank(s), this run has %d: converting", path, meta["world_size"], world_size()
        )

        def convert() -> str:
            convert_to_universal(path, log=lambda msg: log0("%s", msg))
            return ""

        # NOTE: the other ranks wait on the store (up to CONVERT_WAIT_S), not in a collective bounded by
        # deepspeed.dist_timeout_s: converting a large model takes longer.
        error = run_on_main(f"convert:{path}", convert, CONVERT_WAIT_S)
        if error:
            raise CheckpointError(f"converting {path} failed: {error}")
        return universal_path(path)

    def _build(self, meta: dict | None) -> None:
        """The engine for a fresh run (`meta` None) or at a checkpoint's depth, batch and format."""
        cfg = self.cfg
        # A resume on another world size keeps the global batch through gradient accumulation (with
        # data.global_batch the plan of this world size already does).
        self.accumulation = (
            gradient_accumulation_for(meta, world_size(), cfg.deepspeed.gradient_accumulation)
            if meta and not self.batches_plan.derived
            else self.batches_plan.accumulation
        )
        self.ds_config = deepspeed_config(
            cfg, world_size(), self.accumulation, load_universal=bool(meta and meta.get("universal"))
        )
        if is_main():
            # The JSON DeepSpeed runs with (deepspeed.extra merged, a resume's accumulation), beside config.yaml.
            (self.out_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=1) + "\n")
        self.growth = GrowthManager(
            build_model=self.build_student,
            ds_config=self.ds_config,
            optim=cfg.optim,
            layer_prefix=LAYER_PREFIX,
            operator=cfg.growth.operator,
            carry=cfg.growth.carry,
            optimizer_state=cfg.growth.optimizer_state,
            pick=cfg.growth.pick,
        )
        self.student, self.engine = self._build_initial_student(meta)

    def _load(self, path: Path) -> tuple[dict | None, list[str]]:
        """This rank's state and, when any rank failed, every rank's error (the same list on all ranks)."""
        rank_state, error = None, ""
        try:
            rank_state = self.checkpointer.load(self.engine, path)
        except Exception as e:  # noqa: BLE001 -- a corrupt file raises whatever its reader raises
            error = f"rank {rank()}: {type(e).__name__}: {e}"
        return rank_state, [e for e in gather_all(error) if e]

    def _build_initial_student(self, meta: dict | None):
        # NOTE: the same seed on every rank: every rank must build the same initial student.
        seed_everything(self.cfg.run.seed)
        if meta:
            student = self.build_student(meta["depth"], meta["supervised"])
        else:
            student = self.build_student(self.schedule.depth_at(0), None)
            log0("student init (%s): %s", self.cfg.student.init, init_student(student, self.cfg.student, self.teacher))
        return student, build_engine(student, self.ds_config, self.cfg.optim)

    def _restore(self, path: Path, meta: dict, rank_state: dict | None) -> None:
        """Step, counters, this rank's RNG and data position (or, from another world size, its epoch)."""
        self.step = meta["step"]
        self.saved_step, self.saved_path = self.step, path
        self.nonfinite_total = meta.get("nonfinite_steps", 0)
        if rank_state is None:  # another world size: fresh per-rank randomness
            seed_everything(self.cfg.run.seed + 1000 * rank() + self.step)
        data_note = self.loader.restore(rank_state, saved_rank_states(path) if rank_state is None else [])
        log0(
            "resumed from %s: step %d, stage %d, depth %d, lr %.3e",
            path,
            self.step,
            self.schedule.stage_at(self.step),
            self.student.depth,
            self.engine.get_lr()[0],
        )
        if self.accumulation != self.batches_plan.accumulation:
            log0(
                "checkpoint ran on %d rank(s); on %d the global batch is kept with gradient accumulation %d "
                "(configured %d)",
                meta["world_size"],
                world_size(),
                self.accumulation,
                self.batches_plan.accumulation,
            )
        log0("data: %s", data_note)
        planned = self.schedule.depth_at(self.step)
        if planned > self.student.depth and planned != self._saved_plan(meta):
            log0(
                "schedule re-planned: the checkpoint has depth %d at step %d, this config's schedule has depth %d "
                "there; growing before the next step",
                self.student.depth,
                self.step,
                planned,
            )

    def _saved_plan(self, meta: dict) -> int | None:
        """The depth the checkpoint's own schedule has at its step (None when its config no longer loads).

        A checkpoint saved at a growth boundary before that growth is behind its own schedule too:
        only a depth that differs from this one is a re-plan.
        """
        try:
            saved = Config.from_dict(meta["config"])
            return Schedule.from_config(saved.growth, saved.optim.steps).depth_at(meta["step"])
        except (KeyError, TypeError, ValueError):
            return None

    # ---- the loop --------------------------------------------------------------------

    def train(self) -> dict:
        cfg = self.cfg
        start = time.time()
        summary_file = self.out_dir / "summary.json"
        if self.step >= cfg.optim.steps and summary_file.exists():
            log0("run already complete at step %d of %d: see %s", self.step, cfg.optim.steps, summary_file)
            self.close()
            return json.loads(summary_file.read_text())
        self.log_topology()
        self.log_model()
        while self.step < cfg.optim.steps:
            self.advance()
            self.maybe_log()
            self.maybe_validate()
            self.maybe_save()
        self.save()
        self.export()
        summary = self.summary(time.time() - start)
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
        reaches the optimizer; `optim.max_nonfinite` in a row save a checkpoint and stop the run.
        """
        t0 = time.perf_counter()
        done = attempts = 0
        while done < self.accumulation:
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
                loss.item(),
                {k: v.item() for k, v in parts.items()},
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
        if self.nonfinite_run >= self.cfg.optim.max_nonfinite:
            path = self.save()
            raise NonFiniteLossError(
                f"{self.nonfinite_run} non-finite losses in a row at step {self.step + 1} "
                f"(optim.max_nonfinite={self.cfg.optim.max_nonfinite}); saved {path}. "
                "Lower optim.lr or check the data, then resume from that checkpoint"
            )

    def teacher_pass(self, audio: torch.Tensor, lens: torch.Tensor):
        """The teacher's targets and, with a shared front end, the CNN features the student consumes too."""
        features = self.teacher.cnn(audio) if self.cfg.student.frontend == "shared" else None
        return features, self.teacher(audio, lens, features)

    def compute_loss(self, pred: dict, targets: dict, audio_lens: torch.Tensor):
        frames = self.teacher.frame_lengths(audio_lens)
        mask = length_mask(frames, max(t.shape[1] for t in targets.values()))
        return distillation_loss(self.cfg.loss, pred, targets, mask)

    @torch.no_grad()
    def held_out_loss(
        self, audio: torch.Tensor, lens: torch.Tensor, targets: dict, features: torch.Tensor | None = None
    ) -> float:
        """The student's loss (eval mode, no dropout) against given targets: benchmarks judge quality with it.

        `audio` is raw; the targets must come from ``teacher(teacher.prepare_input(audio, lens), lens)``.

        `features`: the teacher's CNN output, used with ``student.frontend: shared`` only.
        """
        self.engine.eval()
        try:
            audio = self.teacher.prepare_input(audio, lens)
            shared = features if self.cfg.student.frontend == "shared" else None
            loss, _ = self.compute_loss(self.engine(audio, lens, shared), targets, lens)
        finally:
            self.engine.train()
        return loss.item()

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
        self.log_model()
        if self.cfg.checkpoint.every:  # a checkpoint after each growth, unless checkpoints are off
            self.save()

    def maybe_log(self) -> None:
        if self.step % self.cfg.log.every and self.step != self.cfg.optim.steps:
            self.metrics.progress(self.step)
            return
        w = self.window
        data = self.loader.counters()
        local = {
            **w.mean_losses(),
            "audio_s": w.audio_s,
            "samples": w.samples,
            "padded": w.padded,
            "utterances": float(w.utterances),
            "skipped": float(data.skipped),
            "shards_done": float(data.shards_done),
            "epoch": float(data.epoch),
        }
        # NOTE: a collective on every rank; only the writing below is rank-0.
        sums = all_reduce_sum(local)
        means = {k: v / world_size() for k, v in sums.items() if k.startswith("loss")}
        epoch = sums["epoch"] / world_size()
        step_s = w.mean_step_s
        values = {
            "train/loss": means["loss"],
            **{f"train/{k}": v for k, v in means.items() if k != "loss"},
            "train/lr": self.engine.get_lr()[0],
            "model/depth": float(self.student.depth),
            "perf/step_s": step_s,
            "perf/audio_s_per_s": sums["audio_s"] / max(1e-9, w.step_s),
            "perf/teacher_frac": self.teacher_timer.collect() / max(1e-9, w.step_s),
            "perf/pad_frac": sums["padded"] / max(1.0, sums["samples"]),
            "data/utterances_per_step": sums["utterances"] / max(1, w.steps),
            "data/skipped": sums["skipped"],
            "data/shards_done": sums["shards_done"],
            "data/epoch": epoch,
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        self.metrics.scalars(self.step, values)
        self.metrics.line(self.step, values, self.student.depth, step_s, values["perf/audio_s_per_s"])
        self.metrics.progress(self.step)
        self.audio_seconds_total += sums["audio_s"]
        self.utterances_total += int(sums["utterances"])
        if self.first_loss is None:
            self.first_loss = means["loss"]
        self.last_loss = means["loss"]
        self.window = LogWindow()

    def maybe_validate(self) -> None:
        every = self.cfg.eval.every
        if self.cfg.data.valid_index and every and (self.step % every == 0 or self.step == self.cfg.optim.steps):
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
        # A held-out split is small: with fewer shards than ranks x workers, fewer workers read it
        # (preflight made sure every rank has at least one shard).
        valid_index = str(self.cfg.data.valid_index)
        workers = check_shard_count(read_index(valid_index), world_size(), self.cfg.data.num_workers, held_out=True)
        data = dataclasses.replace(self.cfg.data, num_workers=workers)
        loader = build_loader(
            data,
            valid_index,
            rank=rank(),
            world_size=world_size(),
            seed=self.cfg.run.seed,
            epochs=1,
            crop=False,
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
        meta = {
            "step": self.step,
            "depth": self.student.depth,
            "supervised": self.student.supervised,
            "stage": self.schedule.stage_at(max(0, self.step - 1)),
            "gradient_accumulation": self.accumulation,
            "nonfinite_steps": self.nonfinite_total,
            "config": self.cfg.to_dict(),
            "version": __version__,
        }
        if self.saved_step != self.step:  # the final save may follow a periodic or growth save
            rank_state = {"data": self.loader.state_dict()}
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

    def summary(self, wall_s: float) -> dict:
        summary = {
            "steps": self.step,
            "depth": self.student.depth,
            "wall_s": round(wall_s, 1),
            "audio_hours": round(self.audio_seconds_total / 3600, 4),
            "utterances_this_process": self.utterances_total,
            "batch": self.batches_plan.describe(),
            "loss_first": self.first_loss,
            "loss_last": self.last_loss,
            "tensorboard": str(self.out_dir / "tb"),
            "student": str(self.out_dir / "student"),
            "checkpoints": str(self.checkpointer.dir),
        }
        if is_main():
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            log0(
                "done: %d steps in %.1f s, %.3f h of audio, loss %.4f -> %.4f, final depth %d",
                self.step,
                wall_s,
                summary["audio_hours"],
                self.first_loss or float("nan"),
                self.last_loss or float("nan"),
                self.student.depth,
            )
            log0(
                "TensorBoard: tensorboard --logdir %s | student: %s | checkpoints: %s",
                summary["tensorboard"],
                summary["student"],
                summary["checkpoints"],
            )
        return summary

    def log_topology(self) -> None:
        topo = topology()
        workers = max(1, self.cfg.data.num_workers)
        shards = len(read_index(self.cfg.data.train_index).shards)
        log0(
            "topology: %d node(s) x %d rank(s) = %d ranks, %d data worker(s) per rank, %d shards (%.1f per worker); "
            "ZeRO %d, %s, gradient accumulation %d",
            topo["nodes"],
            topo["ranks_per_node"],
            topo["world_size"],
            workers,
            shards,
            shards / (topo["world_size"] * workers),
            self.cfg.deepspeed.zero_stage,
            self.cfg.deepspeed.precision,
            self.accumulation,
        )
        log0("batch: %s", self.batches_plan.describe())
        log0("teacher: %s", self.teacher.describe())
        log0(
            "schedule: %s (%s)",
            ", ".join(f"depth {d} from step {s}" for d, s in zip(self.schedule.depths, self.schedule.starts)),
            self.cfg.growth.operator,
        )

    def log_model(self) -> None:
        params = (
            self.student.num_parameters()
            if self.cfg.deepspeed.zero_stage < 3
            else sum(getattr(p, "ds_numel", p.numel()) for p in self.student.parameters())
        )
        self.metrics.scalars(self.step, {"model/depth": float(self.student.depth), "model/params": float(params)})
        log0(
            "student: depth %d, %.2fM parameters, supervised layers %s -> teacher %s",
            self.student.depth,
            params / 1e6,
            self.student.supervised,
            self.cfg.loss.teacher_layers,
        )

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
