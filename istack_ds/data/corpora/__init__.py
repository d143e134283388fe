"""Corpora: one module per corpus, each turning a corpus directory into lhotse cut manifests per split.

The contract, all that :func:`istack_ds.data.writer.shard_corpus` needs of a corpus:
a module ``istack_ds.data.corpora.<name>`` (or any object) with ::

    def prepare(corpus_dir, out_dir, *, max_seconds, min_seconds, valid_speakers, valid_fraction, jobs, log)
        -> PreparedCorpus

that writes one lhotse cut manifest per split (``train``, and ``valid`` when speakers
are held out: the last `valid_speakers` of the sorted speakers, or `valid_fraction` of
them) and returns their paths. Each cut of a manifest

- has a recording with exactly one ``file`` source: the writer opens that file and seeks to the cut;
- has ``start`` and ``duration`` in seconds, ``duration`` between `min_seconds` and `max_seconds`;
- carries in ``cut.custom`` the metadata its shard member keeps: the member json is
  ``{"id", **cut.custom, "offset", "duration", "sample_rate"}``, so custom values must be
  JSON values and its keys none of id, offset, duration, sample_rate.

A source file that cannot be used (its audio header does not decode, its metadata is
unreadable or malformed) is left out of the manifests and counted in
``PreparedCorpus.skipped`` by one of :data:`SOURCE_SKIP_REASONS`, never a reason to stop:
the writer records those counts, with the first few files named, in each split's
index.json (``settings.skipped_sources``) and prints them. A re-run reports the same
skips. `log` takes one line of progress; errors are :class:`~istack_ds.data.index.DataError`
naming the path. Each module also declares ::

    LAYOUT: str                       # one line: what it reads, e.g. "LibriLight ({root}/{{small,...}}/...)"
    def detect(root: Path) -> bool    # whether `root` is laid out so

Adding a corpus is one module here plus its test and its name in :data:`CORPORA`; ``tools/shard_corpus.py
--layout <name>`` picks it by module name; without ``--layout`` :func:`detect_layout` asks each module's
``detect``. A module may set ``DEFAULT_MAX_SECONDS`` (the longest cut when ``--max-seconds`` is not given).
The plumbing every corpus shares (manifests per part, held-out speakers, cuts per split) is
:mod:`istack_ds.data.corpora.common`.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from istack_ds.data.index import DataError

DEFAULT_CORPUS = "librilight"
#: THE list of corpus modules (``istack_ds.data.corpora.<name>``), in the order :func:`detect_layout` tries them:
#: the most specific layout first. A new corpus is one module, its test and its name here.
CORPORA = ("librilight", "librispeech", "lhotse_manifest")
#: The longest cut (seconds) when neither the caller nor the corpus module says.
DEFAULT_MAX_SECONDS = 20.0
#: Why a corpus's `prepare` left a source (a file, an utterance, a supervision) out of its manifests.
SOURCE_SKIP_REASONS = (
    "missing_json",  # LibriLight: no <name>.json beside the FLAC
    "bad_json",
    "bad_vad",
    "vad_past_end",  # LibriLight: a voice_activity interval that starts at or after the end of its file's audio
    "undecodable_flac",  # the audio header does not decode
    "undecodable_name",  # a file whose name is not UTF-8 (manifests and member json hold names as UTF-8 text)
    "no_transcript",  # LibriSpeech: a FLAC no *.trans.txt line names
    "missing_audio",  # a transcript line or a recording whose audio file is not there
    "no_file_source",  # a lhotse recording whose audio is not exactly one file (url, command, several files)
    "no_recording",  # a supervision whose recording is not in the recordings manifest (or not adjacent to it)
    "unsupported_cut",  # a lhotse cut that is not one recording (a MixedCut, a PaddingCut)
    "too_long",  # an utterance longer than max_seconds: a batch holds whole utterances, never a crop
    "too_short",  # an utterance shorter than min_seconds
)


class BadSource(DataError):
    """A source file that a corpus leaves out; `reason` is one of SOURCE_SKIP_REASONS, the message names the file.
    `count`: how many things it stands for (e.g. the VAD intervals of one file left out for one reason)."""

    def __init__(self, reason: str, message: str, count: int = 1):
        super().__init__(message)
        self.reason = reason
        self.count = count


@dataclass
class Skipped:
    """What a preparation or a sharding left out: a count per reason and the first :attr:`KEEP` named."""

    by_reason: dict[str, int] = field(default_factory=dict)
    first: list[dict] = field(default_factory=list)
    """{"name", "reason", "why"} of the first KEEP things left out, in the order they were met."""
    KEEP: ClassVar[int] = 10

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    def add(self, reason: str, name: str, why: str = "", count: int = 1) -> None:
        """Counts `count` things left out for one reason (e.g. every utterance of a recording that cannot be read);
        `why` is kept on one line."""
        self.by_reason[reason] = self.by_reason.get(reason, 0) + count
        if len(self.first) < self.KEEP:
            self.first.append({"name": name, "reason": reason, "why": " ".join(why.split())})

    def update(self, other: Skipped | dict | None) -> None:
        """Adds another record (a Skipped or its :meth:`to_dict`) after this one's."""
        if not other:
            return
        other = other if isinstance(other, Skipped) else Skipped.from_dict(other)
        for reason, n in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n
        self.first.extend(other.first[: max(0, self.KEEP - len(self.first))])

    def to_dict(self) -> dict:
        """{"count", "by_reason" (sorted by reason), "first"}: what index.json records."""
        return {"count": self.count, "by_reason": dict(sorted(self.by_reason.items())), "first": list(self.first)}

    @classmethod
    def from_dict(cls, raw: dict) -> Skipped:
        return cls(
            by_reason={str(r): int(n) for r, n in raw.get("by_reason", {}).items()},
            first=[dict(f) for f in raw.get("first", [])],
        )

    def line(self, what: str) -> str:
        """One line, e.g. ``skipped 3 source files: bad_vad 2, undecodable_flac 1; first: a (bad_vad: ...), ...``."""
        if not self.count:
            return f"skipped 0 {what}"
        counts = ", ".join(f"{r} {n}" for r, n in sorted(self.by_reason.items()))
        named = "; ".join(f"{f['name']} ({f['reason']}{': ' + f['why'] if f['why'] else ''})" for f in self.first)
        more = f" (and {self.count - len(self.first)} more)" if self.count > len(self.first) else ""
        return f"skipped {self.count} {what}: {counts}; first: {named}{more}"


@dataclass
class PreparedCorpus:
    """What a corpus's `prepare` returns."""

    splits: dict[str, Path]
    """split name -> its cut manifest (lhotse jsonl.gz), in the order the splits are sharded."""
    settings: dict = field(default_factory=dict)
    """What each split's index.json records about the preparation (for LibriLight: held-out speakers, parts)."""
    skipped: Skipped = field(default_factory=Skipped)
    """Source files left out of the manifests, by reason (SOURCE_SKIP_REASONS); the same on a re-run."""


class Corpus(Protocol):
    def prepare(
        self,
        corpus_dir,
        out_dir,
        *,
        max_seconds: float,
        min_seconds: float,
        valid_speakers: int | None,
        valid_fraction: float | None,
        jobs: int,
        log: Callable,
    ) -> PreparedCorpus: ...


def available() -> list[str]:
    """Names of the corpus modules, in the order :func:`detect_layout` tries them (:data:`CORPORA`)."""
    return list(CORPORA)


def detect_layout(corpus_dir: str | os.PathLike) -> str:
    """The corpus module that reads `corpus_dir`, from what lies in it; raises DataError saying what it looked for.

    Each module of :data:`CORPORA`, in that order, is asked with its ``detect(root)``; the first that
    says yes reads it. The error names what each looked for (its ``LAYOUT``).
    """
    root = Path(corpus_dir)
    if not root.is_dir():
        raise DataError(f"corpus directory {root} does not exist")
    modules = [importlib.import_module(f"{__name__}.{name}") for name in CORPORA]
    for name, module in zip(CORPORA, modules):
        if module.detect(root):
            return name
    raise DataError(
        f"{root}: no corpus layout recognised. Looked for: "
        + ", ".join(m.LAYOUT.format(root=root) for m in modules)
        + f"; name one with --layout ({', '.join(available())})"
    )


def default_max_seconds(corpus: str | Corpus) -> float:
    """The corpus module's ``DEFAULT_MAX_SECONDS`` (:data:`DEFAULT_MAX_SECONDS` when it sets none)."""
    return float(getattr(get_corpus(corpus), "DEFAULT_MAX_SECONDS", DEFAULT_MAX_SECONDS))


def private_tmp(path: Path) -> Path:
    """A temporary name for `path` that no other process uses (host and pid in it), same suffixes.

    NOTE: jobs of one sharding split over machines (``--part I/N``) may prepare the same
    manifests at once; each writes its own file and renames it into place (the contents are
    the same), so no reader ever sees two writers' lines interleaved.
    """
    name = path.name
    stem, dot, rest = name.partition(".")
    return path.with_name(f"{stem}.tmp-{socket.gethostname()}-{os.getpid()}{dot}{rest}")


def get_corpus(corpus: str | Corpus) -> Corpus:
    """The corpus module of that name, or `corpus` itself when it is already one."""
    if not isinstance(corpus, str):
        return corpus
    if corpus not in available():
        raise DataError(f"unknown corpus {corpus!r}: the corpora are {available()} (istack_ds/data/corpora/)")
    return importlib.import_module(f"{__name__}.{corpus}")


def add_preparation_args(parser, corpus_required: bool = True) -> None:
    """The command-line options of the preparation step, shared by tools/prepare_librilight.py and shard_corpus.py."""
    parser.add_argument(
        "--corpus",
        required=corpus_required,
        help="the corpus: a LibriLight tree (small/ ...), a LibriSpeech tree (LibriSpeech/train-clean-100/ ...) "
        "or a lhotse manifest directory",
    )
    parser.add_argument("--out", required=True, help="output directory: manifests/, train/, valid/")
    parser.add_argument(
        "--layout",
        choices=available(),
        default=None,
        help="the corpus module that reads --corpus (istack_ds/data/corpora/); recognised from the directory when "
        "not given",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="longest cut: a LibriLight VAD window (default 20), a whole utterance (LibriSpeech, lhotse manifests: "
        "default 36; longer ones are skipped and counted as too_long); a member's FLAC is capped at twice its "
        "16-bit PCM",
    )
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="shorter windows are dropped, shorter utterances skipped and counted as too_short (shard members are "
        "never under 400 samples, whatever this says)",
    )
    held = parser.add_mutually_exclusive_group()
    held.add_argument(
        "--valid-speakers",
        type=int,
        default=None,
        help="speakers held out for validation (default 1) when the corpus names no held-out part (LibriSpeech "
        "dev-*, a lhotse manifest part named dev/valid)",
    )
    held.add_argument("--valid-fraction", type=float, default=None, help="fraction of the speakers held out")


def valid_speakers_arg(args) -> int | None:
    """--valid-speakers, defaulting to 1 when neither it nor --valid-fraction is given."""
    return 1 if args.valid_speakers is None and args.valid_fraction is None else args.valid_speakers
