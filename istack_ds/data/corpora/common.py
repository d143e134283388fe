"""Corpus plumbing shared by the corpus modules: manifests per part, held-out speakers, cuts per split, detection.

A corpus module (:mod:`istack_ds.data.corpora`) keeps only what its layout needs; what every one does the
same way is here:

- :func:`prepare_parts`: a part's recordings + supervisions manifests, written once (a part counts as prepared
  once both exist, its skips kept beside them so a re-run reports the same), each through
  :func:`write_part_manifests` (a bounded window of source files parsed by threads, written in order);
- :func:`pick_valid_speakers`, :func:`warn_large_valid` and :func:`write_split_files`: the held-out speakers
  (a warning when they hold much of the data) and the cuts manifests per split;
- :func:`check_name`, :func:`printable`, :func:`audio_error`, :func:`sorted_dirs`, :func:`has_file`: reading a
  corpus directory.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from istack_ds.data.corpora import BadSource, Skipped, private_tmp
from istack_ds.data.index import DataError, write_json_atomic
from istack_ds.data.progress import Ticker


def sorted_dirs(path: Path) -> list[Path]:
    """The directories in `path`, sorted (raises OSError when it cannot be listed)."""
    with os.scandir(path) as it:
        return sorted(Path(e.path) for e in it if e.is_dir())


def subdirs(path: Path) -> list[Path]:
    """The directories in `path`, sorted; none when it cannot be listed."""
    try:
        return sorted_dirs(path)
    except OSError:
        return []


def has_file(path: Path, suffix: str, depth: int) -> bool:
    """Whether a file ending in `suffix` lies exactly `depth` directories below `path` (first hit ends the walk)."""
    if depth == 0:
        try:
            with os.scandir(path) as it:
                return any(e.name.endswith(suffix) and e.is_file() for e in it)
        except OSError:
            return False
    return any(has_file(d, suffix, depth - 1) for d in subdirs(path))


def printable(path: str | os.PathLike) -> str:
    """`path` as text that prints and goes into json anywhere: bytes of its name that are not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_name(path: Path) -> None:
    """BadSource("undecodable_name") naming `path` when its name is not UTF-8: a manifest, a member key and its
    json hold names as UTF-8 text (soundfile and lhotse fail on it with an encoding error, not a bad header)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise BadSource("undecodable_name", f"{printable(path)}: the file name is not UTF-8 (rename it)") from None


def audio_error(flac: Path, e: Exception) -> str:
    """soundfile's one-line reason for a header that does not read (lhotse's message spans several lines)."""
    import soundfile as sf

    try:
        sf.info(str(flac))
    except Exception as direct:  # noqa: BLE001 -- soundfile raises several types on junk
        return str(direct)
    return " ".join(str(e).split())


def manifest_paths(manifest_dir: Path, corpus: str, part: str) -> tuple[Path, Path]:
    """A part's recordings and supervisions manifests, named as lhotse's recipes name them."""
    return (
        manifest_dir / f"{corpus}_recordings_{part}.jsonl.gz",
        manifest_dir / f"{corpus}_supervisions_{part}.jsonl.gz",
    )


def skipped_path(manifest_dir: Path, corpus: str, part: str) -> Path:
    """The record of the sources a part's manifests leave out (:meth:`Skipped.to_dict`)."""
    return manifest_dir / f"{corpus}_skipped_{part}.json"


def read_skipped(path: Path) -> Skipped:
    """The skips recorded for a prepared part; none when it was prepared without a record (lhotse's recipe)."""
    if not path.is_file():
        return Skipped()
    try:
        return Skipped.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: unreadable ({e}); delete it and the part's manifests to prepare it again") from None


def prepare_parts(
    manifest_dir: Path,
    corpus: str,
    parts: list[str],
    write_part: Callable[[str, Path, Path, Skipped], int],
    *,
    done: Callable[[str, int, Skipped], None],
    min_bytes: int = -1,
) -> tuple[Skipped, dict[str, int]]:
    """The manifests of every part in `parts` that is not prepared yet; returns the sources left out of all of
    them (those recorded for prepared parts included) and the count each written part holds.

    `write_part(part, recordings, supervisions, skipped)` writes a part's two manifests (to temporary names,
    renamed here when complete) and returns what they hold; `done(part, n, skipped)` logs it. A part is prepared
    when both manifests exist and the recordings one is larger than `min_bytes`.
    """
    total, written = Skipped(), {}
    for part in parts:
        rec_path, sup_path = manifest_paths(manifest_dir, corpus, part)
        record = skipped_path(manifest_dir, corpus, part)
        if rec_path.is_file() and sup_path.is_file() and rec_path.stat().st_size > min_bytes:
            total.update(read_skipped(record))
            continue
        tmp_rec, tmp_sup = private_tmp(rec_path), private_tmp(sup_path)
        skipped = Skipped()
        n = write_part(part, tmp_rec, tmp_sup, skipped)
        write_json_atomic(record, skipped.to_dict())
        os.replace(tmp_sup, sup_path)
        os.replace(tmp_rec, rec_path)  # last: the recordings manifest marks the part as complete
        total.update(skipped)
        written[part] = n
        done(part, n, skipped)
    return total, written


def write_part_manifests(
    rec_path: Path,
    sup_path: Path,
    sources: Iterable[tuple[Path, tuple]],
    parse: Callable,
    *,
    skip: Callable[[Path, BadSource], None],
    ticker: Ticker,
    skipped: Skipped,
    jobs: int,
) -> int:
    """Writes one part's two manifests from `sources` ((file, args of `parse`) each, in order); returns the
    sources written.

    ``parse(*args)`` gives (Recording, [SupervisionSegment, ...], [BadSource of parts left out, ...]) or raises
    BadSource; `skip(file, error)` counts each. `jobs` threads parse a bounded window of in-flight sources
    (shared storage is latency-bound); they are written in order.
    """
    from lhotse import RecordingSet, SupervisionSet

    n = 0
    with (
        RecordingSet.open_writer(rec_path) as recs,
        SupervisionSet.open_writer(sup_path) as sups,
        ThreadPoolExecutor(max(1, jobs)) as pool,
    ):
        pending: deque = deque()

        def drain(limit: int) -> None:
            nonlocal n
            while len(pending) > limit:
                source, fut = pending.popleft()
                try:
                    recording, segments, left_out = fut.result()
                except BadSource as e:
                    skip(source, e)
                    continue
                for part in left_out:
                    skip(source, part)
                recs.write(recording)
                for s in segments:
                    sups.write(s)
                n += 1

        for source, args in sources:
            pending.append((source, pool.submit(parse, *args)))
            drain(4 * max(1, jobs))
            ticker.tick(f"{skipped.count} skipped" if skipped.count else "")  # a line every few seconds
        drain(0)
    return n


def pick_valid_speakers(speakers: list[str], valid_speakers: int | None, valid_fraction: float | None) -> list[str]:
    """The held-out speakers: the last N of the sorted list (N given, or a fraction of all, at least 1)."""
    if valid_fraction is not None:
        if not 0 <= valid_fraction < 1:
            raise DataError(f"--valid-fraction {valid_fraction} must be in [0, 1)")
        n = 0 if valid_fraction == 0 else max(1, round(valid_fraction * len(speakers)))
    else:
        n = valid_speakers or 0
    if n >= len(speakers):
        raise DataError(f"{n} validation speakers leave no training speaker (corpus has {len(speakers)})")
    return speakers[len(speakers) - n :] if n > 0 else []


#: Held-out speakers holding more than this share of the cuts or seconds are said in the log (with few speakers the
#: default one speaker can be half the corpus).
VALID_SHARE_WARNING = 0.2


def warn_large_valid(counts: dict, valid: list[str], speakers: int, log: Callable) -> None:
    """A warning line when the held-out `valid` speakers (of `speakers`) hold more than VALID_SHARE_WARNING of the
    cuts or the seconds; `counts` is (cuts, seconds) per split."""
    if not valid or "valid" not in counts:
        return
    cuts, seconds = (sum(float(c[i]) for c in counts.values()) for i in (0, 1))
    n, held = counts["valid"]
    if n <= VALID_SHARE_WARNING * cuts and held <= VALID_SHARE_WARNING * seconds:
        return
    log(
        f"warning: the {len(valid)} held-out speaker(s) of {speakers} hold {n} of {cuts:.0f} cuts "
        f"({n / max(cuts, 1):.0%}), {held / 3600:.3f} of {seconds / 3600:.3f} h ({held / max(seconds, 1e-9):.0%}) "
        f"(above {VALID_SHARE_WARNING:.0%}): hold out fewer with --valid-speakers N or --valid-fraction F "
        "(--valid-speakers 0 holds none out)"
    )


def write_split_files(
    out_dir: Path, splits: list[str], routed: Iterable[tuple[str, object]]
) -> tuple[dict[str, Path], dict[str, list]]:
    """OUT/<split>/cuts.jsonl.gz of each of `splits` from (split, cut) pairs; returns the paths and, per split,
    [cuts, seconds]. Each file is written under a private name and published when complete."""
    from lhotse import CutSet

    paths = {s: out_dir / s / "cuts.jsonl.gz" for s in splits}
    counts: dict[str, list] = {s: [0, 0.0] for s in splits}
    writers = {}
    for split in splits:
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        writers[split] = CutSet.open_writer(private_tmp(paths[split]))
    try:
        for split, cut in routed:
            writers[split].write(cut)
            counts[split][0] += 1
            counts[split][1] += cut.duration  # type: ignore[attr-defined]
    finally:
        for w in writers.values():
            w.close()
    for split in splits:
        os.replace(private_tmp(paths[split]), paths[split])  # complete: publish
    return paths, counts
