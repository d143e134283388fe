"""Engine helpers that need no process group: the DeepSpeed JSON, the optimizer, parameter groups,
refusals, the manager's name mapping."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from istack_ds.batching import plan_batches
from istack_ds.config import OptimConfig, load_config
from istack_ds.deepspeed_json import deepspeed_json
from istack_ds.engine import build_engine, fused_adamw, param_groups
from istack_ds.growth import GrowthManager
from istack_ds.zero_states import GrowthStateError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


class Tiny(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(depth))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_gives_a_deepspeed_json(path):
    cfg = load_config(path)
    if cfg.optim.total_steps is None:  # optim.epochs: resolved from the train index at start (not here)
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, total_steps=1000))
    ds = deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, 8))
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    plan = plan_batches(cfg.data, cfg.deepspeed, 8)
    assert ds["train_batch_size"] == 8 * plan.accumulation == 8 * ds["gradient_accumulation_steps"]
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.optim.total_steps


def test_override_changes_deepspeed_json():
    base_cfg = load_config(None)
    base = deepspeed_json(base_cfg, plan_batches(base_cfg.data, base_cfg.deepspeed, 2))
    cfg = load_config(
        None,
        [
            "deepspeed.zero_stage=3",
            "optim.lr=1e-3",
            "optim.total_steps=1000",
            "deepspeed.precision=fp32",
            "deepspeed.gradient_accumulation=4",
        ],
    )
    ds = deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, 2))
    assert base["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["stage"] == 3
    assert "optimizer" not in ds  # build_engine builds it from cfg.optim
    assert ds["scheduler"]["params"] == {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 1e-3,
        "warmup_num_steps": 70,
        "total_num_steps": 1000,
        "warmup_type": "linear",
    }
    assert "bf16" in base and "bf16" not in ds
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 4


def test_optimizer_is_torchfused_adamw_from_the_optim_section():
    optim = load_config(
        None, ["optim.lr=1e-3", "optim.betas=[0.8,0.9]", "optim.eps=1e-6", "optim.weight_decay=0.05"]
    ).optim
    opt = fused_adamw(optim)(param_groups(Tiny(), optim.weight_decay))
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["eps"], g["fused"]) == (1e-3, (0.8, 0.9), 1e-6, True)


def test_param_groups_decay_matrices_only():
    groups = param_groups(Tiny(), weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.ndim == 2 for p in groups[0]["params"]) and len(groups[0]["params"]) == 3
    assert len(groups[1]["params"]) == 1 + 2 * 3  # inp bias, per layer: norm weight + bias, linear bias
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_build_engine_refuses_zero_stage_0():
    with pytest.raises(ValueError, match="stage 1, 2 or 3"):
        build_engine(Tiny(), {"zero_optimization": {"stage": 0}}, OptimConfig())


def test_source_names_map_layers_through_the_lineage():
    m = GrowthManager(lambda d, s: Tiny(d), {}, OptimConfig(), "layers.", "interleaved")
    old = {n for n, p in Tiny(2).named_parameters() if p.requires_grad}
    new = [n for n, p in Tiny(4).named_parameters() if p.requires_grad]
    mapping = m.source_names(new, m.lineage(2, 4), old)
    assert mapping["layers.1.1.weight"] == "layers.0.1.weight"
    assert mapping["layers.2.0.bias"] == "layers.1.0.bias"
    assert mapping["inp.weight"] == "inp.weight"
    with pytest.raises(GrowthStateError, match="new parameter extra.weight has no source"):
        m.source_names(new + ["extra.weight"], m.lineage(2, 4), old)
    with pytest.raises(ValueError, match="must end with '.'"):
        GrowthManager(lambda d, s: Tiny(d), {}, OptimConfig(), "layers")
    assert m.lineage(3, 3) == [0, 1, 2]


@pytest.mark.parametrize(
    "choice",
    [{"operator": "zigzag"}, {"carry": "middle"}, {"optimizer_state": "resett"}],
)
def test_growth_manager_refuses_unknown_choices_when_built(choice):
    """Built without a config (benchmarks, tools), a typo stops it at once, not hours later at the first growth."""
    ((key, value),) = choice.items()
    with pytest.raises(ValueError, match=rf"growth\.{key}='{value}' is not allowed"):
        GrowthManager(lambda d, s: Tiny(d), {}, OptimConfig(), "layers.", **choice)


def test_grown_states_reset_zeroes_only_clones():
    from istack_ds.zero_states import ParamState

    m = GrowthManager(lambda d, s: Tiny(d), {}, OptimConfig(), "layers.", "interleaved", optimizer_state="reset")
    old = {f"layers.{i}.w": ParamState(torch.full((2,), float(i)), torch.ones(2), torch.ones(2), 5) for i in range(2)}
    src = m.lineage(2, 4)  # [0, 0, 1, 1]
    new = m.grown_states(old, m.source_names([f"layers.{i}.w" for i in range(4)], src, set(old)), src)
    assert [float(new[f"layers.{i}.w"].param[0]) for i in range(4)] == [0, 0, 1, 1]
    assert [float(new[f"layers.{i}.w"].exp_avg.sum()) for i in range(4)] == [2, 0, 2, 0]
    assert all(s.step == 5 for s in new.values())
