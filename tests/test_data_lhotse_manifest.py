"""Any lhotse manifest directory shards: a CutSet or Recording + Supervision sets, one member per supervision with its
text, speaker, language and custom labels (phonemes); parts named dev/valid are held out, test parts left out; a
recording that is not one file, or a supervision without its recording, is skipped and counted."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from istack_ds.data.corpora import detect_layout
from istack_ds.data.corpora.lhotse_manifest import find_manifests, split_of
from istack_ds.data.index import DataError, read_index
from istack_ds.data.writer import shard_corpus
from tests.test_data_librispeech import members

QUIET = dict(log=lambda *_: None)
LABELS = ["id", "text", "speaker", "language", "phonemes", "offset", "duration", "sample_rate"]


def _recordings(root, names_seconds):
    from lhotse import Recording

    recs = {}
    for name, seconds in names_seconds.items():
        t = np.arange(int(16000 * seconds)) / 16000
        sf.write(root / f"{name}.flac", (0.2 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
        recs[name] = Recording.from_file(root / f"{name}.flac", recording_id=name)
    return recs


def _sup(rec, i, start, duration, speaker, language="en"):
    from lhotse import SupervisionSegment

    return SupervisionSegment(
        id=f"{rec.id}.s{i}",
        recording_id=rec.id,
        start=start,
        duration=duration,
        text=f"text {rec.id} {i}",
        speaker=speaker,
        language=language,
        custom={"phonemes": ["h", "@", f"{i}"]},
    )


def test_a_cutset_shards_one_member_per_supervision_with_its_labels(tmp_path):
    """Issue 14 item 1: a CutSet as a lhotse recipe writes it; a cut with two supervisions gives two members, each
    with text, speaker, language and phonemes; the part named dev is the held-out split, the test part left out."""
    from lhotse import CutSet, MonoCut

    manifests = tmp_path / "m"
    manifests.mkdir()
    recs = _recordings(manifests, {"a": 3.0, "b": 2.0, "c": 2.0, "d": 2.0})

    def cut(rec, sups):
        return MonoCut(
            id=f"{rec.id}-cut", start=0.0, duration=rec.duration, channel=0, recording=rec, supervisions=sups
        )

    train = [cut(recs["a"], [_sup(recs["a"], 0, 0.0, 1.2, "s1"), _sup(recs["a"], 1, 1.5, 1.4, "s2")])]
    train.append(cut(recs["b"], []))  # no supervision: the whole cut
    CutSet.from_cuts(train).to_file(manifests / "toy_cuts_train.jsonl.gz")
    CutSet.from_cuts([cut(recs["c"], [_sup(recs["c"], 0, 0.2, 1.5, "s3", "fr")])]).to_file(
        manifests / "toy_cuts_dev.jsonl.gz"
    )
    CutSet.from_cuts([cut(recs["d"], [_sup(recs["d"], 0, 0.0, 1.0, "s4")])]).to_file(
        manifests / "toy_cuts_test.jsonl.gz"
    )
    assert detect_layout(manifests) == "lhotse_manifest"
    out = tmp_path / "out"
    reports = shard_corpus(manifests, out, min_shards=1, valid_speakers=1, **QUIET)
    assert set(reports) == {"train", "valid"}
    train_members = {m["id"]: m for m in members(out / "train" / "index.json")}
    assert sorted(train_members) == ["a_s0", "a_s1", "b-cut"]
    assert list(train_members["a_s1"]) == LABELS
    assert train_members["a_s1"]["text"] == "text a 1" and train_members["a_s1"]["speaker"] == "s2"
    assert train_members["a_s1"]["phonemes"] == ["h", "@", "1"] and train_members["a_s1"]["language"] == "en"
    assert (train_members["a_s1"]["offset"], train_members["a_s1"]["duration"]) == (1.5, 1.4)
    assert train_members["b-cut"] == {"id": "b-cut", "offset": 0.0, "duration": 2.0, "sample_rate": 16000}
    (valid,) = members(out / "valid" / "index.json")
    assert valid == {
        "id": "c_s0",
        "text": "text c 0",
        "speaker": "s3",
        "language": "fr",
        "phonemes": ["h", "@", "0"],
        "offset": 0.2,
        "duration": 1.5,
        "sample_rate": 16000,
    }
    settings = read_index(out / "train" / "index.json").settings
    assert settings["parts_left_out"] == ["test"] and settings["valid_speakers"] == []


def test_recordings_and_supervisions_shard_held_out_by_speaker_and_bad_entries_are_counted(tmp_path):
    """Issue 14 item 1: recordings.jsonl.gz + supervisions.jsonl.gz (the brief's labelled corpus); no part is named
    dev, so the last speaker is held out; a recording with a URL source, a supervision whose recording is not in
    the manifest, and one above --max-seconds are skipped and counted, not raised."""
    from lhotse import AudioSource, Recording, RecordingSet, SupervisionSet

    manifests = tmp_path / "m"
    manifests.mkdir()
    recs = _recordings(manifests, {"r1": 3.0, "r2": 2.5, "r3": 2.0})
    url = Recording(
        id="web",
        sources=[AudioSource(type="url", channels=[0], source="https://example.org/x.flac")],
        sampling_rate=16000,
        num_samples=32000,
        duration=2.0,
    )
    sups = [
        _sup(recs["r1"], 0, 0.0, 1.0, "alice"),
        _sup(recs["r1"], 1, 1.2, 1.5, "bob"),
        _sup(url, 0, 0.0, 1.0, "alice"),
        _sup(url, 1, 1.0, 1.0, "alice"),  # both utterances of the unreadable recording are counted
        _sup(recs["r2"], 0, 0.0, 2.5, "alice"),  # above max_seconds 2.2
        _sup(recs["r3"], 0, 0.5, 1.0, "carol"),
    ]
    ghost = _sup(recs["r3"], 9, 0.0, 1.0, "bob")
    ghost.recording_id = "ghost"
    RecordingSet.from_recordings([recs["r1"], url, recs["r2"], recs["r3"]]).to_file(manifests / "recordings.jsonl.gz")
    SupervisionSet.from_segments(sups[:4] + [ghost] + sups[4:]).to_file(manifests / "supervisions.jsonl.gz")
    out = tmp_path / "out"
    lines: list[str] = []
    reports = shard_corpus(
        manifests, out, corpus="lhotse_manifest", max_seconds=2.2, min_shards=1, valid_speakers=1, log=lines.append
    )
    assert reports["train"].samples == 2 and reports["valid"].samples == 1
    train = sorted(members(out / "train" / "index.json"), key=lambda m: m["id"])
    assert [(m["id"], m["speaker"]) for m in train] == [("r1_s0", "alice"), ("r1_s1", "bob")]
    assert all(list(m) == LABELS and m["phonemes"][:2] == ["h", "@"] for m in train)
    (valid,) = members(out / "valid" / "index.json")
    assert (valid["id"], valid["speaker"], valid["text"], valid["offset"]) == ("r3_s0", "carol", "text r3 0", 0.5)
    skipped = read_index(out / "train" / "index.json").settings["skipped_sources"]
    assert skipped["by_reason"] == {"no_file_source": 2, "no_recording": 1, "too_long": 1}
    assert [f["name"] for f in skipped["first"]] == ["web", "r3_s9", "r2_s0"]
    assert any(
        line.startswith("skipped 4 source files: no_file_source 2, no_recording 1, too_long 1") for line in lines
    )
    assert any(line.startswith("warning: the 1 held-out speaker(s) of 3 hold 1 of 3 cuts (33%)") for line in lines)


@pytest.mark.parametrize(
    "part, split",
    [("train-clean-100", "train"), ("XL", "train"), ("", "train"), ("dev-other", "valid"), ("DEV", "valid")]
    + [("validation", "valid"), ("test", None), ("eval_2000", None), ("validated", None), ("invalidated", None)]
    + [("train-other-500", "train")],
)
def test_part_names_pick_the_split(part, split):
    assert split_of(part) == split


def test_manifest_files_are_paired_by_prefix_and_part(tmp_path):
    for name in ("ls_recordings_dev.jsonl.gz", "ls_supervisions_dev.jsonl.gz", "ls_cuts_train.jsonl.gz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "ls_cuts_dev.jsonl.gz").write_bytes(b"")
    parts = find_manifests(tmp_path)
    assert [(p.name, p.files) for p in parts] == [
        ("dev", ["ls_cuts_dev.jsonl.gz"]),
        ("train", ["ls_cuts_train.jsonl.gz"]),
    ]


def test_relative_audio_paths_from_another_directory_say_the_audio_is_missing(tmp_path, monkeypatch):
    """Issue 24 item 6: audio paths relative to the corpus root, sharded from elsewhere, is an error naming the audio
    that is missing and where it was looked for (not "no supervision names a speaker")."""
    from lhotse import RecordingSet, SupervisionSet

    corpus = tmp_path / "corpus"
    (corpus / "audio").mkdir(parents=True)
    recs = _recordings(corpus / "audio", {"r1": 1.0, "r2": 1.0})
    for rec in recs.values():
        rec.sources[0].source = f"audio/{rec.id}.flac"  # relative to the corpus root, as a recipe run there writes
    manifests = corpus / "manifests"
    manifests.mkdir()
    RecordingSet.from_recordings(recs.values()).to_file(manifests / "recordings.jsonl.gz")
    sups = [_sup(recs["r1"], 0, 0.0, 1.0, "alice"), _sup(recs["r2"], 0, 0.0, 1.0, "bob")]
    SupervisionSet.from_segments(sups).to_file(manifests / "supervisions.jsonl.gz")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError) as e:
        shard_corpus(manifests, tmp_path / "out", corpus="lhotse_manifest", min_shards=1, valid_speakers=1, **QUIET)
    text = str(e.value)
    assert text.startswith("audio missing: 2 utterances") and "missing_audio" in text, text
    assert f"{elsewhere / 'audio' / 'r1.flac'} is not there" in text, text
    assert f"looked for in {elsewhere}, then in {manifests}" in text, text
    monkeypatch.chdir(corpus)  # from the corpus root the same manifests shard
    reports = shard_corpus(
        manifests, tmp_path / "out", corpus="lhotse_manifest", min_shards=1, valid_speakers=1, **QUIET
    )
    assert reports["train"].samples == 1 and reports["valid"].samples == 1
