"""`istack check` takes an index.json, the directory holding it, or a shard tree root (each split's index checked in
turn); a path holding none is one error line naming what was looked for (exit 2)."""

from __future__ import annotations

import shutil

from istack_ds.commands.check import main as check_main


def test_a_directory_or_a_shard_tree_root_is_checked_like_its_indexes(demo_shards, capsys):
    """Issue 24 item 6: `istack check DIR` wanted the index.json path."""
    assert check_main([str(demo_shards / "train"), "--jobs", "1", "--no-decode"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{demo_shards / 'train' / 'index.json'}: 8 shards"), lines

    assert check_main([str(demo_shards), "--jobs", "1", "--no-decode"]) == 0
    summaries = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert summaries == [str(demo_shards / split / "index.json") for split in ("train", "valid")], summaries


def test_a_bad_split_of_a_tree_fails_the_check(demo_shards, tmp_path, capsys):
    tree = tmp_path / "shards"
    shutil.copytree(demo_shards, tree)
    shard = sorted((tree / "valid").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-512])  # a truncated shard: its size and sha256 differ
    assert check_main([str(tree), "--jobs", "1", "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert f"{tree / 'train' / 'index.json'}: 8 shards" in out and "BAD " in out, out


def test_a_path_without_an_index_is_one_line_naming_what_was_looked_for(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for given in (tmp_path / "empty", tmp_path / "nope"):
        assert check_main([str(given)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert err == (
            f"error: no shard index at {given}: looked for {given / 'index.json'} and {given / '*' / 'index.json'} "
            "(e.g. train/index.json; write them with `istack shard`)"
        )
    assert check_main([str(tmp_path / "nope" / "index.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
