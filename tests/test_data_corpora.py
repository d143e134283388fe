"""The corpus contract: any corpus whose cuts carry a file source and custom metadata shards the same way; the
source files a corpus skips and the keys it repeats are counted, never written twice."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import soundfile as sf

from istack_ds.data.corpora import DEFAULT_CORPUS, PreparedCorpus, Skipped, available, get_corpus
from istack_ds.data.index import DataError, read_index
from istack_ds.data.writer import shard_corpus

QUIET = dict(log=lambda *_: None)


class ToyCorpus:
    """Two 16 kHz FLAC files under CORPUS/, one cut per file, with metadata LibriLight does not have."""

    def __init__(self, custom=lambda i: {"language": "xx", "text": f"utterance {i}"}):
        self.custom = custom

    def prepare(self, corpus_dir, out_dir, *, max_seconds, min_seconds, valid_speakers, valid_fraction, jobs, log):
        from lhotse import CutSet, MonoCut, Recording

        cuts = []
        for i in range(2):
            path = corpus_dir / f"toy{i}.flac"
            sf.write(path, 0.1 * np.sin(np.arange(16000 * (2 + i)) / (5.0 + i)).astype(np.float32), 16000)
            rec = Recording.from_file(path, recording_id=f"toy{i}")
            cuts.append(
                MonoCut(id=f"toy{i}-0000", start=0.5, duration=1.0 + i, channel=0, recording=rec, custom=self.custom(i))
            )
        (out_dir / "train").mkdir(parents=True, exist_ok=True)
        path = out_dir / "train" / "cuts.jsonl.gz"
        CutSet.from_cuts(cuts).to_file(path)
        return PreparedCorpus(splits={"train": path}, settings={"toy": True})


def member_jsons(index_path) -> list[dict]:
    metas = []
    for shard in read_index(index_path).shards:
        with tarfile.open(shard.path) as tf:
            metas += [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    return metas


def test_a_corpus_object_keeps_its_custom_metadata_in_each_member(tmp_path):
    (tmp_path / "corpus").mkdir()
    reports = shard_corpus(tmp_path / "corpus", tmp_path / "out", corpus=ToyCorpus(), min_shards=2, **QUIET)
    assert list(reports) == ["train"] and reports["train"].samples == 2
    metas = sorted(member_jsons(tmp_path / "out" / "train" / "index.json"), key=lambda m: m["id"])
    assert [list(m) for m in metas] == [["id", "language", "text", "offset", "duration", "sample_rate"]] * 2
    assert metas[1] == {
        "id": "toy1-0000",
        "language": "xx",
        "text": "utterance 1",
        "offset": 0.5,
        "duration": 2.0,
        "sample_rate": 16000,
    }
    settings = read_index(tmp_path / "out" / "train" / "index.json").settings
    assert settings["toy"] is True and settings["split"] == "train"


def test_custom_metadata_cannot_overwrite_the_writers_keys(tmp_path):
    (tmp_path / "corpus").mkdir()
    clashing = ToyCorpus(custom=lambda i: {"duration": 9.0})
    with pytest.raises(DataError, match=r"cut toy0-0000: custom metadata \['duration'\]"):
        shard_corpus(tmp_path / "corpus", tmp_path / "out", corpus=clashing, min_shards=2, **QUIET)


def test_corpora_by_name():
    assert DEFAULT_CORPUS in available()
    assert get_corpus("librilight").__name__ == "istack_ds.data.corpora.librilight"
    toy = ToyCorpus()
    assert get_corpus(toy) is toy
    with pytest.raises(DataError, match=r"unknown corpus 'nope': the corpora are \['librilight'"):
        get_corpus("nope")


def test_librilight_members_keep_their_json_keys_in_order(demo_shards):
    """The member json of a LibriLight cut, key for key: its order is part of the shard's bytes (and sha256)."""
    metas = member_jsons(demo_shards / "train" / "index.json")
    assert metas and all(
        list(m) == ["id", "speaker", "book", "source", "offset", "duration", "sample_rate"] for m in metas
    )
    assert all(m["source"].startswith("small/") and m["source"].endswith(".flac") for m in metas)


class RepeatingCorpus:
    """train: keys a, b, a (again); valid: b (a key train has), c; one source file left out at preparation."""

    def prepare(self, corpus_dir, out_dir, *, max_seconds, min_seconds, valid_speakers, valid_fraction, jobs, log):
        from lhotse import CutSet, MonoCut, Recording

        path = corpus_dir / "one.flac"
        sf.write(path, 0.1 * np.sin(np.arange(16000 * 4) / 5.0).astype(np.float32), 16000)
        rec = Recording.from_file(path, recording_id="one")
        splits = {}
        for split, ids in (("train", ["a", "b", "a"]), ("valid", ["b", "c"])):
            cuts = [MonoCut(id=k, start=float(i), duration=1.0, channel=0, recording=rec) for i, k in enumerate(ids)]
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            splits[split] = out_dir / split / "cuts.jsonl.gz"
            CutSet.from_cuts(cuts).to_file(splits[split])
        skipped = Skipped()
        skipped.add("bad_vad", "two.flac", "voice_activity[0] = [1, nan]")
        return PreparedCorpus(splits=splits, skipped=skipped)


def test_a_repeated_key_is_written_once_over_all_splits_and_counted(tmp_path):
    """Issue 13 item 10: a key already written, in this split or an earlier one, is counted (duplicate_key) and
    named with where it was first written; a re-run keeps the shards and says the same."""
    (tmp_path / "corpus").mkdir()
    lines: list[str] = []
    reports = shard_corpus(
        tmp_path / "corpus", tmp_path / "out", corpus=RepeatingCorpus(), min_shards=1, log=lines.append
    )
    assert lines[-3:] == [
        "skipped 1 source files: bad_vad 1; first: two.flac (bad_vad: voice_activity[0] = [1, nan])",
        "train: skipped 1 cuts: duplicate_key 1; first: a (duplicate_key: "
        f"{tmp_path / 'corpus' / 'one.flac'} from 2.0 s; the key is already in train/shard-000000.tar)",
        "valid: skipped 1 cuts: duplicate_key 1; first: b (duplicate_key: "
        f"{tmp_path / 'corpus' / 'one.flac'} from 0.0 s; the key is already in train/shard-000000.tar)",
    ]
    written = {
        split: sorted(m["id"] for m in member_jsons(tmp_path / "out" / split / "index.json")) for split in reports
    }
    assert written == {"train": ["a", "b"], "valid": ["c"]}
    assert (reports["train"].samples, reports["valid"].samples) == (2, 1)
    settings = read_index(tmp_path / "out" / "valid" / "index.json").settings
    assert settings["skipped_members"]["by_reason"] == {"duplicate_key": 1}
    assert settings["skipped_sources"]["first"] == [
        {"name": "two.flac", "reason": "bad_vad", "why": "voice_activity[0] = [1, nan]"}
    ]
    before = {s: (tmp_path / "out" / s / "index.json").read_text() for s in reports}
    again = shard_corpus(tmp_path / "corpus", tmp_path / "out", corpus=RepeatingCorpus(), min_shards=1, **QUIET)
    assert all(r.written == 0 for r in again.values())
    assert {s: (tmp_path / "out" / s / "index.json").read_text() for s in reports} == before
