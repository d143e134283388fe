"""What a run reports: TensorBoard scalars, the log line, the window of steps it sums, timers, the data audit.

Only rank 0 writes TensorBoard, the extra monitors and the log line; every rank keeps its own window and audit.

What <out_dir>/tb/<run.name>/ holds besides the scalars (``tensorboard --logdir <out_dir>/tb`` shows it as the
run <run.name>; istack_ds/tbview.py shapes what it shows):

- CUSTOM SCALARS, the way in: losses first, then depth, growth pause, LR, CKA, throughput, data
  (:data:`istack_ds.tbview.CUSTOM_SCALARS`); depth as a step, the pause as a spike, both unsmoothed;
- HPARAMS: every config key (``run.name``, ``optim.lr``, ...; lists as JSON text, None as ``null``),
  the method's keys (growth, loss, student, optim) first, with ``valid/loss`` and ``train/loss`` as its metrics;
- TEXT ``run/name`` (the run name and directory), ``config/yaml`` (the resolved config) and, for a teacher
  of random weights, ``about/random_teacher`` (why the CKA maps are flat), at the first step this
  process writes;
- IMAGES and TENSORS: the layer diagnostics' CKA heatmaps and the same maps as numbers
  (:meth:`Metrics.image`, :meth:`Metrics.tensor`; istack_ds/diagnostics.py);
- on resume, events written after the checkpoint's step are purged (``purge_step``): the steps the
  resumed run logs again replace the old ones instead of showing twice.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml

from .config import ConfigError
from .dist import is_main, log0
from .tbview import CUSTOM_SCALARS, SeriesShaper, events_dir, flat_hparams, method_keys_first, random_teacher_note


class RegionTimer:
    """Seconds spent in a region of code (``with timer:``), summed until :meth:`collect`.

    On a GPU the region's kernels are timed with CUDA events, read only at collect: a wall clock
    around asynchronous launches measures the launching, and a synchronize per step would stall
    the queue. On the CPU, wall time.
    """

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.pending: list = []
        self.seconds = 0.0
        self._start: Any = None  # a CUDA event or a perf_counter() reading

    def __enter__(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self._start, end))
        else:
            self.seconds += time.perf_counter() - self._start

    def collect(self) -> float:
        """Seconds since the last collect (waits for the GPU work recorded so far)."""
        for start, end in self.pending:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1e3
        total, self.pending, self.seconds = self.seconds, [], 0.0
        return total


@dataclass
class LogWindow:
    """This rank's sums over the optimizer steps since the last log line."""

    steps: int = 0
    """Optimizer steps taken."""
    micro: int = 0
    """Micro-batches that reached backward (finite losses)."""
    step_s: float = 0.0
    """Wall seconds spent in those steps."""
    audio_s: float = 0.0
    """Unpadded audio seconds trained on."""
    loss: float | torch.Tensor = 0.0
    """Sum of the micro-batch losses (a tensor on the loss's device until :meth:`mean_losses` reads it)."""
    parts: dict[str, float | torch.Tensor] = field(default_factory=dict)
    """Sum of each target's unweighted loss, by ``L<t>`` (on the device, as `loss`)."""
    samples: float = 0.0
    """Samples in the batch tensors, padding included."""
    padded: float = 0.0
    """Of those, padding (``perf/pad_frac`` = padded / samples)."""
    utterances: int = 0
    """Cuts trained on (``data/utterances_per_step`` = utterances summed over ranks / steps)."""

    def add_micro_batch(
        self,
        loss: float | torch.Tensor,
        parts: dict[str, float] | dict[str, torch.Tensor],
        audio_s: float,
        samples: float = 0.0,
        pad_frac: float = 0.0,
        utterances: int = 0,
    ) -> None:
        self.micro += 1
        self.utterances += utterances
        self.loss += loss
        self.audio_s += audio_s
        self.samples += samples
        self.padded += pad_frac * samples
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value

    def add_step(self, seconds: float) -> None:
        self.steps += 1
        self.step_s += seconds

    def mean_losses(self) -> dict[str, float]:
        """``loss`` and ``loss_L<t>`` averaged over the window's micro-batches (one device-to-host read)."""
        micro = max(1, self.micro)
        names = ["loss", *(f"loss_{name}" for name in self.parts)]
        sums = [self.loss, *self.parts.values()]
        tensors = [v for v in sums if torch.is_tensor(v)]
        if tensors:
            device = tensors[0].device
            sums = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in sums]).tolist()
        return {name: float(v) / micro for name, v in zip(names, sums)}

    @property
    def mean_step_s(self) -> float:
        return self.step_s / max(1, self.steps)


class DataAudit:
    """Appends the cut ids of every consumed batch to ``<out_dir>/data_audit/rank<r>.jsonl`` (``log.data_audit``).

    One line per batch, flushed as it is written: a rank killed mid-run leaves every batch it
    trained on in the file, so an audit shows exactly what a resume re-read or skipped.
    """

    def __init__(self, out_dir: str | Path, rank: int):
        self.path = Path(out_dir) / "data_audit" / f"rank{rank}.jsonl"
        self.file: TextIO | None = None

    def write(self, step: int, depth: int, batch: dict) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", buffering=1)  # line-buffered
        self.file.write(
            json.dumps(
                {
                    "step": step,
                    "depth": depth,
                    "worker": int(batch.get("worker", 0)),
                    "epoch": batch.get("epoch"),
                    "cut_ids": list(batch["cut_ids"]),
                }
            )
            + "\n"
        )

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


MONITORS = ("csv", "wandb")
"""Extra monitors besides TensorBoard, each one of DeepSpeed's monitor classes (``log.monitors``)."""


def purge_csv(folder: Path, purge_step: int) -> None:
    """Drops the rows at steps >= `purge_step` from every CSV file of `folder` (what a resume logs again).

    Nothing is deleted: a file that loses rows is first renamed ``<tag>.csv.superseded-<unix time>``.
    """
    for path in sorted(folder.glob("*.csv")):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [row for row in rows[1:] if row and int(float(row[0])) < purge_step]
        if len(kept) != len(rows):
            path.rename(path.with_name(f"{path.name}.superseded-{int(time.time())}"))
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(kept)


def _monitor(kind: str, out_dir: Path, run_name: str, hparams: dict, purge_step: int, wandb_project: str):
    """One of DeepSpeed's monitors (rank 0; ``deepspeed.comm`` must be initialised, as in training)."""
    from deepspeed.monitor.config import CSVConfig, WandbConfig

    if kind == "csv":
        from deepspeed.monitor.csv_monitor import csvMonitor

        folder = out_dir / "csv"
        if folder.is_dir():
            purge_csv(folder, purge_step)
        monitor = csvMonitor(CSVConfig(enabled=True, output_path=str(out_dir), job_name="csv"))
        # csvMonitor writes a header the first time it writes a file in this process: not into a resumed file.
        monitor.filenames.extend(p.stem for p in folder.glob("*.csv"))
        return monitor
    if kind == "wandb":
        from deepspeed.monitor.wandb import WandbMonitor

        # DeepSpeed's WandbMonitor passes only project, group and entity to wandb.init: the run's name
        # and directory reach wandb through its environment variables. Each start or resume is a wandb
        # run of its own (wandb refuses steps below its last), grouped under the run name.
        os.environ.setdefault("WANDB_NAME", run_name)
        os.environ.setdefault("WANDB_DIR", str(out_dir))
        monitor = WandbMonitor(WandbConfig(enabled=True, project=wandb_project, group=run_name))
        import wandb

        wandb.config.update(hparams, allow_val_change=True)
        return monitor
    raise ConfigError(f"log.monitors: unknown monitor {kind!r}; choose from {list(MONITORS)}")


def check_monitors(monitors: Sequence[str], key: str = "log.monitors") -> None:
    """Raises ConfigError naming `key` for an unknown monitor or for ``wandb`` when wandb is not installed."""
    for kind in monitors:
        if kind not in MONITORS:
            raise ConfigError(f"{key}: unknown monitor {kind!r}; choose from {list(MONITORS)}")
        if kind == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"{key} holds `wandb` but the wandb package is not installed (pip install wandb)")


class Metrics:
    """Rank-0 TensorBoard writer + extra monitors + one log line per interval (step/total, %, loss parts, lr,
    throughput, ETA).

    `resume_step`: the step of the checkpoint the run resumed from, None for a fresh run. Events at
    later steps (what the resumed run logs again) are purged: TensorBoard's ``purge_step`` is
    ``resume_step + 1``; a fresh run purges from step 0, hiding what an earlier run left in the
    same directory. Events at the checkpoint's step (and before) were written before it was saved
    and stay; what the resumed run would log at those steps again (the model line at start, a
    growth re-done at the resume step) is not written, so TensorBoard and the CSVs hold each step once.
    """

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        tensorboard: bool = True,
        *,
        run_name: str = "",
        config: dict | None = None,
        resume_step: int | None = None,
        monitors: Sequence[str] = (),
        wandb_project: str = "istack_ds",
    ):
        self.total_steps = total_steps
        self.out_dir = Path(out_dir)
        self.purge_step = 0 if resume_step is None else resume_step + 1
        self.writer = None
        self.monitors: list = []
        hparams = flat_hparams(config or {})
        if run_name:
            hparams.setdefault("run.name", run_name)
        self.shaper = SeriesShaper()
        if is_main() and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = events_dir(self.out_dir / "tb", run_name)
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=self.purge_step)
            self._describe_run(run_name, config, hparams)
        if is_main():
            check_monitors(monitors)
            self.monitors = [
                _monitor(kind, self.out_dir, run_name, hparams, self.purge_step, wandb_project) for kind in monitors
            ]
        self.start = time.time()
        self.bar = None
        self._redirect = contextlib.ExitStack()
        if is_main() and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)
            # NOTE: every log line (growth, checkpoint, validation, DeepSpeed) goes through tqdm.write while the
            # bar is up: it clears the bar, writes the line and redraws the bar below it, so they never share a line.
            loggers = [logging.root] + [lg for lg in [logging.getLogger("DeepSpeed")] if lg.handlers]
            self._redirect.enter_context(logging_redirect_tqdm(loggers))

    @classmethod
    def from_config(cls, cfg, resume_step: int | None = None) -> Metrics:
        """The metrics of a run of config `cfg` (:class:`istack_ds.config.Config`), resumed at `resume_step`."""
        return cls(
            cfg.run.out_dir,
            cfg.optim.steps,
            cfg.log.tensorboard,
            run_name=cfg.run.name,
            config=cfg.to_dict(),
            resume_step=resume_step,
            monitors=cfg.log.monitors,
            wandb_project=cfg.log.wandb_project,
        )

    def _describe_run(self, run_name: str, config: dict | None, hparams: dict[str, Any]) -> None:
        """Run name, config text, hparams and the custom-scalar layout, into the scalars' event directory."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        assert self.writer is not None
        step = self.purge_step
        if run_name:
            self.writer.add_text("run/name", f"**{run_name}** in `{self.out_dir}`", step)
        from .provenance import as_markdown

        self.writer.add_text("run/provenance", as_markdown(), step)  # package versions, git commit
        if config is not None:
            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config/yaml", f"```yaml\n{text}```", step)
        note = random_teacher_note(config)
        if note:
            self.writer.add_text("about/random_teacher", note, step)  # `about` sorts first in the TEXT tab
        if hparams:
            # NOTE: SummaryWriter.add_hparams would write into a new timestamped subdirectory (another run
            # in TensorBoard, without the scalars): these summaries go into this writer's own file.
            experiment, start, _ = hparams_summaries(hparams, {"valid/loss": 0.0, "train/loss": 0.0})
            method_keys_first(experiment)
            file_writer = self.writer.file_writer  # the writer of the scalars' event file
            assert file_writer is not None
            file_writer.add_summary(experiment, step)
            file_writer.add_summary(start, step)
        self.writer.add_custom_scalars(CUSTOM_SCALARS)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Writes `values` at `step`; depth and the growth pause as steps and spikes (:class:`SeriesShaper`)."""
        # NOTE: events before the purge step were logged before the checkpoint this run resumed from.
        events = [e for e in self.shaper.events(step, values) if e[2] >= self.purge_step]
        if self.writer is not None:
            for tag, value, at in events:
                self.writer.add_scalar(tag, value, at)
        if self.monitors and events:
            for monitor in self.monitors:
                monitor.write_events(events)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None and step >= self.purge_step:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, image, step: int) -> None:
        """An RGB image [H, W, 3] (uint8) into TensorBoard."""
        if self.writer is not None and step >= self.purge_step:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def tensor(self, tag: str, tensor: torch.Tensor, step: int) -> None:
        """A tensor into TensorBoard, as numbers (``EventAccumulator.Tensors(tag)`` reads it back)."""
        if self.writer is not None and step >= self.purge_step:
            self.writer.add_tensor(tag, tensor.detach().cpu(), step)

    def progress(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def line(self, step: int, values: dict[str, float], depth: int, step_s: float, audio_s_per_s: float) -> None:
        elapsed = time.time() - self.start
        eta = step_s * (self.total_steps - step)
        parts = " ".join(f"{k.removeprefix('train/')}={v:.4f}" for k, v in values.items() if k.startswith("train/loss"))
        msg = (
            f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%) | {parts} | "
            f"lr {values.get('train/lr', 0):.2e} | depth {depth} | {step_s:.3f} s/step | "
            f"{audio_s_per_s:.1f} audio s/s | elapsed {_fmt_duration(elapsed)} | eta {_fmt_duration(eta)}"
        )
        log0(msg)

    def flush(self) -> None:
        """Puts every event logged so far on disk (before a checkpoint: a resume from it does not log them again)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self._redirect.close()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if any(type(m).__name__ == "WandbMonitor" for m in self.monitors):
            import wandb

            wandb.finish()
        self.monitors = []
