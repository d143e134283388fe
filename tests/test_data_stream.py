"""The streaming loader: the exact partition over ranks and workers, batch contents, endless mode, bad input."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import soundfile as sf

from istack_ds.config import DataConfig
from istack_ds.data.shards import DataError, read_index
from istack_ds.data.stream import build_loader
from tests.helpers import torchrun


def index_keys(index_path) -> list[str]:
    keys = []
    for shard in read_index(index_path).shards:
        with tarfile.open(shard.path) as tf:
            keys += [m.name.split(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".json")]
    return keys


def config(index, **kw) -> DataConfig:
    base = dict(train_index=str(index), num_workers=0, crop_seconds=2.0, batch_seconds=8.0, num_buckets=3,
                shuffle_buffer=16)
    return DataConfig(**{**base, **kw})


def test_partition_two_ranks_two_workers_gloo(demo_shards, tmp_path):
    """THE partition test: 2 gloo ranks x 2 workers, one epoch: every cut exactly once."""
    index = demo_shards / "train" / "index.json"
    out = tmp_path / "ids.json"
    torchrun("data_partition.py", str(index), str(out), nproc=2)
    per_rank = json.loads(out.read_text())
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
        assert batch["skipped"] == 0 and "fbank" not in batch
        ids += batch["cut_ids"]
        n_batches += 1
    assert sorted(ids) == sorted(index_keys(data.train_index)), "num_workers=0 reads every shard of the rank"
    assert n_batches > 1


def test_crop_false_keeps_whole_windows(demo_shards):
    data = config(demo_shards / "train" / "index.json", crop_seconds=1.0)
    lens = [n for b in build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1, crop=False)
            for n in b["audio_lens"].tolist()]
    assert max(lens) > 2 * data.sample_rate and len(lens) == len(index_keys(data.train_index))


def test_fbank_batches(demo_shards):
    data = config(demo_shards / "valid" / "index.json", features="fbank", num_mel_bins=40, num_workers=1)
    batch = next(iter(build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1)))
    feats, feat_lens = batch["fbank"], batch["fbank_lens"]
    assert feats.shape[0] == len(batch["cut_ids"]) and feats.shape[2] == 40
    assert feats.shape[1] == int(feat_lens.max())
    # 10 ms frame shift: about 100 frames a second
    assert feat_lens.tolist() == pytest.approx([n / 160 for n in batch["audio_lens"].tolist()], abs=2)
    assert np.isfinite(feats.numpy()).all()


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
    with pytest.raises(DataError, match=rf"has 8 shards but 9 are needed \(1 node\(s\) x 3 ranks x 3 workers.*") as e:
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
        files = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    keys = sorted({name.split(".")[0] for name, _ in files})
    good = dict(files)
    empty = io.BytesIO()
    sf.write(empty, np.zeros(0, np.float32), 16000, format="FLAC")
    added = {
        "zz-bad-0000.flac": b"\x00garbage" * 100, "zz-bad-0000.json": good[f"{keys[0]}.json"],
        "zz-empty-0000.flac": empty.getvalue(), "zz-empty-0000.json": good[f"{keys[0]}.json"],
        "zz-nojson-0000.flac": good[f"{keys[0]}.flac"],
    }
    with tarfile.open(shard, "w") as tf:
        for name, payload in files + list(added.items()):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    data = config(split / "index.json")
    batches = list(build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1))
    ids = [i for b in batches for i in b["cut_ids"]]
    assert sorted(ids) == sorted(index_keys(demo_shards / "train" / "index.json"))
    assert batches[-1]["skipped"] == 3


def test_other_rate_and_stereo_members_are_resampled_and_downmixed(demo_shards, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(demo_shards / "train", split)
    shard = split / "shard-000000.tar"
    with tarfile.open(shard) as tf:
        files = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    name, flac = next((n, d) for n, d in files if n.endswith(".flac"))
    audio, sr = sf.read(io.BytesIO(flac), dtype="float32")
    stereo = np.stack([audio[::2], audio[::2]], axis=1)  # 8 kHz, two channels
    buf = io.BytesIO()
    sf.write(buf, stereo, sr // 2, format="FLAC")
    with tarfile.open(shard, "w") as tf:
        for n, payload in files:
            payload = buf.getvalue() if n == name else payload
            info = tarfile.TarInfo(n)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    data = config(split / "index.json", crop_seconds=20.0, batch_seconds=40.0, shuffle_buffer=64)
    key = name.split(".")[0]
    for batch in build_loader(data, data.train_index, rank=0, world_size=1, seed=0, epochs=1):
        if key in batch["cut_ids"]:
            n = int(batch["audio_lens"][batch["cut_ids"].index(key)])
            assert n == pytest.approx(len(audio), abs=2) and batch["skipped"] == 0
            break
    else:
        raise AssertionError(f"{key} never arrived")
