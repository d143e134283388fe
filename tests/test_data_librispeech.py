"""LibriSpeech as it unpacks: train-* -> train, dev-* -> valid, test-* left out; one whole utterance per member with
its transcript and speaker; a FLAC without a transcript line, a line without its FLAC, an undecodable FLAC and an
utterance above --max-seconds are skipped, counted and named (again on a re-run); the layout is recognised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from istack_ds.commands.shard import main as shard_main
from istack_ds.data.corpora import detect_layout
from istack_ds.data.index import DataError, read_index
from istack_ds.data.tario import iter_tar_samples

#: part -> speaker -> chapter -> utterance seconds (speakers sort as strings: "1034" < "19" < "201").
TREE = {
    "train-clean-100": {"19": {"198": [1.2, 1.6, 2.0]}, "1034": {"121": [1.4, 1.8], "122": [1.1]}},
    "dev-clean": {"201": {"300": [1.3, 1.5]}},
    "test-clean": {"61": {"70": [1.2]}},
}


def make_librispeech(root: Path, tree: dict = TREE, *, oddities: bool = True) -> dict[str, str]:
    """A LibriSpeech tree under root/LibriSpeech (synthesized 16 kHz FLAC + *.trans.txt); returns {utterance: text}.

    With `oddities`, train-clean-100 also has a FLAC without a transcript line (19-198-0100), a line without its
    FLAC (19-198-0101), an undecodable FLAC with its line (1034-121-0100) and a 4 s utterance (1034-122-0100).
    """
    rng = np.random.default_rng(0)
    texts: dict[str, str] = {}
    for part, speakers in tree.items():
        for speaker, chapters in speakers.items():
            for chapter, seconds in chapters.items():
                d = root / "LibriSpeech" / part / speaker / chapter
                d.mkdir(parents=True)
                lines = []
                for n, s in enumerate(seconds):
                    utt = f"{speaker}-{chapter}-{n:04d}"
                    t = np.arange(int(16000 * s)) / 16000
                    audio = 0.2 * np.sin(2 * np.pi * (150 + 40 * n) * t) + 0.01 * rng.standard_normal(len(t))
                    sf.write(d / f"{utt}.flac", audio.astype(np.float32), 16000)
                    texts[utt] = f"WORDS OF {speaker} {chapter} NUMBER {n}"
                    lines.append(f"{utt} {texts[utt]}")
                (d / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    if oddities:
        base = root / "LibriSpeech" / "train-clean-100"
        sf.write(base / "19" / "198" / "19-198-0100.flac", np.zeros(20000, np.float32), 16000)  # no transcript line
        with open(base / "19" / "198" / "19-198.trans.txt", "a") as f:
            f.write("19-198-0101 A LINE WITHOUT ITS FILE\n")
        (base / "1034" / "121" / "1034-121-0100.flac").write_bytes(b"junk" * 50)
        with open(base / "1034" / "121" / "1034-121.trans.txt", "a") as f:
            f.write("1034-121-0100 A FILE THAT DOES NOT DECODE\n")
        sf.write(base / "1034" / "122" / "1034-122-0100.flac", 0.1 * np.ones(64000, np.float32), 16000)
        with open(base / "1034" / "122" / "1034-122.trans.txt", "a") as f:
            f.write("1034-122-0100 FOUR SECONDS LONG\n")
    return texts


def _raise(reason, message):
    raise AssertionError(f"{reason}: {message}")


def members(index_path) -> list[dict]:
    """Every member json of a split, in shard order."""
    shards = read_index(index_path).shards
    return [json.loads(s["json"]) for shard in shards for s in iter_tar_samples(shard.path, _raise)]


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory):
    root = tmp_path_factory.mktemp("ls")
    return root, make_librispeech(root)


def test_librispeech_shards_whole_utterances_with_text_and_speaker_and_counts_what_it_skips(
    librispeech, tmp_path, capsys
):
    """Issue 14 item 1: the same `istack shard --corpus DIR --out DIR` shards a LibriSpeech tree; train-* is train,
    dev-* is valid, test-* is left out; every member is a whole utterance whose json carries text and speaker;
    oddities are skipped, counted by reason, named, and a re-run reports the same."""
    root, texts = librispeech
    out = tmp_path / "out"
    argv = ["--corpus", str(root), "--out", str(out), "--max-seconds", "3", "--min-shards", "2"]
    assert shard_main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    assert first[0].startswith("layout: librispeech (recognised in ")
    assert any(line == "LibriSpeech parts left out (test sets): test-clean" for line in first)
    train, valid = members(out / "train" / "index.json"), members(out / "valid" / "index.json")
    assert sorted(m["id"] for m in train) == sorted(u for u in texts if u.split("-")[0] in ("19", "1034"))
    assert sorted(m["id"] for m in valid) == ["201-300-0000", "201-300-0001"]
    for m in train + valid:
        assert list(m) == ["id", "text", "speaker", "language", "chapter", "offset", "duration", "sample_rate"]
        speaker, chapter, _ = m["id"].split("-")
        assert (m["text"], m["speaker"], m["chapter"], m["language"]) == (texts[m["id"]], speaker, chapter, "English")
        assert m["offset"] == 0.0 and m["duration"] == pytest.approx(sf.info(_flac(root, m["id"])).duration, abs=1e-3)
    settings = read_index(out / "valid" / "index.json").settings
    assert settings["parts"] == {"train": ["train-clean-100"], "valid": ["dev-clean"]}
    assert settings["parts_left_out"] == ["test-clean"]
    assert settings["skipped_sources"]["by_reason"] == {
        "missing_audio": 1,
        "no_transcript": 1,
        "too_long": 1,
        "undecodable_flac": 1,
    }
    named = {f["name"].split("/")[-1].removesuffix(".flac"): f["reason"] for f in settings["skipped_sources"]["first"]}
    assert named == {
        "1034-121-0100": "undecodable_flac",
        "19-198-0100": "no_transcript",
        "19-198-0101": "missing_audio",
        "1034-122-0100": "too_long",
    }
    assert first[-4].startswith("skipped 4 source files: ") and first[-1].startswith("done in")

    before = {s: (out / s / "index.json").read_text() for s in ("train", "valid")}
    assert shard_main(argv) == 0, "a re-run keeps what is there"
    again = capsys.readouterr().out.splitlines()
    assert again[-4:-1] == first[-4:-1]
    assert {s: (out / s / "index.json").read_text() for s in ("train", "valid")} == before


def _flac(root: Path, utt: str) -> Path:
    speaker, chapter, _ = utt.split("-")
    part = next(p for p in TREE if speaker in TREE[p])
    return root / "LibriSpeech" / part / speaker / chapter / f"{utt}.flac"


def test_the_layout_is_recognised_or_the_error_says_what_was_looked_for(librispeech, tmp_path):
    """Issue 14 item 1/3: one function tells LibriLight, LibriSpeech (DIR or DIR/LibriSpeech) and lhotse manifests
    apart; anything else is an error listing what it looked for."""
    root, _ = librispeech
    assert detect_layout(root) == "librispeech"
    assert detect_layout(root / "LibriSpeech") == "librispeech"
    (tmp_path / "ll" / "small" / "100" / "book").mkdir(parents=True)
    (tmp_path / "ll" / "small" / "100" / "book" / "a.flac").write_bytes(b"")
    assert detect_layout(tmp_path / "ll") == "librilight"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "gigaspeech_recordings_XL.jsonl.gz").write_bytes(b"")
    assert detect_layout(tmp_path / "m") == "lhotse_manifest"
    (tmp_path / "other" / "x").mkdir(parents=True)
    with pytest.raises(
        DataError, match=r"no corpus layout recognised. Looked for: LibriLight .* LibriSpeech .* lhotse"
    ):
        detect_layout(tmp_path / "other")


def test_a_flac_whose_name_is_not_utf8_is_an_undecodable_name(tmp_path):
    """Issue 23 item 12: named for what is wrong (the name), not as an undecodable FLAC or a missing transcript."""
    import os

    from istack_ds.data.corpora import BadSource
    from istack_ds.data.corpora.librispeech import parse_utterance

    flac = Path(os.fsdecode(os.fsencode(tmp_path) + b"/19-198-\xff.flac"))
    flac.write_bytes(b"")  # the name is refused before any audio is read (soundfile cannot open it at all)
    with pytest.raises(BadSource, match=r"19-198-\\xff\.flac: the file name is not UTF-8") as e:
        parse_utterance(flac.stem, flac, "A TRANSCRIPT", True)
    assert e.value.reason == "undecodable_name"
