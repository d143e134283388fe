"""SUPERB-style probes (istack_ds/evidence/probe.py, `istack probe`): outputs, labels that carry vs noise, the real
model path.

The labelled index is synthetic: each phoneme is a tone below 1.9 kHz (20 ms pauses between), each speaker a
steady tone above 4 kHz.
The stand-in "model" (`bands`) returns three hidden states: the low band of a 20 ms spectrum (it carries the
phonemes), the high band (it carries the speaker) and noise, so a probe must find the right layer per task.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from istack_ds.data.index import DataError, file_sha256, index_dict
from istack_ds.data.tario import MemberWriter
from istack_ds.evidence.ctc import edit_distance
from istack_ds.evidence.probe import JSON_FILE, PLOT_FILE, run_probes
from istack_ds.evidence.probe_data import held_out_ids

SR = 16000
HOP = 320  # 20 ms frames, as HuBERT's CNN
PHONEMES = ["a", "e", "i", "o", "u", "m", "n", "s"]
SPEAKERS = 4
PER_SPEAKER = 20
QUIET = dict(log=lambda *_: None)


def synth_utterance(rng: np.random.Generator, speaker: int) -> tuple[np.ndarray, list[str]]:
    phones = [PHONEMES[i] for i in rng.integers(len(PHONEMES), size=int(rng.integers(4, 9)))]
    parts = [np.zeros(HOP)]
    for p in phones:
        # NOTE: 2-3 frames of a steady tone: on longer constant segments a linear CTC head settles in its
        # well-known spread optimum (blank everywhere), which real, context-dependent features do not have
        n = int(rng.integers(2, 4)) * HOP
        t = np.arange(n) / SR
        parts += [0.3 * np.sin(2 * np.pi * (400 + 200 * PHONEMES.index(p)) * t), np.zeros(HOP)]  # 20 ms pause
    audio = np.concatenate(parts)
    t = np.arange(len(audio)) / SR
    audio = audio + 0.2 * np.sin(2 * np.pi * (4000 + 600 * speaker) * t) + 0.01 * rng.standard_normal(len(audio))
    return audio.astype(np.float32), phones


def write_index(split_dir, members: list[tuple[str, np.ndarray, dict]], shards: int = 2):
    """index.json + `shards` tar shards of (key, audio, labels) members, as istack shard writes them."""
    split_dir.mkdir(parents=True)
    entries = []
    for k in range(shards):
        path = split_dir / f"shard-{k:06d}.tar"
        chosen = members[k::shards]
        with open(path, "wb") as f, MemberWriter(f, SR) as writer:
            for key, audio, labels in chosen:
                meta = {"id": key, **labels, "offset": 0.0, "duration": len(audio) / SR, "sample_rate": SR}
                writer.write(key, audio, meta)
        entries.append(
            {
                "path": path.name,
                "samples": len(chosen),
                "seconds": sum(len(a) for _, a, _ in chosen) / SR,
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        )
    (split_dir / "index.json").write_text(json.dumps(index_dict(split_dir.name, SR, entries, [], {})))
    return split_dir / "index.json"


@pytest.fixture(scope="module")
def labelled_index(tmp_path_factory):
    """4 speakers x 20 utterances with `speaker` + `phonemes`; 2 more without phonemes, 1 without a speaker."""
    rng = np.random.default_rng(0)
    members = []
    for s in range(SPEAKERS):
        for i in range(PER_SPEAKER):
            audio, phones = synth_utterance(rng, s)
            members.append((f"spk{s}-{i:02d}", audio, {"speaker": f"spk{s}", "phonemes": phones}))
    members.append(("nophon-0", synth_utterance(rng, 0)[0], {"speaker": "spk0"}))
    members.append(("nophon-1", synth_utterance(rng, 1)[0], {"speaker": "spk1", "text": "no phonemes here"}))
    audio, phones = synth_utterance(rng, 2)
    members.append(("nospk-0", audio, {"phonemes": phones}))
    return write_index(tmp_path_factory.mktemp("probe_data") / "train", members)


def bands(audio: np.ndarray) -> torch.Tensor:
    """Stand-in model: [3, frames, 18] = low band (phonemes), high band (speaker), noise."""
    frames = len(audio) // HOP
    spectrum = np.log1p(np.abs(np.fft.rfft(audio[: frames * HOP].reshape(frames, HOP), axis=1)))  # 50 Hz bins
    noise = np.random.default_rng(len(audio)).standard_normal((frames, 18))
    layers = [spectrum[:, 4:40:2], spectrum[:, 76:148:4], noise]
    return torch.tensor(np.stack(layers), dtype=torch.float32)


def noise(audio: np.ndarray) -> torch.Tensor:
    """Stand-in model that knows nothing: 3 hidden states of noise."""
    return torch.tensor(np.random.default_rng(len(audio)).standard_normal((3, len(audio) // HOP, 18)))


PROBE = dict(steps=400, lr=0.05, held_out=0.5, seed=0, **QUIET)


def test_probe_of_labelled_features_beats_chance_and_finds_the_layer(labelled_index, tmp_path):
    report = run_probes(bands, labelled_index, out=tmp_path, **PROBE)

    assert report["pr"]["per"] < 0.15 and report["pr"]["chance_per"] > 0.8, report["pr"]
    assert report["sid"]["accuracy"] > 0.9 and report["sid"]["chance"] < 0.35, report["sid"]
    # each task weights the hidden state that carries its label most
    assert int(np.argmax(report["layer_weights"]["pr"])) == 0, report["layer_weights"]
    assert int(np.argmax(report["layer_weights"]["sid"])) == 1, report["layer_weights"]
    # outputs: probe.json = the returned report, weights softmaxed per task, the plot written
    written = json.loads((tmp_path / JSON_FILE).read_text())
    assert {"model", "hidden_states", "settings", "data", "pr", "sid", "layer_weights", "timing"} <= set(written)
    assert written["pr"]["per"] == report["pr"]["per"] and written["hidden_states"] == 3
    for task in ("pr", "sid"):
        assert len(written["layer_weights"][task]) == 3
        assert sum(written["layer_weights"][task]) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / PLOT_FILE).stat().st_size > 1000
    # members without a label are counted and left out of that task only
    counts = written["data"]["train"]
    assert counts["members"] == SPEAKERS * PER_SPEAKER + 3
    assert counts["without_phonemes"] == 2 and counts["without_speaker"] == 1
    assert report["sid"]["train_utterances"] + report["sid"]["test_utterances"] == SPEAKERS * PER_SPEAKER + 2
    # the per-item scores the intervals resample add up to the reported figures
    each = np.array(report["pr"]["per_utterance"])
    assert len(each) == report["pr"]["test_utterances"] and each[:, 1].sum() == report["pr"]["test_phonemes"]
    assert each[:, 0].sum() / each[:, 1].sum() == pytest.approx(report["pr"]["per"])
    assert len(report["sid"]["correct"]) == report["sid"]["test_utterances"]
    assert np.mean(report["sid"]["correct"]) == pytest.approx(report["sid"]["accuracy"])
    # deterministic for a seed
    again = run_probes(bands, labelled_index, tasks=["sid"], **PROBE)
    assert again["sid"] == {**report["sid"]}


def test_probe_of_noise_stays_at_chance(labelled_index):
    report = run_probes(noise, labelled_index, **PROBE)

    assert report["sid"]["accuracy"] < report["sid"]["chance"] + 0.2, report["sid"]
    # the label-blind guess knows only the length; noise of the utterance's length knows no more
    assert report["pr"]["per"] > max(0.7, report["pr"]["chance_per"] - 0.15), report["pr"]


def test_index_without_the_label_is_an_error_naming_it(tmp_path):
    rng = np.random.default_rng(1)
    members = [(f"u{i}", synth_utterance(rng, 0)[0], {"text": "unlabelled"}) for i in range(4)]
    index = write_index(tmp_path / "bare", members, shards=1)
    with pytest.raises(DataError, match=f"{index}.*`speaker`"):
        run_probes(bands, index, tasks=["sid"], steps=1, **QUIET)
    with pytest.raises(DataError, match=f"{index}.*`phonemes`"):
        run_probes(bands, index, tasks=["pr"], steps=1, **QUIET)


def test_held_out_split_is_per_speaker_and_independent_of_order():
    from istack_ds.evidence.probe_data import Utterance

    utts = [Utterance(f"s{s}-{i}", f"s{s}", None) for s, n in enumerate((1, 2, 4)) for i in range(n)]
    held = held_out_ids(utts, 0.5, seed=3)
    assert held == held_out_ids(list(reversed(utts)), 0.5, seed=3)
    assert held != held_out_ids(utts, 0.5, seed=4)
    by_speaker = [sum(u.id in held for u in utts if u.speaker == f"s{s}") for s in range(3)]
    assert by_speaker == [0, 1, 2]  # a speaker's only utterance is kept for fitting
    assert edit_distance(list("kitten"), list("sitting")) == 3


def test_probe_command_on_a_saved_hf_model(labelled_index, tmp_path, teacher_dir):
    from istack_ds.commands.probe import main

    model = teacher_dir
    out = tmp_path / "probe"
    main([str(model), "--train-index", str(labelled_index), "--out", str(out), "--steps", "20", "--held-out", "0.5"])

    report = json.loads((out / JSON_FILE).read_text())
    assert report["model_type"] == "hubert" and report["hidden_states"] == 9  # 8 layers + the input of the first
    assert 0.0 <= report["pr"]["per"] and 0.0 <= report["sid"]["accuracy"] <= 1.0
    for task in ("pr", "sid"):
        assert len(report["layer_weights"][task]) == 9
        assert sum(report["layer_weights"][task]) == pytest.approx(1.0, abs=1e-5)
    assert (out / PLOT_FILE).is_file()
