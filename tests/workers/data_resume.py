"""Data position across a restart on every rank: K batches, the loader's state saved as JSON, a new loader, the rest.

Run by tests/test_data_stream.py (2 ranks x 2 workers, gloo); by hand, from the repo root:
    PYTHONPATH=. torchrun --standalone --nproc_per_node 2 tests/workers/data_resume.py \\
        --index INDEX --batches K --out OUT_JSON

Each rank's result: each worker's position as its batches said, the loader's saved state, its
binding, whether the new loader resumed and its note, and each worker's batches (cut ids and a
digest of the audio) before the save, after the resume and in an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from itertools import islice

import torch.distributed as dist

from istack_ds.config import DataConfig
from istack_ds.data.loader import build_loader
from tests.workers.protocol import worker_parser, write_all_ranks


def per_worker(batches: list[dict]) -> dict[str, list[list]]:
    """str(worker) -> its batches in order, each [cut ids, sha256 of the audio tensor's bytes]."""
    out: dict[str, list[list]] = {"0": [], "1": []}
    for batch in batches:
        audio = hashlib.sha256(batch["audio"].numpy().tobytes()).hexdigest()
        out[str(batch["worker"])].append([batch["cut_ids"], audio])
    return out


def main(index_path: str, out_json: str, k: int) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # 2 shards a worker, read 2 at a time: one group a worker, one cut a batch
    data = DataConfig(
        train_index=index_path,
        num_workers=2,
        crop_seconds=1.0,
        batch_seconds=1.0,
        num_buckets=3,
        shuffle_buffer=4,
        interleave_shards=2,
    )

    def loader():
        return build_loader(data, index_path, rank=rank, world_size=world_size, seed=3, epochs=1)

    full = list(loader())  # the uninterrupted run
    interrupted = loader()
    first_batches = list(islice(interrupted, k))  # exactly K batches pass through the loader
    position = {str(b["worker"]): b["position"] for b in first_batches}  # each worker's latest, as batches said
    state = json.loads(json.dumps(interrupted.state_dict()))  # the checkpoint's JSON round trip
    binding = json.loads(json.dumps(interrupted.binding()))
    del interrupted
    resumed = loader()
    resumed.load_state_dict(state)
    after_batches = list(resumed)
    write_all_ranks(
        out_json,
        {
            "position": position,
            "state": state,
            "binding": binding,
            "resumed": resumed.resumed,
            "note": resumed.position_note,
            "first_by_worker": per_worker(first_batches),
            "after_by_worker": per_worker(after_batches),
            "full_by_worker": per_worker(full),
            "order": [b["cut_ids"] for b in first_batches + after_batches],
            "full_order": [b["cut_ids"] for b in full],
        },
    )


if __name__ == "__main__":
    parser = worker_parser(__doc__.split("\n")[0])
    parser.add_argument("--index", required=True, help="index.json of the shards")
    parser.add_argument("--batches", type=int, required=True, help="K: batches read before the state is saved")
    args = parser.parse_args()
    main(args.index, args.out, args.batches)
