"""LibriLight preparation: any subset of parts, window limits, VAD windows, the speaker split, clear errors."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from istack_ds.data.corpora.librilight import manifest_paths, pick_valid_speakers, prepare_librilight, vad_windows
from istack_ds.data.demo_corpus import make_corpus
from istack_ds.data.index import DataError

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
    second = prepare_librilight(corpus, out, max_seconds=3.0, min_seconds=0.5, valid_speakers=1, **QUIET)
    assert second["parts"] == ["small", "medium"] and second["valid_speakers"] == ["102"]
    assert manifest_paths(out / "manifests", "small")[0].stat().st_mtime_ns == mtime, "a prepared part is kept"
    assert len(ids_in(manifest_paths(out / "manifests", "medium")[0])) == 2
    assert second["splits"]["valid"]["cuts"] > 0
    assert second["splits"]["train"]["cuts"] == first["splits"]["train"]["cuts"]


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
