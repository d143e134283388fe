"""Refusals with one line instead of a traceback hours later: the run directory before any process group
(istack_ds/run_dir.py through preflight), run.out_dir and run.seed when the config loads, a corrupt checkpoint
named by `istack export` / `istack probe`, and a probe index without its labels before any hidden state."""

import json
from collections import namedtuple

import numpy as np
import pytest

from istack_ds import run_dir
from istack_ds.config import ConfigError, load_config
from istack_ds.data.index import DataError
from istack_ds.preflight import preflight
from tests.helpers import ROOT

Usage = namedtuple("Usage", "total used free")


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)


def demo_config(teacher, out, *overrides, shards=None):
    data = [f"data.train_index={shards / 'train/index.json'}", "data.valid_index=null"] if shards else []
    return load_config(
        ROOT / "configs/demo.yaml",
        [f"teacher.path={teacher}", f"run.out_dir={out}", "checkpoint.resume=none", *data, *overrides],
    )


# ---- when the config loads -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("run.out_dir=", "run.out_dir is empty"),
        (f"run.seed={2**64 + 1}", "run.seed=18446744073709551617 is beyond 63 bits"),
        (f"run.seed={-(2**63)}", "beyond 63 bits"),
    ],
)
def test_an_empty_out_dir_or_a_seed_beyond_64_bits_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/demo.yaml", [override])


# ---- the run directory, before any process group ---------------------------------------------------


def test_preflight_refuses_a_checkpoint_directory_it_cannot_write(tmp_path, teacher_dir, demo_shards):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    with pytest.raises(ConfigError, match=f"checkpoint directory {out / 'checkpoints'}.* not a directory"):
        preflight(demo_config(teacher_dir, out, shards=demo_shards))


def test_a_read_only_checkpoint_directory_is_found_at_start(tmp_path, teacher_dir, monkeypatch):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    real = run_dir.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # a read-only mount: root is refused too, whatever the mode bits
        if dir == ckpt.absolute():
            raise PermissionError(13, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(run_dir.tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError, match=f"checkpoint directory {ckpt}: cannot write in {ckpt}.*Read-only"):
        run_dir.check_run_dir(demo_config(teacher_dir, tmp_path / "run"))
    # a run directory that does not exist yet is checked where it would be created, and nothing is left
    run_dir.check_run_dir(demo_config(teacher_dir, tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists() and sorted(ckpt.iterdir()) == []


def test_too_little_space_for_one_checkpoint_is_refused(tmp_path, teacher_dir, monkeypatch):
    cfg = demo_config(teacher_dir, tmp_path / "run")
    need, how = run_dir.checkpoint_bytes(cfg)
    assert "student parameters at depth" in how and need > 0
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda _: Usage(10 * need, 9 * need, need - 1))
    with pytest.raises(ConfigError, match=f"run.out_dir {tmp_path / 'run'}: .* free .* one checkpoint needs"):
        run_dir.check_run_dir(cfg)
    # with a checkpoint on disk, its size is the need
    step = tmp_path / "run" / "checkpoints" / "step00000003"
    step.mkdir(parents=True)
    (step / "istack_meta.json").write_text(json.dumps({"step": 3}))
    (step / "weights.pt").write_bytes(b"\0" * 5000)
    assert run_dir.checkpoint_bytes(cfg) == (5000 + len(json.dumps({"step": 3})), "the size of the newest checkpoint")
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda _: Usage(10**6, 10**6 - 4000, 4000))
    with pytest.raises(ConfigError, match="newest checkpoint"):
        run_dir.check_run_dir(cfg)


# ---- a corrupt checkpoint named explicitly ------------------------------------------------------------


def corrupt_checkpoint(tmp_path, teacher, truncated: bool):
    """A checkpoint whose model file is cut short (truncated) or, same size as listed, all zeros."""
    cfg = demo_config(teacher, tmp_path / "run")
    step = tmp_path / "run" / "checkpoints" / "step00000003"
    step.mkdir(parents=True)
    files = {"mp_rank_00_model_states.pt": 4096}
    meta = {"step": 3, "depth": cfg.growth.stage_depths[0], "supervised": None, "config": cfg.to_dict()}
    (step / "istack_meta.json").write_text(json.dumps(meta | {"files": files}))
    (step / "mp_rank_00_model_states.pt").write_bytes(b"\0" * (100 if truncated else 4096))
    return step


@pytest.mark.parametrize("truncated", [True, False])
def test_export_of_a_corrupt_checkpoint_is_one_line_and_exit_2(tmp_path, teacher_dir, capsys, truncated):
    from istack_ds.commands.export import main

    step = corrupt_checkpoint(tmp_path, teacher_dir, truncated)
    assert main(["--checkpoint", str(step), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(step) in err
    assert ("has 100 bytes, the marker lists 4096" in err) == truncated
    assert not (tmp_path / "hf").exists()


def test_probe_of_a_corrupt_checkpoint_is_one_line_and_exit_2(tmp_path, teacher_dir, capsys):
    from istack_ds.commands.probe import main
    from tests.test_probe import synth_utterance, write_index

    rng = np.random.default_rng(0)
    members = [(f"u{i}", synth_utterance(rng, i % 2)[0], {"speaker": f"s{i % 2}"}) for i in range(4)]
    index = write_index(tmp_path / "labelled", members, shards=1)
    step = corrupt_checkpoint(tmp_path, teacher_dir, truncated=True)
    assert main([str(step), "--train-index", str(index), "--tasks", "sid", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has 100 bytes, the marker lists 4096" in err


# ---- a probe index without its labels ---------------------------------------------------------------------


def test_probe_refuses_an_index_without_its_labels_before_any_hidden_state(tmp_path):
    from istack_ds.evidence.probe import run_probes
    from tests.test_probe import synth_utterance, write_index

    rng = np.random.default_rng(1)
    members = [(f"u{i}", synth_utterance(rng, 0)[0], {"speaker": "s0"}) for i in range(4)]
    index = write_index(tmp_path / "speakers_only", members, shards=1)

    def never(audio):
        raise AssertionError("hidden states computed for an index the probe refuses")

    with pytest.raises(DataError, match=f"{index}: none of its 4 members carries `phonemes`"):
        run_probes(never, index, tasks=["sid", "pr"], log=lambda *_: None)
    labelled = write_index(tmp_path / "labelled", [(k, a, {"phonemes": ["a"]}) for k, a, _ in members], shards=1)
    valid = write_index(tmp_path / "valid", [(k, a, {}) for k, a, _ in members], shards=1)
    with pytest.raises(DataError, match=f"{valid}: .*`phonemes`"):
        run_probes(never, labelled, valid_index=valid, tasks=["pr"], log=lambda *_: None)
