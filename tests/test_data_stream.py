"""The streaming loader: the exact partition over ranks and workers, batch contents, endless mode, bad input."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import warnings
from itertools import islice

import numpy as np
import pytest
import soundfile as sf
import torch

from istack_ds.config import ConfigError, DataConfig, load_config
from istack_ds.data.index import DataError, read_index
from istack_ds.data.loader import DataCounters, build_loader
from istack_ds.data.position import state_epoch
from istack_ds.data.stream import ShardStream
from tests.helpers import run_worker, shard_of_cut


def index_keys(index_path) -> list[str]:
    keys = []
    for shard in read_index(index_path).shards:
        with tarfile.open(shard.path) as tf:
            keys += [m.name.split(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".json")]
    return keys


def config(index, **kw) -> DataConfig:
    base = dict(
        train_index=str(index), num_workers=0, crop_seconds=2.0, batch_seconds=8.0, num_buckets=3, shuffle_buffer=16
    )
    return DataConfig(**{**base, **kw})


def rewrite_shard(shard, extra: dict[str, bytes] | None = None, keep=lambda name: True) -> list[tuple[str, bytes]]:
    """Rewrites a shard tar: members filtered by `keep`, those named in `extra` replaced in place, the
    other `extra` members appended. Returns the original members."""
    with tarfile.open(shard) as tf:
        files = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    extra = dict(extra or {})
    members = [(name, extra.pop(name, payload)) for name, payload in files if keep(name)] + list(extra.items())
    with tarfile.open(shard, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return files


@pytest.mark.procgroup
def test_partition_two_ranks_two_workers_gloo(demo_shards):
    """THE partition test: 2 gloo ranks x 2 workers, one epoch: every cut exactly once."""
    index = demo_shards / "train" / "index.json"
    per_rank = run_worker("data_partition.py", "--index", index, nproc=2)
    ids = [set(r["ids"]) for r in per_rank]
    everything = index_keys(index)
    assert len(everything) == len(set(everything))
    assert all(len(r["ids"]) == len(set(r["ids"])) for r in per_rank), "no duplicates within a rank"
    assert not ids[0] & ids[1], "ranks share no cut"
    assert ids[0] | ids[1] == set(everything), "together the ranks see every cut"
    assert all(r["workers"] == [0, 1] for r in per_rank), "both workers of each rank produce batches"


def test_raw_batches_padding_lengths_and_crop(demo_shards):
    data = config(demo_shards / "train" / "index.json")
    ids, n_batches = [], 0
    for batch in build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1):
        audio, lens = batch["audio"], batch["audio_lens"]
        assert audio.dtype.is_floating_point and audio.ndim == 2 and lens.tolist()
        assert audio.shape == (len(batch["cut_ids"]), int(lens.max()))
        assert int(lens.max()) <= data.crop_seconds * data.sample_rate, "crop respected"
        for row, n in zip(audio, lens):
            assert row[n:].abs().sum() == 0 and row[:n].abs().sum() > 0, "zero padding after the length"
        assert batch["seconds"] == pytest.approx(lens.sum().item() / data.sample_rate, abs=1e-3)
        assert batch["seconds"] <= data.batch_seconds + 1e-6
        assert batch["skipped"] == 0
        assert batch["pad_frac"] == pytest.approx(1 - lens.sum().item() / audio.numel()), "padded / all samples"
        ids += batch["cut_ids"]
        n_batches += 1
    assert sorted(ids) == sorted(index_keys(data.train_index)), "num_workers=0 reads every shard of the rank"
    assert n_batches > 1


def test_crop_false_keeps_whole_windows(demo_shards):
    data = config(demo_shards / "train" / "index.json", crop_seconds=1.0)
    lens = [
        n
        for b in build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1, crop=False)
        for n in b["audio_lens"].tolist()
    ]
    assert max(lens) > 2 * data.sample_rate and len(lens) == len(index_keys(data.train_index))


def test_pad_frac_of_a_tiny_batch():
    """perf/pad_frac's source: rows of 3 and 1 samples pad to 2 x 3, so 2 of 6 samples are padding."""
    stream = ShardStream(
        shards=[], data=DataConfig(), rank=0, world_size=1, local_world_size=1, seed=0, epochs=1, crop=True,
        duration_bins=[1.0],
    )  # fmt: skip
    batch = stream.collate([("a", np.ones(3, dtype=np.float32)), ("b", np.ones(1, dtype=np.float32))])
    assert batch["audio"].shape == (2, 3) and batch["audio_lens"].tolist() == [3, 1]
    assert batch["pad_frac"] == pytest.approx(2 / 6)
    assert "fbank" not in batch


@pytest.mark.parametrize("key", ["features", "num_mel_bins"])
def test_fbank_settings_are_gone(key):
    """Nothing consumed batch["fbank"]: data.features and data.num_mel_bins are unknown keys now."""
    with pytest.raises(ConfigError, match=rf"unknown key `data\.{key}` in section `data`"):
        load_config(None, [f"data.{key}=80"])


def test_same_seed_same_order_endless_stream_keeps_going(demo_shards):
    data = config(demo_shards / "train" / "index.json")
    n_cuts = len(index_keys(data.train_index))

    def first(n, seed):
        it = iter(build_loader(data, data.train_index, rank=0, world_size=1, seed=seed))
        return [next(it) for _ in range(n)]

    a, b, c = first(3, seed=5), first(3, seed=5), first(3, seed=6)
    assert [x["cut_ids"] for x in a] == [x["cut_ids"] for x in b]
    assert all(np.array_equal(x["audio"], y["audio"]) for x, y in zip(a, b)), "same crops"
    assert [x["cut_ids"] for x in a] != [x["cut_ids"] for x in c]
    # endless: well past three epochs' worth of cuts, the stream still yields
    seen, epochs = 0, set()
    for batch in build_loader(data, data.train_index, rank=0, world_size=1, seed=5):
        seen += len(batch["cut_ids"])
        epochs.add(batch["epoch"])
        if seen > 3 * n_cuts:
            break
    assert seen > 3 * n_cuts and max(epochs) >= 2


def test_too_few_shards_for_ranks_x_workers(demo_shards):
    index = demo_shards / "train" / "index.json"
    data = config(index, num_workers=3)
    with pytest.raises(DataError, match=r"has 8 shards but 9 are needed \(1 node\(s\) x 3 ranks x 3 workers.*") as e:
        build_loader(data, str(index), rank=0, world_size=3, seed=0)
    assert str(index) in str(e.value) and "--min-shards 9" in str(e.value)
    data = config(index, num_workers=2)
    with pytest.raises(DataError, match=r"but 12 are needed \(2 node\(s\) x 3 ranks x 2 workers"):
        build_loader(data, str(index), rank=0, world_size=6, local_world_size=3, seed=0)


def test_missing_and_empty_index(tmp_path):
    data = config(tmp_path / "index.json")
    with pytest.raises(DataError, match="does not exist"):
        build_loader(data, data.train_index, rank=0, world_size=1, seed=0)
    (tmp_path / "index.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(DataError, match="lists no shards"):
        build_loader(data, data.train_index, rank=0, world_size=1, seed=0)


def test_bad_members_are_skipped_and_counted(demo_shards, tmp_path):
    """An undecodable flac, an empty flac and a flac without its json: 3 skips, the rest all arrive."""
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    shard = split / "shard-000002.tar"
    with tarfile.open(shard) as tf:
        good = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    key = sorted(good)[0].split(".")[0]
    empty = io.BytesIO()
    sf.write(empty, np.zeros(0, np.float32), 16000, format="FLAC")
    rewrite_shard(
        shard,
        {
            "zz-bad-0000.flac": b"\x00garbage" * 100,
            "zz-bad-0000.json": good[f"{key}.json"],
            "zz-empty-0000.flac": empty.getvalue(),
            "zz-empty-0000.json": good[f"{key}.json"],
            "zz-nojson-0000.flac": good[f"{key}.flac"],
        },
    )
    data = config(split / "index.json")
    batches = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1))
    ids = [i for b in batches for i in b["cut_ids"]]
    assert sorted(ids) == sorted(index_keys(demo_shards / "train" / "index.json"))
    assert batches[-1]["skipped"] == 3
    assert batches[-1]["skipped_by_reason"] == {"undecodable_flac": 1, "empty_audio": 1, "missing_json": 1}
    assert batches[-1]["repaired_by_reason"] == {}


@pytest.mark.parametrize("interleave", [1, 4])
def test_skip_counts_survive_a_resume_without_double_counting(demo_shards, tmp_path, interleave):
    """Two epochs over shards with 2 bad headers and 1 bad body: resumed after ANY batch, the batches and their
    skip counts are the unresumed run's (a bad body is found while its batch is decoded, possibly in a batch
    the resume drops, or in the batch that completes its group)."""
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    with tarfile.open(split / "shard-000003.tar") as tf:
        flac = next(tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".flac"))
    rewrite_shard(
        split / "shard-000003.tar",
        {"zz-bad-0000.flac": b"\x00garbage" * 100, "zz-bad-0000.json": b"{}", "zz-nojson-0000.flac": flac},
    )
    with tarfile.open(split / "shard-000005.tar") as tf:
        name, flac = next((m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".flac"))
    rewrite_shard(split / "shard-000005.tar", {name: flac[:200] + bytes(len(flac) - 200)})  # header fine, body not
    data = config(split / "index.json", batch_seconds=4.0, interleave_shards=interleave)  # several batches a group
    full = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=1, epochs=2))
    assert full[-1]["skipped_by_reason"] == {"undecodable_flac": 4, "missing_json": 2}
    for j in range(len(full) - 1):
        position = json.loads(json.dumps({"0": full[j]["position"]}))
        rest = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=1, epochs=2, position=position))
        assert rest[-1]["skipped_by_reason"] == full[-1]["skipped_by_reason"], f"resumed after batch {j}"
        # the dropped batches of the re-read group were decoded: every batch counts as the unresumed one
        assert [(b["cut_ids"], b["skipped_by_reason"]) for b in rest] == [
            (b["cut_ids"], b["skipped_by_reason"]) for b in full[j + 1 :]
        ], f"resumed after batch {j}"


def test_a_position_saved_with_other_groups_loses_and_repeats_nothing(demo_shards):
    """Saved at 3 of 8 shards with interleave_shards=1, resumed with 4: the other 5 shards' cuts, each once."""
    index = demo_shards / "train" / "index.json"
    shard_of = shard_of_cut(index)
    data = config(index, interleave_shards=4)
    loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=2, epochs=1)
    order = [p for p, _ in loader.dataset.shards_for(0, 0, 1)]
    position = {"0": {"worker": 0, "epoch": 0, "shards_done": 3, "interleave_shards": 1}}
    with pytest.warns(UserWarning, match=r"interleave_shards=\[1\]"):
        loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=2, epochs=1, position=position)
    ids = [k for b in loader for k in b["cut_ids"]]
    assert len(ids) == len(set(ids)) and {shard_of[k] for k in ids} == set(order[3:])
    assert sorted(ids) == sorted(k for k in index_keys(index) if shard_of[k] in order[3:])


def test_other_rate_and_stereo_members_are_resampled_and_downmixed(demo_shards, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    shard = split / "shard-000000.tar"
    with tarfile.open(shard) as tf:
        name, flac = next((m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".flac"))
    audio, sr = sf.read(io.BytesIO(flac), dtype="float32")
    stereo = np.stack([audio[::2], audio[::2]], axis=1)  # 8 kHz, two channels
    buf = io.BytesIO()
    sf.write(buf, stereo, sr // 2, format="FLAC")
    rewrite_shard(shard, {name: buf.getvalue()})
    data = config(split / "index.json", crop_seconds=20.0, batch_seconds=40.0, shuffle_buffer=64)
    key = name.split(".")[0]
    for batch in build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1):
        if key in batch["cut_ids"]:
            n = int(batch["audio_lens"][batch["cut_ids"].index(key)])
            assert n == pytest.approx(len(audio), abs=2) and batch["skipped"] == 0
            assert batch["repaired_by_reason"] == {"resampled": 1, "downmixed": 1}
            break
    else:
        raise AssertionError(f"{key} never arrived")


# ---- data position: resume ----------------------------------------------------------------


@pytest.mark.procgroup
def test_resume_two_ranks_two_workers_gloo(demo_shards):
    """2 gloo ranks x 2 workers, one epoch: each worker's first batches + its batches after loading the loader's
    saved state = its uninterrupted batches, cut ids and audio, with the save inside a shard group."""
    index = demo_shards / "train" / "index.json"
    per_rank = run_worker("data_resume.py", "--index", index, "--batches", 3, nproc=2)
    assert any(p["batches_in_group"] for r in per_rank for p in r["position"].values()), "saved inside a group (K)"
    for rank, r in enumerate(per_rank):
        assert sorted(r["position"]) == ["0", "1"]
        assert r["state"] == {**r["binding"], "positions": r["position"], "next_worker": 1}, "what its batches said"
        assert (r["binding"]["rank"], r["binding"]["world_size"], r["binding"]["num_workers"]) == (rank, 2, 2)
        assert r["resumed"] and r["note"] == ""
        for w, full in r["full_by_worker"].items():
            assert r["first_by_worker"][w] + r["after_by_worker"][w] == full, f"rank {rank} worker {w}"
        assert r["order"] == r["full_order"], f"rank {rank}: the order across workers"


def test_resume_two_workers_in_groups_of_two(demo_shards):
    """2 loader processes, 4 shards each read 2 at a time: after a resume each worker goes on with exactly the
    batches it would have given; the state is what the caller took, not what the workers prefetched."""
    index = demo_shards / "train" / "index.json"
    data = config(index, num_workers=2, interleave_shards=2, batch_seconds=2.0, shuffle_buffer=4)

    def by_worker(batches) -> dict[int, list]:
        out: dict[int, list] = {0: [], 1: []}
        for b in batches:
            out[b["worker"]].append((b["cut_ids"], b["audio"]))
        return out

    full = by_worker(build_loader(data, data.train_index, rank=0, world_size=1, seed=4, epochs=1))
    loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=4, epochs=1)
    first = list(islice(loader, 6))
    position = {str(b["worker"]): b["position"] for b in first}
    # (K, seed): one worker saved inside its first group, the other at the end of it
    assert sorted((p["shards_done"], p["batches_in_group"] > 0) for p in position.values()) == [(0, True), (2, False)]
    state = json.loads(json.dumps(loader.state_dict()))
    assert state == {**loader.binding(), "positions": position, "next_worker": 0}
    resumed = build_loader(data, data.train_index, rank=0, world_size=1, seed=4, epochs=1)
    resumed.load_state_dict(state)
    assert resumed.resumed and resumed.position_note == ""
    before, after = by_worker(first), by_worker(resumed)
    for w in (0, 1):
        got = before[w] + after[w]
        assert [c for c, _ in got] == [c for c, _ in full[w]], f"worker {w}"
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, full[w])), f"worker {w}: same crops"


def test_a_resume_after_an_odd_number_of_batches_keeps_the_order_across_workers(demo_shards):
    """The DataLoader serves workers in turn from worker 0: a resumed stream must go on with the worker after the
    last one taken, or every pair of batches after the resume is swapped."""
    index = demo_shards / "train" / "index.json"
    data = config(index, num_workers=2, interleave_shards=2, batch_seconds=2.0, shuffle_buffer=4)
    unbroken = build_loader(data, data.train_index, rank=0, world_size=1, seed=4)
    full = [(b["worker"], b["cut_ids"]) for b in islice(unbroken, 12)]
    loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=4)
    first = [(b["worker"], b["cut_ids"]) for b in islice(loader, 3)]
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["next_worker"] == 1
    resumed = build_loader(data, data.train_index, rank=0, world_size=1, seed=4)
    resumed.load_state_dict(state)
    after = [(b["worker"], b["cut_ids"]) for b in islice(resumed, 9)]
    assert first + after == full


def test_a_save_before_every_worker_handed_out_a_batch_keeps_every_position(demo_shards):
    index = demo_shards / "train" / "index.json"
    data = config(index, num_workers=2, interleave_shards=2, batch_seconds=2.0, shuffle_buffer=4)
    loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=4)
    next(iter(loader))  # worker 0's first batch only
    state = json.loads(json.dumps(loader.state_dict()))
    assert sorted(state["positions"]) == ["0", "1"] and state["positions"]["1"]["shards_done"] == 0
    resumed = build_loader(data, data.train_index, rank=0, world_size=1, seed=4)
    resumed.load_state_dict(state)
    assert resumed.resumed and resumed.position_note == ""


def test_iterating_the_loader_leaves_the_global_torch_rng_alone(demo_shards):
    """A resume restores the RNG, then makes the iterator: a draw there would change every dropout mask after."""
    index = demo_shards / "train" / "index.json"
    data = config(index, num_workers=0)
    loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=4)
    torch.manual_seed(0)
    want = torch.rand(1).item()
    torch.manual_seed(0)
    iter(loader)
    assert torch.rand(1).item() == want


def test_interleaved_shards_mix_in_a_batch_and_every_cut_comes_once(demo_shards):
    """interleave_shards=4: batches draw from several shards at once; =1: every batch is one shard's."""
    index = demo_shards / "train" / "index.json"
    shard_of = shard_of_cut(index)
    for interleave in (1, 4):
        data = config(index, batch_seconds=20.0, shuffle_buffer=16, interleave_shards=interleave)
        batches = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=5, epochs=1))
        ids = [k for b in batches for k in b["cut_ids"]]
        assert sorted(ids) == sorted(index_keys(index)), "each cut exactly once per epoch"
        shards_per_batch = [len({shard_of[k] for k in b["cut_ids"]}) for b in batches]
        if interleave == 1:
            assert max(shards_per_batch) == 1
        else:
            assert max(shards_per_batch) >= 3, shards_per_batch
            # the position moves by whole groups of 4 of the 8 shards
            assert {4, 8} <= {b["shards_done"] for b in batches} <= {0, 4, 8}


def same_batches(got: list[dict], want: list[dict]) -> bool:
    """The same batches in the same order: cut ids, audio (crops) and lengths."""
    return len(got) == len(want) and all(
        a["cut_ids"] == b["cut_ids"]
        and np.array_equal(a["audio"], b["audio"])
        and np.array_equal(a["audio_lens"], b["audio_lens"])
        for a, b in zip(got, want)
    )


def test_resumed_batches_equal_the_uninterrupted_run(demo_shards):
    """num_workers=0, 8 shards read 2 at a time (4 groups an epoch), 2 epochs: resumed from the position of ANY
    batch, inside a group or at its end, the batches that follow are the uninterrupted run's, batch for batch."""
    data = config(demo_shards / "train" / "index.json", batch_seconds=2.0, shuffle_buffer=4, interleave_shards=2)
    full = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=9, epochs=2))
    assert {b["epoch"] for b in full} == {0, 1}
    inside = [j for j, b in enumerate(full) if b["position"]["batches_in_group"] > 0]
    boundary = [j for j, b in enumerate(full[:-1]) if b["position"]["batches_in_group"] == 0]
    assert inside and boundary and max(b["position"]["batches_in_group"] for b in full) >= 2
    for j in range(len(full) - 1):
        position = json.loads(json.dumps({"0": full[j]["position"]}))
        loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=9, epochs=2, position=position)
        rest = list(loader)
        assert loader.resumed and loader.position_note == ""
        assert same_batches(rest, full[j + 1 :]), f"resumed after batch {j}: {full[j]['position']}"
        assert [b["position"] for b in rest] == [b["position"] for b in full[j + 1 :]]
    # the position counts shards within the epoch and ends the epoch at the worker's whole list
    ends = [b for b in full if b["epoch"] == 0]
    assert ends[-1]["shards_done"] == 8 and full[-1]["position"] == {
        "worker": 0,
        "epoch": 1,
        "shards_done": 8,
        "batches_in_group": 0,
        "interleave_shards": 2,
        "skipped_by_reason": {},
        "repaired_by_reason": full[-1]["repaired_by_reason"],  # too_long: windows over batch_seconds
    }


def test_a_resume_inside_a_group_counts_the_skips_of_the_batches_it_drops(demo_shards, tmp_path):
    """A good header and a bad body in one member of each shard: found only when its batch is decoded. Resumed
    inside a group, the worker decodes the batches it drops, so the batches after it count the same skips."""
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    for shard in sorted(split.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            flacs = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".flac")]
        if len(flacs) >= 2:
            name, flac = flacs[1]
            rewrite_shard(shard, {name: flac[:200] + bytes(len(flac) - 200)})
    data = config(split / "index.json", batch_seconds=4.0, interleave_shards=2)
    full = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=1, epochs=1))
    # (seed): some batch handed out inside a group had found a bad body after the group's start
    assert any(
        b["position"]["batches_in_group"] and b["skipped_by_reason"] != b["position"]["skipped_by_reason"] for b in full
    )
    for j in range(len(full) - 1):
        position = json.loads(json.dumps({"0": full[j]["position"]}))
        rest = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=1, epochs=1, position=position))
        assert [(b["cut_ids"], b["skipped_by_reason"]) for b in rest] == [
            (b["cut_ids"], b["skipped_by_reason"]) for b in full[j + 1 :]
        ], f"resumed after batch {j}"


def test_a_position_without_batches_in_group_resumes_at_the_group_start(demo_shards):
    """A position saved before ``batches_in_group`` existed re-reads its unfinished group whole, as before."""
    data = config(demo_shards / "train" / "index.json", batch_seconds=2.0, shuffle_buffer=4, interleave_shards=2)
    full = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=9, epochs=1))
    j = next(j for j, b in enumerate(full) if b["position"]["batches_in_group"] >= 2)
    old = {k: v for k, v in full[j]["position"].items() if k != "batches_in_group"}
    rest = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=9, epochs=1, position={"0": old}))
    start = j + 1 - full[j]["position"]["batches_in_group"]  # the first batch of that group
    assert same_batches(rest, full[start:])


def test_moved_split_gives_the_same_batches_and_resumes_exactly(demo_shards, tmp_path):
    """The split copied elsewhere (shards + index.json): the same index digest, the same batches, and a state saved
    on the original resumes on the copy batch for batch."""
    moved = tmp_path / "elsewhere" / "deeper" / "train"
    shutil.copytree(demo_shards / "train", moved)
    data = config(demo_shards / "train" / "index.json", batch_seconds=2.0, shuffle_buffer=4, interleave_shards=2)
    there = config(moved / "index.json", batch_seconds=2.0, shuffle_buffer=4, interleave_shards=2)
    full = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=9, epochs=1))
    assert same_batches(list(build_loader(there, there.train_index, rank=0, world_size=1, seed=9, epochs=1)), full)
    k = 1 + next(j for j, b in enumerate(full) if b["position"]["batches_in_group"] > 0)  # saved inside a group
    original = build_loader(data, data.train_index, rank=0, world_size=1, seed=9, epochs=1)
    list(islice(original, k))
    resumed = build_loader(there, there.train_index, rank=0, world_size=1, seed=9, epochs=1)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert resumed.resumed and resumed.position_note == ""
    assert same_batches(list(resumed), full[k:])


def test_state_dict_load_state_dict_and_the_old_rank_file(demo_shards):
    """num_workers=0: the state after any batch resumes to exactly the rest of the run; rank files of before the
    binding ({"num_workers", "positions"} and {"data_position", "num_workers"}) resume the same; such a file for
    another number of workers starts at epoch 0 with a note naming it."""
    data = config(demo_shards / "train" / "index.json", batch_seconds=4.0, shuffle_buffer=4)

    def loader():
        return build_loader(data, data.train_index, rank=0, world_size=1, seed=9, epochs=2)

    full, states = [], []
    run = loader()
    binding = run.binding()
    start = {"worker": 0, "epoch": 0, "shards_done": 0, "batches_in_group": 0}
    assert run.state_dict() == {**binding, "positions": {"0": {**run.state_dict()["positions"]["0"], **start}},
                                "next_worker": 0}  # fmt: skip
    assert binding == {
        "index": read_index(data.train_index).digest,
        "seed": 9,
        "world_size": 1,
        "rank": 0,
        "ranks_per_node": 1,
        "num_workers": 0,
        "batching": {
            "crop": True,
            "crop_seconds": 2.0,
            "micro_batch": "4 seconds",
            "long_cuts": "crop",
            "shuffle_buffer": 4,
            "num_buckets": 3,
            "sample_rate": 16000,
            "min_samples": 400,
        },
    }
    for batch in run:
        full.append(batch)
        states.append(json.loads(json.dumps(run.state_dict())))
    for j in (0, len(full) // 2, len(full) - 2):
        assert states[j] == {**binding, "positions": {"0": full[j]["position"]}, "next_worker": 0}
        old = {"num_workers": 0, "positions": states[j]["positions"]}
        older = {"data_position": states[j]["positions"], "num_workers": 0}
        for state in (states[j], old, older):
            resumed = loader()
            resumed.load_state_dict(state)
            assert resumed.resumed and resumed.position_note == "" and resumed.restart_epoch is None
            assert resumed.state_dict() == states[j], "a save before the first batch keeps the loaded position"
            assert same_batches(list(resumed), full[j + 1 :])
            assert resumed.state_dict() == states[-1]
    other = loader()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict({"num_workers": 2, "positions": states[3]["positions"]})
    assert not other.resumed and other.restart_epoch == 0
    assert {k: other.state_dict()["positions"]["0"][k] for k in ("epoch", "shards_done")} == {
        "epoch": 0,
        "shards_done": 0,
    }
    assert other.position_note.startswith("data.num_workers 2 -> 0 ") and "starts at epoch 0" in other.position_note
    assert same_batches(list(other), full)


def saved_state(loader, epoch: int, shards_done: int = 1, **changes) -> dict:
    """`loader`'s state with `changes`, as if 2 workers had reached `shards_done` shards of `epoch` and `epoch` + 1."""
    positions = {str(w): {"worker": w, "epoch": epoch + w, "shards_done": shards_done} for w in range(2)}
    return json.loads(json.dumps({**loader.state_dict(), "positions": positions, **changes}))


@pytest.mark.parametrize(
    "saved, now, note, epoch",
    [
        ({"seed": 8}, {}, "run.seed 8 -> 9: the saved position counts in another shard order", 0),
        ({"index": "ab12" * 16}, {}, "index digest ab12ab12ab12.. -> {digest}..: the saved position", 0),
        ({"world_size": 2}, {}, "world size 2 -> 1: this rank's workers read other shards", 3),
        ({"rank": 1}, {"world_size": 2}, "rank 1 -> 0: this rank's workers read other shards", 3),
        ({"ranks_per_node": 2}, {"world_size": 2, "local_world_size": 1}, "ranks per node 2 -> 1: this rank's", 3),
        ({"num_workers": 2}, {"num_workers": 1}, "data.num_workers 2 -> 1: this rank's workers read other", 3),
        ({"num_workers": 2, "seed": 8}, {"num_workers": 1}, "run.seed 8 -> 9, data.num_workers 2 -> 1: the saved", 0),
    ],
)
def test_a_position_bound_to_other_data_is_a_named_restart(demo_shards, saved, now, note, epoch):
    """Each difference in what a position counts in: not used, position_note names it and what is kept; another
    shard order starts at epoch 0, another shard assignment at the beginning of the saved (lowest) epoch."""
    index = demo_shards / "train" / "index.json"
    digest = read_index(index).digest
    data = config(index, num_workers=now.get("num_workers", 0))
    kw = dict(rank=0, world_size=now.get("world_size", 1), local_world_size=now.get("local_world_size"), seed=9)
    state = saved_state(build_loader(data, str(index), **kw), epoch=3, **saved)
    loader = build_loader(data, str(index), **kw)
    loader.load_state_dict(state)
    assert not loader.resumed and loader.restart_epoch == epoch
    assert loader.position_note.startswith(note.format(digest=digest[:12])), loader.position_note
    kept = f"starts at the beginning of the saved epoch {epoch} (epoch kept, position in it reset)"
    assert loader.position_note.endswith(kept if epoch else "the stream starts at epoch 0")
    # before the first batch, a save keeps the epoch; every worker starts at its beginning
    assert {p["epoch"] for p in loader.state_dict()["positions"].values()} <= {epoch}
    first = next(iter(loader))
    assert first["epoch"] == epoch and first["position"]["shards_done"] <= data.interleave_shards


def test_other_batching_settings_resume_at_the_group_start(demo_shards):
    """Another data.batch_seconds: the shard counts hold, the batches of a re-read group do not, so each worker
    re-reads its unfinished group whole, and the note says so."""
    index = demo_shards / "train" / "index.json"
    data = config(index, batch_seconds=2.0, shuffle_buffer=4, interleave_shards=2)
    run = build_loader(data, str(index), rank=0, world_size=1, seed=9, epochs=1)
    taken = list(islice(run, 2))
    assert taken[-1]["position"]["batches_in_group"] > 0, "saved inside a group"
    state = json.loads(json.dumps(run.state_dict()))
    other = config(index, batch_seconds=3.0, shuffle_buffer=4, interleave_shards=2)
    full = list(build_loader(other, str(index), rank=0, world_size=1, seed=9, epochs=1))
    loader = build_loader(other, str(index), rank=0, world_size=1, seed=9, epochs=1)
    loader.load_state_dict(state)
    assert loader.resumed and loader.position_note.startswith(
        "micro-batch 2 seconds -> 3 seconds: each worker resumes at the start of its unfinished shard group"
    )
    # from the unfinished group on: after the batch that completed the group before it
    group_start = (taken[-1]["position"]["shards_done"], 0)
    again = [b for b in full if (b["position"]["shards_done"], b["position"]["batches_in_group"]) > group_start]
    assert same_batches(list(loader), again)


def test_start_at_epoch_starts_every_worker_there(demo_shards):
    """What the trainer calls for a checkpoint of another world size: every worker at the beginning of the epoch,
    the note kept, a save before the first batch keeps the epoch; state_epoch reads any format's lowest epoch."""
    data = config(demo_shards / "train" / "index.json", num_workers=2)
    loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=9)
    loader.start_at_epoch(4, "saved by 4 ranks: epoch 4 kept")
    assert not loader.resumed and loader.position_note == "saved by 4 ranks: epoch 4 kept"
    assert loader.restart_epoch == 4
    positions = loader.state_dict()["positions"]
    assert {w: (p["epoch"], p["shards_done"], p["batches_in_group"]) for w, p in positions.items()} == {
        "0": (4, 0, 0),
        "1": (4, 0, 0),
    }
    batches = list(islice(loader, 2))  # the first batch of each worker
    assert {b["epoch"] for b in batches} == {4} and {b["worker"] for b in batches} == {0, 1}
    assert state_epoch(loader.state_dict()) == 4
    assert state_epoch({"num_workers": 1, "data_position": {"0": {"epoch": 2}, "1": {"epoch": 1}}}) == 1
    assert state_epoch({"num_workers": 0, "positions": {}}) == 0


def test_counters_sum_the_workers_latest_batches(demo_shards, tmp_path):
    """counters(): the lowest epoch, the shards done and the skips summed over each worker's latest batch."""
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    rewrite_shard(split / "shard-000002.tar", {"zz-bad-0000.flac": b"\x00garbage" * 100, "zz-bad-0000.json": b"{}"})
    data = config(split / "index.json", num_workers=2)
    loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1)
    assert loader.counters() == DataCounters(epoch=0, shards_done=0, skipped=0)
    latest = {}
    for batch in loader:
        latest[batch["worker"]] = batch
        counters = loader.counters()
        assert counters.epoch == min(b["epoch"] for b in latest.values())
        assert counters.shards_done == sum(b["shards_done"] for b in latest.values())
        assert counters.skipped == sum(b["skipped"] for b in latest.values())
    assert loader.counters() == DataCounters(epoch=0, shards_done=8, skipped=1)


def test_a_position_for_other_workers_starts_fresh(demo_shards):
    data = config(demo_shards / "train" / "index.json", num_workers=2)
    position = {str(w): {"worker": w, "epoch": 3, "shards_done": 1} for w in range(3)}
    with pytest.warns(UserWarning, match="starting from epoch 0: it is for workers \\[0, 1, 2\\], this loader has 2"):
        loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1, position=position)
    assert not loader.resumed and "workers [0, 1, 2]" in loader.position_note
    assert {b["epoch"] for b in loader} == {0}
    fresh = build_loader(data, data.train_index, rank=0, world_size=1, seed=0, position=None)
    assert not fresh.resumed and fresh.position_note == ""


def test_shards_split_by_node_then_rank_then_worker(demo_shards):
    """4 ranks on 2 nodes x 2 workers over 8 shards: each worker one shard, every epoch a partition."""
    index = demo_shards / "train" / "index.json"
    data = config(index, num_workers=2)
    everything = [s.path for s in read_index(index).shards]
    for epoch in (0, 1):
        got = []
        for rank in range(4):
            stream = build_loader(data, str(index), rank=rank, world_size=4, local_world_size=2, seed=1).dataset
            lists = [[p for p, _ in stream.shards_for(epoch, w, 2)] for w in range(2)]
            assert all(len(x) == 1 for x in lists)
            got += [p for x in lists for p in x]
        assert sorted(got) == sorted(everything)
        node0 = set(got[:4])
        order = list(everything)
        import random

        random.Random(f"shards:1:{epoch}").shuffle(order)
        assert node0 == set(order[0::2]), "node 0 reads every other shard of the epoch's order"


def test_truncated_tar_keeps_what_precedes_the_cut(demo_shards, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    shard = split / "shard-000001.tar"
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    first_key = members[0].name.split(".")[0]
    # cut inside the second key's flac: the first key survives, the second is lost with the tar's end
    second_flac = next(m for m in members if m.name.endswith(".flac") and not m.name.startswith(first_key))
    shard.write_bytes(shard.read_bytes()[: second_flac.offset_data + 100])
    data = config(split / "index.json", num_workers=2)
    batches = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1))
    ids = {i for b in batches for i in b["cut_ids"]}
    lost = {m.name.split(".")[0] for m in members} - {first_key}
    assert ids == set(index_keys(demo_shards / "train" / "index.json")) - lost and first_key in ids
    by_worker = {b["worker"]: b["skipped_by_reason"] for b in batches}
    assert sum(r.get("truncated_tar", 0) for r in by_worker.values()) == 1, by_worker


def test_tar_cut_at_a_header_boundary_is_counted_too(demo_shards, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    shard = split / "shard-000001.tar"
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    shard.write_bytes(shard.read_bytes()[: members[2].offset])  # ends cleanly after the first key
    data = config(split / "index.json")
    batches = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1))
    assert batches[-1]["skipped_by_reason"] == {"truncated_tar": 1}


def test_absurdly_long_member_is_cropped_and_counted(demo_shards, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    long = io.BytesIO()
    sf.write(long, 0.1 * np.sin(np.arange(16000 * 60) / 7.0).astype(np.float32), 16000, format="FLAC")
    meta = json.dumps({"id": "zz-long-0000"}).encode()
    rewrite_shard(split / "shard-000004.tar", {"zz-long-0000.flac": long.getvalue(), "zz-long-0000.json": meta})
    data = config(split / "index.json")  # batch_seconds 8: a 60 s member could never fit a batch
    for crop in (False, True):
        batches = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1, crop=crop))
        lens = {k: int(n) for b in batches for k, n in zip(b["cut_ids"], b["audio_lens"])}
        assert lens["zz-long-0000"] == data.crop_seconds * data.sample_rate
        assert batches[-1]["repaired_by_reason"] == {"too_long": 1} and batches[-1]["skipped"] == 0
        assert all(b["seconds"] <= data.batch_seconds + 1e-6 for b in batches)


def test_shard_vanishing_after_start_up_is_a_counted_skip(demo_shards, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    data = config(split / "index.json")
    loader = build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1)
    gone = split / "shard-000006.tar"
    lost = {m.split(".")[0] for m in tarfile.open(gone).getnames()}
    gone.unlink()
    batches = list(loader)
    assert {i for b in batches for i in b["cut_ids"]} == set(index_keys(demo_shards / "train" / "index.json")) - lost
    assert batches[-1]["skipped_by_reason"] == {"missing_shard": 1}
    # at start-up the missing file is named
    with pytest.raises(DataError, match=r"shard-000006\.tar \(entry 6\) is missing on disk"):
        build_loader(data, data.train_index, rank=0, world_size=1, seed=0)


def test_all_bad_members_in_a_worker_do_not_kill_it(demo_shards, tmp_path):
    """A shard of nothing but junk: its worker keeps streaming its other shards (2 workers, 8 shards)."""
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    files = rewrite_shard(split / "shard-000000.tar", keep=lambda name: name.endswith(".json"))
    data = config(split / "index.json", num_workers=2)
    batches = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1))
    lost = {n.split(".")[0] for n, _ in files}
    assert {i for b in batches for i in b["cut_ids"]} == set(index_keys(demo_shards / "train" / "index.json")) - lost
    assert sum(
        b["skipped_by_reason"].get("missing_flac", 0) for b in {b["worker"]: b for b in batches}.values()
    ) == len(lost)


@pytest.mark.timeout(120)
def test_a_worker_over_undecodable_bodies_raises_instead_of_hanging(demo_shards, tmp_path):
    """Every member with a good FLAC header and a body that does not decode: the endless stream of a DataLoader
    worker raises DataError naming the rank, the worker, its shards and the skips, in the iterating process."""
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    for shard in sorted(split.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            flacs = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".flac")}
        rewrite_shard(shard, {name: flac[:200] + bytes(len(flac) - 200) for name, flac in flacs.items()})
    data = config(split / "index.json", num_workers=1)
    loader = build_loader(data, data.train_index, rank=1, world_size=2, seed=0)
    shards = [p for p, _ in loader.dataset.shards_for(0, 0, 1)]
    with pytest.raises(DataError, match=r"rank 1 worker 0: no batch from the last 4 shards read") as e:
        next(iter(loader))
    assert all(p in str(e.value) for p in shards) and "'undecodable_flac': " in str(e.value)


def test_members_shorter_than_min_samples_are_skipped_and_counted(demo_shards, tmp_path):
    """300 samples at 16 kHz and 150 at 8 kHz (300 at 16 kHz) are too short for min_samples=400 (the default);
    500 samples pass; with min_samples=200 all three arrive."""
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    extra = {}
    for key, n, sr in (("zz-short-0000", 300, 16000), ("zz-short8k-0000", 150, 8000), ("zz-ok-0000", 500, 16000)):
        buf = io.BytesIO()
        sf.write(buf, 0.1 * np.sin(np.arange(n) / 5.0).astype(np.float32), sr, format="FLAC")
        extra |= {f"{key}.flac": buf.getvalue(), f"{key}.json": json.dumps({"id": key}).encode()}
    rewrite_shard(split / "shard-000003.tar", extra)
    data = config(split / "index.json")
    batches = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1))
    ids = {k for b in batches for k in b["cut_ids"]}
    assert "zz-ok-0000" in ids and not ids & {"zz-short-0000", "zz-short8k-0000"}
    assert batches[-1]["skipped_by_reason"] == {"too_short": 2}
    batches = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1, min_samples=200))
    assert {"zz-short-0000", "zz-short8k-0000", "zz-ok-0000"} <= {k for b in batches for k in b["cut_ids"]}
    assert batches[-1]["skipped"] == 0
