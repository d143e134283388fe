"""The shard index: clear errors naming the path for every way an index can be unusable; the shard-count rule."""

from __future__ import annotations

import json
import shutil

import pytest

from istack_ds.data.index import DataError, check_shard_count, read_index


def test_read_index_missing_file(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.json'} does not exist"):
        read_index(tmp_path / "nope.json")


def test_read_index_empty(tmp_path):
    path = tmp_path / "index.json"
    path.write_text(json.dumps({"split": "train", "shards": []}))
    with pytest.raises(DataError, match=f"{path} lists no shards"):
        read_index(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        read_index(path)


def test_read_index_names_the_missing_shard(demo_shards, tmp_path):
    shutil.copytree(demo_shards / "train", tmp_path / "train")
    (tmp_path / "train" / "shard-000005.tar").unlink()
    with pytest.raises(DataError, match=r"shard .*shard-000005\.tar \(entry 5\) is missing on disk"):
        read_index(tmp_path / "train" / "index.json")


def test_a_held_out_split_is_read_by_fewer_workers(demo_shards):
    """The same rule for a held-out split: each rank needs one shard, and gets at most shards // ranks workers."""
    index = read_index(demo_shards / "valid" / "index.json")
    n = len(index.shards)
    assert check_shard_count(index, 1, 2, held_out=True) == min(2, n)
    assert check_shard_count(index, n, 4, held_out=True) == 1
    assert check_shard_count(index, n, 0, held_out=True) == 0
    with pytest.raises(
        DataError,
        match=rf"has {n} shards for {n + 1} ranks: every rank validates on its own shards"
        rf".*--min-shards {n + 1} or set data.valid_index=null",
    ) as e:
        check_shard_count(index, n + 1, 1, held_out=True)
    assert index.path in str(e.value)


def test_digest_names_the_shard_list_not_where_it_lives(demo_shards, tmp_path):
    """The digest of the ordered (name, samples) list: a moved split keeps it; another order or count changes it."""
    index = read_index(demo_shards / "train" / "index.json")
    moved = tmp_path / "a" / "b" / "train"
    shutil.copytree(demo_shards / "train", moved)
    there = read_index(moved / "index.json")
    assert [s.name for s in index.shards] == [f"shard-{i:06d}.tar" for i in range(len(index.shards))]
    assert there.digest == index.digest and len(index.digest) == 64
    assert [s.path for s in there.shards] != [s.path for s in index.shards]
    raw = json.loads((moved / "index.json").read_text())
    raw["shards"].reverse()
    (moved / "index.json").write_text(json.dumps(raw))
    assert read_index(moved / "index.json").digest != index.digest
    raw["shards"].reverse()
    raw["shards"][0]["samples"] += 1
    (moved / "index.json").write_text(json.dumps(raw))
    assert read_index(moved / "index.json").digest != index.digest
