"""The run configuration as a whole: the typed tree, checks across its sections, reading it and writing it.

:func:`load_config` reads a YAML file (a top-level ``base: other.yaml`` is read first and merged under
it), applies ``--set a.b=v`` overrides and builds the :class:`Config` (an error starts with where its key
came from: the file, or ``--set a.b=v``), whose sections check themselves
and whose :meth:`Config.validate` checks across sections (the growth schedule included). A saved
config.yaml (or a checkpoint's meta) becomes a Config again through :meth:`Config.from_dict`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..growth.schedule import Schedule
from . import sections
from .values import ConfigError, _build


@dataclass
class Config:
    run: sections.RunConfig = field(default_factory=sections.RunConfig)
    data: sections.DataConfig = field(default_factory=sections.DataConfig)
    teacher: sections.TeacherConfig = field(default_factory=sections.TeacherConfig)
    student: sections.StudentConfig = field(default_factory=sections.StudentConfig)
    loss: sections.LossConfig = field(default_factory=sections.LossConfig)
    growth: sections.GrowthConfig = field(default_factory=sections.GrowthConfig)
    optim: sections.OptimConfig = field(default_factory=sections.OptimConfig)
    deepspeed: sections.DeepSpeedConfig = field(default_factory=sections.DeepSpeedConfig)
    log: sections.LogConfig = field(default_factory=sections.LogConfig)
    checkpoint: sections.CheckpointConfig = field(default_factory=sections.CheckpointConfig)
    eval: sections.EvalConfig = field(default_factory=sections.EvalConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checks that span sections."""
        first_depth = self.growth.stage_depths[0]
        if self.loss.kind == "l2l" and len(self.loss.teacher_layers) > first_depth:
            raise ConfigError(
                f"loss.teacher_layers={self.loss.teacher_layers} needs {len(self.loss.teacher_layers)} supervised "
                f"student layers but the student starts at depth {first_depth} (growth.depths)"
            )
        if self.data.global_batch is not None and self.deepspeed.gradient_accumulation != 1:
            raise ConfigError(
                f"deepspeed.gradient_accumulation={self.deepspeed.gradient_accumulation}: with data.global_batch "
                "the accumulation is derived from the world size (bound the micro-batch with data.max_micro_batch)"
            )
        if self.optim.epochs is not None and self.data.global_batch is None:
            raise ConfigError(
                f"optim.epochs={self.optim.epochs:g} needs data.global_batch: without it a step's batch grows with the "
                "world size, and so would the steps of an epoch"
            )
        if self.optim.total_steps is not None:
            self.check_schedule(self.optim.total_steps)

    def check_schedule(self, total_steps: int) -> None:
        """The growth schedule over `total_steps` steps is one the Trainer can run (ConfigError naming growth.*)."""
        if self.growth.boundaries and self.growth.boundaries[-1] >= total_steps:
            raise ConfigError(
                f"growth.boundaries={self.growth.boundaries} must lie below optim.total_steps={total_steps}"
            )
        if self.growth.operator != "none" and len(self.growth.depths) > total_steps:
            raise ConfigError(f"optim.total_steps={total_steps} is fewer than the {len(self.growth.depths)} stages")
        # NOTE: the schedule the Trainer builds, built here too: a degenerate one stops the run before launch.
        try:
            Schedule.from_config(self.growth, total_steps)
        except ValueError as e:
            g = self.growth
            chosen_by, fix = (
                (f"growth.boundaries={g.boundaries}", "")
                if g.boundaries is not None
                else (f"growth.alpha={g.alpha}", "; use more steps, another growth.alpha or explicit growth.boundaries")
            )
            raise ConfigError(
                f"{chosen_by} with growth.depths={g.depths} and optim.total_steps={total_steps}: {e}{fix}"
            ) from None

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """A config from nested ``{section: {key: value}}`` (a saved config.yaml, a checkpoint's meta),
        checked like :func:`load_config`: unknown keys, types and values are errors naming the key."""
        return _build(cls, values, "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


# ---- loading -----------------------------------------------------------------------


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override `{item}` must look like section.key=value")
    key, raw = item.split("=", 1)
    # YAML parses numbers, booleans, lists ([3,6,12]) and null the way a config file would.
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: the value is not valid YAML ({_yaml_problem(e)})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and, when known, where (line and column, counted from 1)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def merge(base: dict, top: dict) -> dict:
    """`base` with `top` laid over it, mapping by mapping (a base config under its file, `deepspeed.extra`)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Reads a config file; a top-level `base: other.yaml` (relative to this file) is loaded first and merged
    under it."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: `base` chain loops back to itself")
    with open(path) as f:
        try:
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML, {_yaml_problem(e)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: `base` must be the name of one config file, not {base!r}")
    return merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), loaded)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a YAML config (or the defaults), applies `a.b=v` overrides, validates."""
    values: dict = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        keys, value = _parse_override(item)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override `{item}`: `{k}` is not a section")
        node[keys[-1]] = value
    try:
        return Config.from_dict(values)
    except ConfigError as e:
        source = blame(str(e), path, overrides)
        if source is not None:
            raise ConfigError(f"{source}: {e}") from None
        raise


def blame(message: str, path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...]) -> str | None:
    """Where the key an error names came from: ``--set KEY=VALUE`` (the last override of a key the message
    names), else the config file, else None (defaults only)."""
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        # NOTE: the whole dotted key: `optim.lr` is not named by a message about `optim.lr_min`.
        if key and re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message):
            return f"--set {item}"
    return None if path is None else str(path)
