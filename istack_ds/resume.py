"""How a run starts: which checkpoint it continues from, whether that fits, and the copy that loads here.

One module decides it for both callers, preflight (before any process group) and the trainer
(after): :func:`candidates` reads ``checkpoint.resume`` (``none``, ``auto`` = every complete
checkpoint that verifies, newest first, or one path); :func:`check_fits` refuses a checkpoint
whose student shapes differ, whose depth is ahead of this config's schedule, or whose global
batch this world size cannot keep; :func:`batch_plan` is the one batch plan of a run, resumed
or not; :func:`loadable_copy` converts a checkpoint of another world size (rank 0, the others
wait). :func:`agreed_candidates` is the trainer's collective view: rank 0 lists, every rank gets
the same list or the same error.

The trainer owns the one branch "fresh or resumed" (:meth:`istack_ds.trainer.Trainer.start`)
and its own counters (``state_dict`` / ``load_state_dict``); the loader owns its data position
(``ShardLoader.restore``); :mod:`istack_ds.checkpoint` owns the files.
"""

from __future__ import annotations

from pathlib import Path

from .batching import BatchPlan, plan_batches
from .checkpoint import Checkpointer, CheckpointError, convert_to_universal, universal_path, verify
from .config import Config, ConfigError
from .device import settle_optimizer_states
from .dist import broadcast_from_main, gather_all, is_main, log0, rank, run_on_main
from .growth import Schedule
from .models.teacher import teacher_digest

#: How long the other ranks wait for rank 0 to convert a checkpoint of another world size.
CONVERT_WAIT_S = 6 * 3600

#: Config fields a resume must keep, each with why: a checkpoint made with other values cannot be loaded into
#: the engine this config builds.
KEPT_FIELDS = {
    ("student", "hidden_size"): "the student's shapes differ",
    ("student", "intermediate_size"): "the student's shapes differ",
    ("student", "num_attention_heads"): "the student's shapes differ",
    ("student", "conv_dim"): "the student's shapes differ",
    ("student", "frontend"): "the student's parameters differ (a shared frontend has no CNN of its own)",
    ("loss", "kind"): "the student's shapes differ",
    ("loss", "teacher_layers"): "the student's shapes differ",
    ("deepspeed", "zero_stage"): (
        "DeepSpeed's optimizer files are partitioned per ZeRO stage and do not load into another "
        "(to carry the weights, not the optimizer state, into a run of another stage: `istack export` the checkpoint "
        "and start that run with student.init=pretrained and student.init_from=<the export>)"
    ),
}

#: Keys that say how a run is run, not what it trains: no line in the resume's list of config changes.
BOOKKEEPING_KEYS = ("checkpoint.resume", "checkpoint.allow_other_teacher", "run.out_dir")


def candidates(cfg: Config, world: int, content: bool = True, first: bool = False) -> tuple[list[Path], list[str]]:
    """The checkpoints to try, newest first, and a note for each one passed over (no collective). `content`,
    `first`: see :meth:`Checkpointer.candidates` (preflight hashes on one rank and only up to the first good one).

    Raises CheckpointError when ``checkpoint.resume`` names no usable checkpoint, and for ``auto``
    when checkpoints exist but none verifies or all were saved at a divergence: never a silent restart
    from step 0 over a run's checkpoints (and its TensorBoard history).
    """
    resume = cfg.checkpoint.resume
    if resume == "none":
        return [], []
    if resume == "auto":
        checkpointer = Checkpointer(Path(cfg.run.out_dir) / "checkpoints", cfg.checkpoint.keep)
        good, notes = checkpointer.candidates(world, content, first)
        if notes and not good:
            raise CheckpointError(
                f"no checkpoint in {checkpointer.dir} can be resumed ({'; '.join(notes)}); to start the run over, set "
                "checkpoint.resume=none (the old checkpoints are then set aside, not deleted)"
            )
        return good, notes
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory; use `auto`, `none` or the path of a checkpoint directory "
            "(<out_dir>/checkpoints/stepNNNNNNNN)"
        )
    meta = verify(path, content)  # an explicit choice: no fallback, the error names what is wrong with it
    return [path], [f"{path} was saved when the run diverged: resumed as asked"] if meta.get("diverged") else []


def agreed_candidates(cfg: Config, world: int) -> list[Path]:
    """:func:`candidates` as rank 0 lists them, on every rank (a collective); its error raised on every rank."""
    listed = None
    if is_main():
        try:
            paths, notes = candidates(cfg, world)
            listed = ([str(p) for p in paths], notes, "")
        except (CheckpointError, OSError) as e:  # raised on every rank below, not on rank 0 alone
            listed = ([], [], str(e))
    paths, notes, error = broadcast_from_main(listed)
    for note in notes:
        log0("checkpoint: %s", note)
    if error:
        raise CheckpointError(error)
    return [Path(p) for p in paths]


def check_fits(meta: dict, cfg: Config, path: Path, world: int) -> None:
    """Refuses (CheckpointError naming the field) a checkpoint this config and world size cannot continue."""
    check_compatible(meta, cfg.to_dict(), path)
    check_teacher(meta, cfg, path)
    planned = Schedule.from_config(cfg.growth, cfg.optim.steps).depth_at(meta["step"])
    if planned < meta["depth"]:  # a student cannot shrink
        raise CheckpointError(
            f"checkpoint {path} (step {meta['step']}) has depth {meta['depth']}, but this config's schedule has "
            f"depth {planned} at step {meta['step']}: a student cannot shrink; restore the growth.* settings the "
            "checkpoint was made with, or resume from an earlier checkpoint"
        )
    batch_plan(cfg, world, meta, path)


def misfit(meta: dict, cfg: Config, path: Path, world: int) -> str:
    """ "" when checkpoint `path` fits this config and world size (:func:`check_fits`), else why not, for the
    trainer to try the previous candidate (checkpoint.resume=auto: preflight checked only the newest one); a
    checkpoint named by path is refused (CheckpointError)."""
    try:
        check_fits(meta, cfg, path, world)
    except CheckpointError as e:
        if cfg.checkpoint.resume != "auto":
            raise
        log0("checkpoint %s does not fit this run (%s): trying the previous one", path, e)
        return str(e)
    return ""


def check_compatible(meta: dict, config: dict, path: str | Path) -> None:
    """Refuses a checkpoint whose model shape differs from what `config` builds, naming the field."""
    saved = meta.get("config", {})
    for (section, key), why in KEPT_FIELDS.items():
        old, new = saved.get(section, {}).get(key), config[section][key]
        if old != new:
            raise CheckpointError(
                f"checkpoint {path} was made with {section}.{key}={old!r} but this run has {section}.{key}={new!r}: "
                f"{why}; resume with the checkpoint's value or set checkpoint.resume=none"
            )


def recorded_config(cfg: Config, digest: str) -> dict:
    """What a checkpoint's marker records of the config: the config itself and `digest`, the digest of the teacher
    the run loaded (:func:`istack_ds.models.teacher.teacher_digest`, taken once at start: a teacher directory
    removed or re-saved during a long run neither stops a save nor is recorded as the run's teacher), which
    :func:`check_teacher` compares on resume."""
    return {"config": cfg.to_dict(), "teacher_digest": digest}


def check_teacher(meta: dict, cfg: Config, path: str | Path) -> None:
    """Refuses a checkpoint distilled from another teacher (by config.json and weight files) unless
    ``checkpoint.allow_other_teacher``; a checkpoint without a digest (older versions) passes unchecked."""
    saved = meta.get("teacher_digest")
    if saved is None or cfg.checkpoint.allow_other_teacher:
        return
    now = teacher_digest(cfg.teacher.path)
    if saved != now:
        was = meta.get("config", {}).get("teacher", {}).get("path")
        raise CheckpointError(
            f"checkpoint {path} was distilled from teacher {was} (digest {saved[:12]}) but this run's teacher "
            f"{cfg.teacher.path} differs (digest {now[:12]}: another config.json or other weight files); the "
            "student learnt the old teacher's layers: restore teacher.path, or set checkpoint.allow_other_teacher=true "
            "to continue with this teacher anyway"
        )


def flat(config: dict, prefix: str = "") -> dict:
    """A nested config as ``{"section.key": value}``."""
    out: dict = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        out.update(flat(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def config_changes(saved: dict, now: dict) -> list[str]:
    """One line per key whose value differs between the checkpoint's flattened config `saved` and this run's
    `now` (``key: old -> new``), in key order; the run's bookkeeping (:data:`BOOKKEEPING_KEYS`) left out."""
    missing = "(absent)"
    return [
        f"{key}: {saved.get(key, missing)!r} -> {now.get(key, missing)!r}"
        for key in sorted(saved.keys() | now.keys())
        if key not in BOOKKEEPING_KEYS and saved.get(key, missing) != now.get(key, missing)
    ]


def batch_plan(cfg: Config, world: int, meta: dict | None = None, path: Path | None = None) -> BatchPlan:
    """The batch plan of a run on `world` ranks, fresh (`meta` None) or resumed from the checkpoint `meta`:
    without data.global_batch a resume on another world size keeps the checkpoint's global batch
    (:func:`istack_ds.batching.plan_batches` with ``saved``)."""
    if meta is None:
        return plan_batches(cfg.data, cfg.deepspeed, world)
    saved = (
        meta.get("world_size", world),
        meta.get("gradient_accumulation", cfg.deepspeed.gradient_accumulation),
    )
    try:
        return plan_batches(cfg.data, cfg.deepspeed, world, saved)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def loadable_copy(path: Path, meta: dict, world: int) -> Path:
    """`path`, or its universal conversion when it was saved by another world size (made by rank 0)."""
    if meta.get("world_size", world) == world or meta.get("universal"):
        return path
    log0("checkpoint %s was saved by %d rank(s), this run has %d: converting", path, meta["world_size"], world)

    def convert() -> str:
        convert_to_universal(path, log=lambda msg: log0("%s", msg))
        return ""

    # NOTE: the other ranks wait on the store (up to CONVERT_WAIT_S), not in a collective bounded by
    # deepspeed.dist_timeout_s: converting a large model takes longer.
    error = run_on_main(f"convert:{path}", convert, CONVERT_WAIT_S)
    if error:
        raise CheckpointError(f"converting {path} failed: {error}")
    return universal_path(path)


def load_on_every_rank(checkpointer: Checkpointer, engine, path: Path) -> tuple[dict | None, list[str]]:
    """Loads `path` into `engine` on every rank: this rank's state and, when any rank failed, every rank's
    error (the same list on all ranks, so all try the previous checkpoint together). A collective."""
    rank_state, error = None, ""
    try:
        configured = group_hyperparameters(engine)
        rank_state = checkpointer.load(engine, path)
        # NOTE: a universal load leaves AdamW's `step` on the CPU, where the fused CUDA kernel cannot read it, and
        # under ZeRO-3 one `step` tensor for every partition
        settle_optimizer_states(engine.optimizer)
        restore_group_hyperparameters(engine, configured)
        apply_configured_lr(engine)
    except Exception as e:  # noqa: BLE001 -- a corrupt file raises whatever its reader raises
        error = f"rank {rank()}: {type(e).__name__}: {e}"
    return rank_state, [e for e in gather_all(error) if e]


#: The hyperparameters of each AdamW parameter group that the config sets (:func:`istack_ds.engine.param_groups`,
#: :func:`istack_ds.engine.fused_adamw`); the LR is the scheduler's (:func:`apply_configured_lr`).
GROUP_HYPERPARAMETERS = ("name", "weight_decay", "betas", "eps")


def group_hyperparameters(engine) -> list[dict]:
    """:data:`GROUP_HYPERPARAMETERS` of each parameter group of the engine's torch optimizer, in order."""
    return [{k: g[k] for k in GROUP_HYPERPARAMETERS if k in g} for g in _torch_optimizer(engine).param_groups]


def _torch_optimizer(engine):
    """The torch optimizer inside DeepSpeed's ZeRO optimizer (or the engine's own, when it has no wrapper)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def restore_group_hyperparameters(engine, configured: list[dict]) -> None:
    """Gives each parameter group back the hyperparameters this config built it with (`configured`).

    NOTE: ZeRO-3's universal load (deepspeed==0.19.8, stage3.py) gives every group the first group's
    hyperparameters and name: the biases and norms (``no_decay``, weight decay 0) would decay from the first step
    on. A changed optim.weight_decay, betas or eps applies from the first step, as a changed LR does.
    """
    for group, values in zip(_torch_optimizer(engine).param_groups, configured, strict=True):
        group.update(values)


def apply_configured_lr(engine) -> None:
    """Sets the optimizer's LR to what this config's schedule gives at the loaded step, before the first step.

    The loaded optimizer state carries the checkpoint's LR, and ``lr_scheduler.load_state_dict`` (the step
    only) does not push the LR of this config's scheduler (built from optim.lr, warmup and total steps) into it:
    without this, a resume with another optim.lr runs its first step at the checkpoint's LR.
    """
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        scheduler.step(scheduler.last_batch_iteration)


def replanned(meta: dict, schedule: Schedule, depth: int) -> bool:
    """True when this config's schedule is ahead of the checkpoint's depth at its step and the checkpoint's own
    schedule was not (its config no longer loading counts as different).

    A checkpoint saved at a growth boundary before that growth is behind its own schedule too: only a
    depth that differs from the one its own schedule planned is a re-plan.
    """
    planned = schedule.depth_at(meta["step"])
    if planned <= depth:
        return False
    try:
        saved = Config.from_dict(meta["config"])
        return planned != Schedule.from_config(saved.growth, saved.optim.steps).depth_at(meta["step"])
    except (KeyError, TypeError, ValueError):
        return True
