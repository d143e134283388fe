"""Checks that need no process group: run before any rank starts talking to another.

What a config alone decides is checked when it loads (:mod:`istack_ds.config`); this
module checks the config against what lies on disk and the job's launcher variables.
A missing teacher dir, a teacher layer that does not exist, a teacher whose sample rate
or CNN depth does not fit the config, an int8 teacher on a GPU, a `checkpoint.resume`
that is not a checkpoint, a missing or empty shard index, too few shards for the job's
nodes x ranks x workers: each stops the run with a message naming the path or key.
"""

from __future__ import annotations

from pathlib import Path

from .config import Config, ConfigError
from .dist import normalize_launcher_env, ranks_per_node, world_size
from .models.student import check_init
from .models.teacher import RANDOM_MARKER, TeacherInfo, check_teacher_layers, read_teacher_info
from .run_dir import check_run_dir


def preflight(cfg: Config) -> None:
    normalize_launcher_env()  # WORLD_SIZE under srun too
    if cfg.teacher.dtype == "int8":
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().device_name()
        if device != "cpu":
            raise ConfigError(
                f"teacher.dtype=int8 runs on CPU only (quantized Linear kernels), this job runs on "
                f"{device}: use teacher.dtype=bf16"
            )
    from .metrics import check_monitors

    check_monitors(cfg.log.monitors)  # wandb missing: refused here, not on rank 0 alone inside the run
    from .batching import plan_batches

    plan_batches(cfg.data, cfg.deepspeed, world_size())  # a global batch this world size cannot split
    info = read_teacher_info(cfg.teacher.path)
    check_teacher_layers(info, cfg.loss.teacher_layers)
    check_teacher_fits(cfg, info)
    check_teacher_trained(cfg, info)
    check_init(cfg.student, info, cfg.growth.stage_depths[0])
    check_resume(cfg)
    check_run_dir(cfg)  # writable, room for a checkpoint: found now, not at the first save
    from .data import check_shard_count, read_index

    train = read_index(cfg.data.train_index)
    world = world_size()
    if cfg.data.valid_index:
        # NOTE: found here, not at the first validation hours into the run
        check_shard_count(read_index(cfg.data.valid_index), world, cfg.data.num_workers, held_out=True)
    # NOTE: the loader checks this again when it is built; here it stops the job before any process group.
    check_shard_count(train, world, cfg.data.num_workers, local_world_size=ranks_per_node(world))


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
        paths, _ = candidates(cfg, world_size())
        if paths:
            check_fits(read_meta(paths[0]), cfg, paths[0], world_size())
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        raise ConfigError(f"checkpoint.resume={resume!r}: {e}") from None
