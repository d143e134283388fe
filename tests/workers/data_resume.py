"""Data position across a restart on every rank: K batches, a position saved as JSON, a new loader, the rest.

Run by tests/test_data_stream.py under torchrun (2 ranks x 2 workers, gloo):
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/workers/data_resume.py INDEX OUT_JSON K

Rank 0 writes, per rank: the cut ids of the first K batches, the saved position, the
cut ids after the resume, and each worker's shard list of epoch 0.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from istack_ds.config import DataConfig
from gather import write_all_ranks
from istack_ds.data.stream import build_loader


def main(index_path: str, out_json: str, k: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    data = DataConfig(train_index=index_path, num_workers=2, crop_seconds=1.0, batch_seconds=1.0, num_buckets=3,
                      shuffle_buffer=4, interleave_shards=1)  # the resume unit is then one shard
    first, position = [], {}
    loader = build_loader(data, index_path, rank=rank, world_size=world_size, seed=3, epochs=1)
    for i, batch in enumerate(loader):
        if i == int(k):
            break
        first += batch["cut_ids"]
        position[batch["worker"]] = batch["position"]  # what the trainer keeps
    del loader
    saved = json.loads(json.dumps(position))  # the checkpoint's JSON round trip: keys become strings
    resumed = build_loader(data, index_path, rank=rank, world_size=world_size, seed=3, epochs=1, position=saved)
    after, skipped = [], 0
    for batch in resumed:
        after += batch["cut_ids"]
        skipped = max(skipped, batch["skipped"])
    lists = {w: [p for p, _ in resumed.dataset.shards_for(0, w, 2)] for w in (0, 1)}
    write_all_ranks(out_json, {"first": first, "position": saved, "after": after, "resumed": resumed.resumed,
                               "skipped": skipped, "shard_lists": lists})


if __name__ == "__main__":
    main(*sys.argv[1:4])
