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
naming the path. Adding a corpus is one module here plus its test; ``tools/shard_corpus.py
--layout <name>`` picks it by module name (:data:`DEFAULT_CORPUS` when not given).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from istack_ds.data.index import DataError

DEFAULT_CORPUS = "librilight"
#: Why a corpus's `prepare` left a source file out of its manifests.
SOURCE_SKIP_REASONS = ("missing_json", "bad_json", "bad_vad", "undecodable_flac")


class BadSource(DataError):
    """A source file that a corpus leaves out; `reason` is one of SOURCE_SKIP_REASONS, the message names the file."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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

    def add(self, reason: str, name: str, why: str = "") -> None:
        """Counts one thing left out; `why` is kept on one line."""
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
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
    """Names of the corpus modules in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_corpus(corpus: str | Corpus) -> Corpus:
    """The corpus module of that name, or `corpus` itself when it is already one."""
    if not isinstance(corpus, str):
        return corpus
    if corpus not in available():
        raise DataError(f"unknown corpus {corpus!r}: the corpora are {available()} (istack_ds/data/corpora/)")
    return importlib.import_module(f"{__name__}.{corpus}")


def add_preparation_args(parser) -> None:
    """The command-line options of the preparation step, shared by tools/prepare_librilight.py and shard_corpus.py."""
    parser.add_argument("--corpus", required=True, help="directory holding small/ (and optionally medium/, large/)")
    parser.add_argument("--out", required=True, help="output directory: manifests/, train/, valid/")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="longest VAD window; a member's FLAC is capped at twice its 16-bit PCM",
    )
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="shorter windows are dropped (shard members are never under 400 samples, whatever this says)",
    )
    held = parser.add_mutually_exclusive_group()
    held.add_argument("--valid-speakers", type=int, default=None, help="speakers held out for validation (default 1)")
    held.add_argument("--valid-fraction", type=float, default=None, help="fraction of the speakers held out")


def valid_speakers_arg(args) -> int | None:
    """--valid-speakers, defaulting to 1 when neither it nor --valid-fraction is given."""
    return 1 if args.valid_speakers is None and args.valid_fraction is None else args.valid_speakers
