"""The demo corpus: LibriLight layout, real VAD, same seed -> same bytes."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from istack_ds.data.demo_corpus import SAMPLE_RATE, make_corpus

TINY = dict(speakers=2, books=1, files=2, seconds=3.0, engine="synth", log=lambda *_: None)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_seed_same_bytes_other_seed_other_audio(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_corpus(a, seed=3, **TINY)
    make_corpus(b, seed=3, **TINY)
    make_corpus(c, seed=4, **TINY)
    assert _files(a) == _files(b) == _files(c)
    for rel in _files(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert any((a / rel).read_bytes() != (c / rel).read_bytes() for rel in _files(a) if rel.suffix == ".flac")


def test_layout_fields_and_vad_marks_speech(demo_corpus):
    flacs = sorted(demo_corpus.glob("small/*/*/*.flac"))
    assert len(flacs) == 12  # 3 speakers x 1 book x 4 files
    for flac in flacs:
        speaker, book = flac.parent.parent.name, flac.parent.name
        meta = json.loads(flac.with_suffix(".json").read_text())
        assert meta["speaker"] == speaker and meta["book_meta"]["id"] == book
        audio, sr = sf.read(flac)
        info = sf.info(flac)
        assert sr == SAMPLE_RATE and info.channels == 1 and info.format == "FLAC"
        vad = meta["voice_activity"]
        assert vad and all(0 <= s < e <= len(audio) / sr for s, e in vad)
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(vad, vad[1:])), "intervals sorted and disjoint"
        inside = np.zeros(len(audio), bool)
        for s, e in vad:
            inside[int(s * sr) : int(e * sr)] = True
        # speech energy lives inside the marked regions; outside is the noise floor
        assert np.sqrt(np.mean(audio[inside] ** 2)) > 30 * np.sqrt(np.mean(audio[~inside] ** 2))


def test_rerun_reuses_files(tmp_path):
    first = make_corpus(tmp_path, seed=1, **TINY)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.flac")}
    again = make_corpus(tmp_path, seed=1, **TINY)
    assert first.files_written == 4 and again.files_written == 0 and again.files_reused == 4
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.flac")} == mtimes


def test_engine_espeak_without_espeak_ng_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from istack_ds.commands import make_demo_corpus
    from istack_ds.data import demo_corpus

    monkeypatch.setattr(demo_corpus, "espeak_available", lambda: False)
    out = tmp_path / "corpus"
    assert make_demo_corpus.main(["--out", str(out), "--engine", "espeak"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "espeak-ng" in err and "apt-get install espeak-ng" in err and "--engine synth" in err
    assert not out.exists()  # nothing written
