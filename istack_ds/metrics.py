"""What a run reports: TensorBoard scalars, the log line, the window of steps it sums, timers, the data audit.

Only rank 0 writes TensorBoard and the log line; every rank keeps its own window and audit.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from .dist import is_main, log0


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
    loss: float = 0.0
    """Sum of the micro-batch losses."""
    parts: dict[str, float] = field(default_factory=dict)
    """Sum of each target's unweighted loss, by ``L<t>``."""

    def add_micro_batch(self, loss: float, parts: dict[str, float], audio_s: float) -> None:
        self.micro += 1
        self.loss += loss
        self.audio_s += audio_s
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value

    def add_step(self, seconds: float) -> None:
        self.steps += 1
        self.step_s += seconds

    def mean_losses(self) -> dict[str, float]:
        """``loss`` and ``loss_L<t>`` averaged over the window's micro-batches."""
        micro = max(1, self.micro)
        return {"loss": self.loss / micro, **{f"loss_{name}": v / micro for name, v in self.parts.items()}}

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


class Metrics:
    """Rank-0 TensorBoard writer + one log line per interval (step/total, %, loss parts, lr, throughput, ETA)."""

    def __init__(self, out_dir: str | Path, total_steps: int, tensorboard: bool = True):
        self.total_steps = total_steps
        self.writer = None
        if is_main() and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / "tb"))
        self.start = time.time()
        self.bar = None
        if is_main() and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

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
        if self.bar is not None:
            self.bar.write(msg)
        else:
            log0(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
