"""Shards -> batches: the streaming loader the trainer iterates.

    index.json -> shard list, shuffled per epoch from (seed, epoch)
      -> this rank's shards (every world_size-th) -> this worker's shards (every num_workers-th)
      -> webdataset tar reading -> lhotse MonoCut with the FLAC bytes in memory
         (decoded once to check it; resampled / downmixed when needed)
      -> random crop to data.crop_seconds (seeded per rank and worker)
      -> lhotse DynamicBucketingSampler (max_duration = data.batch_seconds)
      -> batch dict (raw samples, and log-mel fbank when data.features == 'fbank')

NOTE: the shards are split here, by rank and worker, before lhotse sees a cut.
The sampler is therefore built with world_size=1, rank=0: left at its defaults it
reads WORLD_SIZE from the environment and silently drops most of the data.

NOTE: ranks get unequal numbers of batches. Training uses ``epochs=None``, an
endless stream driven by the step count, so no rank runs dry while another waits
in a collective. Finite ``epochs`` are for validation and tests.

Batch keys:
    audio        FloatTensor [B, T], zero-padded
    audio_lens   LongTensor [B], samples
    cut_ids      list[str], the shard keys
    seconds      float, unpadded audio seconds in the batch
    fbank, fbank_lens   FloatTensor [B, F, num_mel_bins], LongTensor [B] (features == 'fbank' only)
    skipped      int, bad shard members skipped so far by the worker that made this batch
    epoch        int, that worker's current epoch over its shards
    shards_done  int, shards that worker has finished (over all epochs)
    worker       int, the DataLoader worker id (0 with num_workers=0): per-worker counters add up across ids
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from istack_ds.config import DataConfig
from istack_ds.data.shards import DataError, ShardIndex, decode_member, encode_flac, read_index


def build_loader(data: DataConfig, index_path: str, *, rank: int, world_size: int, seed: int,
                 epochs: int | None = None, crop: bool = True) -> torch.utils.data.DataLoader:
    """The DataLoader of this rank over the shards of `index_path`.

    `epochs=None` streams forever (each epoch reshuffles the shard order from
    (seed, epoch)); an int stops after that many passes. Raises DataError when
    the index is unusable or has fewer shards than ranks x workers.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    index = read_index(index_path)
    needed = world_size * max(1, data.num_workers)
    if len(index.shards) < needed:
        raise DataError(
            f"shard index {index_path} has {len(index.shards)} shards but {needed} are needed "
            f"({world_size} ranks x {max(1, data.num_workers)} workers each read their own shards); "
            f"re-shard with more, smaller shards (tools/shard_corpus.py --min-shards {needed}) or use fewer workers"
        )
    dataset = ShardStream(
        shards=[s.path for s in index.shards], data=data, rank=rank, world_size=world_size, seed=seed,
        epochs=epochs, crop=crop, duration_bins=duration_bins(index, data.num_buckets,
                                                               data.crop_seconds if crop else None),
    )
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=data.num_workers,
                                       persistent_workers=False)


def duration_bins(index: ShardIndex, num_buckets: int, crop_seconds: float | None) -> list[float]:
    """Bucket boundaries that split the audio seconds evenly, from the index's duration histogram.

    lhotse would otherwise estimate them by reading (and decoding) the first
    10,000 cuts of the stream at start-up.
    """
    counts = np.asarray(index.duration_histogram, dtype=np.float64)
    centers = (np.arange(len(counts)) + 0.5) * index.bin_seconds
    if crop_seconds is not None:
        centers = np.minimum(centers, crop_seconds)
    if num_buckets <= 1 or counts.sum() == 0:
        return [float(centers.max())] if len(centers) else [1.0]
    mass = np.cumsum(counts * centers)
    targets = mass[-1] * np.arange(1, num_buckets) / num_buckets
    picks = np.searchsorted(mass, targets)
    return sorted({round(float(centers[min(i + 1, len(centers) - 1)]), 3) for i in picks})


@dataclass
class WorkerCounters:
    skipped: int = 0
    epoch: int = 0
    shards_done: int = 0


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one rank; each DataLoader worker reads its own subset of that rank's shards."""

    def __init__(self, *, shards: list[str], data: DataConfig, rank: int, world_size: int, seed: int,
                 epochs: int | None, crop: bool, duration_bins: list[float]):
        super().__init__()
        self.shards, self.data, self.rank, self.world_size = list(shards), data, rank, world_size
        self.seed, self.epochs, self.crop, self.duration_bins = seed, epochs, crop, duration_bins

    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """This rank's and worker's shards in `epoch`: the same global shuffle on every rank, then strided."""
        order = list(self.shards)
        random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)
        return order[self.rank::self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict]:
        from lhotse import CutSet
        from lhotse.dataset import DynamicBucketingSampler

        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counters = WorkerCounters()
        cuts = CutSet(_CutStream(self, worker, num_workers, counters))
        sampler = DynamicBucketingSampler(
            cuts, max_duration=self.data.batch_seconds, duration_bins=self.duration_bins, shuffle=True,
            buffer_size=self.data.shuffle_buffer, drop_last=False,
            world_size=1, rank=0,  # NOTE: shards are already split by rank and worker (see module doc)
            seed=(self.seed * 1_000_003 + self.rank * 1009 + worker) % 2**31,
        )
        fbank = None
        if self.data.features == "fbank":
            from lhotse import Fbank, FbankConfig
            from lhotse.dataset import OnTheFlyFeatures

            fbank = OnTheFlyFeatures(Fbank(FbankConfig(num_mel_bins=self.data.num_mel_bins)))
        for batch_cuts in sampler:
            yield self.collate(batch_cuts, fbank, counters, worker)

    @staticmethod
    def collate(cuts, fbank, counters: WorkerCounters, worker: int) -> dict:
        from lhotse.dataset.collation import collate_audio

        audio, audio_lens = collate_audio(cuts)
        batch = {
            "audio": audio.float(),
            "audio_lens": audio_lens.long(),
            "cut_ids": [c.id for c in cuts],
            "seconds": float(sum(c.duration for c in cuts)),
        }
        if fbank is not None:
            feats, feat_lens = fbank(cuts)
            batch["fbank"], batch["fbank_lens"] = feats.float(), feat_lens.long()
        batch.update(skipped=counters.skipped, epoch=counters.epoch, shards_done=counters.shards_done, worker=worker)
        return batch


class _CutStream:
    """The cuts of one worker, epoch after epoch; bad members are counted and skipped."""

    def __init__(self, stream: ShardStream, worker: int, num_workers: int, counters: WorkerCounters):
        self.stream, self.worker, self.num_workers, self.counters = stream, worker, num_workers, counters
        s = stream
        self.crop_rng = random.Random(f"crop:{s.seed}:{s.rank}:{worker}")

    def __iter__(self):
        s, c = self.stream, self.counters
        epoch = 0
        while s.epochs is None or epoch < s.epochs:
            c.epoch = epoch
            shards = s.shards_for(epoch, self.worker, self.num_workers)
            yielded = 0
            for shard in shards:
                for sample in _read_shard(shard, c):
                    cut = self.make_cut(sample)
                    if cut is not None:
                        yielded += 1
                        yield cut
                c.shards_done += 1
            if yielded == 0:
                # an endless loop over unreadable shards would hang this rank silently
                raise DataError(f"rank {s.rank} worker {self.worker}: no readable cut in epoch {epoch} of "
                                f"shards {shards} ({c.skipped} bad members skipped); run tools/check_shards.py")
            epoch += 1

    def make_cut(self, sample: dict):
        import soundfile as sf
        from lhotse import Recording

        s = self.stream
        try:
            audio, _meta = decode_member(sample, s.data.sample_rate)
            data = sample["flac"]
            info = sf.info(io.BytesIO(data))
            if info.samplerate != s.data.sample_rate or info.channels != 1:
                data = encode_flac(audio, s.data.sample_rate)  # resampled / downmixed by decode_member
            cut = Recording.from_bytes(data, recording_id=sample["__key__"]).to_cut()
        except Exception:  # noqa: BLE001 -- any bad member is a counted skip, never a dead worker
            self.counters.skipped += 1
            return None
        if s.crop and cut.duration > s.data.crop_seconds:
            offset = self.crop_rng.uniform(0.0, cut.duration - s.data.crop_seconds)
            offset = math.floor(offset * s.data.sample_rate) / s.data.sample_rate
            cut = cut.truncate(offset=offset, duration=s.data.crop_seconds, preserve_id=True)
        return cut


def _read_shard(path: str, counters: WorkerCounters) -> Iterator[dict]:
    """Samples ({'__key__', 'flac', 'json'}) of one tar; a broken tar counts as a skip and ends the shard."""
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        counters.skipped += 1
        return True  # keep going

    yield from wds.tarfile_samples([{"url": path}], handler=handler)
