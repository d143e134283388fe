"""Sharding: index <-> files, totals <-> manifests, member contents, idempotence, parallel writers, progress,
what the writer leaves out (undecodable, too short, too large, duplicate keys), the reader's size cap, and
checking shards back (tools/check_shards.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import soundfile as sf

from istack_ds.data import tario
from istack_ds.data.index import DataError, read_index
from istack_ds.data.plan import plan_shards
from istack_ds.data.progress import Progress
from istack_ds.data.shard_check import check_shard
from istack_ds.data.tario import BadMember, decode_member, iter_tar_samples
from istack_ds.data.writer import member_byte_cap, shard_corpus, write_shard
from tests.conftest import DEMO_SHARDING
from tests.helpers import ROOT

QUIET = dict(log=lambda *_: None)


def members(tar_path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def split_meta(split_dir) -> list[dict]:
    index = read_index(split_dir / "index.json")
    return [json.loads(m["json"]) for s in index.shards for m in members(s.path).values()]


def test_index_matches_shard_files_and_manifests(demo_shards):
    from lhotse import CutSet

    for split in ("train", "valid"):
        raw = json.loads((demo_shards / split / "index.json").read_text())
        index = read_index(demo_shards / split / "index.json")
        # small splits are spread over min_shards shards (valid has fewer cuts than that: one each)
        assert len(index.shards) == min(DEMO_SHARDING["min_shards"], raw["totals"]["samples"])
        assert split == "valid" or len(index.shards) == DEMO_SHARDING["min_shards"]
        for entry, shard in zip(raw["shards"], index.shards):
            data = open(shard.path, "rb").read()
            assert not entry["path"].startswith("/"), "paths are relative to the index"
            assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
            got = members(shard.path)
            assert len(got) == entry["samples"]
            assert all(set(m) == {"flac", "json"} for m in got.values()), "flac + json, no pickles"
        cuts = CutSet.from_jsonl_lazy(demo_shards / split / "cuts.jsonl.gz").to_eager()
        totals = raw["totals"]
        assert totals["shards"] == len(raw["shards"])
        assert totals["samples"] == sum(e["samples"] for e in raw["shards"]) == len(cuts)
        assert totals["bytes"] == sum(e["bytes"] for e in raw["shards"])
        assert totals["seconds"] == pytest.approx(sum(c.duration for c in cuts), abs=1e-3 * len(cuts))
        assert sum(raw["duration_histogram"]["counts"]) == len(cuts)
        metas = split_meta(demo_shards / split)
        assert sorted(m["id"] for m in metas) == sorted(c.id for c in cuts)


def test_members_are_16k_mono_vad_windows_within_limits(demo_shards):
    import soundfile as sf

    index = read_index(demo_shards / "train" / "index.json")
    for shard in index.shards:
        for key, m in members(shard.path).items():
            meta = json.loads(m["json"])
            audio, sr = sf.read(io.BytesIO(m["flac"]))
            assert meta["id"] == key and sr == meta["sample_rate"] == 16000 and audio.ndim == 1
            assert set(meta) >= {"id", "speaker", "book", "source", "offset", "duration", "sample_rate"}
            assert DEMO_SHARDING["min_seconds"] <= len(audio) / sr <= DEMO_SHARDING["max_seconds"] + 1e-3
            assert meta["duration"] == pytest.approx(len(audio) / sr, abs=1e-3)


def test_speaker_split_is_disjoint(demo_shards):
    train = {m["speaker"] for m in split_meta(demo_shards / "train")}
    valid = {m["speaker"] for m in split_meta(demo_shards / "valid")}
    assert len(valid) == DEMO_SHARDING["valid_speakers"] and len(train) == 2 and not train & valid


def test_rerun_skips_verified_shards_and_rewrites_a_damaged_one(demo_corpus, demo_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/shard-*.tar")}
    reports = shard_corpus(demo_corpus, out, log=lambda *_: None, **DEMO_SHARDING)
    assert all(r.written == 0 and r.skipped == r.shards for r in reports.values())
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/shard-*.tar")} == before

    damaged = out / "train" / "shard-000003.tar"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    # the command-line tool, as a user runs it
    args = ["--corpus", demo_corpus, "--out", out] + [f"--{k.replace('_', '-')}={v}" for k, v in DEMO_SHARDING.items()]
    proc = subprocess.run(
        [sys.executable, ROOT / "tools" / "shard_corpus.py", *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "train: 8 shards (1 written, 7 already there)" in proc.stdout
    valid_shards = len(read_index(out / "valid" / "index.json").shards)
    assert f"valid: {valid_shards} shards (0 written, {valid_shards} already there)" in proc.stdout
    assert (out / "train" / "index.json").read_text() == (demo_shards / "train" / "index.json").read_text()


def test_plan_shards_limits_and_spreads_small_splits():
    assert plan_shards([1.0] * 10, sample_rate=16000, shard_mb=1e3, max_per_shard=4, min_shards=1) == [4, 4, 2]
    assert plan_shards([1.0] * 10, sample_rate=16000, shard_mb=1e3, max_per_shard=None, min_shards=4) == [3, 3, 2, 2]
    assert plan_shards([1.0] * 3, sample_rate=16000, shard_mb=1e3, max_per_shard=None, min_shards=8) == [1, 1, 1]
    # 16-bit PCM estimate: 10 s = 320 kB, so 0.7 MB holds two cuts
    assert plan_shards([10.0] * 5, sample_rate=16000, shard_mb=0.7, max_per_shard=None, min_shards=1) == [2, 2, 1]


def test_parallel_writers_write_the_same_bytes_and_totals_match(demo_corpus, demo_shards, tmp_path):
    out = tmp_path / "jobs2"
    progress = io.StringIO()
    reports = shard_corpus(demo_corpus, out, jobs=2, progress_stream=progress, **QUIET, **DEMO_SHARDING)
    for split, report in reports.items():
        assert report.written == report.shards
        assert (out / split / "index.json").read_text() == (demo_shards / split / "index.json").read_text()
        for a, b in zip(sorted((out / split).glob("shard-*.tar")), sorted((demo_shards / split).glob("shard-*.tar"))):
            assert a.read_bytes() == b.read_bytes()
        index = read_index(out / split / "index.json")
        assert index.samples == report.samples and index.seconds == pytest.approx(report.seconds, abs=1e-3)
    lines = progress.getvalue().splitlines()
    assert lines[-1].startswith("valid: ") and " h, " in lines[-1] and "ETA 0:00:00" in lines[-1]
    assert any(line.startswith("train: 8/8 shards (0 already there)") for line in lines)
    assert not list(out.glob("*/*.tmp")) and not list(out.glob("*/index.partial.json"))


def test_interrupted_run_resumes_from_the_partial_index(demo_corpus, demo_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    index = json.loads((out / "train" / "index.json").read_text())
    # as if the run died after shard 2: a partial index naming shards 0-2, no index.json, the rest absent
    index["shards"] = index["shards"][:3]
    (out / "train" / "index.partial.json").write_text(json.dumps(index))
    (out / "train" / "index.json").unlink()
    for p in sorted((out / "train").glob("shard-*.tar"))[3:]:
        p.unlink()
    reports = shard_corpus(demo_corpus, out, progress_stream=io.StringIO(), **QUIET, **DEMO_SHARDING)
    assert (reports["train"].written, reports["train"].skipped) == (5, 3)
    assert (out / "train" / "index.json").read_text() == (demo_shards / "train" / "index.json").read_text()


def test_progress_line_has_hours_rate_and_eta():
    stream = io.StringIO()
    p = Progress("train", shards=4, total_seconds=4 * 3600.0, stream=stream, every=0.0)
    p.update(3600.0, written=False)
    p.update(3600.0, written=True)
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("train: 2/4 shards (1 already there), 2.00/4.00 h, ")
    assert "audio s/s, ETA " in line and "ETA ?" not in line and "skipped" not in line
    p.update(3000.0, written=True, skipped=2)
    assert stream.getvalue().splitlines()[-1].endswith(", 2 cuts skipped")


# ---- what the writer leaves out, and the reader's size cap ----------------------------


def _spec(key, path, start, duration) -> dict:
    return {"id": key, "path": str(path), "start": start, "duration": duration, "custom": {"speaker": "1"}}


def test_writer_leaves_out_undecodable_too_short_and_too_large_cuts_whole(tmp_path):
    """Issue 13 item 10: a body that does not decode, fewer than 400 samples (the CNN's receptive field), and a FLAC
    above the cap are each counted and named in the entry; every member written is whole; nothing raises."""
    rng = np.random.default_rng(0)
    good = tmp_path / "good.flac"
    sf.write(good, 0.3 * rng.standard_normal(3 * 16000).astype(np.float32), 16000)
    broken = tmp_path / "broken.flac"
    sf.write(broken, 0.3 * rng.standard_normal(16000).astype(np.float32), 16000)
    body = broken.read_bytes()
    broken.write_bytes(body[:200] + bytes(len(body) - 200))  # header fine, body not
    cap = 40_000  # 16-bit noise is nearly incompressible: 0.5 s is ~15 kB of FLAC, 2 s ~60 kB
    cuts = [
        _spec("a-0000", good, 0.0, 0.5),
        _spec("a-0001", good, 0.5, 399 / 16000),  # one sample short of the receptive field
        _spec("a-0002", good, 0.6, 400 / 16000),  # exactly the receptive field
        _spec("a-0003", good, 1.0, 2.0),  # too large for the cap
        _spec("b-0000", broken, 0.2, 0.5),
    ]
    entry = write_shard(tmp_path / "shard-000000.tar", cuts, 16000, cap)
    assert entry["samples"] == 2
    assert entry["skipped"]["by_reason"] == {"too_large": 1, "too_short": 1, "undecodable_flac": 1}
    assert [(f["name"], f["reason"]) for f in entry["skipped"]["first"]] == [
        ("a-0001", "too_short"),
        ("a-0003", "too_large"),
        ("b-0000", "undecodable_flac"),
    ]
    assert "broken.flac" in entry["skipped"]["first"][2]["why"]
    got = members(tmp_path / "shard-000000.tar")
    assert sorted(got) == ["a-0000", "a-0002"] and all(set(m) == {"flac", "json"} for m in got.values())
    for key, m in got.items():
        audio, meta = decode_member({"__key__": key, **m}, 16000)
        assert meta["id"] == key and len(audio) >= tario.MIN_MEMBER_SAMPLES and len(m["flac"]) <= cap
    with pytest.raises(DataError, match=r"gone\.flac: source of cut g-0000 is missing"):
        write_shard(tmp_path / "shard-000001.tar", [_spec("g-0000", tmp_path / "gone.flac", 0.0, 0.5)], 16000)
    assert member_byte_cap(3.0, 16000) == 4 * 48000 + 4096
    assert member_byte_cap(1e6, 16000) == tario.MAX_MEMBER_BYTES
    with pytest.raises(DataError, match="max_seconds=3000"):
        shard_corpus(tmp_path / "nope", tmp_path / "out", max_seconds=3000, **QUIET)


def _tar(path, files: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, payload in files:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def test_reader_steps_over_a_member_above_the_cap_without_reading_it(tmp_path):
    """Issue 13 item 10: a member whose tar header declares more than the cap is counted (too_large) and left out,
    key and all, without its bytes in memory; the members after it are read."""
    import tracemalloc

    flac = io.BytesIO()
    sf.write(flac, np.zeros(800, dtype=np.float32), 16000, format="FLAC")
    ok = [("{k}.flac", flac.getvalue()), ("{k}.json", b"{}")]
    files = [(n.format(k="a"), b) for n, b in ok] + [("big.json", b"{}"), ("big.flac", bytes(16 << 20))]
    files += [(n.format(k="c"), b) for n, b in ok]
    _tar(tmp_path / "s.tar", files)
    errors: list[tuple[str, str]] = []
    tracemalloc.start()
    keys = [
        s["__key__"]
        for s in iter_tar_samples(str(tmp_path / "s.tar"), lambda *e: errors.append(e), max_member_bytes=1 << 20)
    ]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["a", "c"] and peak < 4 << 20, peak
    assert [r for r, _ in errors] == ["too_large"] and "big.flac declares 16777216 bytes" in errors[0][1]


def test_the_default_cap_applies_where_the_stream_and_check_shards_read(demo_shards, tmp_path, monkeypatch):
    """iter_tar_samples(path, on_error), as the stream calls it, and decode_member both take tario.MAX_MEMBER_BYTES."""
    shard = read_index(demo_shards / "valid" / "index.json").shards[0]
    monkeypatch.setattr(tario, "MAX_MEMBER_BYTES", 1000)
    errors: list[str] = []
    assert list(iter_tar_samples(shard.path, lambda reason, _msg: errors.append(reason))) == []
    assert set(errors) == {"too_large"}
    problems = check_shard(shard, 16000).problems
    assert any("too_large" in why for _, why in problems)
    sample = {"__key__": "k", "flac": members(shard.path)[next(iter(members(shard.path)))]["flac"], "json": b"{}"}
    monkeypatch.setattr(tario, "MAX_MEMBER_BYTES", len(sample["flac"]) + 100)  # the tar member fits, its PCM not
    with pytest.raises(BadMember, match="k: flac header declares") as e:
        decode_member(sample, 16000)
    assert e.value.reason == "too_large"


# ---- tools/check_shards.py -----------------------------------------------------------


def _check_shards_main():
    spec = importlib.util.spec_from_file_location("check_shards", ROOT / "tools" / "check_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_check_shards_passes_good_and_names_bad_members(demo_shards, tmp_path, capsys):
    check = _check_shards_main()
    assert check([str(demo_shards / "valid" / "index.json")]) == 0
    assert "0 bad" in capsys.readouterr().out

    shutil.copytree(demo_shards / "valid", tmp_path / "valid")
    shard = tmp_path / "valid" / "shard-000000.tar"
    got = members(shard)
    key = sorted(got)[0]
    with tarfile.open(shard, "w") as tf:
        for k, exts in sorted(got.items()):
            for ext, data in exts.items():
                data = b"not a flac at all" if (k, ext) == (key, "flac") else data
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    assert check([str(tmp_path / "valid" / "index.json")]) == 1
    out = capsys.readouterr().out
    assert f"shard-000000.tar: {key}: undecodable flac" in out
    assert "sha256" in out  # the rewritten shard no longer matches its index entry
    assert check([str(tmp_path / "nope.json")]) == 2


def test_check_shards_in_parallel_names_a_truncated_tar(demo_shards, tmp_path, capsys):
    check = _check_shards_main()
    shutil.copytree(demo_shards / "train", tmp_path / "train")
    shard = tmp_path / "train" / "shard-000003.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    assert check([str(tmp_path / "train" / "index.json"), "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "shard-000003.tar: truncated_tar:" in out and "8 shards" in out and "2 jobs" in out
    assert sum(line.startswith("BAD ") for line in out.splitlines()) >= 2  # the cut itself, sizes/hash, counts
    assert "shard-000002.tar" not in out


def test_check_shards_names_duplicate_keys_across_shards(demo_shards, tmp_path, capsys):
    """Issue 13 item 10: the same key in two shards of one index is reported (exit 1), naming both shards."""
    check = _check_shards_main()
    shutil.copytree(demo_shards / "valid", tmp_path / "valid")
    index_path = tmp_path / "valid" / "index.json"
    raw = json.loads(index_path.read_text())
    copy = tmp_path / "valid" / "shard-000099.tar"
    shutil.copy(tmp_path / "valid" / raw["shards"][0]["path"], copy)
    raw["shards"].append({**raw["shards"][0], "path": copy.name})
    index_path.write_text(json.dumps(raw))
    keys = sorted(members(copy))
    for argv in ([str(index_path)], [str(index_path), "--no-decode", "--jobs", "2"]):
        assert check(argv) == 1
        out = capsys.readouterr().out
        for key in keys:
            assert f"BAD {copy}: {key}: duplicate key, first in {tmp_path / 'valid' / 'shard-000000.tar'}" in out
        assert f"{len(keys)} duplicate keys, {len(keys)} bad" in out


def test_ticker_prints_counts_rate_and_eta_at_the_end():
    """The progress line of check_shards and manifest preparation."""
    import io

    from istack_ds.data.progress import Ticker

    stream = io.StringIO()
    ticker = Ticker("check", "shards", total=3, stream=stream, every=1e9)
    for _ in range(3):
        ticker.tick("1 bad")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("check: 3/3 shards, ") and "ETA 00:00:00" in lines[0]
    assert lines[0].endswith(", 1 bad")


def test_silent_audio_is_left_out_and_counted(tmp_path):
    """Issue 23 item 12: an all-zero window is counted as `silent` and left out; a quiet but not silent one (and
    the shard's other members) are written as before."""
    rng = np.random.default_rng(1)
    audio = 0.3 * rng.standard_normal(3 * 16000).astype(np.float32)
    audio[16000:32000] = 0.0  # one second of digital silence
    audio[40000] = 1 / 32768  # a single quantum: quiet, not silent
    source = tmp_path / "source.flac"
    sf.write(source, audio, 16000)
    cuts = [_spec("a-0000", source, 0.0, 0.5), _spec("a-0001", source, 1.25, 0.5), _spec("a-0002", source, 2.4, 0.5)]
    entry = write_shard(tmp_path / "shard-000000.tar", cuts, 16000)
    assert entry["samples"] == 2 and entry["skipped"]["by_reason"] == {"silent": 1}
    assert entry["skipped"]["first"] == [{"name": "a-0001", "reason": "silent", "why": "every sample is zero"}]
    assert sorted(members(tmp_path / "shard-000000.tar")) == ["a-0000", "a-0002"]
    # the shard of the other cuts alone is the same, byte for byte
    alone = write_shard(tmp_path / "shard-000001.tar", [cuts[0], cuts[2]], 16000)
    assert alone["sha256"] == entry["sha256"] and "skipped" not in alone
