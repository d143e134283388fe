"""LibriLight layout -> lhotse manifests -> VAD-window cuts -> plain WebDataset shards + index.json.

The pipeline (``tools/shard_corpus.py`` drives it)::

    CORPUS/{small,medium,large}/<speaker>/<book>/<name>.flac + .json
      -> OUT/manifests/librilight_{recordings,supervisions}_<part>.jsonl.gz   (lhotse.recipes.prepare_librilight)
      -> OUT/<split>/cuts.jsonl.gz       one cut per VAD window (adjacent voice_activity merged up to max_seconds)
      -> OUT/<split>/shard-000000.tar    members <key>.flac (16 kHz mono) + <key>.json (no pickles)
      -> OUT/<split>/index.json          per shard {path, samples, seconds, bytes, sha256} + totals

Splits are by speaker (``valid`` holds ``valid_speakers`` speakers, ``train`` the rest).
Everything is streamed from lazily opened manifests; only per-cut durations are
held in memory. Re-running skips shards whose file still matches the index.

:func:`read_index` is what the loader and the tools use to open an index; it
raises :class:`DataError` naming the path for every way an index can be unusable.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterable, Iterator

INDEX_FORMAT = "istack_ds.shards/1"
SHARD_PATTERN = "shard-%06d.tar"
HISTOGRAM_BIN_SECONDS = 0.25
LIBRILIGHT_PARTS = ("small", "medium", "large")


class DataError(ValueError):
    """Unusable data (index, shards, corpus); the message names the path."""


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


# ---- LibriLight -> manifests -------------------------------------------------------


def prepare_manifests(corpus_dir: str | os.PathLike, manifest_dir: str | os.PathLike, log=print) -> list[str]:
    """Runs lhotse's LibriLight recipe on the parts that exist; returns those parts.

    ``prepare_librilight`` processes small, medium and large and asserts on an
    empty part. It skips a part whose two manifests already exist, so a missing
    part gets empty placeholder manifests first (removed again once the part
    appears). The recipe's own skip makes this idempotent.
    """
    from lhotse.recipes.librilight import prepare_librilight

    corpus_dir, manifest_dir = Path(corpus_dir).resolve(), Path(manifest_dir)
    if not corpus_dir.is_dir():
        raise DataError(f"corpus directory {corpus_dir} does not exist")
    manifest_dir.mkdir(parents=True, exist_ok=True)
    present = []
    for part in LIBRILIGHT_PARTS:
        has_audio = (corpus_dir / part).is_dir() and next((corpus_dir / part).rglob("*.flac"), None) is not None
        placeholders = [manifest_dir / f"librilight_{kind}_{part}.jsonl.gz" for kind in ("recordings", "supervisions")]
        marker = manifest_dir / f".placeholder_{part}"
        if has_audio:
            present.append(part)
            if marker.exists():
                for p in placeholders + [marker]:
                    p.unlink(missing_ok=True)
        elif not all(p.is_file() for p in placeholders):
            for p in placeholders:
                with gzip.open(p, "wt"):
                    pass
            marker.touch()
    if not present:
        raise DataError(f"corpus {corpus_dir} has no FLAC files under any of {list(LIBRILIGHT_PARTS)}")
    prepare_librilight(corpus_dir, manifest_dir)
    log(f"manifests {manifest_dir}: parts {present}")
    return present


def _lazy(path: Path):
    from lhotse import load_manifest_lazy

    return load_manifest_lazy(path) if path.is_file() else None  # None: an empty manifest


def vad_windows(intervals: Iterable[tuple[float, float]], max_seconds: float, min_seconds: float,
                ) -> list[tuple[float, float]]:
    """Merges adjacent voice-activity intervals into windows of at most `max_seconds`.

    A window spans from its first interval's start to its last interval's end
    (short pauses inside are kept). An interval longer than `max_seconds` is cut
    into `max_seconds` pieces. Windows shorter than `min_seconds` are dropped.
    """
    pieces: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
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
    return [(round(a, 4), round(b, 4)) for a, b in windows if b - a >= min_seconds]


def cut_key(recording_id: str, window: int) -> str:
    """A WebDataset key: no dots (they start the extension) and no slashes."""
    rel = recording_id.split("/", 1)[1] if recording_id.split("/", 1)[0] in LIBRILIGHT_PARTS else recording_id
    return f"{rel.replace('/', '-').replace('.', '_')}-{window:04d}"


def window_cuts(manifest_dir: Path, parts: list[str], max_seconds: float, min_seconds: float) -> Iterator:
    """Lazily yields one lhotse MonoCut per VAD window, in manifest order."""
    from lhotse import MonoCut

    for part in parts:
        recordings = _lazy(manifest_dir / f"librilight_recordings_{part}.jsonl.gz")
        supervisions = _lazy(manifest_dir / f"librilight_supervisions_{part}.jsonl.gz")
        if recordings is None or supervisions is None:
            continue
        # The recipe writes supervisions grouped by recording; a dict of recordings
        # (one small entry per file) lets the groups come in any order.
        by_id = {r.id: r for r in recordings}
        for rec_id, group in groupby(supervisions, key=lambda s: s.recording_id):
            group = list(group)
            rec = by_id[rec_id]
            speaker = group[0].speaker
            book = rec_id.split("/")[-2] if rec_id.count("/") >= 2 else ""
            intervals = [(max(0.0, s.start), min(rec.duration, s.end)) for s in group]
            for i, (start, end) in enumerate(vad_windows(intervals, max_seconds, min_seconds)):
                yield MonoCut(id=cut_key(rec_id, i), start=start, duration=round(end - start, 4), channel=0,
                              recording=rec, custom={"speaker": speaker, "book": book, "source": rec_id + ".flac"})


# ---- cuts -> shards ----------------------------------------------------------------


def plan_shards(durations: list[float], *, sample_rate: int, shard_mb: float, max_per_shard: int | None,
                min_shards: int) -> list[int]:
    """Sizes (cut counts) of consecutive shards.

    Greedy: a shard closes before it would exceed `shard_mb` (estimated as 16-bit
    PCM, an upper bound of the FLAC size) or `max_per_shard` cuts. If that gives
    fewer than `min_shards` shards (small splits), the cuts are spread evenly over
    min(min_shards, cuts) shards instead, so that ranks x workers can be fed.
    """
    limit = shard_mb * 1e6
    sizes, count, size = [], 0, 0.0
    for d in durations:
        est = d * sample_rate * 2 + 1536  # samples + tar/json overhead
        if count and (size + est > limit or (max_per_shard and count >= max_per_shard)):
            sizes.append(count)
            count, size = 0, 0.0
        count += 1
        size += est
    if count:
        sizes.append(count)
    n = len(durations)
    want = min(min_shards, n)
    if len(sizes) < want:
        sizes = [n // want + (1 if i < n % want else 0) for i in range(want)]
    return sizes


def _keys_digest(cuts) -> str:
    lines = "".join(f"{c.id} {c.start:.4f} {c.duration:.4f}\n" for c in cuts)
    return hashlib.sha256(lines.encode()).hexdigest()


def encode_flac(audio, sample_rate: int) -> bytes:
    """16-bit FLAC bytes of a float mono signal."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _load_window(cut, sample_rate: int):
    import numpy as np
    from scipy import signal

    audio = cut.load_audio()  # (channels, samples) float32
    audio = audio.mean(axis=0) if audio.ndim == 2 else audio
    if cut.sampling_rate != sample_rate:
        g = math.gcd(cut.sampling_rate, sample_rate)
        audio = signal.resample_poly(audio, sample_rate // g, cut.sampling_rate // g)
    return np.clip(audio, -1.0, 1.0).astype("float32")


def write_shard(path: Path, cuts: list, sample_rate: int) -> dict:
    """Writes one shard with webdataset.ShardWriter (to a temp name, renamed when complete)."""
    import webdataset as wds

    members, seconds = [], 0.0
    for cut in cuts:
        audio = _load_window(cut, sample_rate)
        meta = {"id": cut.id, "speaker": cut.custom["speaker"], "book": cut.custom["book"],
                "source": cut.custom["source"], "offset": cut.start, "duration": round(len(audio) / sample_rate, 4),
                "sample_rate": sample_rate}
        members.append({"__key__": cut.id, "flac": encode_flac(audio, sample_rate),
                        "json": json.dumps(meta).encode()})
        seconds += len(audio) / sample_rate
    number = int(path.stem.split("-")[-1])
    writer = wds.ShardWriter(str(path.parent / SHARD_PATTERN), maxcount=len(members), start_shard=number,
                             verbose=0, mtime=0.0,  # fixed mtime: same input, same bytes
                             opener=lambda name: open(name + ".tmp", "wb"),
                             post=lambda name: os.replace(name + ".tmp", name))
    try:
        for m in members:
            writer.write(m)
    finally:
        writer.close()
    return {"path": path.name, "samples": len(members), "seconds": round(seconds, 4),
            "bytes": path.stat().st_size, "sha256": file_sha256(path)}


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
    for name in ("index.json", "index.partial.json"):
        p = split_dir / name
        if p.is_file():
            try:
                return {e["path"]: e for e in json.loads(p.read_text()).get("shards", [])}
            except (OSError, ValueError, TypeError, KeyError):
                pass
    return {}


def shard_split(split: str, cuts_path: Path, split_dir: Path, *, sample_rate: int, shard_mb: float,
                max_per_shard: int | None, min_shards: int, settings: dict, log=print) -> SplitReport:
    """Writes the shards of one split from its cuts manifest; keeps shards that still match."""
    from lhotse import CutSet

    report = SplitReport(split=split, index=str(split_dir / "index.json"))
    durations = [c.duration for c in CutSet.from_jsonl_lazy(cuts_path)]
    if not durations:
        raise DataError(f"split {split!r} has no cuts ({cuts_path}); lower --min-seconds or check the corpus")
    sizes = plan_shards(durations, sample_rate=sample_rate, shard_mb=shard_mb, max_per_shard=max_per_shard,
                        min_shards=min_shards)
    histogram = [0] * (int(max(durations) / HISTOGRAM_BIN_SECONDS) + 1)
    for d in durations:
        histogram[int(d / HISTOGRAM_BIN_SECONDS)] += 1
    previous = _previous_entries(split_dir)
    entries: list[dict] = []
    cut_iter = iter(CutSet.from_jsonl_lazy(cuts_path))
    for number, size in enumerate(sizes):
        group = [next(cut_iter) for _ in range(size)]
        path = split_dir / (SHARD_PATTERN % number)
        digest = _keys_digest(group)
        old = previous.get(path.name)
        if (old and old.get("keys_sha256") == digest and path.is_file()
                and path.stat().st_size == old.get("bytes") and file_sha256(path) == old.get("sha256")):
            entries.append(old)
            report.skipped += 1
        else:
            entry = write_shard(path, group, sample_rate)
            entry["keys_sha256"] = digest
            entries.append(entry)
            report.written += 1
            # progress survives an interrupted run: the next run skips what is here
            _write_json_atomic(split_dir / "index.partial.json",
                               _index_dict(split, sample_rate, entries, histogram, settings))
    # shards of an older, larger plan would be picked up by nothing, but confuse people
    for stale in split_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if int(stale.stem.split("-")[-1]) >= len(sizes):
            stale.unlink()
    _write_json_atomic(split_dir / "index.json", _index_dict(split, sample_rate, entries, histogram, settings))
    (split_dir / "index.partial.json").unlink(missing_ok=True)
    report.shards = len(entries)
    report.samples = sum(e["samples"] for e in entries)
    report.seconds = sum(e["seconds"] for e in entries)
    report.bytes = sum(e["bytes"] for e in entries)
    log(f"{split}: {report.shards} shards ({report.written} written, {report.skipped} already there), "
        f"{report.samples} cuts, {report.seconds / 3600:.3f} h, {report.bytes / 1e6:.1f} MB -> {report.index}")
    return report


def shard_corpus(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_seconds: float = 20.0,
                 min_seconds: float = 1.0, shard_mb: float = 256.0, max_per_shard: int | None = None,
                 min_shards: int = 8, valid_speakers: int = 1, sample_rate: int = 16000,
                 log: Callable = print) -> dict[str, SplitReport]:
    """The whole pipeline; returns a report per split (`train`, and `valid` when valid_speakers > 0)."""
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    if max_seconds <= 0 or min_seconds < 0 or min_seconds > max_seconds:
        raise DataError(f"need 0 <= min_seconds ({min_seconds}) <= max_seconds ({max_seconds})")
    out_dir = Path(out_dir)
    manifest_dir = out_dir / "manifests"
    parts = prepare_manifests(corpus_dir, manifest_dir, log=log)

    speakers = set()
    for part in parts:
        sups = _lazy(manifest_dir / f"librilight_supervisions_{part}.jsonl.gz")
        speakers.update(s.speaker for s in (sups or []))
    speakers = sorted(speakers)
    if valid_speakers >= len(speakers):
        raise DataError(f"--valid-speakers {valid_speakers} leaves no training speaker (corpus has {len(speakers)})")
    valid = set(speakers[len(speakers) - valid_speakers:]) if valid_speakers > 0 else set()
    splits = ["train", "valid"] if valid else ["train"]

    writers = {}
    for split in splits:
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        writers[split] = CutSet.open_writer(out_dir / split / "cuts.tmp.jsonl.gz")
    seen = set()
    for cut in window_cuts(manifest_dir, parts, max_seconds, min_seconds):
        if cut.id in seen:
            raise DataError(f"two windows share the key {cut.id}: the same speaker/book/name in two LibriLight parts?")
        seen.add(cut.id)
        split = "valid" if cut.custom["speaker"] in valid else "train"
        writers[split].write(fastcopy(cut))
    for split, w in writers.items():
        w.close()
        os.replace(out_dir / split / "cuts.tmp.jsonl.gz", out_dir / split / "cuts.jsonl.gz")  # complete: publish

    settings = {"max_seconds": max_seconds, "min_seconds": min_seconds, "shard_mb": shard_mb,
                "max_per_shard": max_per_shard, "min_shards": min_shards, "valid_speakers": sorted(valid),
                "corpus": str(Path(corpus_dir).resolve())}
    return {split: shard_split(split, out_dir / split / "cuts.jsonl.gz", out_dir / split, sample_rate=sample_rate,
                               shard_mb=shard_mb, max_per_shard=max_per_shard, min_shards=min_shards,
                               settings={**settings, "split": split}, log=log)
            for split in splits}


# ---- reading members back ----------------------------------------------------------


def decode_member(sample: dict, sample_rate: int):
    """(audio float32 [T] at `sample_rate`, meta dict) of one shard sample; raises ValueError when bad."""
    import numpy as np
    import soundfile as sf
    from scipy import signal

    if "flac" not in sample:
        raise ValueError(f"{sample.get('__key__')}: no .flac member")
    if "json" not in sample:
        raise ValueError(f"{sample.get('__key__')}: .flac without .json")
    try:
        meta = json.loads(sample["json"])
    except ValueError as e:
        raise ValueError(f"{sample['__key__']}: bad json ({e})") from None
    try:
        audio, sr = sf.read(io.BytesIO(sample["flac"]), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError on junk
        raise ValueError(f"{sample['__key__']}: undecodable flac ({e})") from None
    if audio.shape[0] == 0:
        raise ValueError(f"{sample['__key__']}: empty audio")
    audio = audio.mean(axis=1)
    if sr != sample_rate:
        g = math.gcd(sr, sample_rate)
        audio = signal.resample_poly(audio, sample_rate // g, sr // g).astype(np.float32)
    if not np.isfinite(audio).all():
        raise ValueError(f"{sample['__key__']}: non-finite samples")
    return audio, meta


def check_shard(shard: ShardInfo, sample_rate: int, decode: bool = True) -> tuple[list[tuple[str, str]], int]:
    """Problems [(where, why)] of one shard and the number of samples read (tools/check_shards.py)."""
    import webdataset as wds

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
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True

    n = 0
    for sample in wds.tarfile_samples([{"url": where}], handler=handler):
        n += 1
        try:
            audio, meta = decode_member(sample, sample_rate)
            if meta.get("id") != sample["__key__"]:
                raise ValueError(f"{sample['__key__']}: json id {meta.get('id')!r} differs from the key")
        except ValueError as e:
            problems.append((where, str(e)))  # the message starts with the member's key
    problems += [(where, f"unreadable tar ({e})") for e in errors]
    if n != shard.samples:
        problems.append((where, f"{n} samples read, index says {shard.samples}"))
    return problems, n
