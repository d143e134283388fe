"""istack_ds/resume.py: the config keys a resume lists as changed, the teacher a checkpoint was distilled from,
the LR a resume's first step runs at (issue 23 item 8); without a process group but for the last test (one rank)."""

import json
import shutil

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupDecayLR

from istack_ds.checkpoint import CheckpointError
from istack_ds.config import load_config
from istack_ds.models.teacher import teacher_digest
from istack_ds.resume import (
    apply_configured_lr,
    check_fits,
    config_changes,
    flat,
    load_on_every_rank,
    misfit,
    recorded_config,
)
from tests.helpers import ROOT


def test_config_changes_lists_each_changed_key_but_not_bookkeeping():
    saved = flat({"optim": {"lr": 1e-4, "steps": 10}, "checkpoint": {"resume": "auto"}, "run": {"out_dir": "a"}})
    now = flat({"optim": {"lr": 5e-5, "steps": 10}, "checkpoint": {"resume": "none"}, "run": {"out_dir": "b"}})
    now["teacher.path"] = "wav2vec2"
    assert config_changes(saved, now) == ["optim.lr: 0.0001 -> 5e-05", "teacher.path: '(absent)' -> 'wav2vec2'"]
    assert config_changes(saved, saved) == []


def saved_meta(cfg, teacher_dir) -> dict:
    """The marker of a step-0 checkpoint of `cfg` saved by one rank."""
    return {
        "step": 0,
        "depth": 2,
        "world_size": 1,
        "config": cfg.to_dict(),
        "teacher_digest": teacher_digest(teacher_dir),
    }


def test_a_checkpoint_of_another_teacher_is_refused_unless_allowed(tmp_path, teacher_dir):
    other = tmp_path / "other_teacher"
    shutil.copytree(teacher_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"num_hidden_layers": config["num_hidden_layers"] + 1}))
    assert teacher_digest(other) != teacher_digest(teacher_dir) == teacher_digest(teacher_dir)

    made = load_config(ROOT / "configs/demo.yaml", [f"teacher.path={teacher_dir}"])
    meta = saved_meta(made, teacher_dir)
    check_fits(meta, made, tmp_path, 1)
    swapped = load_config(ROOT / "configs/demo.yaml", [f"teacher.path={other}"])
    with pytest.raises(CheckpointError, match=rf"teacher {teacher_dir} .* this run's teacher {other} differs"):
        check_fits(meta, swapped, tmp_path, 1)
    allowed = load_config(ROOT / "configs/demo.yaml", [f"teacher.path={other}", "checkpoint.allow_other_teacher=true"])
    check_fits(meta, allowed, tmp_path, 1)
    check_fits({k: v for k, v in meta.items() if k != "teacher_digest"}, swapped, tmp_path, 1)  # an older checkpoint


def test_a_fallback_that_does_not_fit_is_passed_over_under_auto_and_refused_by_path(tmp_path, teacher_dir):
    """Issue 23: a fallback candidate whose shape differs (preflight checks only the newest) stopped the run
    instead of the trainer trying the one before it."""
    made = load_config(ROOT / "configs/demo.yaml", [f"teacher.path={teacher_dir}", "student.hidden_size=96"])
    meta = saved_meta(made, teacher_dir)
    auto = load_config(ROOT / "configs/demo.yaml", [f"teacher.path={teacher_dir}"])
    assert misfit(meta, made, tmp_path, 1) == ""
    assert "student.hidden_size=96" in misfit(meta, auto, tmp_path, 1)
    by_path = load_config(ROOT / "configs/demo.yaml", [f"teacher.path={teacher_dir}", f"checkpoint.resume={tmp_path}"])
    with pytest.raises(CheckpointError, match="student.hidden_size=96"):
        misfit(meta, by_path, tmp_path, 1)


class LoadedEngine:
    """An engine just after DeepSpeed's load_checkpoint: this config's scheduler (peak LR 1e-3) at the saved step,
    the optimizer's param groups still at the LR the checkpoint's config (peak 1e-2) gave there."""

    def __init__(self):
        self.param = torch.nn.Parameter(torch.zeros(2))
        self.optimizer = torch.optim.AdamW([self.param], lr=1e-3)
        self.lr_scheduler = WarmupDecayLR(
            self.optimizer, total_num_steps=100, warmup_max_lr=1e-3, warmup_num_steps=10, warmup_type="linear"
        )
        self.lr_scheduler.load_state_dict({"last_batch_iteration": 50})
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-2 * 50 / 90


class Checkpointer:
    def load(self, engine, path):
        return {}


class OtherGroupsCheckpointer:
    """A load that leaves the checkpoint's (or, ZeRO-3 universal, the first group's) hyperparameters in the groups."""

    def load(self, engine, path):
        engine.optimizer.param_groups[0].update(weight_decay=0.5, betas=(0.5, 0.5), eps=1e-3)
        return {}


def test_a_resume_runs_at_this_configs_weight_decay_betas_and_eps():
    engine = LoadedEngine()
    configured = {k: engine.optimizer.param_groups[0][k] for k in ("weight_decay", "betas", "eps")}
    assert load_on_every_rank(OtherGroupsCheckpointer(), engine, None)[1] == []
    assert {k: engine.optimizer.param_groups[0][k] for k in configured} == configured


def test_a_resume_runs_its_first_step_at_this_configs_lr():
    engine = LoadedEngine()
    state, errors = load_on_every_rank(Checkpointer(), engine, None)
    assert errors == []
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 50 / 90)
    assert engine.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 50 / 90)
    apply_configured_lr(engine)  # nothing changed: the same LR again
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 50 / 90)


@pytest.mark.procgroup
def test_a_resume_with_another_lr_logs_the_change_and_runs_at_it(tmp_path, teacher_dir, demo_shards):
    """Issue 23 item 8: the resume line printed the checkpoint's LR and the first step ran at it."""
    import re

    from tests.helpers import run_args, scalars, torchrun

    out = tmp_path / "run"
    torchrun(ROOT / "launchers/train.py", *run_args(out, teacher_dir, demo_shards), nproc=1, timeout=300)
    before = scalars(out / "tb", "train/lr")[12][-1]  # the LR of step 13, set when step 12 ended
    ckpt = out / "checkpoints/step00000012"
    resumed = torchrun(
        ROOT / "launchers/train.py",
        *run_args(out, teacher_dir, demo_shards, f"checkpoint.resume={ckpt}", "optim.lr=5.0e-4"),
        nproc=1,
        timeout=300,
    )
    assert "config changed since the checkpoint: optim.lr: 0.002 -> 0.0005" in resumed.stderr, resumed.stderr[-3000:]
    assert "checkpoint.resume" not in "".join(x for x in resumed.stderr.splitlines() if "config changed" in x)
    lr = float(re.search(r"resumed from .*, lr ([0-9.e+-]+)", resumed.stderr).group(1))
    assert lr == pytest.approx(before / 4, rel=1e-3), (lr, before)


def test_a_save_records_the_digest_taken_at_start_without_reading_the_teacher_again(tmp_path):
    """Review of issue 23, 8: the digest was recomputed from the teacher directory at every save, so a teacher
    removed during a long run stopped the run at its next checkpoint with a traceback."""
    from types import SimpleNamespace

    from istack_ds.trainer import Trainer

    cfg = load_config(None, [f"teacher.path={tmp_path / 'removed'}"])
    assert recorded_config(cfg, "d1") == {"config": cfg.to_dict(), "teacher_digest": "d1"}
    # what a save records (Trainer.save writes Trainer.state_dict into the marker), the teacher directory gone
    run = SimpleNamespace(
        cfg=cfg,
        teacher_digest="d1",  # taken by Trainer.__init__
        step=5,
        student=SimpleNamespace(depth=2, supervised=[1, 2]),
        schedule=SimpleNamespace(stage_at=lambda step: 0),
        plan=SimpleNamespace(accumulation=1),
        nonfinite_total=0,
    )
    meta = Trainer.state_dict(run)
    assert meta["teacher_digest"] == "d1" and meta["config"] == cfg.to_dict()


def test_a_save_puts_the_events_logged_before_it_on_disk_first(tmp_path):
    """A resume from a checkpoint does not log its step's events again (Metrics' purge_step), so they must be on
    disk before the checkpoint exists: a growth's depth events, logged just before its save and still in the
    TensorBoard writer's buffer at a kill -9, were lost (test_checkpoint's kill -9 test, under load: the resumed
    run's depth at the growth step was the old one)."""
    from types import SimpleNamespace

    from istack_ds.trainer import Trainer

    order: list[str] = []
    run = SimpleNamespace(
        metrics=SimpleNamespace(flush=lambda: order.append("events flushed")),
        checkpointer=SimpleNamespace(save=lambda engine, meta, rank_state: order.append("checkpoint") or tmp_path),
        loader=SimpleNamespace(state_dict=dict),
        state_dict=dict,
        saved_step=None,
        step=9,
        engine=None,
    )
    Trainer.save(run)  # type: ignore[arg-type]
    assert order == ["events flushed", "checkpoint"]
