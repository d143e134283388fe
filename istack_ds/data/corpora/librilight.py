"""LibriLight layout -> lhotse manifests -> VAD-window cuts, split by speaker. Everything lazy.

    CORPUS/{small,medium,large}/<speaker>/<book>/<name>.flac + <name>.json ("voice_activity": [[s, e], ...])
      -> MANIFESTS/librilight_recordings_<part>.jsonl.gz      one lhotse Recording per file (header only)
         MANIFESTS/librilight_supervisions_<part>.jsonl.gz    one SupervisionSegment per VAD interval
      -> OUT/<split>/cuts.jsonl.gz                            one MonoCut per VAD window (<= max_seconds)

The manifests have the file names, ids and fields of ``lhotse.recipes.prepare_librilight``
(a directory it prepared is read as is), but are written here, file by file, with
lhotse's sequential jsonl writers: the recipe builds all parts in memory, asserts
when a part is missing (a user with only ``small``), and finds the json by
replacing "flac" anywhere in the path. Headers are read by ``jobs`` threads
(shared storage is latency-bound). A part counts as prepared once both its
manifests exist (they are written under a temporary name and renamed when
complete), so re-running is cheap and adding ``medium`` later prepares only it.

A file whose name is not UTF-8, whose json is missing, unreadable or has a malformed ``voice_activity``
(not a list of [start, end] pairs of finite numbers with 0 <= start < end), or
whose FLAC header does not decode, is left out and counted by reason, and so is each
``voice_activity`` interval that starts at or after the end of its file's audio (``vad_past_end``)
(:data:`~istack_ds.data.corpora.SOURCE_SKIP_REASONS`); each part's skips are kept in
``MANIFESTS/librilight_skipped_<part>.json`` (written before the part counts as
prepared), so a re-run reports the same skips without reading the files again.

Each cut keeps in ``cut.custom`` what its shard member's json records: speaker,
book and source (the FLAC path relative to the corpus); :func:`prepare` is this
module's side of the corpus contract (:mod:`istack_ds.data.corpora`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from pathlib import Path

from istack_ds.data.corpora import BadSource, PreparedCorpus, Skipped, common
from istack_ds.data.index import DataError
from istack_ds.data.progress import Ticker

LIBRILIGHT_PARTS = ("small", "medium", "large")
#: The longest VAD window when --max-seconds is not given.
DEFAULT_MAX_SECONDS = 20.0
#: What this module reads (how detection names it when no corpus layout is recognised).
LAYOUT = "LibriLight ({root}/{{small,medium,large}}/<speaker>/<book>/*.flac)"


def detect(root: Path) -> bool:
    """Whether `root` holds ``small/``, ``medium/`` or ``large/`` with ``<speaker>/<book>/*.flac``."""
    return any(common.has_file(root / part, ".flac", 2) for part in LIBRILIGHT_PARTS)


# ---- LibriLight -> manifests -----------------------------------------------------------


def manifest_paths(manifest_dir: Path, part: str) -> tuple[Path, Path]:
    return common.manifest_paths(manifest_dir, "librilight", part)


def iter_flacs(part_dir: Path) -> Iterator[Path]:
    """<speaker>/<book>/<name>.flac under a part, in sorted order, one directory listing at a time."""
    for speaker in common.sorted_dirs(part_dir):
        for book in common.sorted_dirs(speaker):
            with os.scandir(book) as it:
                names = sorted(e.name for e in it if e.name.endswith(".flac"))
            for name in names:
                yield book / name


def _has_flac(part_dir: Path) -> bool:
    return part_dir.is_dir() and next(iter_flacs(part_dir), None) is not None


def voice_activity(meta: dict, where: Path) -> list[tuple[float, float]]:
    """The [start, end] intervals of a LibriLight json; raises BadSource("bad_vad") unless each is a pair of finite
    numbers with 0 <= start < end."""
    vad = meta.get("voice_activity")
    if not isinstance(vad, list):
        raise BadSource("bad_vad", f"{where}: voice_activity is {type(vad).__name__}, not a list of [start, end]")
    out = []
    for i, pair in enumerate(vad):
        ok = (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in pair)
            and 0 <= pair[0] < pair[1]
        )
        if not ok:
            raise BadSource("bad_vad", f"{where}: voice_activity[{i}] = {pair!r} is not [start, end], 0 <= start < end")
        out.append((float(pair[0]), float(pair[1])))
    return out


def parse_file(corpus_dir: Path, flac: Path):
    """(Recording, [SupervisionSegment per VAD interval], [BadSource of intervals left out]) of one file; ids as
    lhotse's recipe makes them.

    Raises BadSource (undecodable_name, missing_json, bad_json, bad_vad, undecodable_flac) for a file to leave
    out; the intervals that start at or after the end of its audio are left out as one BadSource (vad_past_end).
    """
    from lhotse import Recording, SupervisionSegment
    from lhotse.utils import add_durations

    common.check_name(flac)
    rec_id = flac.relative_to(corpus_dir).with_suffix("").as_posix()  # small/<speaker>/<book>/<name>
    meta_path = flac.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise BadSource("missing_json", f"{meta_path}: missing") from None
    except (OSError, ValueError) as e:
        raise BadSource("bad_json", f"{meta_path}: unreadable json ({e})") from None
    if not isinstance(meta, dict) or "speaker" not in meta:
        raise BadSource("bad_json", f"{meta_path}: not a LibriLight json (no speaker)")
    speaker, vad = str(meta["speaker"]), voice_activity(meta, meta_path)
    try:
        recording = Recording.from_file(flac, recording_id=rec_id)
    except Exception as e:  # noqa: BLE001 -- soundfile raises several types on junk
        raise BadSource(
            "undecodable_flac", f"{flac}: unreadable audio header ({common.audio_error(flac, e)})"
        ) from None
    past = [(s, e) for s, e in vad if s >= recording.duration]
    left_out = []
    if past:  # NOTE: no audio to cut from; an interval that only ends past the end is cut at the end later
        vad = [(s, e) for s, e in vad if s < recording.duration]
        left_out.append(
            BadSource(
                "vad_past_end",
                f"{meta_path}: {len(past)} voice_activity interval(s) start at or after the end of its audio "
                f"({recording.duration:g} s), e.g. {list(past[0])}",
                count=len(past),
            )
        )
    sups = [
        SupervisionSegment(
            id=f"{rec_id}_{i}",
            recording_id=rec_id,
            start=s,
            duration=add_durations(e, -s, sampling_rate=16000),
            channel=0,
            language="English",
            speaker=speaker,
        )
        for i, (s, e) in enumerate(vad)
    ]
    return recording, sups, left_out


@dataclass
class PrepareReport:
    parts: list[str]
    """Parts present in the corpus (each has its two manifests now)."""
    prepared: list[str]
    """Parts whose manifests this call wrote (the rest were already there)."""
    files: int = 0
    """Files in the manifests this call wrote."""
    skipped: Skipped = field(default_factory=Skipped)
    """Files left out of every present part's manifests (those written before included), by reason."""


def prepare_manifests(
    corpus_dir: str | os.PathLike, manifest_dir: str | os.PathLike, *, jobs: int = 4, log: Callable = print
) -> PrepareReport:
    """Writes the recordings + supervisions manifests of every part present; skips prepared parts.

    Files whose json, voice_activity or audio header is unusable are left out, logged and
    counted by reason in `skipped`, which also holds the skips recorded when an already
    prepared part was written.
    """

    corpus_dir, manifest_dir = Path(corpus_dir).resolve(), Path(manifest_dir)
    if not corpus_dir.is_dir():
        raise DataError(f"corpus directory {corpus_dir} does not exist")
    present = [p for p in LIBRILIGHT_PARTS if _has_flac(corpus_dir / p)]
    if not present:
        raise DataError(f"corpus {corpus_dir} has no FLAC files under any of {list(LIBRILIGHT_PARTS)}")
    manifest_dir.mkdir(parents=True, exist_ok=True)
    report = PrepareReport(parts=present, prepared=[])

    def done(part: str, n: int, skipped: Skipped) -> None:
        report.prepared.append(part)
        log(f"manifests {part}: {n} recordings ({skipped.count} files skipped) -> {manifest_dir}")

    write = partial(_write_part_manifests, corpus_dir, jobs=jobs, log=log)
    report.skipped, written = common.prepare_parts(manifest_dir, "librilight", present, write, done=done, min_bytes=20)
    report.files = sum(written.values())
    return report


def _write_part_manifests(
    corpus_dir: Path, part: str, rec_path: Path, sup_path: Path, skipped: Skipped, *, jobs: int, log: Callable
) -> int:
    """Writes one part's two manifests, headers read by `jobs` threads; returns the files written.

    Files left out are added to `skipped`, named relative to the corpus.
    """

    def skip(flac: Path, e: BadSource) -> None:
        log(f"skipped ({e.reason}): {e}")
        name, why = (
            common.printable(flac.relative_to(corpus_dir)),
            str(e).removeprefix(f"{common.printable(flac.parent)}/"),
        )
        skipped.add(e.reason, name, why, count=e.count)

    return common.write_part_manifests(
        rec_path,
        sup_path,
        ((flac, (corpus_dir, flac)) for flac in iter_flacs(corpus_dir / part)),
        parse_file,
        skip=skip,
        ticker=Ticker(f"manifests {part}", "files"),
        skipped=skipped,
        jobs=jobs,
    )


def _lazy(path: Path):
    from lhotse import load_manifest_lazy

    return load_manifest_lazy(path) if path.is_file() and path.stat().st_size > 20 else None


# ---- VAD windows -----------------------------------------------------------------------


def vad_windows(
    intervals: Iterable[tuple[float, float]],
    max_seconds: float,
    min_seconds: float,
) -> list[tuple[float, float]]:
    """Merges adjacent voice-activity intervals into windows of at most `max_seconds`.

    A window spans from its first interval's start to its last interval's end
    (short pauses inside are kept). An interval longer than `max_seconds` is cut
    into `max_seconds` pieces; one that is not finite is ignored. Windows shorter than
    `min_seconds` are dropped.
    """
    pieces: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if not (math.isfinite(start) and math.isfinite(end)):
            continue  # NOTE: parse_file refuses such files; an infinite interval would never end the loop below
        while end - start > max_seconds:
            pieces.append((start, start + max_seconds))
            start += max_seconds
        if end > start:
            pieces.append((start, end))
    windows: list[list[float]] = []
    for start, end in pieces:
        if windows and end - windows[-1][0] <= max_seconds + 1e-9:
            windows[-1][1] = max(windows[-1][1], end)
        else:
            windows.append([start, end])
    out = []
    for a, b in windows:
        if b - a >= min_seconds:
            a4 = round(a, 4)  # NOTE: rounding never lets a window exceed max_seconds
            out.append((a4, round(a4 + min(round(b - a4, 4), max_seconds), 4)))
    return out


def cut_key(recording_id: str, window: int) -> str:
    """A WebDataset key: no dots (they start the extension) and no slashes."""
    rel = recording_id.split("/", 1)[1] if recording_id.split("/", 1)[0] in LIBRILIGHT_PARTS else recording_id
    return f"{rel.replace('/', '-').replace('.', '_')}-{window:04d}"


def window_cuts(manifest_dir: Path, parts: list[str], max_seconds: float, min_seconds: float) -> Iterator:
    """Lazily yields one lhotse MonoCut per VAD window, in manifest order.

    NOTE: the supervisions are grouped by recording and come in the recordings' order
    (both the recipe and :func:`prepare_manifests` write them so): the two manifests
    are walked in step, never loaded whole.
    """
    from lhotse import MonoCut

    for part in parts:
        rec_path, sup_path = manifest_paths(Path(manifest_dir), part)
        recordings, supervisions = _lazy(rec_path), _lazy(sup_path)
        if recordings is None or supervisions is None:
            continue
        rec_iter = iter(recordings)
        for rec_id, segments in groupby(supervisions, key=lambda s: s.recording_id):
            group = list(segments)
            rec = next((r for r in rec_iter if r.id == rec_id), None)
            if rec is None:
                raise DataError(
                    f"{sup_path}: recording {rec_id} is not in {rec_path} (or not in the same order); "
                    "re-prepare the manifests (`istack prepare`)"
                )
            speaker = group[0].speaker
            book = rec.id.split("/")[-2] if rec.id.count("/") >= 2 else ""
            intervals = [(max(0.0, s.start), min(rec.duration, s.end)) for s in group]
            for i, (start, end) in enumerate(vad_windows(intervals, max_seconds, min_seconds)):
                yield MonoCut(
                    id=cut_key(rec.id, i),
                    start=start,
                    duration=min(round(end - start, 4), max_seconds),
                    channel=0,
                    recording=rec,
                    custom={"speaker": speaker, "book": book, "source": rec.id + ".flac"},
                )


# ---- cuts per split ----------------------------------------------------------------------


def corpus_speakers(manifest_dir: Path, parts: list[str]) -> list[str]:
    speakers: set[str] = set()
    for part in parts:
        speakers.update(s.speaker for s in (_lazy(manifest_paths(Path(manifest_dir), part)[1]) or []))
    return sorted(speakers)


def write_split_cuts(
    manifest_dir: Path, parts: list[str], out_dir: Path, *, max_seconds: float, min_seconds: float, valid: list[str]
) -> dict[str, Path]:
    """OUT/<split>/cuts.jsonl.gz (train, and valid when `valid` names speakers); returns the paths."""
    if max_seconds <= 0 or min_seconds < 0 or min_seconds > max_seconds:
        raise DataError(f"need 0 <= min_seconds ({min_seconds}) <= max_seconds ({max_seconds})")
    valid_set = set(valid)
    routed = (
        ("valid" if cut.custom["speaker"] in valid_set else "train", cut)
        for cut in window_cuts(manifest_dir, parts, max_seconds, min_seconds)
    )
    paths, _ = common.write_split_files(out_dir, ["train", "valid"] if valid_set else ["train"], routed)
    return paths


def prepare_librilight(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_seconds: float = 20.0,
    min_seconds: float = 1.0,
    valid_speakers: int | None = 1,
    valid_fraction: float | None = None,
    jobs: int = 4,
    log: Callable = print,
) -> dict:
    """Manifests under OUT/manifests, cuts under OUT/<split>/cuts.jsonl.gz; returns a summary dict.

    The summary: parts, speakers, valid_speakers, splits ({cuts, seconds, path} each) and
    skipped (the source files left out, :meth:`Skipped.to_dict`; the caller logs their line, as for every corpus).
    """
    from lhotse import CutSet

    out_dir = Path(out_dir)
    manifest_dir = out_dir / "manifests"
    report = prepare_manifests(corpus_dir, manifest_dir, jobs=jobs, log=log)
    speakers = corpus_speakers(manifest_dir, report.parts)
    if not speakers:
        raise DataError(f"corpus {corpus_dir}: no voice-activity interval in any file of {report.parts}")
    valid = common.pick_valid_speakers(speakers, valid_speakers, valid_fraction)
    paths = write_split_cuts(
        manifest_dir, report.parts, out_dir, max_seconds=max_seconds, min_seconds=min_seconds, valid=valid
    )
    splits: dict[str, dict] = {}
    summary = {
        "parts": report.parts,
        "speakers": len(speakers),
        "valid_speakers": valid,
        "splits": splits,
        "skipped": report.skipped.to_dict(),
    }
    for split, path in paths.items():
        n, seconds = 0, 0.0
        for c in CutSet.from_jsonl_lazy(path):
            n += 1
            seconds += c.duration
        splits[split] = {"cuts": n, "seconds": round(seconds, 3), "path": str(path)}
        log(f"{split}: {n} VAD windows ({seconds / 3600:.3f} h, <= {max_seconds} s each) -> {path}")
    common.warn_large_valid({k: (v["cuts"], v["seconds"]) for k, v in splits.items()}, valid, len(speakers), log)
    return summary


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
    """The corpus contract (:mod:`istack_ds.data.corpora`): :func:`prepare_librilight`'s cuts per split.

    The index settings record the held-out speakers and the parts that were present;
    `skipped` holds the source files left out.
    """
    summary = prepare_librilight(
        corpus_dir,
        out_dir,
        max_seconds=max_seconds,
        min_seconds=min_seconds,
        valid_speakers=valid_speakers,
        valid_fraction=valid_fraction,
        jobs=jobs,
        log=log,
    )
    return PreparedCorpus(
        splits={split: Path(s["path"]) for split, s in summary["splits"].items()},
        settings={"valid_speakers": summary["valid_speakers"], "parts": summary["parts"]},
        skipped=Skipped.from_dict(summary["skipped"]),
    )
