"""Regrows a live DeepSpeed engine: full states out, deeper model in, a new engine, states back.

The student is any ``nn.Module`` whose transformer layers' parameters are named
``{layer_prefix}{i}.*`` (the HF HubertModel student wrapped as ``sfm`` uses
``"sfm.encoder.layers."``). A growth, on every rank at once, at an optimizer-step
boundary (docs/architecture.md):

1. gather the full fp32 params, Adam moments and step from the old engine (collective);
2. lineage ``src`` (``new_layer[i] = old_layer[src[i]]``), where the supervised layers go;
3. ``build_model(new_depth, new_supervised)``; map each new parameter to its source name
   (``{prefix}{i}.`` -> ``{prefix}{src[i]}.``; every other parameter to itself);
4. destroy the old engine and empty the old model's trainable tensors;
5. build the new engine the way the first one was built (the same DeepSpeed JSON and
   ``optim`` section), scatter the states (clones' moments copied, or zeroed with
   ``optimizer_state='reset'``), carry step counters and the LR position, read back.

The caller must rebind ``engine`` and ``model`` to the result's and drop every other
reference to the old ones; the old engine and model are unusable afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from istack_ds import engine as ds_engine
from istack_ds import faults, zero_states
from istack_ds.config import OptimConfig
from istack_ds.growth import operators
from istack_ds.growth.operators import Carry, Operator, OptimizerState, Pick
from istack_ds.zero_states import GrowthStateError, ParamState


@dataclass
class GrowthResult:
    engine: object
    """The new DeepSpeed engine (the old one is destroyed)."""
    model: nn.Module
    """The new, deeper student (``engine.module``)."""
    depth: int
    """Depth of the new student."""
    supervised: list[int]
    """0-based indices of the supervised layers in the new student."""
    lineage: list[int]
    """``new_layer[i] = copy(old_layer[lineage[i]])``."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in gather_s, build_s (model + engine), destroy_s, set_s (scatter + counters), verify_s."""
    pause_s: float = 0.0
    """Wall-clock seconds of the whole growth."""


def _moment(moment: torch.Tensor | None, reset: bool) -> torch.Tensor | None:
    """A source's Adam moment as its copy's: shared (read-only), or zeros for a reset clone."""
    if moment is None:
        return None
    return torch.zeros_like(moment) if reset else moment


class GrowthManager:
    def __init__(
        self,
        build_model: Callable[[int, list[int]], nn.Module],
        ds_config: dict,
        optim: OptimConfig,
        layer_prefix: str,
        operator: Operator = "interleaved",
        carry: Carry = "last",
        optimizer_state: OptimizerState = "copy",
        pick: Pick = "last",
    ):
        """
        build_model: ``(depth, supervised) -> nn.Module``, the student at a depth; called on every
            rank, its initial values do not matter (every parameter is overwritten).
        ds_config, optim: what every engine is built from (``build_engine(model, ds_config, optim)``):
            the DeepSpeed JSON (:func:`istack_ds.deepspeed_json.deepspeed_json`) and the ``optim`` section.
        layer_prefix: name prefix of the transformer layers, ending in ``.``: ``"sfm.encoder.layers."``.
        operator / carry / optimizer_state / pick: as in ``growth.*`` of the run config.
        """
        operators.check_choices(operator, carry, optimizer_state, pick)
        if not layer_prefix.endswith("."):
            raise ValueError(f"layer_prefix={layer_prefix!r} must end with '.' (e.g. 'sfm.encoder.layers.')")
        self.build_model = build_model
        self.ds_config = ds_config
        self.optim = optim
        self.layer_prefix = layer_prefix
        self.operator = operator
        self.carry = carry
        self.optimizer_state = optimizer_state
        self.pick = pick

    # ---- pure parts --------------------------------------------------------------------------

    def lineage(self, depth: int, new_depth: int) -> list[int]:
        """The growth's lineage; ``depth == new_depth`` is a rebuild (identity)."""
        if new_depth == depth:
            return operators.identity(depth)
        return operators.lineage(self.operator, depth, new_depth, self.pick)

    def layer_index(self, name: str) -> tuple[int, str] | None:
        """(layer index, rest of the name) for a layer parameter, None for any other parameter."""
        if not name.startswith(self.layer_prefix):
            return None
        index, _, rest = name[len(self.layer_prefix) :].partition(".")
        if not index.isdigit() or not rest:
            raise GrowthStateError(
                f"{name}: starts with layer_prefix {self.layer_prefix!r} but is not '{self.layer_prefix}<i>.<param>'"
            )
        return int(index), rest

    def source_names(self, new_names: list[str], src: list[int], old_names: set[str]) -> dict[str, str]:
        """New parameter name -> the old parameter it is copied from; errors name a param with no source."""
        out = {}
        for name in new_names:
            parsed = self.layer_index(name)
            if parsed is None:
                source = name
            else:
                i, rest = parsed
                if i >= len(src):
                    raise GrowthStateError(f"{name}: layer {i} is beyond the lineage's {len(src)} layers")
                source = f"{self.layer_prefix}{src[i]}.{rest}"
            if source not in old_names:
                raise GrowthStateError(f"new parameter {name} has no source in the old student (looked for {source})")
            out[name] = source
        return out

    def grown_states(
        self, old: dict[str, ParamState], mapping: dict[str, str], src: list[int]
    ) -> dict[str, ParamState]:
        """States of the new student: copies of the sources; a clone's moments zeroed under ``reset``.

        A clone is a later copy of a source layer (the first copy in the new stack is the original).
        """
        clones = {i for i, s in enumerate(src) if s in src[:i]}
        out = {}
        for name, source in mapping.items():
            st = old[source]
            parsed = self.layer_index(name)
            reset = self.optimizer_state == "reset" and parsed is not None and parsed[0] in clones
            out[name] = ParamState(
                param=st.param,  # shared, read-only: scatter copies into the engine
                exp_avg=_moment(st.exp_avg, reset),
                exp_avg_sq=_moment(st.exp_avg_sq, reset),
                step=st.step,
            )
        return out

    # ---- the growth --------------------------------------------------------------------------

    def grow(self, engine, model: nn.Module, depth: int, new_depth: int, supervised: list[int]) -> GrowthResult:
        """Grows (or, with ``new_depth == depth``, rebuilds) the student inside a live engine. COLLECTIVE."""
        timings: dict[str, float] = {}
        t_start = tick = time.perf_counter()

        def lap(key: str) -> None:
            nonlocal tick
            now = time.perf_counter()
            timings[key] = timings.get(key, 0.0) + now - tick
            tick = now

        old_states = zero_states.gather_full_states(engine)
        counters = ds_engine.engine_counters(engine)
        # Fault tests: a rank lost here (ISTACK_FAULTS=die_in_growth / hang_in_growth), between the
        # gathers and the new engine, leaves its peers in the new engine's first collectives.
        # The growth before step N runs after N - 1 optimizer steps.
        faults.stop_here("growth", counters["global_steps"] + 1)
        lap("gather_s")

        src = self.lineage(depth, new_depth)
        new_supervised = operators.carry_supervised(supervised, src, self.carry)
        new_model = self.build_model(new_depth, new_supervised)
        # A model may place its targets itself (a student whose heads read the top layer): report where they are.
        new_supervised = list(getattr(new_model, "supervised", new_supervised))
        new_names = [n for n, p in new_model.named_parameters() if p.requires_grad]
        mapping = self.source_names(new_names, src, set(old_states))
        new_states = self.grown_states(old_states, mapping, src)
        del old_states
        lap("build_s")

        keep = {id(p) for p in new_model.parameters()}
        ds_engine.destroy_engine(engine)
        # NOTE: the caller still holds `engine` and `model` until it rebinds them; empty the old
        # trainable tensors so their memory (views into freed ZeRO buffers) goes now.
        for p in model.parameters():
            if p.requires_grad and id(p) not in keep:
                p.data = torch.empty(0, dtype=p.dtype)
                if hasattr(p, "ds_tensor"):
                    p.ds_tensor = None
        del engine, model
        lap("destroy_s")

        new_engine = ds_engine.build_engine(new_model, self.ds_config, self.optim)
        lap("build_s")
        zero_states.scatter_full_states(new_engine, new_states, verify=False)
        ds_engine.carry_counters(counters, new_engine)
        lap("set_s")
        zero_states.verify_full_states(new_engine, new_states)
        lap("verify_s")
        return GrowthResult(
            new_engine, new_model, new_depth, new_supervised, src, timings, time.perf_counter() - t_start
        )
