"""Checkpoint directories without engines: which checkpoint a resume picks, what is passed over, what is set
aside, what pruning keeps, what a save clears, what the converter refuses, what a rank file may hold.

A fake engine writes DeepSpeed-like files, so every rule of istack_ds/checkpoint.py is checked in-process.
"""

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from istack_ds.checkpoint import (
    META_FILE,
    SET_ASIDE,
    Checkpointer,
    CheckpointError,
    convert_to_universal,
    load_rank_state,
    rng_state,
    set_rng_state,
    verify,
    write_marker,
)


class FakeEngine:
    """Writes what DeepSpeed writes for one rank: a model file and a partition."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        path = f"{save_dir}/{tag}"
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.ones(4) * client_state["istack"]["step"]}, f"{path}/mp_rank_00_model_states.pt")
        torch.save({"m": torch.zeros(4)}, f"{path}/zero_pp_rank_0_mp_rank_00_optim_states.pt")


def save(ckpt: Checkpointer, step: int, **meta):
    return ckpt.save(FakeEngine(), {"step": step, "depth": 2, **meta}, {"data": {"positions": {}}})


def make(tmp_path, steps, keep=10, world=1) -> Checkpointer:
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=keep, log=lambda *a: None)
    for step in steps:
        save(ckpt, step)
        if world != 1:  # as if saved by `world` ranks
            path = ckpt.dir / f"step{step:08d}"
            meta = json.loads((path / META_FILE).read_text())
            write_marker(path, {k: v for k, v in meta.items() if k != "files"} | {"world_size": world})
    return ckpt


def universal_copy(ckpt: Checkpointer, step: int, with_rank_files: bool) -> None:
    src = ckpt.dir / f"step{step:08d}"
    out = ckpt.dir / f"step{step:08d}_universal"
    (out / "zero").mkdir(parents=True)
    if with_rank_files:
        (out / "rank0.pt").write_bytes((src / "rank0.pt").read_bytes())
    meta = json.loads((src / META_FILE).read_text())
    write_marker(out, {k: v for k, v in meta.items() if k != "files"} | {"universal": True})


def test_a_same_size_restart_prefers_the_original_over_its_universal_copy(tmp_path):
    """Item 4: the universal copy has no rank files; picking it dropped every rank's RNG and data position."""
    ckpt = make(tmp_path, [3, 6])
    universal_copy(ckpt, 6, with_rank_files=False)
    assert ckpt.latest(world=1).name == "step00000006"
    # another world size: the copy that loads as it is
    assert ckpt.latest(world=2).name == "step00000006_universal"


def test_a_corrupt_or_empty_marker_is_passed_over_not_raised(tmp_path):
    """Item 3: an empty marker made every start raise."""
    ckpt = make(tmp_path, [3, 6, 9])
    (ckpt.dir / "step00000009" / META_FILE).write_text("")
    (ckpt.dir / "step00000006" / META_FILE).write_text("{not json")
    good, notes = ckpt.candidates(1)
    assert [p.name for p in good] == ["step00000003"]
    assert ckpt.latest(world=1).name == "step00000003"


def test_a_file_that_does_not_match_the_marker_fails_verification_and_the_previous_is_used(tmp_path):
    """Item 3: the marker lists every file with its size; a truncated or missing file is named."""
    ckpt = make(tmp_path, [3, 6])
    meta = json.loads((ckpt.dir / "step00000006" / META_FILE).read_text())
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank0.pt"}
    partition = ckpt.dir / "step00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    partition.write_bytes(partition.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt has \d+ bytes"):
        verify(ckpt.dir / "step00000006")
    good, notes = ckpt.candidates(1)
    assert [p.name for p in good] == ["step00000003"]
    assert len(notes) == 1 and "step00000006" in notes[0] and "bytes" in notes[0]
    (ckpt.dir / "step00000003" / "rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="rank0.pt is missing"):
        verify(ckpt.dir / "step00000003")


def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    """Item 2: the abandoned timeline's newer checkpoints kept their marker and won `auto` and pruning."""
    ckpt = make(tmp_path, [3, 6, 9, 12])
    ckpt.keep = 2
    (ckpt.dir / "step00000015").mkdir()  # an unfinished save of the abandoned timeline
    ckpt.start_timeline(ckpt.dir / "step00000006", json.loads((ckpt.dir / "step00000006" / META_FILE).read_text()))
    assert sorted(p.name for p in ckpt.dir.glob("step*")) == ["step00000003", "step00000006"]
    aside = list((ckpt.dir / SET_ASIDE).iterdir())
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step00000009", "step00000012"]
    assert verify(aside[0] / "step00000012")["step"] == 12  # renamed whole, not deleted
    # the new timeline's saves: pruning keeps the newest 2 and the checkpoint resumed from
    for step in (7, 8, 9, 10):
        save(ckpt, step)
    assert sorted(p.name for p in ckpt.dir.glob("step*")) == ["step00000006", "step00000009", "step00000010"]
    assert ckpt.latest(world=1).name == "step00000010"
    timelines = {json.loads((ckpt.dir / n / META_FILE).read_text())["timeline"] for n in ("step00000009",)}
    assert timelines == {ckpt.timeline}
    assert json.loads((aside[0] / "step00000009" / META_FILE).read_text())["timeline"] != ckpt.timeline


def test_continuing_from_the_newest_keeps_the_timeline(tmp_path):
    ckpt = make(tmp_path, [3, 6])
    old = json.loads((ckpt.dir / "step00000006" / META_FILE).read_text())
    resumed = Checkpointer(ckpt.dir, keep=10, log=lambda *a: None)
    assert not resumed.start_timeline(ckpt.dir / "step00000006", old)
    assert resumed.timeline == old["timeline"] and not (ckpt.dir / SET_ASIDE).exists()


def test_a_fresh_run_sets_aside_what_an_earlier_run_left(tmp_path):
    """checkpoint.resume=none in a used directory: `auto` after a crash must not go back to the old run."""
    ckpt = make(tmp_path, [3, 6])
    fresh = Checkpointer(ckpt.dir, keep=10, log=lambda *a: None)
    assert fresh.start_timeline(None, None)
    assert fresh.latest(world=1) is None


def test_a_step_directory_is_written_fresh(tmp_path):
    """Item 2: a reused step directory kept the old run's extra partition files."""
    ckpt = make(tmp_path, [3])
    stale = ckpt.dir / "step00000006"
    stale.mkdir()
    (stale / "zero_pp_rank_7_mp_rank_00_optim_states.pt").write_bytes(b"old run")
    save(ckpt, 6)
    assert not (stale / "zero_pp_rank_7_mp_rank_00_optim_states.pt").exists()
    assert "zero_pp_rank_7_mp_rank_00_optim_states.pt" not in verify(stale)["files"]
    save(ckpt, 6)  # a complete one at the same step is set aside, not written over
    assert len(list((ckpt.dir / SET_ASIDE).glob("*/step00000006"))) == 1


def test_the_converter_never_deletes_a_directory_it_did_not_make(tmp_path):
    """Item 1: `--out runs/x` wiped a whole run."""
    ckpt = make(tmp_path, [3])
    out = tmp_path / "run_x"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("precious")
    with pytest.raises(CheckpointError, match="is left as it is"):
        convert_to_universal(ckpt.dir / "step00000003", out, log=lambda *_: None)
    assert (out / "config.yaml").read_text() == "precious"


def test_rank_files_hold_plain_values_and_load_without_unpickling_objects(tmp_path):
    """Item 11: rank files were loaded with weights_only=False."""
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = tmp_path / "rank0.pt"
    torch.save({"data": {"positions": {"0": {"epoch": 1}}}, "rng": rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = load_rank_state(path)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    torch.save({"rng": rng_state(), "evil": FakeEngine()}, path)
    with pytest.raises(CheckpointError, match="does not load as plain values"):
        load_rank_state(path)


def test_a_diverged_save_is_never_resumed_by_auto_nor_pushes_the_last_good_one_out(tmp_path):
    """Issue 23, 3: the save at a divergence was the newest checkpoint (resumed, failing again at once, for
    ever) and, with checkpoint.keep, pruned the last good one."""
    ckpt = make(tmp_path, [3, 6], keep=1)
    assert not (ckpt.dir / "step00000003").exists()
    save(ckpt, 9, diverged=True)
    assert sorted(p.name for p in ckpt.dir.glob("step*")) == ["step00000006", "step00000009"]
    good, notes = ckpt.candidates(1)
    assert [p.name for p in good] == ["step00000006"]
    assert len(notes) == 1 and "step00000009" in notes[0] and "diverged" in notes[0]
    save(ckpt, 10, diverged=True)  # diverged again, this step: the last good one stays
    assert (ckpt.dir / "step00000006").is_dir() and ckpt.latest(world=1).name == "step00000006"


def test_the_divergence_message_names_the_last_good_checkpoint(tmp_path):
    ckpt = make(tmp_path, [3, 6], keep=1)
    message = ckpt.save_diverged(FakeEngine(), {"step": 8, "depth": 2}, {"data": {}}, "3 non-finite losses in a row")
    assert message.startswith("3 non-finite losses in a row")
    assert f"last good checkpoint {ckpt.dir / 'step00000006'} (step 6" in message
    assert str(ckpt.dir / "step00000008") in message and "inspection" in message
    assert json.loads((ckpt.dir / "step00000008" / META_FILE).read_text())["diverged"] is True
    fresh = make(tmp_path / "fresh", [])
    message = fresh.save_diverged(FakeEngine(), {"step": 2, "depth": 2}, {"data": {}}, "diverged")
    assert "no checkpoint before step 2" in message and "checkpoint.resume=none" in message


def test_a_divergence_right_after_a_save_keeps_that_good_checkpoint_and_names_it(tmp_path):
    """Review of issue 23, 3: the losses stop being finite in the step right after a save (e.g. a growth's save):
    the diverged save must not set that step's good checkpoint aside and leave nothing resumable."""
    ckpt = make(tmp_path, [100, 150], keep=1)
    message = ckpt.save_diverged(FakeEngine(), {"step": 150, "depth": 2}, {"data": {}}, "3 non-finite losses")
    assert str(ckpt.dir / "step00000150") in message and "resume from it" in message
    assert "diverged" not in json.loads((ckpt.dir / "step00000150" / META_FILE).read_text())
    good, _ = ckpt.candidates(1)
    assert [p.name for p in good] == ["step00000150"]
    assert not (ckpt.dir / "set_aside").exists()


def test_preflight_hashes_on_rank_0_only_and_only_up_to_the_first_good_checkpoint(tmp_path, monkeypatch):
    """Review of issue 23, 4: before any process group every rank ran the resume check, and each hashed every
    checkpoint (32 ranks x 3 checkpoints of 1.5 GB: 144 GB read from a shared file system)."""
    import istack_ds.checkpoint
    from istack_ds.config import load_config
    from istack_ds.preflight import check_resume

    make(tmp_path / "run", [3, 6, 9])
    hashed = []
    real = istack_ds.checkpoint.digest
    monkeypatch.setattr(istack_ds.checkpoint, "digest", lambda f: hashed.append(f.parent.name) or real(f))
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", "checkpoint.resume=auto"])
    monkeypatch.setattr("istack_ds.preflight.world_size", lambda: 1)
    monkeypatch.setattr("istack_ds.resume.check_fits", lambda *a: None)
    monkeypatch.setenv("RANK", "1")
    check_resume(cfg)
    assert hashed == []
    monkeypatch.setenv("RANK", "0")
    check_resume(cfg)
    assert set(hashed) == {"step00000009"}


def test_a_same_size_file_from_another_step_fails_verification_naming_it(tmp_path):
    """Issue 23, 4: verification by size only let rank 1's file of step 50, copied over step 60's, resume."""
    ckpt = make(tmp_path, [3, 6])
    for name in ("mp_rank_00_model_states.pt", "rank0.pt"):
        old, new = ckpt.dir / "step00000003" / name, ckpt.dir / "step00000006" / name
        saved = new.read_bytes()
        assert old.stat().st_size == new.stat().st_size
        new.write_bytes(old.read_bytes() if old.read_bytes() != saved else saved[:-1] + bytes([saved[-1] ^ 1]))
        with pytest.raises(CheckpointError, match=rf"step00000006: {name} does not hold what was saved there"):
            verify(ckpt.dir / "step00000006")
        good, notes = ckpt.candidates(1)
        assert [p.name for p in good] == ["step00000003"] and name in notes[0]
        new.write_bytes(saved)
        assert verify(ckpt.dir / "step00000006")["step"] == 6


def test_a_marker_without_digests_still_verifies_by_size(tmp_path):
    """Checkpoints saved before markers held digests must still resume."""
    ckpt = make(tmp_path, [3])
    marker = ckpt.dir / "step00000003" / META_FILE
    meta = json.loads(marker.read_text())
    meta.pop("sha256", None)  # as written before markers held digests
    marker.write_text(json.dumps(meta))
    assert verify(marker.parent)["step"] == 3 and ckpt.latest(world=1) == marker.parent
    (marker.parent / "rank0.pt").write_bytes(b"short")
    with pytest.raises(CheckpointError, match="rank0.pt has 5 bytes"):
        verify(marker.parent)


def test_each_rank_hashes_the_files_it_wrote():
    from istack_ds.checkpoint_files import owner

    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_3_mp_rank_00_optim_states.pt", "rank2.pt", "zero/x/fp32.pt"]
    assert [owner(n, 4) for n in names] == [0, 3, 2, 0]
    assert owner("rank7.pt", 4) == 0  # not a rank of this world: rank 0 hashes it


def _fake_ds_to_universal(cmd, **_):
    """What ds_to_universal leaves: the output folder, and `latest_universal` in the folder above it."""
    out = Path(cmd[cmd.index("--output_folder") + 1])
    (out / "zero" / "w").mkdir(parents=True)
    torch.save({"param": torch.ones(2)}, out / "zero" / "w" / "fp32.pt")
    (out.parent / "latest_universal").write_text(out.name)
    return subprocess.CompletedProcess(cmd, 0, "", "")


def test_the_converter_keeps_a_partial_directory_it_did_not_make_and_leaves_no_stray_file(tmp_path, monkeypatch):
    """Issue 23, 5: `--out X` deleted the user's X.partial and left DeepSpeed's latest_universal beside X."""
    monkeypatch.setattr("istack_ds.checkpoint.subprocess.run", _fake_ds_to_universal)
    ckpt = make(tmp_path, [3])
    out = tmp_path / "exports" / "X"
    (out.parent / "X.partial").mkdir(parents=True)
    (out.parent / "X.partial" / "mine.txt").write_text("the user's")
    assert convert_to_universal(ckpt.dir / "step00000003", out, log=lambda *_: None) == out
    assert (out.parent / "X.partial" / "mine.txt").read_text() == "the user's"
    assert sorted(p.name for p in out.parent.iterdir()) == ["X", "X.partial"]
    assert verify(out)["universal"] and (out / "rank0.pt").is_file()


def test_renames_and_prunes_are_followed_by_fsyncs_of_their_directories(tmp_path, monkeypatch):
    """Issue 23: checkpoints/ was never fsynced before pruning; set-aside and converter renames had no parent
    fsync."""
    import os
    import shutil

    events: list[tuple[str, Path]] = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")))))
    monkeypatch.setattr(
        "istack_ds.checkpoint.shutil.rmtree", lambda p, **kw: events.append(("rmtree", Path(p))) or real_rmtree(p, **kw)
    )
    ckpt = make(tmp_path, [3, 6], keep=1)
    removal = events.index(("rmtree", ckpt.dir / "step00000003"))
    marked = max(i for i, e in enumerate(events) if e == ("fsync", ckpt.dir / "step00000006"))  # the marker's rename
    assert ("fsync", ckpt.dir) in events[marked:removal]

    events.clear()
    assert Checkpointer(ckpt.dir, keep=1, log=lambda *a: None).start_timeline(None, None)
    aside = next((ckpt.dir / SET_ASIDE).iterdir())
    assert events == [("fsync", aside), ("fsync", aside.parent), ("fsync", ckpt.dir)]

    monkeypatch.setattr("istack_ds.checkpoint.subprocess.run", _fake_ds_to_universal)
    ckpt = make(tmp_path / "again", [3])
    events.clear()
    out = tmp_path / "converted" / "U"
    convert_to_universal(ckpt.dir / "step00000003", out, log=lambda *_: None)
    assert [p for what, p in events if what == "fsync"][-1] == out.parent
