"""Where a rank waits (istack_ds/phase.py) and a hung shard read (issue 23 item 7): the heartbeat carries the phase,
the survivor names the rank that waits for data, and data.read_timeout_s ends a read that hangs with a DataError
naming the rank, the worker and its shards."""

from __future__ import annotations

import time

import pytest

from istack_ds import phase
from istack_ds.config import DataConfig
from istack_ds.data.index import DataError, read_index
from istack_ds.data.loader import build_loader


def test_a_phase_is_named_while_inside_and_left_after():
    assert phase.current().split()[0] == phase.STEP
    with phase.waiting("data"):
        time.sleep(1.1)
        name, seconds = phase.current().split()
        assert name == "data" and int(seconds) >= 1
    assert phase.current().split()[0] == phase.STEP


def test_describe_names_the_ranks_in_a_named_wait_only():
    said = phase.describe({1: "data 41", 2: "step 3", 3: None})
    assert said == "rank 1 waits for its data loader's next batch (a shard read hangs or is slow) for 41 s"
    assert phase.describe({1: "step 0"}) == ""
    assert phase.describe({0: "save 7"}) == "rank 0 is writing a checkpoint (a slow, hung or full file system) for 7 s"


def test_a_trainer_save_and_validation_are_named_phases():
    """What the heartbeat says while the trainer writes a checkpoint or validates (a survivor names that rank)."""
    from types import SimpleNamespace

    from istack_ds.trainer import Trainer

    seen = []
    trainer = SimpleNamespace(
        state_dict=dict,
        saved_step=None,
        step=3,
        loader=SimpleNamespace(state_dict=dict),
        metrics=SimpleNamespace(flush=lambda: None),
        engine=None,
        checkpointer=SimpleNamespace(save=lambda *a: seen.append(phase.current().split()[0]) or "ckpt"),
        cfg=SimpleNamespace(data=SimpleNamespace(valid_index="v"), eval=SimpleNamespace(every=3), optim=None),
        validate=lambda: seen.append(phase.current().split()[0]),
    )
    assert Trainer.save(trainer) == "ckpt"
    Trainer.maybe_validate(trainer)
    assert seen == ["save", "validate"] and phase.current().split()[0] == phase.STEP


def test_a_hung_shard_read_ends_after_read_timeout_s_naming_rank_worker_and_shards(demo_shards, monkeypatch):
    """The worker's second batch never comes (its read hangs): without a timeout the rank waited for ever."""
    monkeypatch.setenv("ISTACK_FAULTS", "stall_in_data@2")
    index = demo_shards / "train/index.json"
    data = DataConfig(
        train_index=str(index), num_workers=1, crop_seconds=2.0, batch_seconds=8.0, num_buckets=3, read_timeout_s=3
    )
    batches = iter(build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1))
    next(batches)
    start = time.time()
    with pytest.raises(DataError) as e:
        next(batches)
    assert 3 <= time.time() - start < 30
    message = str(e.value)
    assert message.startswith("DataLoader worker 0 gave no batch in 3 s (data.read_timeout_s)")
    assert any(shard.path in message for shard in read_index(index).shards)
