"""Any lhotse manifest directory -> one cut per supervision (a whole utterance), labels kept, split by part or speaker.

    DIR/<prefix>_cuts_<part>.jsonl.gz                                  a CutSet (preferred when both exist), or
    DIR/<prefix>_recordings_<part>.jsonl.gz + ..._supervisions_<part>.jsonl.gz
        (prefix and part optional: ``recordings.jsonl.gz`` + ``supervisions.jsonl.gz`` is one unnamed part)
      -> OUT/<split>/cuts.jsonl.gz     one MonoCut per supervision: its span of the recording, its labels in
                                       cut.custom: text, speaker, language (when set), then every key of
                                       supervision.custom (e.g. phonemes)

This is what any lhotse recipe writes (GigaSpeech, MLS, VoxPopuli, Common Voice, LibriSpeech, ...),
so such a corpus shards with no new code. Everything streams: manifests are read lazily, cuts written
one by one.

Splits, by the part name (the text after ``cuts_`` / ``recordings_``, cut at ``-``, ``_`` and ``.``,
lowercase): a part holding the word ``dev``, ``valid``, ``validation`` or ``val`` is held out
(``valid``); one holding ``test``, ``eval`` or Common Voice's ``validated`` or ``invalidated`` is left out
(said in the log); every other part
(``train-clean-100``, ``XL``, an unnamed part) is ``train``. When no part is held out, the last
`valid_speakers` speakers (sorted), or `valid_fraction` of them, are (as for LibriLight).

A cut of a CutSet with supervisions gives one cut per supervision; one without supervisions is
taken whole. Supervisions of one recording must come together (every lhotse recipe writes them
so, in the recordings' order); the recordings manifest is walked in step with them, so it is not loaded
whole, except that recordings read past while looking for a supervision's (the two manifests in different
orders) are held in memory until used. Left out and counted by reason, per utterance lost
(:data:`~istack_ds.data.corpora.SOURCE_SKIP_REASONS`), not
raised: a recording whose audio is not exactly one file (no_file_source) or whose file is not there
(missing_audio), a supervision whose recording is not found (no_recording), a cut that is not one
recording (unsupported_cut), an utterance longer than `max_seconds` (too_long: a batch holds whole
utterances, so it is never cut) or shorter than `min_seconds` (too_short). A relative audio path is
made absolute (from the current directory, else the manifest directory), so shards can be written
from anywhere. A multi-channel recording is mixed down to mono by the writer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from istack_ds.data.corpora import PreparedCorpus, Skipped
from istack_ds.data.corpora.common import pick_valid_speakers, warn_large_valid, write_split_files
from istack_ds.data.index import DataError

#: Utterances up to this long are kept (LibriSpeech was segmented to at most 35 s): a batch holds whole utterances.
DEFAULT_MAX_SECONDS = 36.0
#: Words of a part name that make it the held-out split, and those that leave it out.
VALID_WORDS = ("dev", "valid", "validation", "val")
#: Common Voice's `validated` holds its train, dev and test clips (training on it would leak dev and test);
#: `invalidated` holds clips its listeners rejected. (Not `other`: LibriSpeech's train-other-500 is training data;
#: Common Voice's unrated `other` part is trained on unless it is left out of the directory.)
TEST_WORDS = ("test", "eval", "validated", "invalidated")
#: Keys the writer sets in every member json; a label of that name would overwrite one.
_RESERVED = ("id", "offset", "duration", "sample_rate")
#: A lhotse manifest file name: <prefix>_cuts_<part>.jsonl.gz, recordings.jsonl.gz, ... (the kind, then the part).
LHOTSE_MANIFEST = re.compile(
    r"^(?:(?P<prefix>.*?)_)?(?P<kind>cuts|recordings|supervisions)(?:_(?P<part>.+?))?\.jsonl(?:\.gz)?$"
)
#: What this module reads (how detection names it when no corpus layout is recognised).
LAYOUT = "lhotse manifests ({root}/*cuts*.jsonl.gz, or *recordings*.jsonl.gz + *supervisions*.jsonl.gz)"


def detect(root: Path) -> bool:
    """Whether `root` itself holds ``*cuts*.jsonl.gz`` or ``*recordings*.jsonl.gz`` files."""
    try:
        names = [e.name for e in os.scandir(root) if e.is_file()]
    except OSError:
        names = []
    return any((m := LHOTSE_MANIFEST.match(n)) and m["kind"] in ("cuts", "recordings") for n in names)


@dataclass
class ManifestPart:
    """The manifests of one part of a lhotse corpus: a CutSet, or recordings + supervisions."""

    name: str
    """The part name from the file names ("" for ``recordings.jsonl.gz``)."""
    cuts: Path | None = None
    recordings: Path | None = None
    supervisions: Path | None = None

    @property
    def files(self) -> list[str]:
        return [p.name for p in (self.cuts,) if p] or [p.name for p in (self.recordings, self.supervisions) if p]


def split_of(part: str) -> str | None:
    """``valid``, ``train`` or None (left out) for a part name, by the words in it (see the module docstring)."""
    words = {w for w in re.split(r"[-_.]", part.lower()) if w}
    if words & set(TEST_WORDS):
        return None
    return "valid" if words & set(VALID_WORDS) else "train"


def find_manifests(manifest_dir: str | os.PathLike) -> list[ManifestPart]:
    """The parts of a lhotse manifest directory, sorted by name; raises DataError when there is none.

    Parts are told apart by prefix and part name; a part with a CutSet uses it, else its
    recordings + supervisions (a recordings manifest without its supervisions is an error).
    """
    root = Path(manifest_dir)
    if not root.is_dir():
        raise DataError(f"lhotse manifest directory {root} does not exist")
    parts: dict[tuple[str, str], ManifestPart] = {}
    for path in sorted(root.iterdir()):
        m = LHOTSE_MANIFEST.match(path.name)
        if not m or not path.is_file():
            continue
        key = (m["prefix"] or "", m["part"] or "")
        part = parts.setdefault(key, ManifestPart(name=m["part"] or ""))
        setattr(part, m["kind"], path)
    out = []
    for (prefix, name), part in sorted(parts.items()):
        if part.cuts is None:
            if part.recordings is None:
                continue  # supervisions alone are no corpus; their recordings manifest would name the part
            if part.supervisions is None:
                raise DataError(
                    f"{part.recordings}: no supervisions manifest beside it "
                    f"({(prefix + '_') if prefix else ''}supervisions{('_' + name) if name else ''}.jsonl.gz); "
                    "every utterance comes from a supervision"
                )
        out.append(part)
    if not out:
        raise DataError(f"{root}: no lhotse manifest (*cuts*.jsonl.gz, or *recordings*.jsonl.gz + *supervisions*)")
    return out


def _lazy(path: Path):
    from lhotse import load_manifest_lazy

    return load_manifest_lazy(path) if path.stat().st_size > 20 else []


def _audio_path(recording, manifest_dir: Path, skipped: Skipped, what: str, utterances: int = 1) -> str | None:
    """The absolute path of a recording's one audio file, or None when it has not exactly one, or it is not
    there: then its `utterances` are counted as left out."""
    sources = recording.sources
    if len(sources) != 1 or sources[0].type != "file":
        kinds = ", ".join(s.type for s in sources) or "none"
        why = f"recording {recording.id}: audio sources {kinds}, not one file"
        skipped.add("no_file_source", what, why, utterances)
        return None
    path = Path(sources[0].source)
    where = ""
    if not path.is_absolute():
        where = f" (relative: looked for in {Path.cwd()}, then in {manifest_dir})"
        path = next((p for p in (Path.cwd() / path, manifest_dir / path) if p.exists()), Path.cwd() / path)
    if not path.exists():
        skipped.add("missing_audio", what, f"recording {recording.id}: {path} is not there{where}", utterances)
        return None
    return str(path.resolve())


def cut_key(utterance_id: str) -> str:
    """A WebDataset key for an utterance id: no dots (they start the extension) and no slashes."""
    return utterance_id.replace("/", "-").replace(".", "_")


def labels_of(supervision, where: str) -> dict:
    """text, speaker, language (those set) and supervision.custom, as one cut.custom; raises DataError naming the
    supervision for a key the writer sets or a value that is not JSON."""
    labels: dict = {}
    if supervision is None:
        return labels
    for key in ("text", "speaker", "language"):
        value = getattr(supervision, key, None)
        if value is not None:
            labels[key] = value
    for key, value in (supervision.custom or {}).items():
        if key in _RESERVED:
            raise DataError(
                f"{where}: supervision {supervision.id} has custom key {key!r}, which the shard writer sets"
            )
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise DataError(
                f"{where}: supervision {supervision.id}: custom[{key!r}] is a {type(value).__name__}, not a JSON value"
            ) from None
        labels[key] = value
    return labels


def _utterance(recording, audio: str, sup, start: float, end: float, key: str, extra: dict, limits, skipped):
    """One MonoCut over [start, end) of the recording (clamped to it), or None (counted) when out of limits."""
    from lhotse import MonoCut
    from lhotse.utils import fastcopy

    max_seconds, min_seconds = limits
    start, end = max(0.0, start), min(recording.duration, end)
    duration = round(end - start, 4)
    if duration > max_seconds:
        skipped.add("too_long", key, f"{duration} s, above max_seconds {max_seconds}")
        return None
    if duration < min_seconds:
        skipped.add("too_short", key, f"{duration} s, below min_seconds {min_seconds}")
        return None
    recording = fastcopy(recording, sources=[fastcopy(recording.sources[0], source=audio)])
    return MonoCut(id=key, start=round(start, 4), duration=duration, channel=0, recording=recording, custom=extra)


def iter_utterances(
    part: ManifestPart,
    *,
    max_seconds: float,
    min_seconds: float,
    skipped: Skipped,
    extra_labels: Callable | None = None,
) -> Iterator:
    """Lazily, one MonoCut per supervision of a part (per cut without supervisions), labels in cut.custom.

    `extra_labels(supervision)` adds labels (LibriSpeech: the chapter). What is left out is added to
    `skipped`, named by utterance id.
    """
    limits = (max_seconds, min_seconds)

    def labels(sup, where):
        out = labels_of(sup, where)
        if extra_labels is not None and sup is not None:
            out.update(extra_labels(sup))
        return out

    if part.cuts is not None:
        from lhotse import MonoCut

        manifest_dir = part.cuts.parent
        for cut in _lazy(part.cuts):
            if not isinstance(cut, MonoCut) or cut.recording is None:
                skipped.add("unsupported_cut", cut.id, f"a {type(cut).__name__} without one recording")
                continue
            audio = _audio_path(cut.recording, manifest_dir, skipped, cut.id, max(1, len(cut.supervisions or [])))
            if audio is None:
                continue
            for sup in cut.supervisions or [None]:
                if sup is None:
                    span, key = (cut.start, cut.end), cut_key(cut.id)
                else:  # a supervision's start is relative to its cut
                    span = (cut.start + max(0.0, sup.start), min(cut.end, cut.start + sup.end))
                    key = cut_key(sup.id)
                one = _utterance(cut.recording, audio, sup, *span, key, labels(sup, part.cuts.name), limits, skipped)
                if one is not None:
                    yield one
        return
    assert part.recordings is not None and part.supervisions is not None
    manifest_dir = part.recordings.parent
    recordings = iter(_lazy(part.recordings))
    ahead: dict = {}  # recordings read past while looking for a supervision's (empty when both come in one order)

    def find(rec_id):
        if rec_id in ahead:
            return ahead.pop(rec_id)
        for rec in recordings:
            if rec.id == rec_id:
                return rec
            ahead[rec.id] = rec
        return None

    for rec_id, group in groupby(_lazy(part.supervisions), key=lambda s: s.recording_id):
        sups = list(group)
        rec = find(rec_id)
        if rec is None:
            for sup in sups:
                why = f"recording {rec_id} is not in {part.recordings.name} (or its supervisions are not together)"
                skipped.add("no_recording", cut_key(sup.id), why)
            continue
        audio = _audio_path(rec, manifest_dir, skipped, rec.id, len(sups))
        if audio is None:
            continue
        for sup in sups:
            one = _utterance(
                rec,
                audio,
                sup,
                sup.start,
                sup.end,
                cut_key(sup.id),
                labels(sup, part.supervisions.name),
                limits,
                skipped,
            )
            if one is not None:
                yield one


def _speaker_of(cut) -> str | None:
    return cut.custom.get("speaker") if cut.custom else None


def write_split_cuts(
    parts: list[ManifestPart],
    out_dir: str | os.PathLike,
    *,
    max_seconds: float,
    min_seconds: float,
    valid_speakers: int | None,
    valid_fraction: float | None,
    log: Callable,
    extra_labels: Callable | None = None,
    split_rule: Callable[[str], str | None] = split_of,
) -> PreparedCorpus:
    """OUT/<split>/cuts.jsonl.gz from the parts (held out by part name, else by speaker); the corpus contract's result.

    The settings record the manifest files of each split (``manifests``), the parts left out
    (``parts_left_out``) and the held-out speakers (``valid_speakers``, empty when a part is held out).
    """
    if max_seconds <= 0 or min_seconds < 0 or min_seconds > max_seconds:
        raise DataError(f"need 0 <= min_seconds ({min_seconds}) <= max_seconds ({max_seconds})")
    out_dir = Path(out_dir)
    by_split: dict[str, list[ManifestPart]] = {}
    left_out = []
    for part in parts:
        split = split_rule(part.name)
        if split is None:
            left_out.append(part)
        else:
            by_split.setdefault(split, []).append(part)
    for part in left_out:
        log(f"part {part.name!r} ({', '.join(part.files)}) is a test part: left out")
    if "train" not in by_split:
        names = [p.name for p in parts]
        raise DataError(f"no training part among {names}: every part is held out (dev/valid) or a test part")
    valid: list[str] = []
    speakers: set[str] = set()
    if "valid" in by_split:
        if valid_speakers or valid_fraction:
            log("held-out split: the corpus's own " + ", ".join(repr(p.name) for p in by_split["valid"]) + " parts")
    else:
        ignored = Skipped()  # this pass only lists speakers; the writing pass counts what is left out
        found = 0
        for part in by_split["train"]:
            for cut in iter_utterances(part, max_seconds=max_seconds, min_seconds=min_seconds, skipped=ignored):
                found += 1
                if _speaker_of(cut) is not None:
                    speakers.add(str(_speaker_of(cut)))
        missing = [f["why"] for f in ignored.first if f["reason"] == "missing_audio"]
        if not found and missing:  # no utterance could be read, so no speaker was seen: say why
            raise DataError(
                f"audio missing: {ignored.by_reason['missing_audio']} utterances of "
                f"{[p.name for p in by_split['train']]} have no audio file (missing_audio); first: {missing[0]}"
            )
        if (valid_speakers or valid_fraction) and not speakers:
            raise DataError(
                f"no supervision of {[p.name for p in parts]} names a speaker, and no part is named dev/valid: "
                "hold nothing out (--valid-speakers 0)"
            )
        valid = pick_valid_speakers(sorted(speakers), valid_speakers, valid_fraction)
    valid_set = set(valid)
    splits = ["train", "valid"] if ("valid" in by_split or valid_set) else ["train"]
    skipped = Skipped()

    def routed():
        for split_name in ("train", "valid"):
            for part in by_split.get(split_name, []):
                for cut in iter_utterances(
                    part, max_seconds=max_seconds, min_seconds=min_seconds, skipped=skipped, extra_labels=extra_labels
                ):
                    yield "valid" if split_name == "valid" or str(_speaker_of(cut)) in valid_set else "train", cut

    paths, counts = write_split_files(out_dir, splits, routed())
    for split in splits:
        n, seconds = counts[split]
        log(f"{split}: {n} utterances ({seconds / 3600:.3f} h, {min_seconds}-{max_seconds} s each) -> {paths[split]}")
    warn_large_valid(counts, valid, len(speakers), log)
    settings = {
        "manifests": {s: [f for p in by_split.get(s, []) for f in p.files] for s in splits},
        "parts_left_out": [p.name for p in left_out],
        "valid_speakers": valid,
    }
    return PreparedCorpus(splits=paths, settings=settings, skipped=skipped)


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
    """The corpus contract (:mod:`istack_ds.data.corpora`) for a lhotse manifest directory (`jobs` is not used)."""
    parts = find_manifests(corpus_dir)
    log(
        f"lhotse manifests in {corpus_dir}: "
        + "; ".join(f"{p.name or '(unnamed)'}: {', '.join(p.files)}" for p in parts)
    )
    return write_split_cuts(
        parts,
        out_dir,
        max_seconds=max_seconds,
        min_seconds=min_seconds,
        valid_speakers=valid_speakers,
        valid_fraction=valid_fraction,
        log=log,
    )
