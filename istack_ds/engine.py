"""DeepSpeed engines: the DeepSpeed JSON, build, gather / scatter full states, carry counters, destroy.

This is the one module that knows DeepSpeed: its JSON is generated here from the run
config (:func:`deepspeed_config`), and the optimizer is built here from the typed
``optim`` section (:func:`build_engine`). Growth needs four
things DeepSpeed does not offer as public API, all pinned to deepspeed==0.19.8
and covered by tests/test_growth_manager.py:

- a freshly built engine has no Adam state (torch AdamW creates it at the first
  step), so :func:`scatter_full_states` creates it on the engine's flat fp32
  partitions and, on ZeRO 1/2, re-links the per-parameter views;
- ``safe_set_full_fp32_param`` writes only the fp32 master, so the master is
  pushed to the model weights by hand;
- the DeepSpeed setters silently do nothing on a parameter they do not manage,
  so every scatter ends with a read-back that names any parameter that differs;
- ``engine.destroy()`` leaves the engine reachable (forward hooks on the root
  module; on ZeRO 3 two module-level references), so :func:`destroy_engine`
  removes them.

Every function that reads or writes full states is COLLECTIVE: every rank calls
it, in the same order, with the same parameter names (docs/architecture.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batching import plan_batches
from .config import Config, OptimConfig
from .dist import all_ranks, comm_device, init_distributed
from .dist import rank as this_rank

# Names of the flat fp32 partitions the wrapped torch optimizer steps, per ZeRO optimizer class:
# ZeRO 1/2 (DeepSpeedZeroOptimizer), bf16 ZeRO 1 (BF16_Optimizer), ZeRO 3 (DeepSpeedZeroOptimizer_Stage3).
_FLAT_FP32_ATTRS = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat")
MOMENTS = ("exp_avg", "exp_avg_sq")


class GrowthStateError(RuntimeError):
    """The states in an engine are not what was set (or cannot be read): the message names the parameter."""


@dataclass
class ParamState:
    """Full (unpartitioned) fp32 training state of one parameter, identical on every rank."""

    param: torch.Tensor
    """fp32 master value, full shape."""
    exp_avg: torch.Tensor | None = None
    """Adam first moment, full shape; None before the optimizer's first step."""
    exp_avg_sq: torch.Tensor | None = None
    """Adam second moment, full shape; None before the optimizer's first step."""
    step: int | None = None
    """Adam step count (bias correction); None before the first step."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two named groups: ``decay`` (matrices) and ``no_decay`` (biases, norms).

    A parameter decays when it has >= 2 dims and is not part of a norm layer. Empty groups are
    left out; the order follows ``model.named_parameters()`` so every rank groups identically.
    """
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.split(".")[-2].lower() if "." in name else ""
        if p.ndim >= 2 and id(p) not in norm_params and "norm" not in owner:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def fused_adamw(optim: OptimConfig):
    """torch's AdamW from the ``optim`` section, with ``fused=True``, as a client optimizer for DeepSpeed.

    ZeRO hands the optimizer one flat fp32 partition per group: the unfused path allocates
    several partition-sized temporaries per step, torch's fused kernel (CPU and CUDA) none
    (README "Performance" has the measured step times). DeepSpeed's own ``torch_adam`` path
    passes only ``foreach`` on, hence the client optimizer; its fused CPU Adam would be compiled
    first. The update rule and the state (``step``, ``exp_avg``, ``exp_avg_sq``) are torch's.
    """
    return functools.partial(
        torch.optim.AdamW,
        lr=optim.lr,
        betas=(optim.betas[0], optim.betas[1]),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=True,
    )


def deepspeed_config(
    cfg: Config, world_size: int, gradient_accumulation: int | None = None, load_universal: bool = False
) -> dict:
    """The DeepSpeed JSON of a run on ``world_size`` ranks (generated, never stored).

    ``gradient_accumulation`` overrides the configured value (a resume on another world size
    keeps the global batch); ``load_universal`` loads a universal checkpoint (any world size).
    There is no optimizer section: :func:`build_engine` builds the optimizer from ``cfg.optim``.
    ``deepspeed.extra`` is merged in last and the result checked by DeepSpeed's config classes
    (``config.DeepSpeedConfig.merged_into`` and ``.check_json``): a conflicting or
    unknown key raises ConfigError naming it.
    """
    opt = cfg.optim
    accumulation = gradient_accumulation or plan_batches(cfg.data, cfg.deepspeed, world_size).accumulation
    ds: dict[str, Any] = {
        # Batches are built by duration, not count: DeepSpeed only needs a
        # consistent (micro=1) x accumulation x world_size for its bookkeeping.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": world_size * accumulation,
        "gradient_clipping": opt.grad_clip,
        "steps_per_print": 10**9,  # our own log line replaces DeepSpeed's
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
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
    if cfg.deepspeed.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        # Gradients are averaged over every rank: in bf16 (DeepSpeed's default under bf16)
        # that sum loses precision as ranks grow; the student is small, fp32 costs little.
        ds["communication_data_type"] = "fp32"
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if cfg.deepspeed.zero_stage == 3:
        # Small models: partition every parameter so growth exercises the real path.
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    ds = cfg.deepspeed.merged_into(ds)
    cfg.deepspeed.check_json(ds)
    return ds


def build_engine(model: nn.Module, ds_config: dict, optim: OptimConfig):
    """``deepspeed.initialize`` on the trainable parameters of ``model`` with torch's fused AdamW
    from ``optim`` (weight decay on matrices only) and the JSON ``ds_config`` (:func:`deepspeed_config`).

    Returns the engine alone (it owns the optimizer and LR scheduler), so no stray
    reference to them survives in the caller: see :func:`destroy_engine`.
    """
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(
            f"zero_optimization.stage={stage}: growth reads and writes states through the ZeRO APIs; "
            "use stage 1, 2 or 3"
        )
    import deepspeed

    init_distributed()
    before = {name: set(getattr(model, name)) for name in _ROOT_HOOK_DICTS}
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, optim.weight_decay),
        optimizer=fused_adamw(optim),
        config=ds_config,
    )
    # NOTE: DeepSpeed registers forward (pre-)hooks on the root module that hold the engine; remember
    # which, so destroy_engine can remove exactly those.
    engine._istack_root_hooks = {name: set(getattr(model, name)) - before[name] for name in _ROOT_HOOK_DICTS}
    return engine


# ---- reading and writing full states ------------------------------------------------------------


def trainable_parameters(engine) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter, in ``named_parameters`` order (same on every rank)."""
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _zero_stage(engine) -> int:
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2, 3):
        raise ValueError(
            f"ZeRO stage {stage}: full states are read through the ZeRO APIs (safe_get_full_*), which return "
            "None at stage 0; build the engine with zero_optimization.stage 1, 2 or 3 (even on one rank)"
        )
    return stage


def _flat_fp32_partitions(engine) -> list[torch.Tensor]:
    opt = engine.optimizer
    for attr in _FLAT_FP32_ATTRS:
        flats = getattr(opt, attr, None)
        if flats is not None:
            return list(flats)
    raise GrowthStateError(
        f"unsupported ZeRO optimizer {type(opt).__name__}: no flat fp32 partitions {_FLAT_FP32_ATTRS}"
    )


def _adam_state(engine) -> dict:
    """The wrapped torch optimizer's state, keyed by flat fp32 partition."""
    return engine.optimizer.optimizer.state


def adam_step(engine) -> int | None:
    """The Adam step count of the engine (all flat partitions step together), None before the first step."""
    state = _adam_state(engine)
    steps = {int(state[f]["step"]) for f in _flat_fp32_partitions(engine) if "step" in state.get(f, {})}
    if len(steps) > 1:
        raise GrowthStateError(f"the engine's parameter groups disagree on the Adam step: {sorted(steps)}")
    return steps.pop() if steps else None


def _has_adam_state(engine) -> bool:
    state = _adam_state(engine)
    local = all(all(k in state.get(f, {}) for k in (*MOMENTS, "step")) for f in _flat_fp32_partitions(engine))
    return all_ranks(local)


def _link_hp_views(engine) -> None:
    """ZeRO 1/2 (and bf16 ZeRO 1): (re-)point each parameter's Adam fragment views at the flat state."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def gather_full_states(engine) -> dict[str, ParamState]:
    """Full fp32 param + Adam moments + step of every trainable parameter, on every rank. COLLECTIVE."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _zero_stage(engine)
    with_moments = _has_adam_state(engine)
    if with_moments:
        _link_hp_views(engine)
    step = adam_step(engine) if with_moments else None
    states = {}
    for name, p in trainable_parameters(engine):
        value = safe_get_full_fp32_param(p)
        if value is None:
            raise GrowthStateError(f"{name}: the ZeRO optimizer does not manage this parameter (no fp32 master)")
        st = ParamState(param=value.detach().clone(), step=step)
        if with_moments:
            st.exp_avg = safe_get_full_optimizer_state(p, "exp_avg").detach().clone()
            st.exp_avg_sq = safe_get_full_optimizer_state(p, "exp_avg_sq").detach().clone()
        states[name] = st
    return states


def _common_step(states: dict[str, ParamState]) -> int | None:
    steps = {s.step for s in states.values() if s.step is not None}
    if len(steps) > 1:
        raise GrowthStateError(
            f"states disagree on the Adam step ({sorted(steps)}): one engine steps all groups together"
        )
    return steps.pop() if steps else None


def _ensure_adam_state(engine, step: int) -> None:
    """Adam state (step, zero moments) on every flat fp32 partition that has none; ``step`` everywhere."""
    state = _adam_state(engine)
    # NOTE: from the groups' flags, not their "params": ZeRO-3 empties those lists between steps.
    fused = any(g.get("fused") for g in engine.optimizer.optimizer.param_groups)
    for flat in _flat_fp32_partitions(engine):
        st = state[flat]  # defaultdict(dict) in torch optimizers
        for key in MOMENTS:
            if key not in st:
                st[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        # torch's rule: a fused AdamW keeps `step` on the parameter's device, the others on the CPU.
        st["step"] = torch.tensor(float(step), dtype=torch.float32, device=flat.device if fused else "cpu")
    _link_hp_views(engine)


def _full_shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


@torch.no_grad()
def _push_master_to_model(engine) -> None:
    """Copy the fp32 masters into the (possibly bf16, possibly partitioned) model weights."""
    opt = engine.optimizer
    if _zero_stage(engine) == 3:
        for i in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
    else:
        opt.update_lp_params()


@torch.no_grad()
def scatter_full_states(engine, states: dict[str, ParamState], verify: bool = True) -> None:
    """Writes full states into a (fresh) engine, then reads everything back. COLLECTIVE.

    ``states`` must name exactly the engine's trainable parameters. Moments are written when any
    state has them (a missing moment is written as zeros); the Adam step is the states' common
    step. Raises :class:`GrowthStateError` naming the parameter on a missing/extra name, a shape
    mismatch, or any read-back difference.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _zero_stage(engine)
    params = trainable_parameters(engine)
    names = [n for n, _ in params]
    missing = [n for n in names if n not in states]
    extra = sorted(set(states) - set(names))
    if missing or extra:
        raise GrowthStateError(
            f"states do not match the engine's parameters: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for name, p in params:
        if tuple(states[name].param.shape) != tuple(_full_shape(p)):
            raise GrowthStateError(
                f"{name}: state shape {tuple(states[name].param.shape)} != parameter shape {tuple(_full_shape(p))}"
            )
    with_moments = any(s.exp_avg is not None or s.exp_avg_sq is not None for s in states.values())
    step = _common_step(states)
    if with_moments:
        if step is None:
            raise GrowthStateError("states carry Adam moments but no step")
        _ensure_adam_state(engine, step)
    for name, p in params:
        st = states[name]
        values: dict[str | None, torch.Tensor] = {None: st.param.float()}
        if with_moments:
            values.update(
                {k: torch.zeros_like(st.param) if getattr(st, k) is None else getattr(st, k).float() for k in MOMENTS}
            )
        for key, value in values.items():
            if _z3_padded(engine, p):
                # NOTE: DeepSpeed 0.19.8's ZeRO 3 setter slices past the end of a parameter whose size
                # is not a multiple of the partition count; write the local partition ourselves.
                for view, start, n in _local_fragments(engine, p, key):
                    view.copy_(value.flatten()[start : start + n])
            elif key is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, key)
    _push_master_to_model(engine)
    if verify:
        verify_full_states(engine, states)


def _z3_padded(engine, p) -> bool:
    """A ZeRO 3 parameter whose last partition is padded."""
    if not hasattr(p, "ds_id"):
        return False
    return p.ds_numel % engine.optimizer._get_param_partition_world_size(p) != 0


def _local_fragments(engine, p, key: str | None) -> list[tuple[torch.Tensor, int, int]]:
    """This rank's pieces of a parameter's fp32 master (key None) or Adam state, read from the
    optimizer's own flat tensors: [(view, start in the flattened full tensor, numel)]."""
    opt = engine.optimizer
    if hasattr(p, "ds_id"):  # ZeRO 3: one equal-size (last one padded) partition per rank
        part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=True, optim_state_key=key)
        start = opt._get_param_partition_rank(p) * part.numel()
        n = max(0, min(part.numel(), p.ds_numel - start))
        return [(part.narrow(0, 0, n), start, n)] if n else []
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:  # ZeRO 1/2: this parameter lies wholly in other ranks' partitions
        return []
    flat = _flat_fp32_partitions(engine)[mapping.param_group_index]
    source = flat if key is None else _adam_state(engine)[flat][key]
    hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
    return [(source.narrow(0, hp.start, hp.numel), lp.start, lp.numel)]


@torch.no_grad()
def verify_full_states(engine, states: dict[str, ParamState]) -> None:
    """Reads back every fp32 master, Adam moment and step, and the model weights; raises naming what differs.

    Each rank reads its own pieces straight from the optimizer's flat fp32 tensors (what the next
    step will use) and compares them with the matching slice of the full state; one all-reduce
    then checks that the ranks together hold every element of every parameter (a parameter the
    ZeRO optimizer does not manage is caught here). COLLECTIVE.
    """
    import torch.distributed as tdist

    rank = this_rank()
    params = trainable_parameters(engine)
    with_moments = any(s.exp_avg is not None or s.exp_avg_sq is not None for s in states.values())
    has_state = all(all(k in _adam_state(engine).get(f, {}) for k in MOMENTS) for f in _flat_fp32_partitions(engine))
    problems = []
    if with_moments and not has_state:
        problems.append(f"the engine has no Adam state on rank {rank}")
    step = _common_step(states)
    if with_moments and has_state and adam_step(engine) != step:
        problems.append(f"Adam step {adam_step(engine)} != {step}")
    covered = torch.zeros(len(params), dtype=torch.int64, device=comm_device())
    for idx, (name, p) in enumerate(params):
        want = states[name]
        keys = [None, *MOMENTS] if with_moments and has_state else [None]
        for key in keys:
            full = want.param if key is None else getattr(want, key)
            full = (torch.zeros_like(want.param) if full is None else full).float().flatten()
            for view, start, n in _local_fragments(engine, p, key):
                if key is None:
                    covered[idx] += n
                if not torch.equal(view.flatten(), full[start : start + n]):
                    diff = (view.flatten() - full[start : start + n]).abs().max()
                    problems.append(
                        f"{name}: {'fp32 master' if key is None else key} differs on rank {rank} "
                        f"(max |diff| {diff:.3g})"
                    )
        # The model weights (low precision and/or partitioned) must hold the master too.
        full = want.param.float().flatten()
        if hasattr(p, "ds_tensor"):  # ZeRO 3: this rank's partition of the flat parameter
            part = p.ds_tensor.flatten()
            start = rank * part.numel()
            n = max(0, min(part.numel(), full.numel() - start))
            local, ref = part[:n], full[start : start + n]
        else:
            local, ref = p.data.flatten(), full
        if not torch.equal(local, ref.to(local.dtype)):
            problems.append(f"{name}: model weights differ from the fp32 master on rank {rank}")
    if tdist.is_initialized():
        tdist.all_reduce(covered)
    for idx, (name, p) in enumerate(params):
        numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if covered[idx] != numel:
            problems.append(
                f"{name}: the ZeRO optimizer holds {int(covered[idx])} of its {numel} elements "
                "(a parameter it does not manage)"
            )
    if not all_ranks(not problems):
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise GrowthStateError(f"read-back after scatter failed: {shown or 'on another rank'}")


# ---- counters and LR schedule ------------------------------------------------------------------

_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def engine_counters(engine) -> dict:
    """Step counters and LR scheduler position of an engine (plain values: survive its destruction)."""
    out = {k: getattr(engine, k) for k in _COUNTERS if hasattr(engine, k)}
    if engine.lr_scheduler is not None:
        out["lr_scheduler"] = dict(engine.lr_scheduler.state_dict())
    return out


def carry_counters(old, new) -> None:
    """Gives ``new`` the step counters and LR position of ``old`` (an engine or :func:`engine_counters`).

    The LR never restarts at growth: ``lr_scheduler.load_state_dict`` does not push the LR into the
    optimizer, so the scheduler is stepped to its last iteration again.
    """
    counters = old if isinstance(old, dict) else engine_counters(old)
    for k in _COUNTERS:
        if k in counters:
            setattr(new, k, counters[k])
    sched_state = counters.get("lr_scheduler")
    if sched_state is not None and new.lr_scheduler is not None:
        new.lr_scheduler.load_state_dict(sched_state)
        last = sched_state.get("last_batch_iteration")
        if last is not None:
            new.lr_scheduler.step(last)


# ---- destruction -------------------------------------------------------------------------------

_ROOT_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), when available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _clear_lru_cache(fn) -> None:
    """``cache_clear()`` an lru_cache, possibly under wrappers (DeepSpeed's instrument_w_nvtx keeps it in a closure)."""
    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if hasattr(f, "cache_clear"):
            f.cache_clear()
            return
        todo.extend(x for x in [getattr(f, "__wrapped__", None)] if x is not None)
        todo.extend(c.cell_contents for c in (getattr(f, "__closure__", None) or ()) if callable(c.cell_contents))
    raise GrowthStateError(
        f"{getattr(fn, '__qualname__', fn)} has no lru_cache: the pinned DeepSpeed changed; "
        "ZeRO 3 would leak one engine per growth"
    )


def destroy_engine(engine) -> None:
    """Destroys ``engine`` and breaks the references DeepSpeed keeps to it.

    The CALLER must also drop every reference it holds to the engine, its optimizer and
    scheduler, and (unless it is reused) the model: memory is only returned once nothing
    points at them. ``engine, *_ = deepspeed.initialize(...)`` keeps them alive in ``_``;
    :func:`build_engine` returns the engine alone for that reason. After this call the
    engine is unusable; its optimizer state and ZeRO buffers are released eagerly so that
    memory drops even while a caller still holds the Python object.
    """
    module = engine.module
    stage = engine.zero_optimization_stage()
    engine.destroy()
    for name, keys in getattr(engine, "_istack_root_hooks", {}).items():
        hooks = getattr(module, name)
        for k in keys:
            hooks.pop(k, None)
    if stage == 3:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        stack = parameter_offload.FWD_MODULE_STACK
        stack[:] = [m for m in stack if not any(m is s for s in module.modules())]
        _clear_lru_cache(PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release)
    # Eager release: the torch optimizer's state and the ZeRO optimizer's flat buffers.
    opt = getattr(engine, "optimizer", None)
    base = getattr(opt, "optimizer", None)
    if base is not None and hasattr(base, "state"):
        base.state.clear()
    if opt is not None:
        for attr, value in list(vars(opt).items()):
            if torch.is_tensor(value) or (
                isinstance(value, list)
                and value
                and all(
                    torch.is_tensor(v) or (isinstance(v, list) and all(torch.is_tensor(x) for x in v)) for v in value
                )
            ):
                setattr(opt, attr, None)
    del opt, base, module
    gc.collect()
    malloc_trim()


def rss_bytes() -> int:
    """Resident set size of this process (Linux), for memory checks."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
