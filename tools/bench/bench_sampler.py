"""Batching inside a shard group: istack_ds's Batcher against lhotse's DynamicBucketingSampler, on the same cuts.

Usage:
    python tools/bench/bench_sampler.py                      # demo shards (data/demo/shards, else built in /tmp)
    python tools/bench/bench_sampler.py --index /data/ll-shards/train/index.json --seed 3

Two corpora, each split over 2 ranks by the stream's own shard assignment and read in groups of
data.interleave_shards shards (istack_ds.data.stream.ShardStream.shards_for):
  demo         the demo shards' cuts (their real durations, cropped as the stream plans them), configs/demo.yaml
               batching (crop 4 s, 16 s batches, 4 buckets, 200-cut buffer)
  librispeech  a synthetic duration list shaped like LibriSpeech (2-20 s, mean ~13 s), 40 shards of 200 cuts,
               the default batching (crop 15.6 s, 200 s batches, 20 buckets, 1000-cut buffer)
and, per corpus, these batchers over exactly the same cut stream (durations only, nothing decoded):
  batcher              istack_ds.data.batcher.Batcher, one per shard group (what the stream does)
  batcher, 8 utt.      the same counting utterances: exactly 8 a batch (the paper's 64 on 8 GPUs), a group's
                       remainder left out at random (`lost`)
  lhotse/group         lhotse DynamicBucketingSampler(shuffle, duration_bins = the stream's), one per shard group,
                       sync_buckets on / off, and with quadratic_duration=30
  lhotse/epoch         one DynamicBucketingSampler over the rank's whole epoch (no group boundary: what
                       sync_buckets is designed for, and what an exact resume inside a group cannot use)
It prints, per row: batches per epoch (both ranks), mean batch fill (audio seconds / batch_seconds), the padding
fraction (padded samples / all samples of the batch tensors), and a straggler proxy for 2 ranks: step i pairs the
ranks' i-th batches, cost(batch) = rows x (F + F^2 / 1500) with F the padded length in 20 ms frames, and
`wait` = sum over steps of (max - min) / sum of max, the fraction of the slower rank's time the other rank idles.
Nothing is written (the demo shards are built in a temporary directory when data/demo/shards is absent).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np

from istack_ds.config import DataConfig
from istack_ds.data.batcher import Batcher, Item, duration_bins, round_robin
from istack_ds.data.index import read_index
from istack_ds.data.loader import build_loader
from istack_ds.data.position import WorkerCounters

ROOT = Path(__file__).resolve().parents[2]
FRAMES_PER_SECOND = 50  # the SFM CNN's 20 ms frames
QUADRATIC_FRAMES = 1500  # cost ~ F + F^2 / c: c = 30 s of frames, the middle of lhotse's advice (15-40 s)
RANKS = 2


def demo_index(tmp: Path) -> Path:
    """data/demo/shards/train/index.json, or the demo corpus sharded into `tmp` when it is absent."""
    index = ROOT / "data" / "demo" / "shards" / "train" / "index.json"
    if index.exists():
        return index
    from istack_ds.data.demo_corpus import make_corpus
    from istack_ds.data.writer import shard_corpus

    make_corpus(tmp / "corpus", log=print)
    shard_corpus(tmp / "corpus", tmp / "shards", log=print)
    return tmp / "shards" / "train" / "index.json"


def demo_groups(index: Path, data: DataConfig, seed: int, crop: bool) -> tuple[list[list[list[Item]]], list[float]]:
    """Per rank: its shard groups of epoch 0, each the group's planned cuts in the order the stream reads them."""
    ranks = []
    for rank in range(RANKS):
        loader = build_loader(
            data, str(index), rank=rank, world_size=RANKS, seed=seed, epochs=1, local_world_size=1, crop=crop
        )
        stream = loader.dataset
        shards = stream.shards_for(0, 0, 1)
        groups = []
        for k in range(0, len(shards), data.interleave_shards):
            group = shards[k : k + data.interleave_shards]
            rng = random.Random(f"crops:{seed}:{stream.names[group[0][0]]}")
            counters = WorkerCounters()
            groups.append(list(round_robin([stream.read_shard(p, n, rng, counters) for p, n in group])))
        ranks.append(groups)
    return ranks, loader.dataset.duration_bins


def librispeech_groups(data: DataConfig, seed: int, shards: int = 40, per_shard: int = 200):
    """Per rank: shard groups of synthetic cuts, 2-20 s (2 + 18 x Beta(4, 2.5)), cropped to data.crop_seconds."""
    rng = np.random.default_rng(seed)
    seconds = 2.0 + 18.0 * rng.beta(4.0, 2.5, size=(shards, per_shard))
    cut = np.minimum(seconds, data.crop_seconds)
    items = [
        [Item(f"s{s}-{i}", b"", 0, int(d * 16000), float(d)) for i, d in enumerate(row)] for s, row in enumerate(cut)
    ]
    order = list(range(shards))
    random.Random(f"shards:{seed}:0").shuffle(order)
    ranks = []
    for rank in range(RANKS):
        mine = order[rank::RANKS]
        groups = [mine[k : k + data.interleave_shards] for k in range(0, len(mine), data.interleave_shards)]
        ranks.append([list(round_robin([iter(items[s]) for s in g])) for g in groups])
    hist = np.histogram(seconds, bins=np.arange(0.0, 20.25, 0.25))[0]
    bins = duration_bins(_Hist(hist.tolist(), 0.25), data.num_buckets, data.crop_seconds)
    return ranks, bins


class _Hist:
    """The two fields of a ShardIndex that duration_bins reads."""

    def __init__(self, counts: list[int], bin_seconds: float):
        self.duration_histogram, self.bin_seconds = counts, bin_seconds


def batcher(groups: list[list[Item]], bins: list[float], data: DataConfig, seed: int) -> list[list[float]]:
    """istack_ds's Batcher, one per group (ShardStream.planned without the decode)."""
    out = []
    for g, items in enumerate(groups):
        b = Batcher(bins, data.batch_seconds, data.shuffle_buffer, random.Random(f"batches:{seed}:{g}"))
        for it in items:
            out += [[c.seconds for c in batch] for batch in b.add(it)]
        out += [[c.seconds for c in batch] for batch in b.drain()]
    return out


def utterance_batcher(groups: list[list[Item]], bins: list[float], data: DataConfig, seed: int, n: int):
    """istack_ds's Batcher counting utterances (data.batch_unit: utterances): exactly n cuts a batch, a group's
    remainder left out at random (what the stream does for training batches)."""
    out = []
    for g, items in enumerate(groups):
        b = Batcher(bins, n, data.shuffle_buffer, random.Random(f"batches:{seed}:{g}"), count=True, drop_remainder=True)
        for it in items:
            out += [[c.seconds for c in batch] for batch in b.add(it)]
        out += [[c.seconds for c in batch] for batch in b.drain()]
    return out


def lhotse_batches(
    streams: list[list[Item]], bins: list[float], data: DataConfig, seed: int, sync: bool, quadratic: float | None
) -> list[list[float]]:
    """lhotse's DynamicBucketingSampler, one per stream (a shard group, or a whole rank epoch)."""
    from lhotse import CutSet
    from lhotse.dataset import DynamicBucketingSampler

    out = []
    for s, items in enumerate(streams):
        cuts = CutSet.from_cuts(_cut(it) for it in items)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager CutSet; buffer smaller than its heuristic wants
            sampler = DynamicBucketingSampler(
                cuts,
                max_duration=data.batch_seconds,
                duration_bins=bins,
                shuffle=True,
                buffer_size=data.shuffle_buffer,
                quadratic_duration=quadratic,
                sync_buckets=sync,
                world_size=1,
                rank=0,
                seed=seed + s,
            )
            out += [[c.duration for c in batch] for batch in sampler]
    return out


def _cut(item: Item):
    from lhotse import MonoCut, Recording
    from lhotse.audio import AudioSource

    samples = round(item.seconds * 16000)
    rec = Recording(
        id=item.key,
        sources=[AudioSource(type="file", channels=[0], source="/dev/null")],
        sampling_rate=16000,
        num_samples=samples,
        duration=samples / 16000,
    )
    return MonoCut(id=item.key, start=0.0, duration=samples / 16000, channel=0, recording=rec)


def cost(batch: list[float]) -> float:
    frames = max(batch) * FRAMES_PER_SECOND
    return len(batch) * (frames + frames * frames / QUADRATIC_FRAMES)


def measure(per_rank: list[list[list[float]]], batch_seconds: float) -> dict:
    batches = [b for rank in per_rank for b in rank]
    real = sum(sum(b) for b in batches)
    padded = sum(len(b) * max(b) for b in batches)
    steps = min(len(r) for r in per_rank)
    costs = [[cost(r[i]) for r in per_rank] for i in range(steps)]
    return {
        "batches": len(batches),
        "fill": real / len(batches) / batch_seconds,
        "pad_frac": 1.0 - real / padded,
        "wait": sum(max(c) - min(c) for c in costs) / sum(max(c) for c in costs),
        "cuts": sum(len(b) for b in batches),
    }


def rows(ranks: list[list[list[Item]]], bins: list[float], data: DataConfig, seed: int) -> list[tuple[str, dict]]:
    runs = {
        "batcher (per group)": lambda groups: batcher(groups, bins, data, seed),
        # the paper's 64 utterances on 8 GPUs: 8 a rank
        "batcher, 8 utterances": lambda groups: utterance_batcher(groups, bins, data, seed, 8),
        "lhotse/group sync": lambda groups: lhotse_batches(groups, bins, data, seed, True, None),
        "lhotse/group nosync": lambda groups: lhotse_batches(groups, bins, data, seed, False, None),
        "lhotse/group sync q30": lambda groups: lhotse_batches(groups, bins, data, seed, True, 30.0),
        "lhotse/epoch sync": lambda groups: lhotse_batches([sum(groups, [])], bins, data, seed, True, None),
        "lhotse/epoch nosync": lambda groups: lhotse_batches([sum(groups, [])], bins, data, seed, False, None),
    }
    total = sum(len(g) for groups in ranks for g in groups)
    out = []
    for name, run in runs.items():
        m = measure([run(groups) for groups in ranks], data.batch_seconds)
        out.append((name, {**m, "lost": total - m["cuts"]}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", help="train index.json for the first row (default: the demo shards)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    demo = DataConfig(crop_seconds=4.0, batch_seconds=16.0, num_buckets=4, shuffle_buffer=200, num_workers=0)
    libri = DataConfig(num_workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(args.index) if args.index else demo_index(Path(tmp))
        read_index(str(index))  # a named error on a bad index before anything else
        corpora = [
            ("demo", demo, *demo_groups(index, demo, args.seed, crop=True)),
            ("demo/nocrop", demo, *demo_groups(index, demo, args.seed, crop=False)),
            ("librispeech", libri, *librispeech_groups(libri, args.seed)),
        ]
        head = f"{'corpus':<12} {'batching':<24} {'batches':>8} {'fill':>6} {'pad_frac':>9} {'wait(2 ranks)':>14}"
        print(f"{head} {'lost':>5}")
        for corpus, data, ranks, bins in corpora:
            for name, m in rows(ranks, bins, data, args.seed):
                print(
                    f"{corpus:<12} {name:<24} {m['batches']:>8} {m['fill']:>6.3f} {m['pad_frac']:>9.4f} "
                    f"{m['wait']:>14.3f} {m['lost']:>5}"
                )
    print(
        "lost = cuts read but in no batch; fill = audio seconds / batch_seconds; pad_frac = padded / all samples; "
        "wait = idle share of the faster "
        f"rank per step, cost = rows x (F + F^2/{QUADRATIC_FRAMES}), F = padded 20 ms frames"
    )


if __name__ == "__main__":
    main()
