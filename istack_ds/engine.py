"""DeepSpeed engines: build one with torch's fused AdamW, carry its counters, destroy it without leaks.

The optimizer is built here from the typed ``optim`` section (:func:`build_engine`); the JSON
the engine runs with is :func:`istack_ds.deepspeed_json.deepspeed_json`, and the full states
growth moves between engines are read and written by :mod:`istack_ds.zero_states`.
``engine.destroy()`` leaves the engine reachable (forward hooks on the root module; on ZeRO 3
two module-level references), so :func:`destroy_engine` removes them (pinned to
deepspeed==0.19.8, covered by tests/test_growth_manager.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os

import torch
from torch import nn

from .config import OptimConfig
from .dist import init_distributed
from .zero_states import GrowthStateError


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


def build_engine(model: nn.Module, ds_config: dict, optim: OptimConfig):
    """``deepspeed.initialize`` on the trainable parameters of ``model`` with torch's fused AdamW
    from ``optim`` (weight decay on matrices only) and the JSON ``ds_config``
    (:func:`istack_ds.deepspeed_json.deepspeed_json`).

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
