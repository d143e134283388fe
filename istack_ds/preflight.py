"""Checks that need no process group: run before any rank starts talking to another.

What a config alone decides is checked when it loads (:mod:`istack_ds.config`); this
module checks the config against what lies on disk and the job's launcher variables.
A `run.device=cuda` that torch cannot use, a missing teacher dir, a teacher layer that does not
exist, a teacher whose sample rate or CNN depth does not fit the config, an int8 teacher on a GPU, a `checkpoint.resume`
that is not a checkpoint, a missing or empty shard index, too few shards for the job's
nodes x ranks x workers: each stops the run with a message naming the path or key, and every
problem found is reported at once (:class:`PreflightError`), so one round trip shows them all.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config, ConfigError
from .device import check_run_device
from .dist import ranks_per_node, world_size
from .models.student import check_init
from .models.teacher import RANDOM_MARKER, TeacherInfo, check_teacher_layers, read_teacher_info
from .run_dir import check_run_dir
from .startup import normalize_launcher_env


class PreflightError(ConfigError):
    """Every problem preflight found, one message each (its str: one per line)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems
        """Each problem's message, in the order of the checks."""


def preflight(cfg: Config) -> None:
    """Runs every check; raises :class:`PreflightError` listing all the problems found, not just the first."""
    problems = preflight_problems(cfg)
    if problems:
        raise PreflightError(problems)


def preflight_problems(cfg: Config) -> list[str]:
    """The message of each check that fails. A check that needs what an earlier one could not read (the
    teacher's config, the train index) is left out, so each cause is reported once."""
    normalize_launcher_env()  # WORLD_SIZE under srun too
    problems: list[str] = []

    def check(fn, *args, **kwargs):
        """`fn(*args)`, its ValueError (ConfigError, DataError, TeacherError) recorded; None when it failed."""
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            problems.append(str(e))
            return None

    world = world_size()
    check(check_run_device, cfg)  # before anything asks DeepSpeed for its accelerator
    check(check_device, cfg)
    from .metrics import check_monitors

    check(check_monitors, cfg.log.monitors)  # wandb missing: refused here, not on rank 0 alone inside the run
    from .batching import plan_batches

    check(plan_batches, cfg.data, cfg.deepspeed, world)  # a global batch this world size cannot split
    info = check(read_teacher_info, cfg.teacher.path)
    found = len(problems)
    if info is not None:
        check(check_teacher_layers, info, cfg.loss.teacher_layers)
        check(check_teacher_fits, cfg, info)
        check(check_teacher_trained, cfg, info)
        check(check_init, cfg.student, info, cfg.growth.stage_depths[0])
    student_known = info is not None and len(problems) == found
    check(check_resume, cfg)
    check(check_run_dir, cfg, student_known)  # writable, room for a checkpoint: found now, not at the first save
    from .data import check_shard_count, read_index

    train = check(read_index, cfg.data.train_index)
    if cfg.data.valid_index:
        valid = check(read_index, cfg.data.valid_index)
        if valid is not None:
            # NOTE: found here, not at the first validation hours into the run
            check(check_shard_count, valid, world, cfg.data.num_workers, held_out=True)
    if train is not None:
        # NOTE: the loader checks this again when it is built; here it stops the job before any process group.
        check(check_shard_count, train, world, cfg.data.num_workers, local_world_size=ranks_per_node(world))
    return problems


def check_device(cfg: Config) -> None:
    """An int8 teacher runs on CPU only."""
    if cfg.teacher.dtype != "int8":
        return
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().device_name()
    if device != "cpu":
        raise ConfigError(
            f"teacher.dtype=int8 runs on CPU only (quantized Linear kernels), this job runs on "
            f"{device}: use teacher.dtype=bf16"
        )


def check_teacher_fits(cfg: Config, info: TeacherInfo) -> None:
    """The teacher hears audio at `data.sample_rate`, and a `student.conv_dim` has one entry per teacher conv layer."""
    preprocessor = Path(info.path) / "preprocessor_config.json"
    if info.sample_rate is None:
        # NOTE: refused rather than assumed: a teacher fed audio at the wrong rate trains a student on
        # garbage targets without any error.
        raise ConfigError(
            f"teacher {info.path} declares no sample rate ({preprocessor} with `sampling_rate` is missing), so "
            f"data.sample_rate={cfg.data.sample_rate} cannot be checked against it: save the teacher's feature "
            "extractor into that directory (`save_pretrained`)"
        )
    if info.sample_rate != cfg.data.sample_rate:
        raise ConfigError(
            f"data.sample_rate={cfg.data.sample_rate} but teacher {info.path} expects {info.sample_rate} Hz "
            f"(sampling_rate in {preprocessor}): set data.sample_rate={info.sample_rate}"
        )
    conv_dim = cfg.student.conv_dim
    if conv_dim is not None and len(conv_dim) != len(info.conv_kernel):
        raise ConfigError(
            f"student.conv_dim={conv_dim} has {len(conv_dim)} conv layers but teacher {info.path} has "
            f"{len(info.conv_kernel)} (the student's CNN takes the teacher's kernels and strides)"
        )


def check_teacher_trained(cfg: Config, info: TeacherInfo) -> None:
    """A teacher marked random (:data:`istack_ds.models.teacher.RANDOM_MARKER`) trains only with
    `teacher.allow_random`: its targets are noise, and a random teacher saved under a real model's name looks
    like one."""
    marker = Path(info.path) / RANDOM_MARKER
    if marker.exists() and not cfg.teacher.allow_random:
        raise ConfigError(
            f"teacher {info.path} has RANDOM weights ({marker}): a student distilled from it learns nothing about "
            'speech. Point teacher.path to a trained model (README "Getting a teacher"), or set '
            "teacher.allow_random=true to exercise the machinery on it (configs/demo.yaml does)"
        )


def check_resume(cfg: Config) -> None:
    """The checkpoint `checkpoint.resume` names (for `auto`: the newest that verifies) fits the config's shapes,
    schedule and this world size (:mod:`istack_ds.resume`, the rules the trainer applies)."""
    from .checkpoint import read_meta
    from .resume import candidates, check_fits

    resume = cfg.checkpoint.resume
    try:
        # NOTE: before any process group every rank runs this: only rank 0 reads the files to hash them, and only
        # up to the first good checkpoint (the run's own choice, on rank 0, verifies again).
        paths, _ = candidates(cfg, world_size(), content=os.environ.get("RANK", "0") == "0", first=True)
        if paths:
            check_fits(read_meta(paths[0]), cfg, paths[0], world_size())
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        raise ConfigError(f"checkpoint.resume={resume!r}: {e}") from None
