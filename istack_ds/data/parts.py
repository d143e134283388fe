"""A split's index at the end of sharding: from one run's shards, or merged from the parts of a run split over machines.

A run split over machines (``--part I/N``) writes the shards numbered ``k`` with ``k % N == I - 1`` (round robin:
each job gets shards of every size, :func:`part_of`) and ``OUT/<split>/index.part-I-of-N.json``; :func:`merge_parts`
checks that all N are there, made with the same settings and plan, each shard present once, on disk with its size
and holding the planned keys (so no key is in two shards), and writes the ``index.json`` one unsplit run writes,
byte for byte: both end in :func:`finish_split`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from istack_ds.data.corpora import Skipped
from istack_ds.data.index import DataError, index_dict, write_json_atomic
from istack_ds.data.plan import SHARD_PATTERN

#: The index of one job's part of a split sharded over machines (``--part I/N``).
PART_INDEX = "index.part-{i}-of-{n}.json"
PART_INDEX_RE = re.compile(r"^index\.part-(\d+)-of-(\d+)\.json$")


def parse_part(text: str) -> tuple[int, int]:
    """``"3/8"`` -> (3, 8); raises DataError unless 1 <= I <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise DataError(f"--part {text!r}: expected I/N with 1 <= I <= N, e.g. 3/8")
    return int(m[1]), int(m[2])


def part_of(number: int, parts: int) -> int:
    """The part (1-based) that writes shard `number` when a split is sharded in `parts` parts: round robin."""
    return number % parts + 1


@dataclass
class SplitReport:
    split: str
    shards: int = 0
    written: int = 0
    skipped: int = 0
    """Shards already there (kept, not written)."""
    samples: int = 0
    seconds: float = 0.0
    bytes: int = 0
    index: str = ""
    members_skipped: Skipped = field(default_factory=Skipped)
    """Cuts of this split left out of its shards, by reason (WRITE_SKIP_REASONS)."""
    sources_skipped: Skipped = field(default_factory=Skipped)
    """Source files the corpus's preparation left out (the whole corpus, every split alike)."""


def finish_split(
    report: SplitReport,
    ordered: list[dict],
    *,
    split_dir: Path,
    planned_shards: int | None,
    sample_rate: int,
    histogram: list[int],
    settings: dict,
    empty: Callable[[SplitReport], str] | None,
    index_name: str = "index.json",
    extra: dict | None = None,
) -> None:
    """The end of a split, written in one run or merged from parts: `report` summed over the shards' index
    entries `ordered`, the split's index written (`extra`: keys added to it).

    Raises DataError with `empty(report)` when no cut was written (None: an empty split is fine, a part's).
    Shards numbered from `planned_shards` on (an older, larger plan's) are removed; None keeps them.
    """
    for e in ordered:
        report.members_skipped.update(e.get("skipped"))
    report.samples = sum(e["samples"] for e in ordered)
    if not report.samples and empty is not None:
        raise DataError(empty(report))
    if planned_shards is not None:
        _remove_stale_shards(split_dir, planned_shards)
    settings = {**settings, "skipped_members": report.members_skipped.to_dict()}
    index = index_dict(report.split, sample_rate, ordered, histogram, settings)
    write_json_atomic(split_dir / index_name, {**index, **(extra or {})})
    report.shards = len(ordered)
    report.seconds = sum(e["seconds"] for e in ordered)
    report.bytes = sum(e["bytes"] for e in ordered)


def _remove_stale_shards(split_dir: Path, shards: int) -> None:
    # shards of an older, larger plan would be picked up by nothing, but confuse people
    for stale in split_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].tar*"):
        if int(stale.name[6:12]) >= shards or stale.name.endswith(".tmp"):
            stale.unlink()


def merge_parts(out_dir: str | os.PathLike, *, log: Callable = print) -> dict[str, SplitReport]:
    """OUT/<split>/index.json from the part indexes of a sharding split over machines; returns a report per split.

    Raises DataError naming the part file when a part is missing or unfinished, was made with
    other settings or another plan, or one of its shards is missing, changed or claimed twice.
    """
    out_dir = Path(out_dir)
    split_dirs = sorted({p.parent for p in out_dir.glob("*/index.part-*.json") if PART_INDEX_RE.match(p.name)})
    if not split_dirs:
        raise DataError(f"{out_dir}: no part index (<split>/index.part-I-of-N.json) to merge; run istack shard --part")
    split_dirs.sort(key=lambda d: ({"train": 0, "valid": 1}.get(d.name, 2), d.name))
    reports = {}
    sources = Skipped()
    for split_dir in split_dirs:
        reports[split_dir.name], sources = _merge_split(split_dir, log)
    log(sources.line("source files"))
    for split, report in reports.items():
        log(f"{split}: " + report.members_skipped.line("cuts"))
    return reports


def _merge_split(split_dir: Path, log: Callable) -> tuple[SplitReport, Skipped]:
    found = {p.name: PART_INDEX_RE.match(p.name) for p in split_dir.glob("index.part-*.json")}
    counts = sorted({int(m[2]) for m in found.values() if m})
    if len(counts) != 1:
        names = sorted(n for n, m in found.items() if m)
        raise DataError(
            f"{split_dir}: part indexes of {len(counts)} different part counts {counts} ({', '.join(names)}); "
            "delete those of the split you no longer use"
        )
    n = counts[0]
    raws = []
    for i in range(1, n + 1):
        path = split_dir / PART_INDEX.format(i=i, n=n)
        if not path.is_file():
            unfinished = path.with_name(path.name.removesuffix(".json") + ".partial.json").is_file()
            raise DataError(
                f"{path}: part {i} of {n} is missing"
                + (" (unfinished: its partial index is there)" if unfinished else "")
                + f"; run istack shard ... --part {i}/{n} (a rerun keeps its finished shards)"
            )
        try:
            raw = json.loads(path.read_text())
            block = raw["part"]
            assert (block["index"], block["of"]) == (i, n), f"it says part {block['index']}/{block['of']}"
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
            raise DataError(f"{path}: not a part index written by istack shard --part ({err})") from None
        raws.append((path, raw))
    ref_path, ref = raws[0]
    same = ("format", "split", "sample_rate", "duration_histogram")
    planned = ref["part"]["keys_sha256"]
    for path, raw in raws[1:]:
        differ = [k for k in same if raw.get(k) != ref.get(k)]
        mine, theirs = ({k: v for k, v in r["settings"].items() if k != "skipped_members"} for r in (raw, ref))
        differ += [f"settings.{k}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if raw["part"]["keys_sha256"] != planned:
            differ.append("the shard plan (another corpus, manifests or sharding settings)")
        if differ:
            raise DataError(
                f"{path} was made with other settings than {ref_path.name}: {', '.join(differ)}; rerun the parts "
                "that differ with the same corpus and settings"
            )
    entries: dict[int, dict] = {}
    for path, raw in raws:
        i = raw["part"]["index"]
        for e in raw["shards"]:
            m = re.fullmatch(r"shard-(\d{6})\.tar", str(e.get("path", "")))
            k = int(m[1]) if m else -1
            if not 0 <= k < len(planned) or part_of(k, n) != i or k in entries:
                raise DataError(f"{path}: shard {e.get('path')} is not part {i}'s (or is listed twice)")
            shard = split_dir / e["path"]
            if not shard.is_file() or shard.stat().st_size != e["bytes"]:
                raise DataError(f"{path}: shard {shard} is missing or not the size the part wrote; rerun part {i}/{n}")
            if e.get("keys_sha256") != planned[k]:
                raise DataError(f"{path}: shard {e['path']} does not hold the planned keys; rerun part {i}/{n}")
            entries[k] = e
    missing = [k for k in range(len(planned)) if k not in entries]
    if missing:
        k = missing[0]
        raise DataError(
            f"{split_dir / PART_INDEX.format(i=part_of(k, n), n=n)} lacks shard {SHARD_PATTERN % k} "
            f"({len(missing)} planned shards missing); rerun part {part_of(k, n)}/{n}"
        )
    ordered = [entries[k] for k in range(len(planned))]
    split = str(ref["split"])
    report = SplitReport(split=split, index=str(split_dir / "index.json"))
    finish_split(
        report,
        ordered,
        split_dir=split_dir,
        planned_shards=len(planned),
        sample_rate=ref["sample_rate"],
        histogram=ref["duration_histogram"]["counts"],
        settings=ref["settings"],
        empty=lambda _: f"split {split!r}: no cut was written in any of the {n} parts ({split_dir})",
    )
    log(
        f"{split}: merged {n} parts: {report.shards} shards, {report.samples} cuts, {report.seconds / 3600:.3f} h, "
        f"{report.bytes / 1e6:.1f} MB -> {report.index}"
    )
    report.sources_skipped = Skipped.from_dict(ref["settings"].get("skipped_sources") or {})
    return report, report.sources_skipped
