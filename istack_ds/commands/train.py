"""`istack train` (also `istack-train` and `launchers/train.py`): parse, check, build, train, close.

One machine, 2 CPU ranks (the demo):
    deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml
One node, 8 GPUs:
    deepspeed --num_gpus 8 launchers/train.py --config configs/paper_interleaved_eql.yaml
Four nodes (hostfile lists each node and its slots):
    deepspeed --num_nodes 4 --num_gpus 8 --hostfile launchers/hostfile.example \\
        launchers/train.py --config configs/paper_interleaved_eql.yaml
torchrun works too (free port, good for tests):
    torchrun --standalone --nproc_per_node 2 launchers/train.py --config configs/demo.yaml
Any config value can be overridden:  --set optim.total_steps=1000 --set growth.alpha=1
DeepSpeed options the config does not model:  --set deepspeed.extra.zero_optimization.contiguous_gradients=true

Before launching (one process, no process group, no launcher):
    istack train --config configs/demo.yaml --print-config     # resolved YAML + the DeepSpeed JSON
    istack train --config configs/demo.yaml --dry-run --nodes 4 --ranks-per-node 8
                                     # every pre-launch check, topology, shards, schedule, memory

Exit codes: 0 done, 2 bad config or input, or run.out_dir held by another run (nothing started), or a
checkpoint could not be written (disk full: the file and the reason named),
3 too many non-finite losses (a checkpoint was saved), 4 a collective failed (another rank died or
stopped answering; the message names it), 5 the data stream failed on a rank (every rank stops; the message names it),
6 no checkpoint to resume could be used (every rank stops; the message says why for each),
7 stopped by SIGTERM / SIGUSR1 or the launcher's death after every rank saved a checkpoint of the step it reached
(checkpoint.resume=auto continues from it), 8 stopped by a signal without a new checkpoint (a second SIGTERM, or
checkpoint.preempt_grace_s ran out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

from ..batching import UNRESOLVED_STEPS, plan_batches, resolve_total_steps
from ..config import Config, ConfigError, load_config
from . import HelpFormatter


def build_parser(prog: str = "istack train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.total_steps=1000 (repeatable)",
    )
    before = parser.add_mutually_exclusive_group()
    before.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved YAML and the generated DeepSpeed JSON, then exit (nothing is started)",
    )
    before.add_argument(
        "--dry-run",
        action="store_true",
        help="run every pre-launch check, print topology, shards per worker, the growth schedule and a memory "
        "estimate, then exit (nothing is started)",
    )
    parser.add_argument(
        "--nodes", type=int, default=None, help="with --print-config / --dry-run: plan for this many nodes"
    )
    parser.add_argument(
        "--ranks-per-node",
        type=int,
        default=None,
        help="with --print-config / --dry-run: plan for this many ranks per node (default: the launcher's, else 1)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser


def parse_args(argv=None, prog: str = "istack train") -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    planned = args.nodes is not None or args.ranks_per_node is not None
    if planned and not (args.print_config or args.dry_run):
        build_parser(prog).error("--nodes / --ranks-per-node plan a job: use them with --print-config or --dry-run")
    for name in ("nodes", "ranks_per_node"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            build_parser(prog).error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _collective_failed(e: RuntimeError) -> bool:
    text = str(e).lower()
    return "gloo" in text or "nccl" in text or "timed out" in text or type(e).__name__ == "DistBackendError"


@contextlib.contextmanager
def _planned_topology(args: argparse.Namespace):
    """--nodes / --ranks-per-node as the launcher variables preflight and the estimates read, while inside."""
    if args.nodes is None and args.ranks_per_node is None:
        yield
        return
    from ..dist import topology
    from ..startup import normalize_launcher_env

    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    normalize_launcher_env()
    now = topology()
    per_node = args.ranks_per_node if args.ranks_per_node is not None else now["ranks_per_node"]
    nodes = args.nodes if args.nodes is not None else now["nodes"]
    os.environ.update(WORLD_SIZE=str(nodes * per_node), LOCAL_WORLD_SIZE=str(per_node))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv=None, prog: str = "istack train") -> int:
    # No hub access at run time, ever: teachers load from local directories.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv, prog)
    try:
        with _planned_topology(args):
            cfg = load_config(args.config, args.overrides)
            # optim.epochs -> optim.total_steps from the train index (the run's config.yaml holds the result);
            # before launch a missing index leaves them to be resolved at launch
            steps_problem, steps_from = "", ""
            try:
                cfg, steps_from = resolve_total_steps(cfg, missing_ok=args.print_config or args.dry_run)
            except ValueError as e:
                if args.print_config:
                    raise
                steps_problem = str(e)  # reported with every other problem below
            if steps_from and os.environ.get("RANK", "0") == "0":
                print(f"istack_ds: {steps_from}", file=sys.stderr)
            if args.print_config:
                print_config(cfg, args.config)
                return 0
            if not args.dry_run:
                announce_start(cfg, args.config)
            # Bad paths stop the run here, before any process group starts; all of them at once.
            problems = pre_launch_problems(cfg)
            if steps_problem and steps_problem not in problems:  # an unreadable index is reported once
                problems.insert(0, steps_problem)
            if args.dry_run:
                return dry_run(cfg, args.config, problems)
            if problems:
                print_problems(problems)
                return 2
            from ..startup import check_master_port

            check_master_port()  # a free port for one process; a busy one the launcher or user gave: exit 2
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"istack_ds: {e}", file=sys.stderr)
        return 2
    return train(cfg)


def announce_start(cfg: Config, path: str) -> None:
    """One line on rank 0 as soon as the config is read, in the log's format: the imports and checks before the
    trainer's first line take seconds, a minute on a loaded machine, which should not pass in silence."""
    if os.environ.get("RANK", "0") == "0":
        print(
            f"{time.strftime('%H:%M:%S')} [r0] starting run `{cfg.run.name}` ({path}) on "
            f"{os.environ.get('WORLD_SIZE', '1')} rank(s) into {cfg.run.out_dir}: checking teacher, data and "
            "checkpoints, then building the student",
            file=sys.stderr,
            flush=True,
        )


def print_problems(problems: list[str]) -> None:
    """One line on stderr per pre-launch problem (each message as its check words it)."""
    for problem in problems:
        print(f"istack_ds: {problem}", file=sys.stderr)


def pre_launch_problems(cfg: Config) -> list[str]:
    """Every problem preflight finds, and a `deepspeed.extra` key that conflicts or is unknown."""
    from ..dist import world_size
    from ..preflight import preflight_problems  # torch: imported once the arguments are known good

    problems = preflight_problems(cfg)
    try:
        launch_deepspeed_json(cfg, world_size())
    except ValueError as e:
        if str(e) not in problems:  # a batch split this world size cannot make is reported once
            problems.append(str(e))
    return problems


def launch_deepspeed_json(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON of `world` ranks; with optim.total_steps not resolved yet (no train index) the
    scheduler's step counts say they are resolved at launch."""
    from ..deepspeed_json import deepspeed_json

    plan = plan_batches(cfg.data, cfg.deepspeed, world)
    if cfg.optim.total_steps is not None:
        return deepspeed_json(cfg, plan)
    # NOTE: any step count gives the same JSON but for the two entries replaced below
    stand_in = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, total_steps=10**9))
    ds = deepspeed_json(stand_in, plan)
    unresolved = UNRESOLVED_STEPS.format(index=cfg.data.train_index)
    ds["scheduler"]["params"].update(total_num_steps=unresolved, warmup_num_steps=unresolved)
    return ds


def train(cfg: Config) -> int:
    """Starts the process group and trains; the exit code says how it ended. A rank of several that did not end
    with 0 exits here (:func:`istack_ds.process_exit.exit_now`)."""
    from ..dist import init_distributed, setup_logging

    setup_logging()
    init_distributed(cfg.deepspeed.dist_timeout_s)
    setup_logging()  # again: the rank is known only now
    code = _train(cfg)
    import torch.distributed as dist

    if code and dist.is_initialized() and dist.get_world_size() > 1:
        from ..process_exit import exit_now

        exit_now(code)
    return code


def _train(cfg: Config) -> int:
    from .. import preemption
    from ..checkpoint import CheckpointError
    from ..checkpoint_write import CheckpointWriteError
    from ..data import DataError
    from ..dist import rank, unresponsive_ranks, world_size
    from ..preemption import PREEMPTED, Preempted
    from ..run_lock import lock_run
    from ..trainer import NonFiniteLossError, Trainer

    refused = lock_run(cfg.run.out_dir)  # before anything is written into it; every rank hears it
    if refused:
        print(f"istack_ds: rank {rank()}: {refused}", file=sys.stderr)
        return 2
    preemption.install(cfg.checkpoint.preempt_grace_s, rank(), world_size())
    try:
        Trainer(cfg).train()
    except Preempted as e:  # raised on every rank together, after the checkpoint was saved
        print(f"istack_ds: rank {rank()}: {e}", file=sys.stderr)
        return PREEMPTED
    except NonFiniteLossError as e:
        print(f"istack_ds: rank {rank()}: {e}", file=sys.stderr)
        return 3
    except DataError as e:  # raised on every rank together, naming the rank whose data failed
        print(f"istack_ds: rank {rank()}: {e}", file=sys.stderr)
        return 5
    except CheckpointError as e:  # raised on every rank together: no checkpoint to resume can be used
        print(f"istack_ds: rank {rank()}: {e}", file=sys.stderr)
        return 6
    except CheckpointWriteError as e:  # raised on every rank together: a rank could not write its files
        print(f"istack_ds: rank {rank()}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # A peer that died or hangs surfaces here as a failed collective (at the latest after
        # deepspeed.dist_timeout_s, which every process group has): say so plainly, naming the
        # rank whose heartbeat stopped, instead of leaving a bare backend trace.
        # NOTE: under NCCL the watchdog may abort the process first (TORCH_NCCL_ASYNC_ERROR_HANDLING);
        # the job still stops, with NCCL's own message instead of this one.
        if _collective_failed(e):
            print(
                f"istack_ds: rank {rank()}: a collective failed; {unresponsive_ranks()} "
                f"(deepspeed.dist_timeout_s={cfg.deepspeed.dist_timeout_s}): {e}",
                file=sys.stderr,
            )
            return 4
        raise
    return 0


# ---- --print-config ---------------------------------------------------------------------------


def print_config(cfg: Config, path: str) -> None:
    """The resolved YAML (as the run writes config.yaml) and the DeepSpeed JSON of this topology."""
    import yaml

    from ..dist import topology

    world = topology()["world_size"]
    print(f"# resolved config: {path} with its base chain and --set overrides (the run's config.yaml)")
    if cfg.optim.total_steps is None and cfg.optim.epochs is not None:
        print(f"# optim.total_steps: {UNRESOLVED_STEPS.format(index=cfg.data.train_index)}")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print(f"# DeepSpeed JSON on {world} rank(s) (the run's deepspeed.json)")
    print(json.dumps(launch_deepspeed_json(cfg, world), indent=1))


# ---- --dry-run --------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"


def model_state_bytes(params: int, precision: str, zero_stage: int, world: int) -> dict[str, float]:
    """Bytes per rank of weights, gradients, fp32 master weights and Adam moments of `params` trainable
    parameters, partitioned as ZeRO `zero_stage` does over `world` ranks (the ZeRO paper's accounting)."""
    low = 2 if precision == "bf16" else 4
    return {
        "weights": low * params / (world if zero_stage >= 3 else 1),
        "grads": low * params / (world if zero_stage >= 2 else 1),
        "fp32 master": 4 * params / world,
        "adam moments": 8 * params / world,
    }


def student_parameters(cfg: Config, depths: list[int]) -> dict[int, int]:
    """Trainable parameters of the student at each depth, built on the meta device (no memory, no weights)."""
    import torch

    from ..models.student import Student
    from ..models.teacher import read_teacher_info

    info = read_teacher_info(cfg.teacher.path)
    counts = {}
    with torch.device("meta"):
        for depth in depths:
            student = Student(cfg.student, cfg.loss, info, depth)
            counts[depth] = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return counts


def _or_none(fn, *args, **kwargs):
    """`fn(*args)`, or None when it raises ValueError (a problem pre_launch_problems already reported)."""
    try:
        return fn(*args, **kwargs)
    except ValueError:
        return None


def dry_run(cfg: Config, path: str, problems: list[str]) -> int:
    """Prints what the job would run on: topology, data split, schedule, memory (each part that its inputs
    allow), then every pre-launch problem; the exit code: 0 when there is none, else 2."""
    from ..data import check_shard_count, read_index
    from ..data.position import shards_per_worker
    from ..device import describe_device
    from ..dist import topology

    topo = topology()
    world, nodes, per_node = topo["world_size"], topo["nodes"], topo["ranks_per_node"]
    train = _or_none(read_index, cfg.data.train_index)
    workers = (
        None
        if train is None
        else _or_none(check_shard_count, train, world, cfg.data.num_workers, local_world_size=per_node)
    )
    readers = max(1, cfg.data.num_workers if workers is None else workers)
    print(f"config: {path} -> run `{cfg.run.name}` in {cfg.run.out_dir}")
    launched = "WORLD_SIZE" in os.environ
    print(
        f"topology: {nodes} node(s) x {per_node} rank(s) = {world} rank(s); {cfg.data.num_workers} DataLoader "
        f"worker(s) per rank (data.num_workers) -> {world * readers} shard readers"
        + ("" if launched else " (no launcher variables: plan a job with --nodes and --ranks-per-node)")
    )
    print(f"device: {describe_device(cfg, world)}")
    if train is None:
        print(f"train: {cfg.data.train_index} cannot be read (below)")
    else:
        counts = shards_per_worker(len(train.shards), world, per_node, readers)
        print(
            f"train: {len(train.shards)} shards, {train.seconds / 3600:.2f} h in {train.path}; shards per worker "
            f"and epoch: {min(counts)}..{max(counts)}"
        )
    plan = _or_none(plan_batches, cfg.data, cfg.deepspeed, world)
    print(f"batch: {plan.describe() if plan else 'no split on this world size (below)'}")
    valid = _or_none(read_index, cfg.data.valid_index) if cfg.data.valid_index else None
    if valid is not None:
        per_rank = shards_per_worker(len(valid.shards), world, per_node, 1)
        print(f"valid: {len(valid.shards)} shards in {valid.path}; shards per rank: {min(per_rank)}..{max(per_rank)}")
    else:
        print(f"valid: {f'{cfg.data.valid_index} cannot be read (below)' if cfg.data.valid_index else 'none'}")

    print_schedule(cfg)
    print_memory(cfg, world)
    if problems:
        print_problems(problems)
        print(f"dry run: {len(problems)} pre-launch problem(s) above; nothing was started", file=sys.stderr)
        return 2
    print("dry run: every pre-launch check passed; nothing was started")
    return 0


def print_schedule(cfg: Config) -> None:
    """The growth schedule's table; its depths alone while the steps wait for the train index."""
    from ..growth import Schedule

    g = cfg.growth
    how = f"boundaries {g.boundaries}" if g.boundaries is not None else f"alpha {g.alpha:g}"
    epochs = f" (optim.epochs={cfg.optim.epochs:g})" if cfg.optim.epochs is not None else ""
    if cfg.optim.total_steps is None:
        steps = UNRESOLVED_STEPS.format(index=cfg.data.train_index)
        print(f"growth schedule: operator {g.operator}, {how}, stage depths {g.stage_depths}{epochs}; {steps}")
        return
    schedule = Schedule.from_config(g, cfg.optim.steps)
    print(f"growth schedule: operator {g.operator}, {how}, {cfg.optim.steps} steps{epochs}")
    print(f"  {'stage':>5}  {'depth':>5}  {'first step':>10}  {'steps':>8}")
    ends = [*schedule.boundaries, schedule.total_steps]
    for i, (depth, start, end) in enumerate(zip(schedule.depths, schedule.starts, ends)):
        print(f"  {i + 1:>5}  {depth:>5}  {start:>10}  {end - start:>8}")


def print_memory(cfg: Config, world: int) -> None:
    """Model-state bytes per rank at each stage depth (needs the teacher's config)."""
    ds = cfg.deepspeed
    params = _or_none(student_parameters, cfg, cfg.growth.stage_depths)
    print(
        f"memory estimate per rank, model states only (weights, gradients, fp32 master weights, Adam moments; "
        f"no activations, teacher, buffers or allocator overhead): {ds.precision}, ZeRO {ds.zero_stage} on "
        f"{world} rank(s)" + ("" if params else f": needs the teacher's config in {cfg.teacher.path} (below)")
    )
    if not params:
        return
    names = list(model_state_bytes(0, ds.precision, ds.zero_stage, world))
    print(f"  {'depth':>5}  {'params':>12}  " + "  ".join(f"{n:>12}" for n in [*names, "total"]))
    for depth, n in params.items():
        parts = model_state_bytes(n, ds.precision, ds.zero_stage, world)
        cells = "  ".join(f"{_size(v):>12}" for v in [*parts.values(), sum(parts.values())])
        print(f"  {depth:>5}  {n:>12,}  {cells}")


if __name__ == "__main__":
    sys.exit(main())
