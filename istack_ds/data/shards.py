"""VAD-window cuts -> plain WebDataset shards + index.json, written in parallel; reading members back.

The pipeline (``tools/shard_corpus.py`` drives it; the first two steps are
:mod:`istack_ds.data.librilight`)::

    CORPUS/{small,medium,large}/<speaker>/<book>/<name>.flac + .json
      -> OUT/manifests/librilight_{recordings,supervisions}_<part>.jsonl.gz
      -> OUT/<split>/cuts.jsonl.gz       one cut per VAD window (adjacent voice_activity merged up to max_seconds)
      -> OUT/<split>/shard-000000.tar    members <key>.flac (16 kHz mono) + <key>.json (no pickles)
      -> OUT/<split>/index.json          per shard {path, samples, seconds, bytes, sha256} + totals

Splits are by speaker. Everything streams from lazily opened manifests: a first
pass plans the shard sizes (one int per shard) and a duration histogram, a second
pass hands each shard's cut list to one of ``jobs`` writer processes. Each
writer opens a source FLAC once per shard and seeks to each window, so a long
recording is never decoded whole. Re-running skips shards whose file still
matches the index (checked by the writers, in parallel); an interrupted run
leaves ``index.partial.json`` so the next run keeps what was finished.

:func:`read_index` is what the loader and the tools use to open an index; it
raises :class:`DataError` naming the path for every way an index can be unusable.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tarfile
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterable, Iterator

from istack_ds.data.librilight import (LIBRILIGHT_PARTS, DataError, cut_key, pick_valid_speakers,  # noqa: F401
                                       prepare_librilight, vad_windows, window_cuts)

INDEX_FORMAT = "istack_ds.shards/1"
SHARD_PATTERN = "shard-%06d.tar"
HISTOGRAM_BIN_SECONDS = 0.25


# ---- the index ---------------------------------------------------------------------


@dataclass
class ShardInfo:
    path: str
    """Absolute path of the shard (the index stores it relative to itself)."""
    samples: int
    seconds: float
    bytes: int
    sha256: str
    keys_sha256: str = ""
    """Digest of the (key, offset, duration) lines the shard was planned with: a changed plan rewrites it."""


@dataclass
class ShardIndex:
    path: str
    """Where index.json lives."""
    split: str
    sample_rate: int
    shards: list[ShardInfo]
    duration_histogram: list[int] = field(default_factory=list)
    """Cuts per HISTOGRAM_BIN_SECONDS-wide duration bin (lets the loader place bucket bins without reading audio)."""
    bin_seconds: float = HISTOGRAM_BIN_SECONDS
    settings: dict = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def read_index(path: str | os.PathLike, check_files: bool = True) -> ShardIndex:
    """Opens an index.json; with `check_files`, every shard it names must exist on disk."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard index {path} does not exist (write it with tools/shard_corpus.py)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"shard index {path} is not readable JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("shards"), list):
        raise DataError(f"shard index {path} has no `shards` list; is it an index written by tools/shard_corpus.py?")
    if not raw["shards"]:
        raise DataError(f"shard index {path} lists no shards (empty split?)")
    shards = []
    for i, s in enumerate(raw["shards"]):
        try:
            info = ShardInfo(path=str((path.parent / s["path"]).resolve()), samples=int(s["samples"]),
                             seconds=float(s["seconds"]), bytes=int(s["bytes"]), sha256=str(s["sha256"]),
                             keys_sha256=str(s.get("keys_sha256", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"shard index {path}: entry {i} is malformed ({e!r})") from None
        if check_files and not Path(info.path).is_file():
            raise DataError(f"shard index {path}: shard {info.path} (entry {i}) is missing on disk")
        shards.append(info)
    hist = raw.get("duration_histogram") or {}
    return ShardIndex(path=str(path), split=str(raw.get("split", "")), sample_rate=int(raw.get("sample_rate", 16000)),
                      shards=shards, duration_histogram=list(hist.get("counts", [])),
                      bin_seconds=float(hist.get("bin_seconds", HISTOGRAM_BIN_SECONDS)),
                      settings=dict(raw.get("settings", {})))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _index_dict(split: str, sample_rate: int, entries: list[dict], histogram: list[int], settings: dict) -> dict:
    return {
        "format": INDEX_FORMAT,
        "split": split,
        "sample_rate": sample_rate,
        "totals": {
            "shards": len(entries),
            "samples": sum(e["samples"] for e in entries),
            "seconds": round(sum(e["seconds"] for e in entries), 3),
            "bytes": sum(e["bytes"] for e in entries),
        },
        "duration_histogram": {"bin_seconds": HISTOGRAM_BIN_SECONDS, "counts": histogram},
        "settings": settings,
        "shards": entries,
    }


# ---- cuts -> shards ----------------------------------------------------------------


def plan_shards(durations: Iterable[float], *, sample_rate: int, shard_mb: float, max_per_shard: int | None,
                min_shards: int) -> list[int]:
    """Sizes (cut counts) of consecutive shards, in one pass over the durations.

    Greedy: a shard closes before it would exceed `shard_mb` (estimated as 16-bit
    PCM, an upper bound of the FLAC size) or `max_per_shard` cuts. If that gives
    fewer than `min_shards` shards (small splits), the cuts are spread evenly over
    min(min_shards, cuts) shards instead, so that ranks x workers can be fed.
    """
    limit = shard_mb * 1e6
    sizes, count, size, n = [], 0, 0.0, 0
    for d in durations:
        n += 1
        est = d * sample_rate * 2 + 1536  # samples + tar/json overhead
        if count and (size + est > limit or (max_per_shard and count >= max_per_shard)):
            sizes.append(count)
            count, size = 0, 0.0
        count += 1
        size += est
    if count:
        sizes.append(count)
    want = min(min_shards, n)
    if len(sizes) < want:
        sizes = [n // want + (1 if i < n % want else 0) for i in range(want)]
    return sizes


def _keys_digest(cuts: list[dict]) -> str:
    lines = "".join(f"{c['id']} {c['start']:.4f} {c['duration']:.4f}\n" for c in cuts)
    return hashlib.sha256(lines.encode()).hexdigest()


def _cut_spec(cut) -> dict:
    """What a writer process needs of a cut: small, picklable."""
    sources = cut.recording.sources
    if len(sources) != 1 or sources[0].type != "file":
        raise DataError(f"cut {cut.id}: recording {cut.recording.id} is not a single audio file")
    return {"id": cut.id, "path": sources[0].source, "start": float(cut.start), "duration": float(cut.duration),
            "speaker": cut.custom["speaker"], "book": cut.custom["book"], "source": cut.custom["source"]}


def encode_flac(audio, sample_rate: int) -> bytes:
    """16-bit FLAC bytes of a float mono signal."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def read_windows(cuts: list[dict], sample_rate: int) -> Iterator[tuple[dict, object]]:
    """(cut, float32 mono audio at `sample_rate`) per cut; each source file opened once, windows read by seeking."""
    import numpy as np
    import soundfile as sf

    for path, group in groupby(cuts, key=lambda c: c["path"]):
        with sf.SoundFile(path) as f:
            for c in group:
                f.seek(int(round(c["start"] * f.samplerate)))
                audio = f.read(int(round(c["duration"] * f.samplerate)), dtype="float32", always_2d=True)
                yield c, np.clip(to_mono_rate(audio, f.samplerate, sample_rate), -1.0, 1.0)


def to_mono_rate(audio, sr: int, sample_rate: int):
    """[T, C] float32 -> [T'] float32 mono at `sample_rate`."""
    import numpy as np

    if audio.ndim == 2:
        audio = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)
    if sr != sample_rate:
        from scipy import signal

        g = math.gcd(sr, sample_rate)
        audio = signal.resample_poly(audio, sample_rate // g, sr // g)
    return np.ascontiguousarray(audio, dtype=np.float32)


def write_shard(path: Path, cuts: list[dict], sample_rate: int) -> dict:
    """Writes one shard, member by member (to a temp name, renamed when complete); returns its index entry."""
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    samples, seconds = 0, 0.0
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, mtime=0.0)  # fixed mtime: same input, same bytes
        for cut, audio in read_windows(cuts, sample_rate):
            meta = {"id": cut["id"], "speaker": cut["speaker"], "book": cut["book"], "source": cut["source"],
                    "offset": cut["start"], "duration": round(len(audio) / sample_rate, 4),
                    "sample_rate": sample_rate}
            writer.write({"__key__": cut["id"], "flac": encode_flac(audio, sample_rate),
                          "json": json.dumps(meta).encode()})
            samples += 1
            seconds += len(audio) / sample_rate
        writer.close()
    os.replace(tmp, path)
    return {"path": path.name, "samples": samples, "seconds": round(seconds, 4),
            "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def ensure_shard(path: str, cuts: list[dict], digest: str, old: dict | None, sample_rate: int) -> tuple[dict, bool]:
    """(index entry, written?): keeps a shard that matches its old entry byte for byte, else (re)writes it."""
    p = Path(path)
    if (old and old.get("keys_sha256") == digest and p.is_file() and p.stat().st_size == old.get("bytes")
            and file_sha256(p) == old.get("sha256")):
        return old, False
    entry = write_shard(p, cuts, sample_rate)
    entry["keys_sha256"] = digest
    return entry, True


class Progress:
    """One line: shards, hours written of the total, audio hours per wall hour, ETA. Overwrites itself on a tty."""

    def __init__(self, label: str, shards: int, total_seconds: float, stream=None, every: float = 5.0):
        self.label, self.shards, self.total = label, shards, total_seconds
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.t0, self.last = every, time.monotonic(), -1e9
        self.done = self.written_shards = 0
        self.done_s = self.written_s = 0.0

    def update(self, seconds: float, written: bool) -> None:
        self.done += 1
        self.done_s += seconds
        if written:
            self.written_shards += 1
            self.written_s += seconds
        now = time.monotonic()
        if self.tty or now - self.last >= self.every or self.done == self.shards:
            self.last = now
            self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
            if self.tty and self.done == self.shards:
                self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-6, (now or time.monotonic()) - self.t0)
        rate = self.written_s / elapsed  # audio seconds written per wall second
        left = self.total - self.done_s
        eta = "0:00:00" if left <= 0 else (time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "?")
        return (f"{self.label}: {self.done}/{self.shards} shards ({self.done - self.written_shards} already there), "
                f"{self.done_s / 3600:.2f}/{self.total / 3600:.2f} h, {rate:.0f} audio s/s, ETA {eta}")


@dataclass
class SplitReport:
    split: str
    shards: int = 0
    written: int = 0
    skipped: int = 0
    samples: int = 0
    seconds: float = 0.0
    bytes: int = 0
    index: str = ""


def _previous_entries(split_dir: Path) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    for name in ("index.json", "index.partial.json"):  # the partial one (newer) wins
        p = split_dir / name
        if p.is_file():
            try:
                entries.update({e["path"]: e for e in json.loads(p.read_text()).get("shards", [])})
            except (OSError, ValueError, TypeError, KeyError):
                pass
    return entries


class _Inline:
    """A stand-in for a process pool with jobs=1: runs the call at submit time."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def shard_split(split: str, cuts_path: Path, split_dir: Path, *, sample_rate: int, shard_mb: float,
                max_per_shard: int | None, min_shards: int, settings: dict, jobs: int = 1, log=print,
                progress_stream=None) -> SplitReport:
    """Writes the shards of one split from its cuts manifest with `jobs` writer processes; keeps matching shards."""
    import multiprocessing

    from lhotse import CutSet

    report = SplitReport(split=split, index=str(split_dir / "index.json"))
    histogram: list[int] = []
    total = [0.0]

    def durations():
        for c in CutSet.from_jsonl_lazy(cuts_path):
            b = int(c.duration / HISTOGRAM_BIN_SECONDS)
            histogram.extend([0] * (b + 1 - len(histogram)))
            histogram[b] += 1
            total[0] += c.duration
            yield c.duration

    sizes = plan_shards(durations(), sample_rate=sample_rate, shard_mb=shard_mb, max_per_shard=max_per_shard,
                        min_shards=min_shards)
    if not sizes:
        raise DataError(f"split {split!r} has no cuts ({cuts_path}); lower --min-seconds or check the corpus")
    previous = _previous_entries(split_dir)
    entries: dict[int, dict] = {}
    progress = Progress(split, len(sizes), total[0], stream=progress_stream)
    pool = (ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) if jobs > 1 else _Inline())
    pending: deque[tuple[int, Future]] = deque()

    def collect(limit: int) -> None:
        while len(pending) > limit:
            number, fut = pending.popleft()
            entry, written = fut.result()
            entries[number] = entry
            report.written += written
            report.skipped += not written
            progress.update(entry["seconds"], written)
            if written:  # progress survives an interrupted run: the next run skips what is here
                _write_json_atomic(split_dir / "index.partial.json", _index_dict(
                    split, sample_rate, [entries[k] for k in sorted(entries)], histogram, settings))

    with pool:
        cut_iter = iter(CutSet.from_jsonl_lazy(cuts_path))
        for number, size in enumerate(sizes):
            group = [_cut_spec(next(cut_iter)) for _ in range(size)]
            path = split_dir / (SHARD_PATTERN % number)
            pending.append((number, pool.submit(ensure_shard, str(path), group, _keys_digest(group),
                                                previous.get(path.name), sample_rate)))
            collect(2 * jobs)
        collect(0)
    ordered = [entries[k] for k in range(len(sizes))]
    # shards of an older, larger plan would be picked up by nothing, but confuse people
    for stale in split_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].tar*"):
        if int(stale.name[6:12]) >= len(sizes) or stale.name.endswith(".tmp"):
            stale.unlink()
    _write_json_atomic(split_dir / "index.json", _index_dict(split, sample_rate, ordered, histogram, settings))
    (split_dir / "index.partial.json").unlink(missing_ok=True)
    report.shards = len(ordered)
    report.samples = sum(e["samples"] for e in ordered)
    report.seconds = sum(e["seconds"] for e in ordered)
    report.bytes = sum(e["bytes"] for e in ordered)
    log(f"{split}: {report.shards} shards ({report.written} written, {report.skipped} already there), "
        f"{report.samples} cuts, {report.seconds / 3600:.3f} h, {report.bytes / 1e6:.1f} MB -> {report.index}")
    return report


def shard_corpus(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_seconds: float = 20.0,
                 min_seconds: float = 1.0, shard_mb: float = 1024.0, max_per_shard: int | None = None,
                 min_shards: int = 8, valid_speakers: int | None = 1, valid_fraction: float | None = None,
                 sample_rate: int = 16000, jobs: int = 1, log: Callable = print,
                 progress_stream=None) -> dict[str, SplitReport]:
    """The whole pipeline; returns a report per split (`train`, and `valid` when speakers are held out)."""
    out_dir = Path(out_dir)
    prep = prepare_librilight(corpus_dir, out_dir, max_seconds=max_seconds, min_seconds=min_seconds,
                              valid_speakers=valid_speakers, valid_fraction=valid_fraction, jobs=max(4, jobs),
                              log=log)
    settings = {"max_seconds": max_seconds, "min_seconds": min_seconds, "shard_mb": shard_mb,
                "max_per_shard": max_per_shard, "min_shards": min_shards, "valid_speakers": prep["valid_speakers"],
                "parts": prep["parts"], "corpus": str(Path(corpus_dir).resolve())}
    return {split: shard_split(split, Path(s["path"]), out_dir / split, sample_rate=sample_rate, shard_mb=shard_mb,
                               max_per_shard=max_per_shard, min_shards=min_shards,
                               settings={**settings, "split": split}, jobs=jobs, log=log,
                               progress_stream=progress_stream)
            for split, s in prep["splits"].items()}


# ---- reading members back ----------------------------------------------------------

#: Why a member (or a whole shard) was skipped: the keys of data/skipped_by_reason.
SKIP_REASONS = ("missing_shard", "unreadable_tar", "truncated_tar", "missing_json", "missing_flac", "bad_json",
                "undecodable_flac", "empty_audio", "non_finite")
#: What was repaired on the way: the keys of data/repaired_by_reason.
REPAIR_REASONS = ("resampled", "downmixed", "too_long")


class BadMember(ValueError):
    """A shard member that cannot be used; `reason` is one of SKIP_REASONS, the message starts with the key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def iter_tar_samples(path: str, on_error: Callable[[str, str], None]) -> Iterator[dict]:
    """{'__key__', <ext>: bytes, ...} per key of a tar, streamed in order.

    A shard-level problem calls ``on_error(reason, message)`` once and ends the
    shard: missing file, not a tar, or a tar cut short (the group being read
    when the data ran out is dropped with it; everything before it is yielded).
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        on_error("missing_shard", f"{path}: missing on disk")
        return
    except OSError as e:
        on_error("unreadable_tar", f"{path}: {e}")
        return
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|")
        except (tarfile.TarError, OSError, EOFError) as e:
            on_error("unreadable_tar", f"{path}: not a tar ({e})")
            return
        current: dict | None = None
        last = "the first member"
        try:
            for m in tf:
                last = m.name
                if not m.isfile():
                    continue
                folder, name = os.path.split(m.name)
                prefix, _, ext = name.partition(".")
                key = f"{folder}/{prefix}" if folder else prefix
                if current is not None and current["__key__"] != key:
                    yield current  # complete: the next key started
                    current = None
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is None:
                    current = {"__key__": key}
                current[ext.lower()] = data
        except (tarfile.TarError, OSError, EOFError) as e:
            on_error("truncated_tar", f"{path}: cut short at {last} ({e})")
            return
        if current is not None:
            yield current


def member_meta(sample: dict) -> dict:
    """The parsed json of a member; raises BadMember when the flac or the json is missing or unreadable."""
    key = sample.get("__key__")
    if "flac" not in sample:
        raise BadMember("missing_flac", f"{key}: no .flac member")
    if "json" not in sample:
        raise BadMember("missing_json", f"{key}: .flac without .json")
    try:
        meta = json.loads(sample["json"])
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise BadMember("bad_json", f"{key}: bad json ({e})") from None
    if not sample["flac"]:
        raise BadMember("empty_audio", f"{key}: empty .flac member")
    return meta


def decode_member(sample: dict, sample_rate: int):
    """(audio float32 [T] at `sample_rate`, meta dict) of one shard sample; raises BadMember when bad."""
    import numpy as np
    import soundfile as sf

    meta = member_meta(sample)
    key = sample["__key__"]
    try:
        audio, sr = sf.read(io.BytesIO(sample["flac"]), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError on junk
        raise BadMember("undecodable_flac", f"{key}: undecodable flac ({e})") from None
    if audio.shape[0] == 0:
        raise BadMember("empty_audio", f"{key}: empty audio")
    audio = to_mono_rate(audio, sr, sample_rate)
    if not np.isfinite(audio).all():
        raise BadMember("non_finite", f"{key}: non-finite samples")
    return audio, meta


def check_shard(shard: ShardInfo, sample_rate: int, decode: bool = True) -> tuple[list[tuple[str, str]], int]:
    """Problems [(where, why)] of one shard and the number of samples read (tools/check_shards.py)."""
    where = shard.path
    if not Path(where).is_file():
        return [(where, "missing on disk")], 0
    problems = []
    size = Path(where).stat().st_size
    if size != shard.bytes:
        problems.append((where, f"size {size} != index {shard.bytes}"))
    digest = file_sha256(where)
    if digest != shard.sha256:
        problems.append((where, f"sha256 {digest[:12]}... != index {shard.sha256[:12]}..."))
    if not decode:
        return problems, 0
    errors: list[str] = []
    n = 0
    for sample in iter_tar_samples(where, lambda reason, msg: errors.append(f"{reason}: {msg}")):
        n += 1
        try:
            _audio, meta = decode_member(sample, sample_rate)
            if meta.get("id") != sample["__key__"]:
                raise BadMember("bad_json", f"{sample['__key__']}: json id {meta.get('id')!r} differs from the key")
        except BadMember as e:
            problems.append((where, str(e)))  # the message starts with the member's key
    problems += [(where, e) for e in errors]
    if n != shard.samples:
        problems.append((where, f"{n} samples read, index says {shard.samples}"))
    return problems, n
