"""LibriLight preparation: any subset of parts, window limits, VAD windows, the speaker split, clear errors, and bad
source files skipped, counted and named (again on a re-run)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil

import pytest

from istack_ds.data.corpora import BadSource
from istack_ds.data.corpora.common import pick_valid_speakers, warn_large_valid
from istack_ds.data.corpora.librilight import (
    manifest_paths,
    prepare_librilight,
    vad_windows,
    voice_activity,
)
from istack_ds.data.demo_corpus import make_corpus
from istack_ds.data.index import DataError, read_index
from tests.helpers import ROOT

QUIET = dict(log=lambda *_: None)


def ids_in(path) -> list[str]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["id"] for line in f]


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory):
    """small/ with speakers 100, 101 and medium/ with 102 (moved from a 3-speaker corpus)."""
    root = tmp_path_factory.mktemp("two_parts")
    make_corpus(root, speakers=3, books=1, files=2, seconds=8.0, seed=2, engine="synth", **QUIET)
    (root / "medium").mkdir()
    shutil.move(str(root / "small" / "102"), str(root / "medium" / "102"))
    return root


def test_only_small_then_medium_added(two_parts, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(two_parts / "small", corpus / "small")
    out = tmp_path / "out"
    first = prepare_librilight(corpus, out, max_seconds=3.0, min_seconds=0.5, valid_speakers=0, **QUIET)
    assert first["parts"] == ["small"] and set(first["splits"]) == {"train"}
    assert not manifest_paths(out / "manifests", "medium")[0].exists()
    recs = ids_in(manifest_paths(out / "manifests", "small")[0])
    assert len(recs) == 4 and all(r.startswith("small/10") for r in recs)

    shutil.copytree(two_parts / "medium", corpus / "medium")
    mtime = manifest_paths(out / "manifests", "small")[0].stat().st_mtime_ns
    lines: list[str] = []
    second = prepare_librilight(corpus, out, max_seconds=3.0, min_seconds=0.5, valid_speakers=1, log=lines.append)
    assert second["parts"] == ["small", "medium"] and second["valid_speakers"] == ["102"]
    assert manifest_paths(out / "manifests", "small")[0].stat().st_mtime_ns == mtime, "a prepared part is kept"
    assert len(ids_in(manifest_paths(out / "manifests", "medium")[0])) == 2
    assert second["splits"]["valid"]["cuts"] > 0
    assert second["splits"]["train"]["cuts"] == first["splits"]["train"]["cuts"]
    (warning,) = [line for line in lines if line.startswith("warning: ")]  # one speaker of three is a third
    assert "the 1 held-out speaker(s) of 3 hold" in warning and "--valid-speakers" in warning, warning


def test_windows_never_exceed_the_maximum(two_parts, tmp_path):
    from lhotse import CutSet

    for max_s, min_s in ((2.0, 0.3), (3.7, 1.0), (20.0, 1.0)):
        out = tmp_path / f"w{max_s}"
        summary = prepare_librilight(two_parts, out, max_seconds=max_s, min_seconds=min_s, valid_speakers=0, **QUIET)
        cuts = list(CutSet.from_jsonl_lazy(summary["splits"]["train"]["path"]))
        assert cuts and all(min_s <= c.duration <= max_s for c in cuts)
        assert all(0 <= c.start and c.end <= c.recording.duration + 1e-6 for c in cuts)
        # each window starts at a voice-activity interval's start (or max_s steps into a longer interval)
        vad = {}
        for part in ("small", "medium"):
            for f in (two_parts / part).rglob("*.json"):
                vad[f"{part}/{f.relative_to(two_parts / part).with_suffix('').as_posix()}"] = json.loads(f.read_text())[
                    "voice_activity"
                ]
        for c in cuts:
            assert any(
                s - 1e-3 <= c.start < e and abs((c.start - s) / max_s - round((c.start - s) / max_s)) < 1e-3
                for s, e in vad[c.recording.id]
            ), c


def test_valid_fraction_and_errors():
    speakers = [str(100 + i) for i in range(50)]
    assert pick_valid_speakers(speakers, None, 0.1) == speakers[45:]
    assert pick_valid_speakers(speakers, None, 0.001) == speakers[49:], "at least one speaker"
    assert pick_valid_speakers(speakers, 3, None) == speakers[47:]
    assert pick_valid_speakers(speakers, 0, None) == []
    with pytest.raises(DataError, match="leave no training speaker"):
        pick_valid_speakers(speakers, 50, None)
    with pytest.raises(DataError, match="must be in"):
        pick_valid_speakers(speakers, None, 1.5)


def test_held_out_speakers_holding_much_of_the_data_are_a_warning():
    """Issue 24 item 6: with few speakers the held-out ones can be half the corpus: a warning line names the numbers
    and the options; a held-out split at most 20 % of the cuts and seconds (or none) is not warned about."""
    lines: list[str] = []
    warn_large_valid({"train": (10, 100.0), "valid": (10, 90.0)}, ["b"], 2, lines.append)
    (line,) = lines
    assert line.startswith("warning: the 1 held-out speaker(s) of 2 hold 10 of 20 cuts (50%), 0.025 of 0.053 h"), line
    assert "--valid-speakers N or --valid-fraction F" in line, line
    warn_large_valid({"train": (90, 1000.0), "valid": (10, 300.0)}, ["b"], 9, lines.append)  # 10 %, 23 % of time
    assert len(lines) == 2 and "(23%)" in lines[1] and "(10%)" in lines[1], lines[1]
    warn_large_valid({"train": (90, 1000.0), "valid": (10, 100.0)}, ["b"], 9, lines.append)
    warn_large_valid({"train": (90, 1000.0)}, [], 9, lines.append)
    assert len(lines) == 2


def test_missing_corpus_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        prepare_librilight(tmp_path / "nope", tmp_path / "out", **QUIET)
    (tmp_path / "empty" / "small").mkdir(parents=True)
    with pytest.raises(DataError, match="has no FLAC files"):
        prepare_librilight(tmp_path / "empty", tmp_path / "out", **QUIET)


def test_vad_windows_merge_split_and_drop():
    vad = [(0.0, 1.0), (1.5, 2.5), (2.8, 3.5), (10.0, 10.2), (12.0, 19.0)]
    assert vad_windows(vad, max_seconds=4.0, min_seconds=0.5) == [(0.0, 3.5), (12.0, 16.0), (16.0, 19.0)]
    windows = vad_windows(vad, max_seconds=2.0, min_seconds=0.0)
    assert all(b - a <= 2.0 for a, b in windows) and windows[0] == (0.0, 1.0)


# ---- bad source files: skipped, counted, named, the same on a re-run ------------------------

BAD_VAD = {
    "nan": [[0.1, float("nan")]],
    "inf": [[0.1, float("inf")]],
    "negative": [[-0.5, 1.0]],
    "start_after_end": [[2.0, 1.0]],
    "empty_interval": [[1.0, 1.0]],
    "triple": [[0.1, 0.5, 0.7]],
    "not_pairs": [1.0, 2.0],
    "strings": [["0.1", "0.5"]],
    "not_a_list": {"start": 0.1},
}


@pytest.mark.parametrize("vad", list(BAD_VAD.values()), ids=list(BAD_VAD))
def test_malformed_voice_activity_is_a_bad_vad(vad, tmp_path):
    with pytest.raises(BadSource, match=r"x\.json: voice_activity") as e:
        voice_activity({"voice_activity": vad}, tmp_path / "x.json")
    assert e.value.reason == "bad_vad"
    assert voice_activity({"voice_activity": [[0, 1.5], [2.0, 3]]}, tmp_path / "x.json") == [(0.0, 1.5), (2.0, 3.0)]


def _shard_corpus_main():
    spec = importlib.util.spec_from_file_location("shard_corpus", ROOT / "tools" / "shard_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_bad_sources_are_skipped_counted_named_and_a_rerun_says_the_same(tmp_path, capsys):
    """Issue 13 item 10: NaN / inf / negative / malformed voice_activity, unreadable or missing json, a FLAC with a
    junk header, and a FLAC whose body does not decode: the run goes on, counts each by reason, names the first
    few, records them in index.json, and a re-run gives the same index and the same lines."""
    corpus = tmp_path / "corpus"
    make_corpus(corpus, speakers=2, books=1, files=5, seconds=4.0, seed=3, engine="synth", **QUIET)
    flacs = sorted(corpus.rglob("*.flac"))
    for flac, vad in zip(flacs, (BAD_VAD["nan"], BAD_VAD["inf"], BAD_VAD["negative"], BAD_VAD["triple"])):
        meta = json.loads(flac.with_suffix(".json").read_text())
        flac.with_suffix(".json").write_text(json.dumps({**meta, "voice_activity": vad}))  # NaN, Infinity tokens
    flacs[4].with_suffix(".json").write_text("{not json")
    flacs[5].with_suffix(".json").unlink()
    flacs[6].write_bytes(b"junk" * 100)
    body = flacs[7].read_bytes()
    flacs[7].write_bytes(body[:200] + bytes(len(body) - 200))  # header fine, body not
    out = tmp_path / "out"
    argv = [
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--max-seconds=3",
        "--min-seconds=0.5",
        "--min-shards=2",
        "--valid-speakers=0",
    ]

    assert _shard_corpus_main()(argv) == 0
    first = capsys.readouterr().out.splitlines()
    sources = (
        "skipped 7 source files: bad_json 1, bad_vad 4, missing_json 1, undecodable_flac 1; "
        f"first: {flacs[0].relative_to(corpus).as_posix()} (bad_vad: {flacs[0].stem}.json: voice_activity[0] = "
        "[0.1, nan] is not [start, end], 0 <= start < end); "
    )
    assert first[-3].startswith(sources), first[-3]
    assert f"{flacs[6].relative_to(corpus).as_posix()} (undecodable_flac: " in first[-3]
    assert first[-2].startswith("train: skipped 1 cuts: undecodable_flac 1; first: ")
    assert flacs[7].name in first[-2] and first[-1].startswith("done in")
    raw = json.loads((out / "train" / "index.json").read_text())
    settings = raw["settings"]
    assert settings["skipped_sources"]["count"] == 7 and len(settings["skipped_sources"]["first"]) == 7
    assert settings["skipped_sources"]["by_reason"] == {
        "bad_json": 1,
        "bad_vad": 4,
        "missing_json": 1,
        "undecodable_flac": 1,
    }
    assert settings["skipped_members"]["by_reason"] == {"undecodable_flac": 1}
    assert [e.get("skipped", {}).get("count", 0) for e in raw["shards"]].count(1) == 1, "the shard names its skip"
    index = read_index(out / "train" / "index.json")
    assert index.samples == raw["totals"]["samples"] > 0
    sources_left = {m.split("-")[2] for s in index.shards for m in _keys(s.path)}
    assert sources_left == {f.stem for f in flacs[8:]}, "only the good files are in the shards"

    before = (out / "train" / "index.json").read_text()
    assert _shard_corpus_main()(argv) == 0, "a re-run after a skip does not crash"
    again = capsys.readouterr().out.splitlines()
    assert again[-3:-1] == first[-3:-1]
    assert (out / "train" / "index.json").read_text() == before


def _keys(shard) -> set[str]:
    import tarfile

    with tarfile.open(shard) as tf:
        return {m.name.split(".")[0] for m in tf.getmembers()}


def test_a_name_that_is_not_utf8_and_vad_past_the_end_are_counted_by_their_own_reasons(tmp_path):
    """Issue 23 item 12: a FLAC whose file name is not UTF-8 is `undecodable_name` (not `undecodable_flac`), and
    each voice_activity interval that starts past the end of its audio is counted `vad_past_end`, its file kept."""
    import os

    from istack_ds.data.corpora.librilight import prepare_manifests

    corpus = tmp_path / "corpus"
    make_corpus(corpus, speakers=2, books=1, files=3, seconds=4.0, seed=3, engine="synth", **QUIET)
    flacs = sorted(corpus.rglob("*.flac"))
    bad = os.fsdecode(os.fsencode(flacs[0].parent) + b"/caf\xe9")  # latin-1 bytes: not UTF-8
    os.rename(flacs[0], bad + ".flac")
    os.rename(flacs[0].with_suffix(".json"), bad + ".json")
    meta = json.loads(flacs[1].with_suffix(".json").read_text())
    vad = meta["voice_activity"] + [[100.0, 101.5], [200.0, 201.0]]  # the file is at most 4 s long
    flacs[1].with_suffix(".json").write_text(json.dumps({**meta, "voice_activity": vad}))
    lines: list[str] = []

    report = prepare_manifests(corpus, tmp_path / "manifests", jobs=1, log=lines.append)
    assert report.skipped.by_reason == {"undecodable_name": 1, "vad_past_end": 2}
    first = {f["reason"]: f for f in report.skipped.first}
    assert first["undecodable_name"]["name"].endswith("caf\\xe9.flac")
    assert "not UTF-8" in first["undecodable_name"]["why"]
    assert first["vad_past_end"]["name"] == flacs[1].relative_to(corpus).as_posix()
    assert "2 voice_activity interval(s) start at or after the end" in first["vad_past_end"]["why"]
    json.dumps(report.skipped.to_dict(), ensure_ascii=False).encode("utf-8")  # prints and serializes as UTF-8
    assert report.files == len(flacs) - 1, "the file with intervals past its end is kept"
    again = prepare_manifests(corpus, tmp_path / "manifests", jobs=1, **QUIET)
    assert again.skipped.to_dict() == report.skipped.to_dict(), "a re-run reports the same"
