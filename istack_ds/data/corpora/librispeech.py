"""LibriSpeech as it unpacks -> lhotse manifests -> one cut per utterance (whole), train-* / dev-* splits. Lazy.

    DIR/LibriSpeech/<part>/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac + <speaker>-<chapter>.trans.txt
        (DIR may be LibriSpeech/ itself; parts: train-clean-100, train-clean-360, train-other-500, dev-clean,
        dev-other, test-*, and Mini LibriSpeech's train-clean-5, dev-clean-2; any subset)
      -> MANIFESTS/librispeech_recordings_<part>.jsonl.gz     one Recording per utterance file (header only)
         MANIFESTS/librispeech_supervisions_<part>.jsonl.gz   one supervision per utterance: text, speaker
      -> OUT/<split>/cuts.jsonl.gz                           one MonoCut per utterance, whole (no VAD windows)

``train-*`` parts are the ``train`` split, ``dev-*`` parts the ``valid`` split (when there is none, speakers
are held out as for LibriLight), ``test-*`` parts are left out (the log says so). cut.custom holds the
member json's labels: text, speaker, language ("English", as lhotse's recipe sets it) and chapter.

The manifests have the file names, ids and fields of ``lhotse.recipes.prepare_librispeech`` but are
written here, file by file, with lhotse's sequential writers, because the recipe gets in the way: it
holds a whole part in memory, reads the FLAC header of every transcript line and raises on the first
undecodable file, and only logs (does not count) a line without its file; a FLAC without a transcript
line it never sees. Here each chapter directory is listed once, headers are read by ``jobs`` threads,
and a FLAC no transcript line names (no_transcript), a transcript line whose FLAC is not there
(missing_audio) and a FLAC whose header does not decode (undecodable_flac) are left out and counted
(:data:`~istack_ds.data.corpora.SOURCE_SKIP_REASONS`), kept per part in
``MANIFESTS/librispeech_skipped_<part>.json`` so a re-run reports the same. A part counts as prepared
once both its manifests exist. The cuts come from :mod:`~istack_ds.data.corpora.lhotse_manifest`: an
utterance longer than `max_seconds` is left out and counted (too_long), never cut, since a batch holds
whole utterances (the paper's batches are 64 utterances); LibriSpeech's are at most 35 s, so the
default keeps every one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from istack_ds.data.corpora import BadSource, PreparedCorpus, Skipped, common
from istack_ds.data.corpora.lhotse_manifest import ManifestPart, write_split_cuts
from istack_ds.data.index import DataError
from istack_ds.data.progress import Ticker

#: Every utterance of LibriSpeech (segmented to at most 35 s) is kept whole.
DEFAULT_MAX_SECONDS = 36.0
#: A LibriSpeech part directory: train-clean-100, dev-other, test-clean, train-clean-5 (Mini LibriSpeech), ...
LIBRISPEECH_PART = re.compile(r"^(train|dev|test)-[A-Za-z0-9-]+$")
#: What this module reads (how detection names it when no corpus layout is recognised).
LAYOUT = "LibriSpeech ({root}/[LibriSpeech/]{{train,dev,test}}-*/<speaker>/<chapter>/*.trans.txt)"


def detect(root: Path) -> bool:
    """Whether ``root/LibriSpeech/<part>/`` or ``root/<part>/`` (train-*, dev-*, test-*) holds
    ``<speaker>/<chapter>/*.trans.txt``."""
    return any(
        any(LIBRISPEECH_PART.match(d.name) and common.has_file(d, ".trans.txt", 2) for d in common.subdirs(base))
        for base in (root / "LibriSpeech", root)
    )


def corpus_root(corpus_dir: str | os.PathLike) -> Path:
    """The directory holding the parts: DIR/LibriSpeech when it is there, else DIR."""
    root = Path(corpus_dir)
    return root / "LibriSpeech" if (root / "LibriSpeech").is_dir() else root


def split_of(part: str) -> str | None:
    """``train`` for train-*, ``valid`` for dev-*, None (left out) for test-* and anything else."""
    return {"train": "train", "dev": "valid"}.get(part.split("-", 1)[0])


def find_parts(root: Path) -> list[str]:
    """The LibriSpeech part directories under `root`, sorted."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and LIBRISPEECH_PART.match(e.name))


def manifest_paths(manifest_dir: Path, part: str) -> tuple[Path, Path]:
    return common.manifest_paths(manifest_dir, "librispeech", part)


def read_transcripts(chapter_dir: Path) -> dict[str, str]:
    """utterance id -> text from the chapter's ``*.trans.txt`` (``<id> <TEXT>`` per line; empty lines ignored)."""
    texts: dict[str, str] = {}
    with os.scandir(chapter_dir) as it:
        for trans in sorted(e.path for e in it if e.name.endswith(".trans.txt")):
            try:
                lines = Path(trans).read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{trans}: unreadable transcript ({e})") from None
            for line in lines:
                utt, _, text = line.strip().partition(" ")
                if utt:
                    texts[utt] = text.strip()
    return texts


def iter_utterances(part_dir: Path) -> Iterator[tuple[str, Path, str | None, bool]]:
    """(utterance id, FLAC path, transcript text or None, whether the FLAC is there) per utterance of a part, sorted.

    Each chapter directory is listed once; an id is there when it has a FLAC or a transcript line.
    """
    for speaker in common.sorted_dirs(part_dir):
        for chapter in common.sorted_dirs(speaker):
            texts = read_transcripts(chapter)
            with os.scandir(chapter) as it:
                flacs = {e.name[: -len(".flac")] for e in it if e.name.endswith(".flac")}
            for utt in sorted(flacs | set(texts)):
                yield utt, chapter / f"{utt}.flac", texts.get(utt), utt in flacs


def parse_utterance(utt: str, flac: Path, text: str | None, has_flac: bool):
    """(Recording, SupervisionSegment) of one utterance, as lhotse's recipe makes them; raises BadSource
    (missing_audio, undecodable_name, no_transcript, undecodable_flac) for one to leave out."""
    from lhotse import Recording, SupervisionSegment

    if not has_flac:
        raise BadSource("missing_audio", f"{flac.name}: named in the transcript, not there")
    common.check_name(flac)  # before the transcript: a name that is not UTF-8 matches no transcript line
    if text is None:
        raise BadSource("no_transcript", f"{flac.name}: no line in {flac.parent.name}'s *.trans.txt")
    try:
        recording = Recording.from_file(flac, recording_id=utt)
    except Exception as e:  # noqa: BLE001 -- soundfile raises several types on junk
        raise BadSource(
            "undecodable_flac", f"{flac.name}: unreadable audio header ({common.audio_error(flac, e)})"
        ) from None
    segment = SupervisionSegment(
        id=utt,
        recording_id=utt,
        start=0.0,
        duration=recording.duration,
        channel=0,
        language="English",
        speaker=utt.split("-", 1)[0],
        text=text,
    )
    return recording, segment


def _write_part_manifests(
    root: Path, part: str, rec_path: Path, sup_path: Path, skipped: Skipped, *, jobs: int, log: Callable
) -> int:
    """Writes one part's two manifests (headers read by `jobs` threads), in utterance order; returns the utterances
    written. What is left out is added to `skipped`, named relative to the corpus root."""

    def skip(flac: Path, e: BadSource) -> None:
        log(f"skipped ({e.reason}): {common.printable(flac)}")
        skipped.add(e.reason, common.printable(flac.relative_to(root)), str(e), count=e.count)

    return common.write_part_manifests(
        rec_path,
        sup_path,
        ((flac, (utt, flac, text, has_flac)) for utt, flac, text, has_flac in iter_utterances(root / part)),
        _parse,
        skip=skip,
        ticker=Ticker(f"manifests {part}", "utterances"),
        skipped=skipped,
        jobs=jobs,
    )


def _parse(utt: str, flac: Path, text: str | None, has_flac: bool):
    recording, segment = parse_utterance(utt, flac, text, has_flac)
    return recording, [segment], []


def prepare_manifests(
    corpus_dir: str | os.PathLike, manifest_dir: str | os.PathLike, *, jobs: int = 4, log: Callable = print
) -> tuple[list[str], Skipped]:
    """Writes the recordings + supervisions manifests of every train-* and dev-* part present (skipping prepared
    ones); returns those parts and the utterances left out of all of them (recorded ones included)."""
    root = corpus_root(corpus_dir)
    if not root.is_dir():
        raise DataError(f"corpus directory {root} does not exist")
    parts = find_parts(root)
    tests = [p for p in parts if split_of(p) is None]
    parts = [p for p in parts if split_of(p) is not None]
    if tests:
        log(f"LibriSpeech parts left out (test sets): {', '.join(tests)}")
    if not parts:
        raise DataError(
            f"{root}: no LibriSpeech train-* or dev-* part (e.g. train-clean-100/<speaker>/<chapter>/*.trans.txt)"
            + (f"; only test parts {tests}" if tests else "")
        )
    manifest_dir = Path(manifest_dir)
    manifest_dir.mkdir(parents=True, exist_ok=True)

    def done(part: str, n: int, skipped: Skipped) -> None:
        log(f"manifests {part}: {n} utterances ({skipped.count} skipped) -> {manifest_dir}")

    write = partial(_write_part_manifests, root, jobs=jobs, log=log)
    total, _ = common.prepare_parts(manifest_dir, "librispeech", parts, write, done=done)
    return parts, total


def prepare(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_seconds: float,
    min_seconds: float,
    valid_speakers: int | None,
    valid_fraction: float | None,
    jobs: int,
    log: Callable,
) -> PreparedCorpus:
    """The corpus contract (:mod:`istack_ds.data.corpora`): manifests under OUT/manifests, one cut per utterance.

    `skipped` holds the utterances left out of the manifests and of the cuts (too_long, too_short).
    """
    manifest_dir = Path(out_dir) / "manifests"
    parts, skipped = prepare_manifests(corpus_dir, manifest_dir, jobs=jobs, log=log)
    manifests = [ManifestPart(p, None, *manifest_paths(manifest_dir, p)) for p in parts]
    prepared = write_split_cuts(
        manifests,
        out_dir,
        max_seconds=max_seconds,
        min_seconds=min_seconds,
        valid_speakers=valid_speakers,
        valid_fraction=valid_fraction,
        log=log,
        extra_labels=lambda sup: {"chapter": sup.id.split("-")[1]} if sup.id.count("-") >= 2 else {},
        split_rule=split_of,
    )
    skipped.update(prepared.skipped)
    return PreparedCorpus(
        splits=prepared.splits,
        settings={
            "parts": {s: [p for p in parts if split_of(p) == s] for s in prepared.splits},
            **prepared.settings,
            "parts_left_out": [p for p in find_parts(corpus_root(corpus_dir)) if split_of(p) is None],
        },
        skipped=skipped,
    )
