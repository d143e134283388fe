"""Checks that need no process group: run before any rank starts talking to another.

A missing teacher dir, a missing or empty shard index, too few shards for the
job's nodes x ranks x workers, a teacher layer that does not exist, an int8
teacher on a GPU: each stops the run with a message naming the path or key.
"""

from __future__ import annotations

from .config import Config, ConfigError
from .dist import normalize_launcher_env, ranks_per_node, world_size
from .models.teacher import check_teacher_layers, read_teacher_info


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
    info = read_teacher_info(cfg.teacher.path)
    check_teacher_layers(info, cfg.loss.teacher_layers)
    from .data import check_shard_count, read_index

    train = read_index(cfg.data.train_index)
    world = world_size()
    if cfg.data.valid_index:
        # NOTE: found here, not at the first validation hours into the run
        check_shard_count(read_index(cfg.data.valid_index), world, cfg.data.num_workers, held_out=True)
    # NOTE: the loader checks this again when it is built; here it stops the job before any process group.
    check_shard_count(train, world, cfg.data.num_workers, local_world_size=ranks_per_node(world))
