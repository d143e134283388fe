"""Sharding split over machines (`istack shard --part I/N`, then `--merge`): each part writes its own round-robin share
of every split's shards and a part index; the merge gives the index.json of one unsplit run, byte for byte, and
refuses a missing part or a part made with other settings, naming the part file."""

from __future__ import annotations

import json

import pytest

from istack_ds.commands.shard import main as shard_main
from istack_ds.data.index import DataError
from istack_ds.data.parts import merge_parts, parse_part
from istack_ds.data.writer import shard_corpus
from tests.test_data_librispeech import make_librispeech

QUIET = dict(log=lambda *_: None)
SETTINGS = dict(max_seconds=3.0, min_shards=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    make_librispeech(root)
    return root


def test_two_parts_merged_give_the_index_of_one_run_and_a_missing_part_is_named(corpus, tmp_path, capsys):
    """Issue 14 item 7: parts 1/2 and 2/2, run one after another, then --merge, write the same shards and the same
    index.json as one unsplit run; a part rerun keeps its shards; before part 2 is there, the merge names it."""
    whole = shard_corpus(corpus, tmp_path / "whole", **SETTINGS, **QUIET)
    out = tmp_path / "parts"
    argv = ["--corpus", str(corpus), "--out", str(out), "--max-seconds=3", "--min-shards=4"]
    assert shard_main([*argv, "--part", "1/2"]) == 0
    assert "istack shard --merge --out" in capsys.readouterr().out
    part1 = json.loads((out / "train" / "index.part-1-of-2.json").read_text())
    assert [e["path"] for e in part1["shards"]] == ["shard-000000.tar", "shard-000002.tar"], "round robin"
    assert len(part1["part"]["keys_sha256"]) == whole["train"].shards == 4
    assert not (out / "train" / "shard-000001.tar").exists() and not (out / "train" / "index.json").exists()

    assert shard_main(["--merge", "--out", str(out)]) == 2
    assert f"{out / 'train' / 'index.part-2-of-2.json'}: part 2 of 2 is missing" in capsys.readouterr().err

    assert shard_main([*argv, "--part", "2/2"]) == 0
    again = shard_corpus(corpus, out, part=(1, 2), **SETTINGS, **QUIET)
    assert all(r.written == 0 and r.skipped == r.shards for r in again.values()), "a part rerun keeps its shards"
    reports = merge_parts(out, **QUIET)
    for split in ("train", "valid"):
        assert (out / split / "index.json").read_text() == (tmp_path / "whole" / split / "index.json").read_text()
        assert reports[split].samples == whole[split].samples
    assert json.loads((out / "train" / "index.json").read_text())["settings"]["skipped_sources"]["count"] == 4
    rerun = shard_corpus(corpus, out, **SETTINGS, **QUIET)
    assert all(r.written == 0 for r in rerun.values()), "an unsplit run over merged parts keeps every shard"


def test_a_part_made_with_other_settings_is_named(corpus, tmp_path):
    """Issue 14 item 7: parts that planned other shards cannot be merged; the error names the part file and what
    differs."""
    out = tmp_path / "out"
    shard_corpus(corpus, out, part=(1, 2), **SETTINGS, **QUIET)
    shard_corpus(corpus, out, part=(2, 2), **{**SETTINGS, "min_shards": 3}, **QUIET)
    with pytest.raises(
        DataError, match=r"index\.part-2-of-2\.json was made with other settings .*settings\.min_shards"
    ):
        merge_parts(out, **QUIET)
    with pytest.raises(DataError, match="no part index"):
        merge_parts(tmp_path / "empty", **QUIET)


def test_part_argument():
    assert parse_part("3/8") == (3, 8)
    for bad in ("0/2", "3/2", "1", "a/b"):
        with pytest.raises(DataError, match="expected I/N"):
            parse_part(bad)
