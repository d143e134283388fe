"""A labelled speech corpus spoken by espeak-ng: text, phonemes and speaker for every utterance.

Layout (a lhotse manifest directory: ``istack shard --layout lhotse_manifest`` reads it)::

    DIR/audio/<speaker>/<utterance>.flac   16 kHz mono FLAC, one sentence each
    DIR/audio/<speaker>/<utterance>.json   {"text", "phonemes"} (what a rerun reuses)
    DIR/recordings.jsonl.gz                lhotse RecordingSet (absolute paths)
    DIR/supervisions.jsonl.gz              lhotse SupervisionSet: text, speaker, language "en",
                                           custom {"phonemes": [...]}
    DIR/phonemes.txt                       the phoneme inventory, one symbol a line, sorted
    DIR/corpus.json                        the settings the corpus was made with

Each speaker is an espeak-ng English voice variant (``en+m1`` .. ``en+m7``, ``en+f1`` ..
``en+f5``, then again with other settings) with its own pitch and speed. Each
sentence is a few words drawn from :data:`WORDS`. Its phonemes are the ones espeak-ng
speaks (``--ipa --sep=_``, printed by the same call that writes the audio), stress marks
and word boundaries removed, so every symbol is one phoneme of a fixed IPA inventory.
Every file depends only on (seed, speaker, utterance): the same seed gives the same bytes,
and a rerun reuses the files already there.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

SAMPLE_RATE = 16000
LANGUAGE = "en"

#: espeak-ng voice variants, one per speaker (cycled, with other pitch/speed, past 12 speakers).
VARIANTS = ("m1", "f1", "m2", "f2", "m3", "f3", "m4", "f4", "m5", "m6", "f5", "m7")

#: The vocabulary sentences are drawn from: common words covering the English consonants and vowels.
WORDS = (
    "the a of and to in is it that was for on are with as his they be at one have this from or had by hot "
    "word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him "
    "two has look more day could go come did number sound no most people my over know water than call "
    "first who may down side been now find head stand own page should country found answer school grow "
    "study still learn plant cover food sun four between state keep eye never last let thought city tree "
    "cross farm hard start might story saw far sea draw left late run while press close night real life "
    "few north book carry took science eat room friend began idea fish mountain stop once base hear horse "
    "cut sure watch colour face wood main enough plain girl usual young ready above ever red list though "
    "feel talk bird soon body dog family direct pose leave song measure door product black short numeral "
    "class wind question happen complete ship area half rock order fire south problem piece told knew pass "
    "since top whole king space heard best hour better true during hundred five remember step early hold "
    "west ground interest reach fast verb sing listen six table travel less morning ten simple several "
    "vowel toward war lay against pattern slow centre love person money serve appear road map rain rule "
    "govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine note wait "
    "plan figure star box noun field rest correct able pound done beauty drive stood contain front teach "
    "week final gave green oh quick develop ocean warm free minute strong special mind behind clear tail "
    "produce fact street inch multiply nothing course stay wheel full force blue object decide surface "
    "deep moon island foot system busy test record boat common gold possible plane stead dry wonder laugh "
    "thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill east "
    "paint language among"
).split()

#: Marks espeak-ng's IPA carries that are not phonemes: primary/secondary stress, and its tie characters.
_NOT_PHONEMES = str.maketrans("", "", "ˈˌ\u200d\u0361")


class EspeakMissing(RuntimeError):
    """espeak-ng is not installed: the labelled corpus (and what needs it) cannot be made here."""


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def require_espeak() -> None:
    if not espeak_available():
        raise EspeakMissing(
            "espeak-ng is not on PATH: the labelled speech corpus is spoken by it (install it, e.g. "
            "`apt-get install espeak-ng`); nothing was written"
        )


@dataclass(frozen=True)
class SpeechCorpusSettings:
    """What a corpus is made of; a corpus directory made with other settings is rebuilt (its files kept)."""

    speakers: int = 12
    """Speakers (espeak-ng voices); at least 2."""
    utterances: int = 50
    """Sentences per speaker."""
    min_words: int = 3
    max_words: int = 7
    seed: int = 0

    def __post_init__(self):
        if self.speakers < 2:
            raise ValueError(f"speakers={self.speakers}: a speaker corpus needs at least 2")
        if self.utterances < 1:
            raise ValueError(f"utterances={self.utterances}: need at least 1 per speaker")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"min_words={self.min_words}, max_words={self.max_words}: need 1 <= min <= max")


@dataclass(frozen=True)
class Voice:
    """One speaker: an espeak-ng voice and its prosody settings."""

    speaker: str
    voice: str
    pitch: int
    speed: int


def speaker_voice(seed: int, k: int) -> Voice:
    """Speaker k's voice: variant VARIANTS[k mod 12], pitch and speed drawn from (seed, k)."""
    variant = VARIANTS[k % len(VARIANTS)]
    rng = np.random.default_rng([seed, k, 101])
    return Voice(
        speaker=f"spk{k:02d}_{variant}",
        voice=f"en+{variant}",
        pitch=int(rng.integers(25, 76)),
        speed=int(rng.integers(140, 186)),
    )


def sentence(seed: int, k: int, i: int, min_words: int, max_words: int) -> str:
    rng = np.random.default_rng([seed, k, i, 202])
    words = rng.choice(len(WORDS), size=int(rng.integers(min_words, max_words + 1)))
    return " ".join(WORDS[w] for w in words)


def parse_phonemes(ipa: str) -> list[str]:
    """espeak-ng ``--ipa --sep=_`` output -> one symbol per phoneme (stress, ties and word boundaries dropped)."""
    out: list[str] = []
    for word in ipa.translate(_NOT_PHONEMES).split():
        out.extend(p for p in word.split("_") if p)
    return out


def speak(text: str, voice: Voice) -> tuple[np.ndarray, list[str]]:
    """espeak-ng speaks `text`: (float64 audio at 16 kHz, its phonemes), from one call."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        done = subprocess.run(
            [
                "espeak-ng",
                "-v",
                voice.voice,
                "-p",
                str(voice.pitch),
                "-s",
                str(voice.speed),
                "--ipa",
                "--sep=_",
                "-w",
                tmp.name,
                text,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        # NOTE: espeak-ng exits 0 on a bad option; what it says on stderr is the error.
        if done.stderr.strip():
            raise RuntimeError(f"espeak-ng -v {voice.voice} failed on {text!r}: {done.stderr.strip()}")
        audio, sr = sf.read(tmp.name, dtype="float64", always_2d=True)
    audio = audio.mean(axis=1)
    if sr != SAMPLE_RATE:
        g = np.gcd(sr, SAMPLE_RATE)
        audio = signal.resample_poly(audio, SAMPLE_RATE // g, sr // g)
    return audio, parse_phonemes(done.stdout)


def utterance_id(speaker: str, i: int) -> str:
    return f"{speaker}-{i:04d}"


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    """Byte-stable jsonl.gz (gzip mtime 0, no file name in the header), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    tmp.replace(path)


@dataclass
class SpeechCorpusStats:
    utterances_written: int = 0
    utterances_reused: int = 0
    seconds: float = 0.0
    speakers: int = 0
    phonemes: int = 0


def make_speech_corpus(
    out: str | Path,
    settings: SpeechCorpusSettings | None = None,
    *,
    log=print,
    progress_stream=None,
    every: float = 5.0,
) -> SpeechCorpusStats:
    """Writes (or reuses) the labelled corpus under `out`; raises :class:`EspeakMissing` without espeak-ng."""
    from lhotse import Recording, SupervisionSegment

    from istack_ds.data.progress import Ticker

    settings = settings or SpeechCorpusSettings()
    require_espeak()
    out = Path(out).resolve()
    stats = SpeechCorpusStats(speakers=settings.speakers)
    recordings, supervisions = [], []
    inventory: set[str] = set()
    ticker = Ticker(
        f"speech corpus {out}", "utterances", settings.speakers * settings.utterances, progress_stream, every
    )
    for k in range(settings.speakers):
        voice = speaker_voice(settings.seed, k)
        folder = out / "audio" / voice.speaker
        for i in range(settings.utterances):
            uid = utterance_id(voice.speaker, i)
            flac, meta = folder / f"{uid}.flac", folder / f"{uid}.json"
            text = sentence(settings.seed, k, i, settings.min_words, settings.max_words)
            labels = json.loads(meta.read_text()) if meta.is_file() and flac.is_file() else None
            if labels is not None and labels.get("text") == text and labels.get("voice") == asdict(voice):
                stats.utterances_reused += 1
            else:
                audio, phonemes = speak(text, voice)
                if not phonemes:
                    raise RuntimeError(f"espeak-ng gave no phonemes for {text!r} (voice {voice.voice}, {uid})")
                rng = np.random.default_rng([settings.seed, k, i, 303])
                # A faint noise floor (no digital silence) and a fixed peak level, as in real recordings.
                audio = audio + 1e-3 * rng.standard_normal(len(audio))
                audio = 0.5 * audio / (np.max(np.abs(audio)) + 1e-9)
                folder.mkdir(parents=True, exist_ok=True)
                sf.write(str(flac), audio.astype(np.float32), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
                labels = {"text": text, "phonemes": phonemes, "voice": asdict(voice)}
                meta.write_text(json.dumps(labels, ensure_ascii=False) + "\n")
                stats.utterances_written += 1
            recording = Recording.from_file(flac, recording_id=uid)
            stats.seconds += recording.duration
            inventory.update(labels["phonemes"])
            recordings.append(recording.to_dict())
            supervisions.append(
                SupervisionSegment(
                    id=uid,
                    recording_id=uid,
                    start=0.0,
                    duration=recording.duration,
                    channel=0,
                    text=text,
                    language=LANGUAGE,
                    speaker=voice.speaker,
                    custom={"phonemes": labels["phonemes"]},
                ).to_dict()
            )
            ticker.tick()
    _write_jsonl_gz(out / "recordings.jsonl.gz", recordings)
    _write_jsonl_gz(out / "supervisions.jsonl.gz", supervisions)
    (out / "phonemes.txt").write_text("".join(p + "\n" for p in sorted(inventory)), encoding="utf-8")
    (out / "corpus.json").write_text(
        json.dumps({**asdict(settings), "words_sha256": words_digest(), "sample_rate": SAMPLE_RATE}, indent=1) + "\n"
    )
    stats.phonemes = len(inventory)
    log(
        f"speech corpus {out}: {stats.utterances_written} utterances written, {stats.utterances_reused} reused, "
        f"{stats.seconds / 60:.1f} min audio, {settings.speakers} speakers x {settings.utterances} sentences, "
        f"{stats.phonemes} phonemes"
    )
    return stats


def words_digest() -> str:
    return hashlib.sha256(" ".join(WORDS).encode()).hexdigest()[:16]


@dataclass
class Utterance:
    """One labelled utterance as the teacher trainer reads it (audio decoded)."""

    id: str
    speaker: str
    text: str
    phonemes: list[str]
    audio: np.ndarray


def read_speech_corpus(corpus: str | Path) -> list[Utterance]:
    """Every utterance of a labelled lhotse manifest directory (one supervision = one utterance), decoded, in
    manifest order."""
    from lhotse import RecordingSet, SupervisionSet

    corpus = Path(corpus)
    for name in ("recordings.jsonl.gz", "supervisions.jsonl.gz"):
        if not (corpus / name).is_file():
            raise FileNotFoundError(f"{corpus / name} is missing: not a labelled lhotse manifest directory")
    recordings = {r.id: r for r in RecordingSet.from_file(corpus / "recordings.jsonl.gz")}
    out = []
    for sup in SupervisionSet.from_file(corpus / "supervisions.jsonl.gz"):
        phonemes = (sup.custom or {}).get("phonemes")
        if not phonemes or sup.speaker is None:
            raise ValueError(f"{corpus}/supervisions.jsonl.gz: supervision {sup.id} has no phonemes or no speaker")
        rec = recordings.get(sup.recording_id)
        if rec is None:
            raise ValueError(
                f"{corpus}/supervisions.jsonl.gz: supervision {sup.id} names recording "
                f"{sup.recording_id!r}, which recordings.jsonl.gz does not hold"
            )
        if rec.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"{corpus}: recording {rec.id} is {rec.sampling_rate} Hz, not {SAMPLE_RATE}")
        audio = rec.load_audio(offset=sup.start, duration=sup.duration)[0].astype(np.float32)
        out.append(Utterance(sup.id, sup.speaker, sup.text or "", list(phonemes), audio))
    return out
