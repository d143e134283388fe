"""Shard members: ``<key>.flac`` (16-bit mono FLAC) + ``<key>.json`` pairs in a plain tar, written and read back.

Writing (:class:`MemberWriter`) is deterministic: the same audio and metadata give
the same bytes (fixed mtime, keys in the order written). Reading
(:func:`iter_tar_samples`) streams a tar member by member and reports every way a
shard or a member can be unusable as one of :data:`SKIP_REASONS`, so that the loader
counts problems instead of dying on them.

Limits of a member: no tar member above :data:`MAX_MEMBER_BYTES`, and no FLAC whose
header declares more 16-bit PCM than that (a damaged header cannot make a reader
allocate it); at least :data:`MIN_MEMBER_SAMPLES` samples of audio (the writer
enforces it).
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

#: Why a member (or a whole shard) was skipped: the keys of data/skipped_by_reason.
SKIP_REASONS = (
    "missing_shard",
    "unreadable_tar",
    "truncated_tar",
    "missing_json",
    "missing_flac",
    "bad_json",
    "undecodable_flac",
    "empty_audio",
    "non_finite",
    "too_short",
    "too_large",  # above MAX_MEMBER_BYTES (tar header or FLAC header)
    "longer_than_crop",  # data.long_cuts=skip: only whole utterances up to data.crop_seconds are trained on
    "batch_remainder",  # utterance batches: a shard group's last cuts that fill no micro-batch (drawn at random)
)
#: What was repaired on the way: the keys of data/repaired_by_reason.
REPAIR_REASONS = ("resampled", "downmixed", "too_long")

#: The largest tar member a reader takes into memory, and the most 16-bit PCM a member's FLAC
#: header may declare. NOTE: 64 MiB is over half an hour of 16 kHz audio, far beyond any window
#: trained on (the writer's own cap, from --max-seconds, is lower); a header declaring more is
#: damaged or foreign, and reading it whole would cost that memory in every loader worker.
MAX_MEMBER_BYTES = 64 << 20
#: The fewest samples a member holds: the receptive field of the teachers' CNN front end
#: (HuBERT, wav2vec 2.0, WavLM: kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2), 25 ms at 16 kHz;
#: shorter audio gives the teacher no frame at all.
MIN_MEMBER_SAMPLES = 400


class BadMember(ValueError):
    """A shard member that cannot be used; `reason` is one of SKIP_REASONS, the message starts with the key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---- audio ---------------------------------------------------------------------------


def encode_flac(audio, sample_rate: int) -> bytes:
    """16-bit FLAC bytes of a float mono signal."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


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


# ---- writing -------------------------------------------------------------------------


class MemberWriter:
    """Writes ``<key>.flac`` + ``<key>.json`` members into an open binary file, as a plain tar."""

    def __init__(self, f: BinaryIO, sample_rate: int):
        import webdataset as wds

        self.sample_rate = sample_rate
        self.tar = wds.TarWriter(f, mtime=0.0)  # fixed mtime: same input, same bytes

    def write(self, key: str, audio, meta: dict) -> None:
        """One member: `audio` (float mono at the writer's rate) as FLAC, `meta` as JSON (keys in its order)."""
        self.write_encoded(key, encode_flac(audio, self.sample_rate), meta)

    def write_encoded(self, key: str, flac: bytes, meta: dict) -> None:
        """One member from FLAC bytes already encoded (:func:`encode_flac`), `meta` as JSON (keys in its order)."""
        self.tar.write({"__key__": key, "flac": flac, "json": json.dumps(meta).encode()})

    def close(self) -> None:
        self.tar.close()

    def __enter__(self) -> MemberWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- reading -------------------------------------------------------------------------


def member_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member's name: the key ends at the first dot of the file name."""
    folder, base = os.path.split(name)
    prefix, _, ext = base.partition(".")
    return (f"{folder}/{prefix}" if folder else prefix), ext


def tar_keys(path: str) -> list[str]:
    """The keys of a tar's members, one per run of members sharing a key, read from the headers alone (the data is
    seeked over); as far as the tar can be read."""
    keys: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    key = member_key(m.name)[0]
                    if not keys or keys[-1] != key:
                        keys.append(key)
    except (tarfile.TarError, OSError, EOFError):
        pass  # what the tar still holds is listed; check_shard reports the damage itself
    return keys


def iter_tar_samples(
    path: str, on_error: Callable[[str, str], None], *, max_member_bytes: int | None = None
) -> Iterator[dict]:
    """{'__key__', <ext>: bytes, ...} per key of a tar, streamed in order.

    A shard-level problem calls ``on_error(reason, message)`` once and ends the
    shard: missing file, not a tar, or a tar cut short (the group being read
    when the data ran out is dropped with it; everything before it is yielded).
    A member whose header declares more than `max_member_bytes` (MAX_MEMBER_BYTES when None) calls
    ``on_error("too_large", message)`` once for its key; the reader steps over its
    data without keeping it, leaves out the whole key and goes on with the shard.
    """
    cap = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
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
        dropped: str | None = None  # the key of a member that was too large: its other members go too
        last = "the first member"
        try:
            for m in tf:
                last = m.name
                if not m.isfile():
                    continue
                key, ext = member_key(m.name)
                if current is not None and current["__key__"] != key:
                    yield current  # complete: the next key started
                    current = None
                if key == dropped:
                    continue
                if m.size > cap:
                    # NOTE: not read: the stream steps over the data in small blocks on the next header
                    on_error("too_large", f"{path}: {key}: {m.name} declares {m.size} bytes (cap {cap})")
                    current, dropped = None, key
                    continue
                member = tf.extractfile(m)
                data = member.read() if member is not None else b""
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
    """(audio float32 [T] at `sample_rate`, meta dict) of one shard sample; raises BadMember when bad.

    A FLAC header declaring more than MAX_MEMBER_BYTES of 16-bit PCM is refused ("too_large") before decoding.
    """
    import numpy as np
    import soundfile as sf

    meta = member_meta(sample)
    key = sample["__key__"]
    try:
        with sf.SoundFile(io.BytesIO(sample["flac"])) as f:
            declared = f.frames * f.channels * 2
            if declared > MAX_MEMBER_BYTES:
                raise BadMember("too_large", f"{key}: flac header declares {f.frames} frames (cap {MAX_MEMBER_BYTES})")
            audio, sr = f.read(dtype="float32", always_2d=True), f.samplerate
    except BadMember:
        raise
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError on junk
        raise BadMember("undecodable_flac", f"{key}: undecodable flac ({e})") from None
    if audio.shape[0] == 0:
        raise BadMember("empty_audio", f"{key}: empty audio")
    audio = to_mono_rate(audio, sr, sample_rate)
    if not np.isfinite(audio).all():
        raise BadMember("non_finite", f"{key}: non-finite samples")
    return audio, meta
