"""A failed checkpoint write in one line (istack_ds/checkpoint_write.py, issue 23 item 11): the file or directory
and "no space left on device" instead of torch's inline_container error; a failed collective stays itself."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest
import torch

from istack_ds import checkpoint_write
from istack_ds.checkpoint_write import write_failure

Usage = namedtuple("Usage", "total used free")


def _torch_error() -> RuntimeError:
    """What torch's C++ writer raises on a full disk (written to /dev/full, which fails every write with ENOSPC)."""
    with pytest.raises(RuntimeError) as e:
        torch.save({"w": torch.zeros(100_000)}, "/dev/full")
    assert "inline_container" in str(e.value)  # no errno, no path, no "no space"
    return e.value


def test_a_full_disk_under_torchs_writer_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**12, 10**12 - 4096, 4096))
    line = write_failure(tmp_path, _torch_error())
    assert line.startswith(f"writing checkpoint file {tmp_path} failed: no space left on device (0 MiB free")
    assert "\n" not in line


def test_torchs_writer_failing_with_room_left_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**12, 0, 10**12))
    line = write_failure(tmp_path, _torch_error())
    assert "torch's writer failed ([enforce fail at inline_container" in line and "no space" not in line


def test_an_oserror_names_its_file_and_reason(tmp_path):
    rank_file = tmp_path / "rank1.pt"
    rank_file.symlink_to("/dev/full")
    with pytest.raises(OSError) as e, open(rank_file, "wb") as f:
        torch.save({"w": torch.zeros(100_000)}, f)
    assert e.value.errno == errno.ENOSPC
    line = write_failure(tmp_path, e.value)
    assert line.startswith(f"writing checkpoint file {tmp_path} failed: no space left on device (")
    quota = OSError(errno.EDQUOT, "Disk quota exceeded", str(rank_file))
    assert f"{rank_file} failed: disk quota exceeded" in write_failure(tmp_path, quota)


def test_a_failed_collective_is_not_taken_for_a_write_error(tmp_path):
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        write_failure(tmp_path, gloo)


def test_the_full_bytes_threshold_is_what_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**12, 0, checkpoint_write.FULL_BYTES - 1))
    assert "no space left on device" in write_failure(tmp_path, _torch_error())


class _Engine:
    """DeepSpeed's save_checkpoint in small: its files through ``checkpoint_engine.save`` (model states by keyword,
    optimizer states by position, as engine.py calls it), then the barrier every rank must reach."""

    def __init__(self, checkpoint_engine):
        self.checkpoint_engine = checkpoint_engine
        self.reached_barrier = False

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        path = f"{save_dir}/{tag}"
        self.checkpoint_engine.save(state_dict={"module": torch.zeros(10)}, path=f"{path}/mp_rank_00_model_states.pt")
        self.checkpoint_engine.save({"w": torch.zeros(100_000)}, f"{path}/zero_pp_rank_1_mp_rank_00_optim_states.pt")
        self.reached_barrier = True


class _TorchCheckpointEngine:
    def save(self, state_dict, path):
        torch.save(state_dict, path)


def test_a_failed_write_inside_deepspeeds_save_is_recorded_so_its_barrier_is_reached(tmp_path, monkeypatch):
    """A write failing inside DeepSpeed's save_checkpoint raised out of it, past the barrier that ends it, while the
    other ranks waited there: the failure is now recorded, named by its file, and the save runs to its end."""
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**12, 10**12 - 4096, 4096))
    (tmp_path / "step00000006").mkdir()
    optim = tmp_path / "step00000006/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.symlink_to("/dev/full")  # torch's C++ writer fails on it, as on a full disk
    engine = _Engine(_TorchCheckpointEngine())
    line = checkpoint_write.write_share(engine, tmp_path, "step00000006", {"step": 6}, {}, 1)
    assert line.startswith(f"writing checkpoint file {optim} failed: no space left on device (")
    assert engine.reached_barrier
    assert not (tmp_path / "step00000006/rank1.pt").exists()
    assert "save" not in vars(engine.checkpoint_engine)  # the class's save again once the checkpoint is done


def test_a_non_write_error_inside_deepspeeds_save_still_raises(tmp_path):
    class Failing(_TorchCheckpointEngine):
        def save(self, state_dict, path):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer")

    engine = _Engine(Failing())
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        checkpoint_write.write_share(engine, tmp_path, "step00000006", {"step": 6}, {}, 1)
    assert "save" not in vars(engine.checkpoint_engine)
