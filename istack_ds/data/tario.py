"""Shard members: ``<key>.flac`` (16-bit mono FLAC) + ``<key>.json`` pairs in a plain tar, written and read back.

Writing (:class:`MemberWriter`) is deterministic: the same audio and metadata give
the same bytes (fixed mtime, keys in the order written). Reading
(:func:`iter_tar_samples`) streams a tar member by member and reports every way a
shard or a member can be unusable as one of :data:`SKIP_REASONS`, so that the
loader counts problems instead of dying on them.
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
)
#: What was repaired on the way: the keys of data/repaired_by_reason.
REPAIR_REASONS = ("resampled", "downmixed", "too_long")


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
        self.tar.write(
            {"__key__": key, "flac": encode_flac(audio, self.sample_rate), "json": json.dumps(meta).encode()}
        )

    def close(self) -> None:
        self.tar.close()

    def __enter__(self) -> MemberWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- reading -------------------------------------------------------------------------


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
