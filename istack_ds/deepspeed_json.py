"""The DeepSpeed JSON: generated from the run config and the batch plan, ``deepspeed.extra`` merged in, checked.

The JSON is never kept beside the YAML: :func:`deepspeed_json` derives it from the typed
config (:class:`istack_ds.config.Config`) and the one :class:`istack_ds.batching.BatchPlan`
of the world size (accumulation and ranks come from the plan only), merges the keys of
``deepspeed.extra`` that the config does not model (:func:`merge_extra`, which refuses an
``extra`` key that would move a value istack_ds sets from another setting, :data:`OWNED_KEYS`),
and checks the result with DeepSpeed's own config classes (:func:`check_json`), so a bad key
stops the run before launch with an error naming it.

There is no optimizer section: :func:`istack_ds.engine.build_engine` builds the optimizer from
``cfg.optim``. DeepSpeed is imported only inside :func:`check_json`.
"""

from __future__ import annotations

import copy
from typing import Any

from .batching import BatchPlan
from .config import Config, ConfigError, DeepSpeedConfig
from .config.tree import merge

#: Keys of the DeepSpeed JSON set from other settings -> (that setting, value when the JSON leaves it out).
#: NOTE: DeepSpeed's `train_batch_size` x ranks bookkeeping, the ZeRO stage growth needs, the precision the
#: trainer casts for, and the client optimizer and LR schedule are built from these: `extra` may not move them.
OWNED_KEYS = {
    "train_batch_size": ("the world size x deepspeed.gradient_accumulation", None),
    "train_micro_batch_size_per_gpu": ("data.batch_seconds (batches are built by duration)", None),
    "gradient_accumulation_steps": ("deepspeed.gradient_accumulation", None),
    "zero_optimization.stage": ("deepspeed.zero_stage", None),
    "bf16.enabled": ("deepspeed.precision", False),
    "fp16.enabled": ("deepspeed.precision", False),
    "amp.enabled": ("deepspeed.precision", False),
    "gradient_clipping": ("optim.grad_clip", None),
    "optimizer": ("the optim section (istack_ds builds torch AdamW)", None),
    "scheduler": ("optim.lr, optim.warmup_fraction and optim.total_steps", None),
    "checkpoint.load_universal": ("checkpoint.resume (set when resuming a universal checkpoint)", None),
    "communication_data_type": ("deepspeed.communication_data_type", None),
    "zero_optimization.overlap_comm": ("deepspeed.overlap_comm", None),
    "zero_optimization.reduce_bucket_size": ("deepspeed.reduce_bucket_size", None),
    "zero_optimization.allgather_bucket_size": ("deepspeed.allgather_bucket_size", None),
    "zero_optimization.stage3_param_persistence_threshold": ("deepspeed.stage3_param_persistence_threshold", None),
}

#: ``deepspeed.extra`` choices that do not work with istack_ds's client optimizer (torch's fused AdamW,
#: :func:`istack_ds.engine.fused_adamw`, whose states growth carries: :mod:`istack_ds.zero_states`) -> why.
#: NOTE: DeepSpeed's config classes accept them; ``deepspeed.initialize`` raises only after the process group,
#: the teacher and the data have started.
CLIENT_OPTIMIZER_REFUSES = {
    "zero_optimization.offload_optimizer": (
        "deepspeed.initialize refuses ZeRO-Offload of the optimizer with a client optimizer (ZeRORuntimeException: "
        "it wants DeepSpeed's CPU Adam), and growth's state surgery is untested with offloaded states"
    ),
    "zero_optimization.offload_param": (
        "growth's state surgery (gathers and writes of every ZeRO-3 partition) is untested with offloaded parameters"
    ),
}


def deepspeed_json(cfg: Config, plan: BatchPlan, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON of a run of `cfg` with the batch plan `plan` (generated, never stored).

    ``plan`` gives the world size and the gradient accumulation (a resume on another world size keeps the global
    batch by passing the plan with its accumulation); ``load_universal`` loads a universal checkpoint (any world
    size). ``deepspeed.extra`` is merged in last and the result checked by DeepSpeed's config classes: a
    conflicting or unknown key raises ConfigError naming it.
    """
    opt, dsc = cfg.optim, cfg.deepspeed
    ds: dict[str, Any] = {
        # Batches are built by duration, not count: DeepSpeed only needs a
        # consistent (micro=1) x accumulation x world_size for its bookkeeping.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.world_size * plan.accumulation,
        "gradient_clipping": opt.grad_clip,
        "steps_per_print": 10**9,  # our own log line replaces DeepSpeed's
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": dsc.zero_stage,
            "overlap_comm": dsc.overlap_comm,
            "reduce_bucket_size": dsc.reduce_bucket_size,
        },
        "communication_data_type": dsc.communication_data_type,
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": opt.lr,
                "warmup_num_steps": max(1, opt.warmup_steps),
                "total_num_steps": opt.steps,
                "warmup_type": "linear",
            },
        },
    }
    if dsc.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    # NOTE: each key only where DeepSpeed reads it (ZeRO-3 has no allgather bucket, ZeRO-1/2 no persistence).
    if dsc.zero_stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = dsc.stage3_param_persistence_threshold
    else:
        ds["zero_optimization"]["allgather_bucket_size"] = dsc.allgather_bucket_size
    ds = merge_extra(dsc, ds)
    check_client_optimizer(ds)
    check_json(ds)
    return ds


def merge_extra(deepspeed: DeepSpeedConfig, generated: dict) -> dict:
    """`generated` (the JSON istack_ds derives) with ``deepspeed.extra`` merged in, section by section; a key of
    :data:`OWNED_KEYS` that `extra` sets to another value raises ConfigError naming it and its setting."""
    missing = object()

    def lookup(tree: dict, dotted: str, default: Any = missing) -> Any:
        node: Any = tree
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    for dotted, (source, absent) in OWNED_KEYS.items():
        wanted = lookup(deepspeed.extra, dotted)
        if wanted is missing:
            continue
        have = lookup(generated, dotted, absent)
        if wanted != have:
            raise ConfigError(
                f"deepspeed.extra.{dotted}={wanted!r} conflicts with the value istack_ds sets from {source} "
                f"({have!r}): change that setting instead"
            )
    # A copy: DeepSpeed may edit the sections of the JSON it is given; the config must not change with them.
    return merge(generated, copy.deepcopy(deepspeed.extra))


def check_client_optimizer(ds: dict) -> None:
    """Refuses a choice of :data:`CLIENT_OPTIMIZER_REFUSES` (an offload to any device but `none`) with a
    ConfigError naming its ``deepspeed.extra`` key, before launch instead of in the running job."""
    for dotted, why in CLIENT_OPTIMIZER_REFUSES.items():
        section, key = dotted.split(".")
        value = ds.get(section, {}).get(key)
        if value and (not isinstance(value, dict) or value.get("device", "none") != "none"):
            raise ConfigError(
                f"deepspeed.extra.{dotted}={value!r} is refused: istack_ds gives DeepSpeed torch's fused AdamW "
                f"(built from the optim section), and {why}. Leave the key out; to fit a larger student raise "
                "deepspeed.zero_stage or the number of ranks"
            )


def check_json(ds: dict) -> None:
    """Checks a DeepSpeed JSON with DeepSpeed's own config classes, without a process group: values and the
    keys of its typed sections (e.g. `zero_optimization`) as DeepSpeed validates them, and every top-level key
    and every key of a section read through its `enabled` switch (e.g. `flops_profiler`) as one DeepSpeed
    reads. Raises ConfigError naming the key."""
    from deepspeed.runtime.config import DeepSpeedConfig as DeepSpeedJson

    reads: dict[str, set] = {}

    class Recorded(dict):
        """A JSON section that notes which keys DeepSpeed reads from it."""

        def __init__(self, values: dict, path: str):
            super().__init__({k: Recorded(v, f"{path}{k}.") if isinstance(v, dict) else v for k, v in values.items()})
            self.path = path

        def _read(self, key) -> None:
            reads.setdefault(self.path, set()).add(key)

        def get(self, key, default=None):
            self._read(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self._read(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            self._read(key)
            return super().__contains__(key)

    # Outside a process group DeepSpeed counts one rank: let it derive train_batch_size for that one.
    checked = {k: v for k, v in ds.items() if k != "train_batch_size"}
    try:
        DeepSpeedJson(Recorded(checked, ""))
    except Exception as e:  # noqa: BLE001 -- pydantic ValidationError, ValueError, AssertionError: all say the key
        raise ConfigError(f"deepspeed JSON (deepspeed.* with deepspeed.extra) refused by DeepSpeed: {e}") from None

    def unread(values: dict, path: str) -> list[str]:
        if path and "enabled" not in reads.get(path, set()):
            return []  # a typed section (DeepSpeed validated its keys above) or one DeepSpeed reads later
        found = [f"{path}{k}" for k in values if k not in reads.get(path, set())]
        for k, v in values.items():
            if isinstance(v, dict) and k in reads.get(path, set()):
                found += unread(v, f"{path}{k}.")
        return found

    unknown = unread(checked, "")
    if unknown:
        raise ConfigError(
            f"deepspeed.extra: DeepSpeed does not know the key `{unknown[0]}` (deepspeed==0.19.8 reads no such "
            "key; check its spelling against https://www.deepspeed.ai/docs/config-json/)"
        )
