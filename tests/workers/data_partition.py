"""One epoch of the training loader on every rank; rank 0 writes each rank's cut ids.

Run by tests/test_data_stream.py (2 ranks x 2 workers, gloo); by hand, from the repo root:
    PYTHONPATH=. torchrun --standalone --nproc_per_node 2 tests/workers/data_partition.py --index INDEX --out OUT_JSON
"""

from __future__ import annotations

import torch.distributed as dist

from istack_ds.config import DataConfig
from istack_ds.data.loader import build_loader
from tests.workers.protocol import worker_parser, write_all_ranks


def main(index_path: str, out_json: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    data = DataConfig(
        train_index=index_path, num_workers=2, crop_seconds=2.0, batch_seconds=8.0, num_buckets=3, shuffle_buffer=16
    )
    ids, seconds, workers = [], 0.0, set()
    for batch in build_loader(data, index_path, rank=rank, world_size=world_size, seed=11, epochs=1):
        ids += batch["cut_ids"]
        seconds += batch["seconds"]
        workers.add(batch["worker"])
    write_all_ranks(out_json, {"ids": ids, "seconds": seconds, "workers": sorted(workers)})


if __name__ == "__main__":
    parser = worker_parser(__doc__.split("\n")[0])
    parser.add_argument("--index", required=True, help="index.json of the shards")
    args = parser.parse_args()
    main(args.index, args.out)
