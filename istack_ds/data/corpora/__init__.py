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

`log` takes one line of progress; errors are :class:`~istack_ds.data.index.DataError`
naming the path. Adding a corpus is one module here plus its test; ``tools/shard_corpus.py
--layout <name>`` picks it by module name (:data:`DEFAULT_CORPUS` when not given).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from istack_ds.data.index import DataError

DEFAULT_CORPUS = "librilight"


@dataclass
class PreparedCorpus:
    """What a corpus's `prepare` returns."""

    splits: dict[str, Path]
    """split name -> its cut manifest (lhotse jsonl.gz), in the order the splits are sharded."""
    settings: dict = field(default_factory=dict)
    """What each split's index.json records about the preparation (for LibriLight: held-out speakers, parts)."""


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
    parser.add_argument("--max-seconds", type=float, default=20.0, help="longest VAD window")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="shorter windows are dropped")
    held = parser.add_mutually_exclusive_group()
    held.add_argument("--valid-speakers", type=int, default=None, help="speakers held out for validation (default 1)")
    held.add_argument("--valid-fraction", type=float, default=None, help="fraction of the speakers held out")


def valid_speakers_arg(args) -> int | None:
    """--valid-speakers, defaulting to 1 when neither it nor --valid-fraction is given."""
    return 1 if args.valid_speakers is None and args.valid_fraction is None else args.valid_speakers
