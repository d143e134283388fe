"""The run configuration: one typed tree, YAML files set values, `--set a.b=v` overrides.

- :mod:`istack_ds.config.sections`: one dataclass per section (``run``, ``data``, ... ``eval``), a docstring
  under every field and a default that is the paper's recipe where the paper gives one; each section checks
  itself.
- :mod:`istack_ds.config.tree`: :class:`Config` (the tree, checks across sections, the growth schedule
  included) and :func:`load_config` (YAML with ``base:`` chains, ``--set`` overrides).
- :mod:`istack_ds.config.values`: each leaf checked and coerced against its annotation; :class:`ConfigError`,
  whose message names the dotted key (and, for choices, the allowed values); :func:`field_docs`.

Checks that read files (teacher, shard indexes, ``checkpoint.resume``) are in :mod:`istack_ds.preflight`. The
DeepSpeed JSON is derived from this tree by :func:`istack_ds.deepspeed_json.deepspeed_json`, never kept beside
the YAML.

This package does not import torch: configs load and validate before any process group or heavy import exists.
"""

from istack_ds.config.sections import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    GrowthConfig,
    LogConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
)
from istack_ds.config.tree import Config, load_config
from istack_ds.config.values import ConfigError, field_docs

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "GrowthConfig",
    "LogConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "StudentConfig",
    "TeacherConfig",
    "field_docs",
    "load_config",
]
