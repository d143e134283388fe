"""Shards -> batches: the shard stream of one rank, each DataLoader worker reading its own shards.

    index.json -> shard list, shuffled per epoch from (seed, epoch), the same on every rank
      -> this node's shards (every num_nodes-th) -> this rank's (every local_world_size-th)
         -> this worker's (every num_workers-th)
      -> groups of data.interleave_shards shards in turn, each read member by member from all
         its shards: tar members -> header check (flac + json, rate, channels, length)
         -> random crop plan (data.crop_seconds) -> at least `min_samples` samples at
         data.sample_rate after the crop -> shuffle buffer (data.shuffle_buffer cuts)
         -> duration buckets (bins from the index's histogram) -> batches of <= data.batch_seconds,
            or the micro-batch of istack_ds.batching.plan_batches (seconds, or exactly N cuts)
      -> decode only the cropped frames (soundfile), resample / downmix when needed
      -> batch dict of raw samples, zero-padded, with the batch's padded fraction

The batching is :class:`istack_ds.data.batcher.Batcher` (not lhotse's sampler: its docstring says
why); lhotse is used upstream, for the corpus manifests and cuts the writer shards.

NOTE: shards are written in corpus order, so one shard holds a few consecutive
speakers; reading several at once into one shuffle buffer is what gives a batch
several speakers. Mixing also happens through the per-epoch shard order and across
ranks and workers.

NOTE: a worker emits its shard groups one after another: at the end of a group the
shuffle buffer and the buckets are drained (leftovers packed together by length)
before the next group is read. The batching randomness (crops, shuffle buffer) is
seeded per (seed, epoch, the group's first shard as index.json names it), so a
re-read group gives the same batches as the first time, wherever the split's
directory lives. A batch's ``position`` says how many of the worker's shards are
fully emitted and how many batches of its unfinished group were handed out before
it and with it. A resumed worker skips the finished shards, re-reads the unfinished
group and drops that many batches (decoding them, so that its skip counters stay
those of an unbroken run): the batches after a resume are the unbroken run's, batch
for batch. A position without ``batches_in_group`` resumes at the group's start.

NOTE: a worker that reads as many shards in a row as it has in an epoch (at least
one) without producing a batch raises DataError naming the rank, the worker, the
shards and the skip counts; an endless stream would otherwise loop over them without
a word. From a DataLoader worker, torch re-raises it in the iterating process.

NOTE: ranks get unequal numbers of batches. Training uses ``epochs=None``, an endless
stream driven by the step count, so no rank runs dry while another waits in a
collective. Finite ``epochs`` are for validation and tests.

The loader that iterates it and keeps its state is :mod:`istack_ds.data.loader`.

Batch keys:
    audio        FloatTensor [B, T], zero-padded
    audio_lens   LongTensor [B], samples
    cut_ids      list[str], the shard keys
    seconds      float, unpadded audio seconds in the batch
    pad_frac     float, padded samples / all samples of ``audio`` (B x T): 1 - sum(audio_lens) / (B x T)
    worker       int, the DataLoader worker id (0 with num_workers=0): per-worker counters add up across ids
    epoch        int, that worker's current epoch over its shards
    shards_done  int, shards of that epoch the worker has fully emitted, this batch included
    position     {"worker", "epoch", "shards_done", "batches_in_group", "interleave_shards",
                 "skipped_by_reason", "repaired_by_reason"}: where that worker resumes (the
                 loader's state_dict() keeps the latest per worker), counters as of the start
                 of its unfinished group
    skipped      int, members (or shards) skipped by that worker so far (a resumed worker goes on counting)
    skipped_by_reason   {reason: count}, reasons from istack_ds.data.tario.SKIP_REASONS
    repaired_by_reason  {reason: count}: resampled, downmixed, too_long (cropped to data.crop_seconds)
"""

from __future__ import annotations

import copy
import io
import math
import random
from collections.abc import Iterator

import numpy as np
import torch

from istack_ds.batching import BatchPlan
from istack_ds.config import DataConfig
from istack_ds.data.batcher import Batcher, Item, round_robin
from istack_ds.data.index import DataError
from istack_ds.data.position import WorkerCounters, assigned_shards
from istack_ds.data.tario import MIN_MEMBER_SAMPLES, BadMember, iter_tar_samples, member_meta, to_mono_rate

#: Shortest cut, in samples at data.sample_rate, handed out by default (the trainer passes its teacher's
#: receptive field): the writer's minimum, the receptive field of the default SFM CNN front end.
MIN_SAMPLES = MIN_MEMBER_SAMPLES


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one rank; each DataLoader worker reads its own subset of that rank's shards."""

    def __init__(
        self,
        *,
        shards: list[tuple[str, int]],
        data: DataConfig,
        rank: int,
        world_size: int,
        local_world_size: int,
        seed: int,
        epochs: int | None,
        crop: bool,
        duration_bins: list[float],
        names: list[str] | None = None,
        index_digest: str = "",
        min_samples: int = MIN_SAMPLES,
        plan: BatchPlan | None = None,
    ):
        super().__init__()
        # What a micro-batch counts and holds at most: seconds of audio, or exactly `limit` cuts.
        self.unit = plan.unit if plan is not None else "seconds"
        self.limit = plan.micro if plan is not None else data.batch_seconds
        self.shards, self.data, self.rank, self.world_size = list(shards), data, rank, world_size
        self.local_world_size = local_world_size
        self.seed, self.epochs, self.crop, self.duration_bins = seed, epochs, crop, duration_bins
        # path -> the shard's name in the index (default: its path), which seeds its group's batching
        self.names = dict(zip((p for p, _ in self.shards), names or (p for p, _ in self.shards)))
        self.index_digest, self.min_samples = index_digest, min_samples
        self.start: dict[int, WorkerCounters] = {}  # worker -> where it resumes (ShardLoader.resume_from sets it)

    def batching(self) -> dict:
        """The settings that, with the shard order, fix a group's batches: an exact resume needs them unchanged."""
        return {
            "crop": self.crop,
            "crop_seconds": self.data.crop_seconds,
            # data.batch_seconds, or the micro-batch data.global_batch gives this world size
            "micro_batch": f"{self.limit:g} {self.unit}",
            "long_cuts": self.data.long_cuts,
            "shuffle_buffer": self.data.shuffle_buffer,
            "num_buckets": self.data.num_buckets,
            "sample_rate": self.data.sample_rate,
            "min_samples": self.min_samples,
        }

    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list[tuple[str, int]]:
        """This worker's shards in `epoch`: one global shuffle, then split by node, rank in node, worker."""
        order = list(self.shards)
        random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)
        return assigned_shards(
            order,
            rank=self.rank,
            world_size=self.world_size,
            ranks_per_node=self.local_world_size,
            worker=worker,
            num_workers=num_workers,
        )

    def __iter__(self) -> Iterator[dict]:
        from istack_ds import faults  # here: faults imports dist, which imports this package

        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counters = copy.deepcopy(self.start.get(worker)) or WorkerCounters(worker=worker)
        counters.interleave_shards = self.data.interleave_shards
        epoch, skip, drop = counters.epoch, counters.shards_done, counters.batches_in_group
        dry: list[str] = []  # shards read in a row (across groups and epochs) without a batch
        handed = 0  # batches this iterator handed out (fault injection counts them)
        while self.epochs is None or epoch < self.epochs:
            shards = self.shards_for(epoch, worker, num_workers)
            if not shards:
                raise DataError(
                    f"rank {self.rank} worker {worker}: no shards in epoch {epoch} (world size "
                    f"{self.world_size}, {num_workers} workers, {len(self.shards)} shards)"
                )
            counters.reached(epoch, min(skip, len(shards)))
            # Groups of `interleave_shards` from the resume point on: a group is read member by member
            # into one shuffle buffer and is the unit of resume (its shards are done together).
            for k in range(counters.shards_done, len(shards), self.data.interleave_shards):
                group = shards[k : k + self.data.interleave_shards]
                end = k + len(group)
                produced = False
                for items, completes in self.planned(epoch, group, counters):
                    decoded = self.decode_all(items, counters)  # decoding may count skips: before `reached`
                    if completes:
                        counters.reached(epoch, end)  # NOTE: the last batch of a group completes it
                    if not decoded:
                        continue
                    produced = True
                    if not completes:
                        counters.handed_out()
                    if drop:
                        # handed out before the resume; decoded all the same, so that skips count as then
                        drop -= 1
                        continue
                    handed += 1
                    faults.stall("data", handed)
                    yield counters.stamp(self.collate(decoded))
                drop = 0  # only the group a worker resumes in was partly handed out
                counters.reached(epoch, end)
                dry = [] if produced else dry + [p for p, _ in group]
                if len(dry) >= len(shards):
                    raise DataError(self.stalled(worker, epoch, len(shards), dry, counters))
            drop = 0
            epoch, skip = epoch + 1, 0

    def stalled(self, worker: int, epoch: int, per_epoch: int, dry: list[str], counters: WorkerCounters) -> str:
        """The DataError message of a worker that read `dry` shards in a row without a batch."""
        names = list(dict.fromkeys(dry))
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        return (
            f"rank {self.rank} worker {worker}: no batch from the last {len(dry)} shards read "
            f"({per_epoch} a worker epoch; now in epoch {epoch}): {shown}; skipped so far by reason: "
            f"{dict(counters.skipped)}; check them with `istack check`"
        )

    def planned(
        self, epoch: int, group: list[tuple[str, int]], counters: WorkerCounters
    ) -> Iterator[tuple[list[Item], bool]]:
        """The batches of one shard group as planned cuts, each with whether it is the group's last."""
        # NOTE: seeded by the shard's name in the index, not its path on disk: moved data, same batches.
        rng = random.Random(f"batches:{self.seed}:{epoch}:{self.names[group[0][0]]}")
        batcher = Batcher(
            self.duration_bins,
            self.limit,
            self.data.shuffle_buffer,
            rng,
            count=self.unit == "utterances",
            # NOTE: training batches hold exactly `limit` cuts (the global batch a step holds); held-out
            # batches keep every cut
            drop_remainder=self.crop,
        )
        for item in round_robin([self.read_shard(path, samples, rng, counters) for path, samples in group]):
            for cuts in batcher.add(item):
                yield cuts, False
        ready = batcher.drain()
        for _ in batcher.dropped:
            counters.skip("batch_remainder")
        for i, cuts in enumerate(ready):
            yield cuts, i == len(ready) - 1

    def read_shard(self, path: str, samples: int, rng: random.Random, counters: WorkerCounters) -> Iterator[Item]:
        """Planned cuts of one shard; bad members and broken tars are counted, never raised."""
        import soundfile as sf

        problems: list[str] = []
        on_error = lambda reason, _msg: problems.append(reason)  # noqa: E731
        target = self.data.sample_rate
        read = 0
        for sample in iter_tar_samples(path, on_error):
            read += 1
            try:
                member_meta(sample)
                try:
                    info = sf.info(io.BytesIO(sample["flac"]))
                except Exception as e:  # noqa: BLE001 -- soundfile raises several types on junk
                    raise BadMember("undecodable_flac", f"{sample['__key__']}: {e}") from None
                if info.frames <= 0 or info.samplerate <= 0:
                    raise BadMember("empty_audio", f"{sample['__key__']}: empty audio")
            except BadMember as e:
                counters.skip(e.reason)
                continue
            sr, frames = info.samplerate, info.frames
            seconds = frames / sr
            if self.crop and self.data.long_cuts == "skip" and seconds > self.data.crop_seconds:
                counters.skip("longer_than_crop")
                continue
            # could never fit a batch of seconds: cut back like a crop
            too_long = self.unit == "seconds" and seconds > self.limit
            start = 0
            if (self.crop or too_long) and seconds > self.data.crop_seconds:
                if self.crop:
                    start = math.floor(rng.uniform(0.0, seconds - self.data.crop_seconds) * sr)
                frames = math.floor(self.data.crop_seconds * sr)
            if -(-frames * target // sr) < self.min_samples:  # its length at `target` (resample_poly rounds up)
                counters.skip("too_short")
                continue
            if sr != target:
                counters.repaired["resampled"] += 1
            if info.channels != 1:
                counters.repaired["downmixed"] += 1
            if too_long:
                counters.repaired["too_long"] += 1
            yield Item(sample["__key__"], sample["flac"], start, frames, frames / sr)
        if not problems and read < samples:
            problems.append("truncated_tar")  # the tar ended cleanly on a header boundary, short of the index
        for reason in problems:
            counters.skip(reason)

    def decode(self, item: Item, counters: WorkerCounters):
        import soundfile as sf

        try:
            with sf.SoundFile(io.BytesIO(item.flac)) as f:
                if item.start:
                    f.seek(item.start)
                audio = f.read(item.frames, dtype="float32", always_2d=True)
                sr = f.samplerate
        except Exception:  # noqa: BLE001 -- a body that does not decode is a counted skip
            counters.skip("undecodable_flac")
            return None
        if audio.shape[0] == 0:
            counters.skip("empty_audio")
            return None
        audio = to_mono_rate(audio, sr, self.data.sample_rate)
        if len(audio) < self.min_samples:  # the body held fewer frames than its header said
            counters.skip("too_short")
            return None
        if not np.isfinite(audio).all():
            counters.skip("non_finite")
            return None
        return audio

    def decode_all(self, items: list[Item], counters: WorkerCounters) -> list[tuple[str, np.ndarray]]:
        """(key, audio) of the items that decode; the others are counted skips."""
        return [(it.key, a) for it in items if (a := self.decode(it, counters)) is not None]

    def collate(self, decoded: list[tuple[str, np.ndarray]]) -> dict:
        """The batch dict of decoded cuts: audio zero-padded to the longest, lengths, keys, seconds, pad_frac."""
        lens = [len(a) for _, a in decoded]
        audio = torch.zeros(len(decoded), max(lens), dtype=torch.float32)
        for row, (_, a) in zip(audio, decoded):
            row[: len(a)] = torch.from_numpy(a)
        batch = {
            "audio": audio,
            "audio_lens": torch.tensor(lens, dtype=torch.long),
            "cut_ids": [k for k, _ in decoded],
            "seconds": sum(lens) / self.data.sample_rate,
            "pad_frac": 1.0 - sum(lens) / audio.numel(),
        }
        return batch
