"""The labelled espeak-ng corpus (evidence/speech_corpus.py) and the trained teacher (evidence/teacher_training.py)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json

import pytest

from istack_ds.evidence import speech_corpus as sc

needs_espeak = pytest.mark.skipif(
    not sc.espeak_available(), reason="espeak-ng is not installed: the labelled speech corpus is spoken by it"
)

#: 3 speakers x 3 sentences of 2-3 words: the last speaker is held out, 1 sentence of each other one is probed.
TINY_CORPUS = dict(speakers=3, utterances=3, min_words=2, max_words=3, seed=5)
#: A teacher small enough to train a handful of steps in about a second.
TINY_TEACHER = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    conv_channels=8,
    steps=3,
    batch_size=2,
    held_out_speakers=1,
    probe_sentences=2,
    log_every=1,
)
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def speech_corpus(tmp_path_factory):
    if not sc.espeak_available():
        pytest.skip("espeak-ng is not installed: the labelled speech corpus is spoken by it")
    out = tmp_path_factory.mktemp("speech_corpus")
    sc.make_speech_corpus(out, sc.SpeechCorpusSettings(**TINY_CORPUS), log=QUIET, progress_stream=io.StringIO())
    return out


def _fail(reason: str, message: str) -> None:
    raise AssertionError(f"{reason}: {message}")


def _jsonl(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


@needs_espeak
def test_speech_corpus_is_a_labelled_lhotse_manifest_dir_that_shards_with_its_labels(speech_corpus, tmp_path):
    from lhotse import CutSet, RecordingSet, SupervisionSet

    from istack_ds.data.plan import plan_split
    from istack_ds.data.tario import iter_tar_samples
    from istack_ds.data.writer import shard_split

    recordings = RecordingSet.from_file(speech_corpus / "recordings.jsonl.gz")
    supervisions = SupervisionSet.from_file(speech_corpus / "supervisions.jsonl.gz")
    inventory = (speech_corpus / "phonemes.txt").read_text(encoding="utf-8").split()
    sups = list(supervisions)
    assert len(sups) == 9 and len({s.speaker for s in sups}) == 3
    assert all(r.sampling_rate == 16000 and r.num_channels == 1 for r in recordings)
    for s in sups:
        assert s.language == "en" and s.text and s.speaker
        phonemes = s.custom["phonemes"]
        assert phonemes and set(phonemes) <= set(inventory)
        # one phoneme a symbol: no stress marks, no word boundaries or separators left in
        assert not any(c in p for p in phonemes for c in "ˈˌ_ ")
    assert "ʃ" in inventory or "ð" in inventory or "ɪ" in inventory  # espeak-ng's IPA, not its ASCII codes

    # The shared contract: one cut per supervision, labels in cut.custom -> every member json keeps them.
    cuts = CutSet.from_manifests(recordings=recordings, supervisions=supervisions).trim_to_supervisions()
    labelled = []
    for c in cuts:
        sup = c.supervisions[0]
        custom = {"text": sup.text, "speaker": sup.speaker, "language": sup.language, **sup.custom}
        labelled.append(dataclasses.replace(c, custom=custom))
    cuts = CutSet.from_cuts(labelled)
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    plan = plan_split(
        "train", tmp_path / "cuts.jsonl.gz", sample_rate=16000, shard_mb=1.0, max_per_shard=None, min_shards=1
    )
    (tmp_path / "train").mkdir()
    report = shard_split(
        plan, tmp_path / "train", sample_rate=16000, settings={}, log=QUIET, progress_stream=io.StringIO()
    )
    assert report.samples == 9
    by_text = {s.text: s for s in sups}
    for sample in iter_tar_samples(str(tmp_path / "train" / "shard-000000.tar"), on_error=_fail):
        meta = json.loads(sample["json"])
        sup = by_text[meta["text"]]
        assert (meta["speaker"], meta["language"], meta["phonemes"]) == (sup.speaker, "en", sup.custom["phonemes"])


@needs_espeak
def test_speech_corpus_is_cached_and_the_same_seed_gives_the_same_bytes(speech_corpus, tmp_path):
    settings = sc.SpeechCorpusSettings(**TINY_CORPUS)
    again = sc.make_speech_corpus(speech_corpus, settings, log=QUIET, progress_stream=io.StringIO())
    assert (again.utterances_written, again.utterances_reused) == (0, 9)

    other = sc.make_speech_corpus(
        tmp_path,
        sc.SpeechCorpusSettings(**{**TINY_CORPUS, "utterances": 1}),
        log=QUIET,
        progress_stream=io.StringIO(),
    )
    assert other.utterances_written == 3
    for flac in sorted(tmp_path.glob("audio/*/*.flac")):
        assert flac.read_bytes() == (speech_corpus / flac.relative_to(tmp_path)).read_bytes()
    first = {s["id"]: s for s in _jsonl(speech_corpus / "supervisions.jsonl.gz")}
    assert all(s == first[s["id"]] for s in _jsonl(tmp_path / "supervisions.jsonl.gz"))


def test_speech_corpus_without_espeak_says_so_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sc.shutil, "which", lambda name: None)
    with pytest.raises(sc.EspeakMissing, match="espeak-ng is not on PATH"):
        sc.make_speech_corpus(tmp_path / "c", log=QUIET)
    assert not (tmp_path / "c").exists()


def test_parse_phonemes_drops_stress_and_word_boundaries():
    assert sc.parse_phonemes("ð_ə k_w_ˈɪ_k\nˌəʊ_v_ə_ɹ ") == ["ð", "ə", "k", "w", "ɪ", "k", "əʊ", "v", "ə", "ɹ"]


@needs_espeak
def test_trained_teacher_loads_through_the_teacher_path_with_its_report(speech_corpus, tmp_path):
    import torch

    from istack_ds.evidence.teacher_eval import FIGURE, REPORT
    from istack_ds.evidence.teacher_training import TeacherTrainingSettings, train_teacher
    from istack_ds.models.teacher import Teacher

    settings = TeacherTrainingSettings(**TINY_TEACHER)
    lines: list[str] = []
    report = train_teacher(speech_corpus, tmp_path / "t", settings, log=lines.append)
    assert any(line.startswith("step 3/3") for line in lines)
    for key in ("per", "cka", "cka_4_12", "train_seconds", "speaker_probe_accuracy", "held_out_speakers", "phonemes"):
        assert key in report
    assert json.loads((tmp_path / "t" / REPORT).read_text())["per"] == report["per"]
    assert (tmp_path / "t" / FIGURE).stat().st_size > 0
    assert len(report["cka"]) == 5 and report["held_out_speakers"] == ["spk02_m2"]

    teacher = Teacher(tmp_path / "t", layers=[2, 4])
    assert not (tmp_path / "t" / "RANDOM_WEIGHTS.txt").exists()
    assert teacher.info.num_layers == 4 and teacher.info.do_normalize
    audio = torch.randn(2, 16000)
    lens = torch.tensor([16000, 12000])
    out = teacher(teacher.prepare_input(audio, lens), lens)
    assert set(out) == {2, 4} and out[4].shape[-1] == 32

    # Same settings, same corpus: reused, not retrained.
    weights = (tmp_path / "t" / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    assert train_teacher(speech_corpus, tmp_path / "t", settings, log=lines.append) == report
    assert "reused" in lines[0] and (tmp_path / "t" / "model.safetensors").stat().st_mtime_ns == weights


@needs_espeak
def test_teacher_training_is_deterministic_for_a_seed(speech_corpus, tmp_path):
    from istack_ds.evidence.teacher_training import TeacherTrainingSettings, train_teacher

    def weights(name, seed):
        train_teacher(
            speech_corpus, tmp_path / name, TeacherTrainingSettings(**{**TINY_TEACHER, "seed": seed}), log=QUIET
        )
        return (tmp_path / name / "model.safetensors").read_bytes()

    first = weights("a", 0)
    assert weights("b", 0) == first
    assert weights("c", 1) != first
