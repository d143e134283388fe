"""Batches as the paper counts them: a global batch in utterances (or seconds) split over any world size,
epochs resolved to steps from the index, utterance micro-batches that hold exactly their count."""

import json
import math
import random

import pytest

from istack_ds.batching import epoch_size, plan_batches, resolve_total_steps
from istack_ds.config import ConfigError, DataConfig, DeepSpeedConfig, load_config
from istack_ds.data import build_loader, read_index
from istack_ds.data.batcher import Batcher, Item
from tests.helpers import ROOT, run_args, torchrun


def _plan(world, **data):
    return plan_batches(DataConfig(**data), DeepSpeedConfig(), world)


@pytest.mark.parametrize(
    "world, accumulation, micro",
    [(1, 4, 16), (2, 2, 16), (4, 1, 16), (8, 1, 8), (32, 1, 2), (64, 1, 1)],
)
def test_64_utterances_a_step_on_any_world_size(world, accumulation, micro):
    plan = _plan(world, global_batch=64, batch_unit="utterances", max_micro_batch=16)
    assert (plan.accumulation, plan.micro) == (accumulation, micro)
    assert plan.global_batch == 64


def test_a_global_batch_the_world_cannot_split_is_refused_naming_the_sizes_that_can():
    with pytest.raises(ConfigError, match=r"64 utterances cannot be split evenly over 3 rank.*\[1, 2, 4, 8"):
        _plan(3, global_batch=64, batch_unit="utterances")
    # seconds split into any share; the accumulation keeps each share under the bound
    plan = _plan(3, global_batch=800, batch_unit="seconds", max_micro_batch=200, crop_seconds=15.6)
    assert (plan.accumulation, round(plan.global_batch, 6)) == (2, 800)
    with pytest.raises(ConfigError, match="less than data.crop_seconds"):
        _plan(64, global_batch=800, batch_unit="seconds", crop_seconds=15.6)


def test_global_batch_and_epochs_rules():
    with pytest.raises(ConfigError, match="deepspeed.gradient_accumulation=2: with data.global_batch"):
        load_config(None, ["data.global_batch=64", "data.batch_unit=utterances", "deepspeed.gradient_accumulation=2"])
    with pytest.raises(ConfigError, match="optim.epochs=2 needs data.global_batch"):
        load_config(None, ["optim.epochs=2", "optim.total_steps=null"])
    with pytest.raises(ConfigError, match="data.global_batch=6.5 must be a whole number of utterances"):
        load_config(None, ["data.global_batch=6.5", "data.batch_unit=utterances"])
    with pytest.raises(ConfigError, match="data.max_micro_batch=12.5 must be a whole number of utterances"):
        load_config(None, ["data.global_batch=64", "data.batch_unit=utterances", "data.max_micro_batch=12.5"])
    with pytest.raises(ConfigError, match="optim.total_steps is null"):
        load_config(None, ["optim.total_steps=null"])


def test_epochs_resolve_from_the_index_to_the_same_steps_whatever_the_world(demo_shards):
    index = demo_shards / "train/index.json"
    sets = [f"data.train_index={index}", "data.global_batch=4", "data.batch_unit=utterances"]
    sets += ["optim.epochs=3", "optim.total_steps=null", "growth.depths=[3]", "growth.operator=none"]
    cfg, how = resolve_total_steps(load_config(None, sets))
    cuts = read_index(index).samples
    assert cfg.optim.total_steps == math.ceil(3 * cuts / 4) and f"= {cfg.optim.total_steps} steps" in how
    # `skip` counts only the cuts a batch can hold whole
    long_cuts = load_config(None, [*sets, "data.long_cuts=skip", "data.crop_seconds=1.0"]).data
    hist = read_index(index)
    assert epoch_size(long_cuts, hist.duration_histogram, hist.bin_seconds) < cuts
    # a saved config.yaml holds the resolved steps: it resolves again; a different value is refused
    assert resolve_total_steps(cfg)[0].optim.total_steps == cfg.optim.total_steps
    with pytest.raises(ConfigError, match="set optim.total_steps to null"):
        resolve_total_steps(load_config(None, [*sets[:-2], "optim.epochs=3", "optim.total_steps=5"]))


def _items(n, rng):
    return [Item(f"c{i}", b"", 0, 0, rng.uniform(1.0, 20.0)) for i in range(n)]


def test_utterance_batches_hold_exactly_their_count_and_leave_out_a_random_remainder():
    rng = random.Random(0)
    longest_left_out = 0
    for group in range(20):
        items = _items(37, rng)
        batcher = Batcher([5.0, 10.0, 15.0], 4, 8, random.Random(group), count=True, drop_remainder=True)
        batches = [b for it in items for b in batcher.add(it)] + batcher.drain()
        assert all(len(b) == 4 for b in batches)
        kept = [it.key for b in batches for it in b]
        assert len(kept) == len(set(kept)) == 36 and len(batcher.dropped) == 1
        assert {it.key for it in batcher.dropped} | set(kept) == {it.key for it in items}
        longest_left_out += batcher.dropped[0].seconds == max(it.seconds for it in items)
    assert longest_left_out < 5  # drawn at random, not the longest of the sorted leftovers every time
    # held-out batches (no drop_remainder) keep every cut
    batcher = Batcher([5.0], 4, 8, random.Random(0), count=True)
    batches = [b for it in _items(37, rng) for b in batcher.add(it)] + batcher.drain()
    assert sum(map(len, batches)) == 37 and not batcher.dropped


def test_the_stream_hands_out_exact_utterance_batches_and_skips_long_cuts_when_asked(demo_shards):
    data = DataConfig(
        global_batch=4, batch_unit="utterances", num_workers=0, crop_seconds=2.5, long_cuts="skip", batch_seconds=6
    )
    plan = plan_batches(data, DeepSpeedConfig(), 1)
    index = demo_shards / "train/index.json"
    loader = build_loader(data, str(index), rank=0, world_size=1, seed=1, epochs=1, plan=plan)
    batches = list(loader)
    assert batches and all(len(b["cut_ids"]) == 4 for b in batches)
    assert all(int(n) <= 2.5 * 16000 for b in batches for n in b["audio_lens"])
    skipped = batches[-1]["skipped_by_reason"]  # as of the last batch: the whole epoch
    assert skipped["longer_than_crop"] > 0
    assert (
        4 * len(batches) + skipped["longer_than_crop"] + skipped.get("batch_remainder", 0) == read_index(index).samples
    )


#: A LibriSpeech tree of 24 whole utterances for training (3 speakers) and one held-out speaker.
LIBRISPEECH = {
    "train-clean-100": {
        "19": {"198": [1.2, 1.6, 2.0, 1.1], "199": [1.4, 1.8, 1.3, 1.5]},
        "26": {"495": [1.7, 1.2, 1.9, 1.4], "496": [1.1, 1.6, 2.1, 1.3]},
        "32": {"21": [1.5, 1.8, 1.2, 1.6, 1.9, 1.0, 1.4, 1.7]},
    },
    "dev-clean": {"84": {"121": [1.3, 1.5, 1.2, 1.6]}},
}


@pytest.mark.procgroup
def test_one_rank_with_accumulation_and_two_ranks_take_the_same_utterances_per_step(tmp_path, teacher_dir):
    """A LibriSpeech tree through `istack shard`, then the same config on 1 rank (accumulation 2) and 2 ranks
    (accumulation 1): the same steps from optim.epochs, and every step of both trains on exactly
    data.global_batch utterances."""
    from istack_ds.commands.check import main as check_main
    from istack_ds.commands.shard import main as shard_main
    from tests.test_data_librispeech import make_librispeech

    make_librispeech(tmp_path / "corpus", LIBRISPEECH, oddities=False)
    shards = tmp_path / "shards"
    assert shard_main(["--corpus", str(tmp_path / "corpus"), "--out", str(shards), "--min-shards", "4"]) == 0
    assert check_main([str(shards / "train/index.json")]) == 0
    sets = ["data.global_batch=4", "data.batch_unit=utterances", "data.max_micro_batch=2", "optim.epochs=1"]
    sets += ["optim.total_steps=null", "checkpoint.every=0", "log.data_audit=false", "data.interleave_shards=1"]
    sets += ["data.long_cuts=skip", "data.crop_seconds=2.5", f"data.valid_index={shards / 'valid/index.json'}"]
    sets += ["eval.every=0", "growth.operator=none", "growth.depths=[2]"]  # batching only: no growth to pay for
    summaries = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        proc = torchrun(ROOT / "launchers/train.py", *run_args(out, teacher_dir, shards, *sets), nproc=nproc)
        accumulation = 3 - nproc
        line = f"4 utterances per step (data.global_batch) = {nproc} rank(s) x {accumulation} micro-batch(es)"
        assert line in proc.stdout + proc.stderr
        summaries[nproc] = json.loads((out / "summary.json").read_text())
    assert read_index(shards / "train/index.json").samples == 24
    assert summaries[1]["steps"] == summaries[2]["steps"] == 6  # one epoch of 24 utterances, 4 a step
    for summary in summaries.values():
        assert summary["utterances_this_process"] == 4 * summary["steps"]


def test_the_paper_recipe_is_64_utterances_a_step_on_1_8_and_32_gpus():
    cfg = load_config(ROOT / "configs/paper_interleaved_eql.yaml")
    assert (cfg.optim.epochs, cfg.optim.total_steps) == (75, None)
    splits = {world: plan_batches(cfg.data, cfg.deepspeed, world) for world in (1, 8, 32)}
    assert {w: (p.accumulation, p.micro, p.global_batch) for w, p in splits.items()} == {
        1: (4, 16, 64),
        8: (1, 8, 64),
        32: (1, 2, 64),
    }
