"""Ends a gloo worker: every rank's result gathered, written by rank 0 as one JSON list, group closed."""

from __future__ import annotations

import json

import torch.distributed as dist


def write_all_ranks(out_json: str, result: dict) -> None:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        with open(out_json, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()
