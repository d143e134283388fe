"""Checking shards back: each shard against its index entry (size, sha256, members), and keys across shards.

What ``istack check`` (tools/check_shards.py) runs; the reader's own checks (:mod:`istack_ds.data.tario`) decide
what a bad member is.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path

from istack_ds.data.index import ShardInfo, file_sha256
from istack_ds.data.plan import key_hashes, repeated_hashes
from istack_ds.data.tario import BadMember, decode_member, iter_tar_samples, tar_keys


@dataclass
class ShardCheck:
    """What :func:`check_shard` found in one shard."""

    problems: list[tuple[str, str]]
    """(where, why) of each problem."""
    samples: int
    """Members read (0 without decoding)."""
    keys: array
    """:func:`key_hashes` of its member keys, in order (for duplicates across shards: :func:`duplicate_keys`)."""


def check_shard(shard: ShardInfo, sample_rate: int, decode: bool = True) -> ShardCheck:
    """Problems of one shard, the samples read, and its key hashes (tools/check_shards.py)."""
    where = shard.path
    if not Path(where).is_file():
        return ShardCheck([(where, "missing on disk")], 0, array("Q"))
    problems = []
    size = Path(where).stat().st_size
    if size != shard.bytes:
        problems.append((where, f"size {size} != index {shard.bytes}"))
    digest = file_sha256(where)
    if digest != shard.sha256:
        problems.append((where, f"sha256 {digest[:12]}... != index {shard.sha256[:12]}..."))
    if not decode:
        return ShardCheck(problems, 0, key_hashes(tar_keys(where)))
    errors: list[str] = []
    n = 0
    keys: list[str] = []
    for sample in iter_tar_samples(where, lambda reason, msg: errors.append(f"{reason}: {msg}")):
        n += 1
        keys.append(sample["__key__"])
        try:
            _audio, meta = decode_member(sample, sample_rate)
            if meta.get("id") != sample["__key__"]:
                raise BadMember("bad_json", f"{sample['__key__']}: json id {meta.get('id')!r} differs from the key")
        except BadMember as e:
            problems.append((where, str(e)))  # the message starts with the member's key
    problems += [(where, e) for e in errors]
    if n != shard.samples:
        problems.append((where, f"{n} samples read, index says {shard.samples}"))
    return ShardCheck(problems, n, key_hashes(keys))


def duplicate_keys(shards: list[str], hashes: list[array]) -> list[tuple[str, str, str]]:
    """(shard, key, first shard) for each member whose key an earlier member (of that or an earlier shard) has.

    `hashes` are the shards' :func:`key_hashes`; only shards holding a repeated hash are
    listed again (headers only), so the keys compared are exact.
    """
    repeated = repeated_hashes(hashes)
    if not repeated:
        return []
    first: dict[str, str] = {}
    out = []
    for shard, h in zip(shards, hashes):
        if repeated.isdisjoint(h):
            continue
        names = tar_keys(shard)
        for key, kh in zip(names, key_hashes(names)):
            if kh not in repeated:
                continue
            if key in first:
                out.append((shard, key, first[key]))
            else:
                first[key] = shard
    return out
