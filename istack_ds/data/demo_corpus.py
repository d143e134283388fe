"""A small, deterministic corpus in LibriLight layout, for the demo and the tests.

Layout (what ``lhotse.recipes.librilight`` reads)::

    DIR/small/<speaker>/<book>/<name>.flac     16 kHz mono FLAC
    DIR/small/<speaker>/<book>/<name>.json     {"speaker", "book_meta", "snr", "voice_activity": [[start, end], ...]}

Speech comes from ``espeak-ng`` when the binary is on PATH (varied voices and
texts, resampled to 16 kHz), otherwise from a speech-like synthesizer: voiced
syllables (harmonics of a moving pitch shaped by formants), fricative noise
bursts, and pauses between phrases. Either way ``voice_activity`` marks the
regions that hold speech, and every file depends only on (seed, speaker, book,
file), so the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

SAMPLE_RATE = 16000
PART = "small"

# (F1, F2, F3) in Hz of a few vowels; a syllable picks one and a speaker scales it.
_VOWELS = np.array(
    [[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480], [570, 840, 2410], [660, 1720, 2410]],
    dtype=np.float64,
)
_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven old ships sail across the quiet harbour "
    "under grey clouds and a gentle wind carries the voices of children playing near the river bank "
    "every morning the baker opens his small shop and the smell of bread fills the narrow street"
).split()


@dataclass
class CorpusStats:
    files_written: int = 0
    files_reused: int = 0
    seconds: float = 0.0
    speech_seconds: float = 0.0


def file_layout(speakers: int, books: int, files: int) -> list[tuple[str, str, str]]:
    """(speaker, book, name) of every file, in a fixed order."""
    out = []
    for s in range(speakers):
        speaker = str(100 + s)
        for b in range(books):
            book = f"book{b:02d}_{speaker}"
            for f in range(files):
                out.append((speaker, book, f"{book}_{f:03d}"))
    return out


# ---- synthesizer -------------------------------------------------------------------


def _speaker_voice(seed: int, speaker: str) -> dict:
    rng = np.random.default_rng([seed, int(speaker), 7])
    female = bool(rng.integers(2))
    return {
        "f0": float(rng.uniform(175, 235) if female else rng.uniform(95, 140)),
        "formant_scale": float(rng.uniform(1.08, 1.18) if female else rng.uniform(0.92, 1.02)),
        "rate": float(rng.uniform(0.85, 1.15)),
        "brightness": float(rng.uniform(0.6, 1.0)),
    }


def _voiced(rng, n: int, f0: float, formants: np.ndarray, brightness: float) -> np.ndarray:
    """Harmonics of a gliding pitch, amplitudes shaped by formant resonances, with an attack/decay envelope."""
    t = np.arange(n) / SAMPLE_RATE
    glide = rng.uniform(-0.15, 0.15)
    f0_t = f0 * (1 + glide * t / max(t[-1], 1e-3) + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0_t) / SAMPLE_RATE
    out = np.zeros(n)
    bandwidths = np.array([90.0, 110.0, 170.0])
    for k in range(1, int(4000 / f0) + 1):
        fk = k * f0
        amp = np.sum(1.0 / (1.0 + ((fk - formants) / bandwidths) ** 2) * np.array([1.0, 0.6, 0.3]))
        amp *= fk ** (-0.5 * (1.2 - brightness))
        out += amp * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    env = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.02 * SAMPLE_RATE))
    return out * env / (np.max(np.abs(out)) + 1e-9)


def _fricative(rng, n: int) -> np.ndarray:
    lo = rng.uniform(2500, 4500)
    sos = signal.butter(4, [lo, min(lo + 3000, 7600)], btype="bandpass", fs=SAMPLE_RATE, output="sos")
    noise = signal.sosfilt(sos, rng.standard_normal(n))
    env = np.hanning(n)
    return 0.35 * noise * env / (np.max(np.abs(noise)) + 1e-9)


def _phrase(rng, seconds: float, voice: dict) -> np.ndarray:
    """Syllables (optional fricative onset + vowel) until `seconds` are filled."""
    pieces, total = [], 0
    target = int(seconds * SAMPLE_RATE)
    f0 = voice["f0"] * rng.uniform(0.95, 1.08)
    while total < target:
        if rng.random() < 0.35:
            pieces.append(_fricative(rng, int(rng.uniform(0.04, 0.11) * SAMPLE_RATE)))
        formants = _VOWELS[rng.integers(len(_VOWELS))] * voice["formant_scale"]
        n = int(rng.uniform(0.09, 0.24) / voice["rate"] * SAMPLE_RATE)
        pieces.append(_voiced(rng, n, f0, formants, voice["brightness"]) * rng.uniform(0.5, 1.0))
        f0 *= rng.uniform(0.96, 1.02)  # declination over the phrase
        if rng.random() < 0.2:  # short closure between syllables
            pieces.append(np.zeros(int(rng.uniform(0.02, 0.06) * SAMPLE_RATE)))
        total = sum(len(p) for p in pieces)
    return np.concatenate(pieces)[:target]


def synth_utterance(rng, seconds: float, voice: dict) -> tuple[np.ndarray, list[list[float]]]:
    """A speech-like signal of `seconds` and its voice activity [[start, end], ...] in seconds."""
    n = int(seconds * SAMPLE_RATE)
    audio = np.zeros(n)
    vad = []
    pos = int(rng.uniform(0.15, 0.5) * SAMPLE_RATE)
    while True:
        remaining = (n - int(0.15 * SAMPLE_RATE) - pos) / SAMPLE_RATE
        if remaining < 0.6:
            break
        phrase_s = min(rng.uniform(0.8, 3.5), remaining)
        end = pos + int(phrase_s * SAMPLE_RATE)
        audio[pos:end] = _phrase(rng, phrase_s, voice) * rng.uniform(0.6, 1.0)
        vad.append([round(pos / SAMPLE_RATE, 3), round(end / SAMPLE_RATE, 3)])
        pos = end + int(rng.uniform(0.3, 1.0) * SAMPLE_RATE)
    if not vad:  # too short for a full phrase: one phrase filling the middle
        start, end = int(0.1 * n), int(0.9 * n)
        audio[start:end] = _phrase(rng, (end - start) / SAMPLE_RATE, voice)
        vad.append([round(start / SAMPLE_RATE, 3), round(end / SAMPLE_RATE, 3)])
    audio += 1e-3 * rng.standard_normal(n)  # a noise floor, as in real recordings
    return (0.5 * audio / (np.max(np.abs(audio)) + 1e-9)).astype(np.float32), vad


# ---- espeak-ng ---------------------------------------------------------------------


class EngineMissing(RuntimeError):
    """The engine asked for (``espeak``) is not installed: nothing is written."""


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp.name, text],
            check=True,
            capture_output=True,
        )
        audio, sr = sf.read(tmp.name, dtype="float64", always_2d=True)
    audio = audio.mean(axis=1)
    if sr != SAMPLE_RATE:
        g = np.gcd(sr, SAMPLE_RATE)
        audio = signal.resample_poly(audio, SAMPLE_RATE // g, sr // g)
    return audio


def _energy_vad(audio: np.ndarray, min_gap: float = 0.25) -> list[list[float]]:
    """Speech regions from frame energy (20 ms frames), gaps shorter than `min_gap` bridged."""
    hop = SAMPLE_RATE // 50
    frames = len(audio) // hop
    if frames == 0:
        return []
    rms = np.sqrt(np.mean(audio[: frames * hop].reshape(frames, hop) ** 2, axis=1))
    active = rms > max(1e-4, 0.05 * rms.max())
    regions, start = [], None
    for i, a in enumerate(np.append(active, False)):
        if a and start is None:
            start = i
        elif not a and start is not None:
            regions.append([start * hop / SAMPLE_RATE, i * hop / SAMPLE_RATE])
            start = None
    merged: list[list[float]] = []
    for r in regions:
        if merged and r[0] - merged[-1][1] < min_gap:
            merged[-1][1] = r[1]
        else:
            merged.append(r)
    return [[round(a, 3), round(b, 3)] for a, b in merged if b - a >= 0.1]


def espeak_utterance(rng, seconds: float, speaker_idx: int) -> tuple[np.ndarray, list[list[float]]]:
    """Phrases spoken by espeak-ng with pauses between them, cut to `seconds`."""
    voices = ["en-us", "en", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-us+f3", "en+m3", "en+f2"]
    voice = voices[speaker_idx % len(voices)]
    speed, pitch = 140 + 10 * (speaker_idx % 5), 30 + 8 * (speaker_idx % 6)
    n = int(seconds * SAMPLE_RATE)
    pieces = [np.zeros(int(rng.uniform(0.15, 0.5) * SAMPLE_RATE))]
    while sum(len(p) for p in pieces) < n:
        words = rng.choice(_WORDS, size=int(rng.integers(3, 9)))
        pieces.append(_espeak(" ".join(words), voice, speed, pitch))
        pieces.append(np.zeros(int(rng.uniform(0.3, 0.9) * SAMPLE_RATE)))
    audio = np.concatenate(pieces)[:n]
    audio[-int(0.1 * SAMPLE_RATE) :] = 0.0  # never cut a word into the last frame
    audio = audio + 1e-3 * rng.standard_normal(n)
    audio = 0.5 * audio / (np.max(np.abs(audio)) + 1e-9)
    return audio.astype(np.float32), _energy_vad(audio)


# ---- the corpus --------------------------------------------------------------------


def make_corpus(
    out: str | Path,
    *,
    speakers: int = 6,
    books: int = 2,
    files: int = 6,
    seconds: float = 12.0,
    seed: int = 0,
    engine: str = "auto",
    log=print,
) -> CorpusStats:
    """Writes (or reuses) the corpus under `out`; file lengths are uniform in [seconds/3, seconds].
    Raises :class:`EngineMissing` for ``engine="espeak"`` without espeak-ng."""
    if engine == "auto":
        engine = "espeak" if espeak_available() else "synth"
    if engine not in ("espeak", "synth"):
        raise ValueError(f"engine={engine!r}: choose auto, espeak or synth")
    if engine == "espeak" and not espeak_available():
        raise EngineMissing(
            "--engine espeak needs the espeak-ng program, which is not on PATH: install it "
            "(apt-get install espeak-ng) or use --engine synth (the built-in synthesizer); nothing was written"
        )
    out = Path(out)
    stats = CorpusStats()
    for speaker, book, name in file_layout(speakers, books, files):
        folder = out / PART / speaker / book
        flac, meta = folder / f"{name}.flac", folder / f"{name}.json"
        if flac.is_file() and meta.is_file():
            info = json.loads(meta.read_text())
            stats.files_reused += 1
            stats.seconds += sf.info(str(flac)).duration
            stats.speech_seconds += sum(b - a for a, b in info["voice_activity"])
            continue
        s_idx, b_idx, f_idx = int(speaker) - 100, int(book[4:6]), int(name.rsplit("_", 1)[1])
        rng = np.random.default_rng([seed, s_idx, b_idx, f_idx])
        length = float(rng.uniform(seconds / 3, seconds))
        if engine == "espeak":
            audio, vad = espeak_utterance(rng, length, s_idx)
        else:
            audio, vad = synth_utterance(rng, length, _speaker_voice(seed, speaker))
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(str(flac), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        info = {
            "speaker": speaker,
            "book_meta": {
                "id": book,
                "title": f"Demo book {book}",
                "language": "English",
                "totaltime": round(length, 3),
                "genre": ["demo"],
            },
            "snr": 60.0,
            "voice_activity": vad,
            "generator": engine,
        }
        meta.write_text(json.dumps(info, indent=1) + "\n")
        stats.files_written += 1
        stats.seconds += len(audio) / SAMPLE_RATE
        stats.speech_seconds += sum(b - a for a, b in vad)
    log(
        f"corpus {out}/{PART}: {stats.files_written} files written, {stats.files_reused} reused, "
        f"{stats.seconds / 60:.1f} min audio ({stats.speech_seconds / 60:.1f} min speech), "
        f"{speakers} speakers x {books} books x {files} files, engine={engine}"
    )
    return stats
