"""How big a step is: the per-rank micro-batch and gradient accumulation of a world size, and epochs -> steps.

With ``data.global_batch`` a config fixes what one optimizer step sees over all ranks (the
paper: 64 utterances); :func:`plan_batches` derives each rank's micro-batch and the
accumulation from the world size, so the same config means the same on 1, 8 or 32 GPUs.
Without it a rank's micro-batch is ``data.batch_seconds`` and a step's batch grows with the
world size (x ``deepspeed.gradient_accumulation``).

:func:`resolve_total_steps` turns ``optim.epochs`` into ``optim.total_steps`` from the train
index: its cuts (or seconds) in one pass, divided by the global batch. It depends on the index
and the batch only, never on the world size, so a run resized by a resume keeps its steps and
growth boundaries.

This module reads index.json (no audio, no torch).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError, DataConfig, DeepSpeedConfig

UNRESOLVED_STEPS = "steps resolved at launch from {index} (not there yet)"
"""What stands for optim.total_steps while optim.epochs cannot be resolved: the train index is not written yet."""


@dataclass(frozen=True)
class BatchPlan:
    """What one optimizer step holds on a world size."""

    unit: str
    """`seconds` (of unpadded audio) or `utterances` (cuts)."""
    world_size: int
    accumulation: int
    """Micro-batches per rank and optimizer step."""
    micro: float
    """Most one rank's micro-batch holds, in `unit`. Utterances: exactly that many (a shard group's last cuts
    that fill no micro-batch are left out, counted as `batch_remainder`), except that a cut whose audio fails to
    decode once read leaves its micro-batch one short (counted as `undecodable_flac`)."""
    derived: bool
    """True when derived from data.global_batch; False for the per-rank data.batch_seconds."""

    @property
    def global_batch(self) -> float:
        """What one optimizer step holds over all ranks, in `unit` (seconds: at most)."""
        return self.world_size * self.accumulation * self.micro

    def describe(self) -> str:
        micro = f"{int(self.micro)} utterances" if self.unit == "utterances" else f"{self.micro:g} s of audio"
        total = f"{self.global_batch:g} {'utterances' if self.unit == 'utterances' else 's of audio'}"
        source = "data.global_batch" if self.derived else "data.batch_seconds x ranks x deepspeed.gradient_accumulation"
        bound = "" if self.unit == "utterances" else "at most "
        return (
            f"{bound}{total} per step ({source}) = {self.world_size} rank(s) x {self.accumulation} micro-batch(es) "
            f"x {bound}{micro}"
        )


def plan_batches(
    data: DataConfig, deepspeed: DeepSpeedConfig, world_size: int, saved: tuple[int, int] | None = None
) -> BatchPlan:
    """The micro-batch and accumulation of `world_size` ranks: the fewest micro-batches per rank whose share of
    data.global_batch fits data.max_micro_batch (utterances: a whole number that divides evenly). Raises
    ConfigError naming the numbers when no split exists.

    `saved`: (world size, accumulation) of the checkpoint a run resumes from. Without data.global_batch the
    global batch is ranks x accumulation micro-batches, so a resume on another world size keeps the saved one
    through the accumulation (:func:`keep_global_batch`); with it, the plan of `world_size` already does.
    """
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    if data.global_batch is None:
        accumulation = deepspeed.gradient_accumulation
        if saved is not None and saved[0] != world_size:
            accumulation = keep_global_batch(*saved, world_size)
        return BatchPlan("seconds", world_size, accumulation, data.batch_seconds, derived=False)
    total = data.global_batch
    if data.batch_unit == "utterances":
        utterances = int(total)
        bound = int(data.max_micro_batch) if data.max_micro_batch is not None else utterances
        for accumulation in range(1, utterances + 1):
            share, rest = divmod(utterances, world_size * accumulation)
            if share >= 1 and not rest and share <= bound:
                return BatchPlan("utterances", world_size, accumulation, float(share), derived=True)
        fits = [w for w in range(1, utterances + 1) if utterances % w == 0]
        raise ConfigError(
            f"data.global_batch={utterances} utterances cannot be split evenly over {world_size} rank(s) in "
            f"micro-batches of at most data.max_micro_batch={bound}; world sizes that divide it: {fits}"
        )
    bound_s = data.max_micro_batch if data.max_micro_batch is not None else data.batch_seconds
    accumulation = max(1, math.ceil(total / (world_size * bound_s) - 1e-9))
    micro = total / (world_size * accumulation)
    if micro < data.crop_seconds:
        raise ConfigError(
            f"data.global_batch={total:g} s over {world_size} rank(s) x {accumulation} micro-batch(es) leaves "
            f"{micro:g} s a micro-batch, less than data.crop_seconds={data.crop_seconds:g}: a longest cut would not fit"
        )
    return BatchPlan("seconds", world_size, accumulation, micro, derived=True)


def keep_global_batch(saved_world: int, saved_accumulation: int, world_size: int) -> int:
    """The accumulation on `world_size` ranks that keeps a step of `saved_world` x `saved_accumulation`
    micro-batches; ConfigError when `world_size` does not divide it."""
    micro_batches = saved_world * saved_accumulation
    if micro_batches % world_size:
        raise ConfigError(
            f"the checkpoint ran {saved_world} rank(s) x {saved_accumulation} accumulation = {micro_batches} "
            f"micro-batches a step; {world_size} rank(s) cannot keep that global batch (not a divisor)"
        )
    return micro_batches // world_size


def epoch_size(data: DataConfig, histogram: list[int], bin_seconds: float) -> float:
    """Utterances (or seconds) of one pass over an index, from its duration histogram (by bin centre): `skip`
    leaves out cuts longer than crop_seconds, `crop` counts them at crop_seconds. What the loader hands out is a
    little less: the `batch_remainder` of every shard group and the cuts under the teacher's receptive field."""
    total = 0.0
    for i, count in enumerate(histogram):
        center = (i + 0.5) * bin_seconds
        if center > data.crop_seconds and data.long_cuts == "skip":
            continue
        total += count if data.batch_unit == "utterances" else count * min(center, data.crop_seconds)
    return total


def resolve_total_steps(cfg: Config, missing_ok: bool = False) -> tuple[Config, str]:
    """`cfg` with optim.total_steps derived from optim.epochs (unchanged without epochs) and a line saying how.

    Raises ConfigError when the index holds nothing usable, or when optim.total_steps is set to another value
    than the epochs give (a saved config.yaml holds the value this wrote). `missing_ok`: a train index that is not
    there yet leaves optim.total_steps null (`--print-config`, `--dry-run` before sharding), the line says so."""
    if cfg.optim.epochs is None:
        return cfg, ""
    if missing_ok and not Path(cfg.data.train_index).exists():
        return cfg, f"optim.epochs={cfg.optim.epochs:g}: {UNRESOLVED_STEPS.format(index=cfg.data.train_index)}"
    from .data.index import read_index

    index = read_index(cfg.data.train_index)
    size = epoch_size(cfg.data, index.duration_histogram, index.bin_seconds)
    assert cfg.data.global_batch is not None  # Config.validate: epochs need a global batch
    unit = "utterances" if cfg.data.batch_unit == "utterances" else "s"
    if size < cfg.data.global_batch:
        raise ConfigError(
            f"optim.epochs: {cfg.data.train_index} hands out {size:g} {unit} an epoch, less than one "
            f"data.global_batch={cfg.data.global_batch:g}"
        )
    steps = math.ceil(cfg.optim.epochs * size / cfg.data.global_batch)
    if cfg.optim.total_steps is not None and cfg.optim.total_steps != steps:
        raise ConfigError(
            f"optim.total_steps={cfg.optim.total_steps} but optim.epochs={cfg.optim.epochs:g} over "
            f"{cfg.data.train_index} gives {steps}: set optim.total_steps to null (the index changed, or both were set)"
        )
    cfg.check_schedule(steps)
    how = (
        f"optim.epochs={cfg.optim.epochs:g} x {size:g} {unit} an epoch ({cfg.data.train_index}, long cuts: "
        f"{cfg.data.long_cuts} at {cfg.data.crop_seconds:g} s) / {cfg.data.global_batch:g} {unit} a step "
        f"= {steps} steps"
    )
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, total_steps=steps)), how
