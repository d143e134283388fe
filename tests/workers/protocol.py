"""The worker protocol: flags in (argparse, always ``--out FILE``), every rank's result out as one JSON list.

A worker parses its flags with :func:`worker_parser` and ends with :func:`write_all_ranks`;
the reading side is tests.helpers.run_worker, which passes ``--out`` and returns the list.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch.distributed as dist


def worker_parser(description: str) -> argparse.ArgumentParser:
    """The parser every worker adds its own flags to: it has ``--out``, where rank 0 writes the results."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="JSON file: the list of every rank's result, rank 0 first")
    return parser


def write_all_ranks(out_json: str, result: dict) -> None:
    """Gathers `result` from every rank; rank 0 writes them to `out_json` in rank order; the group is closed and
    the process ends here (exit 0).

    NOTE: the worker's work is done and its result on disk: ending with ``os._exit`` skips the interpreter's
    finalization, where gloo work objects left by a destroyed ZeRO-3 engine can abort the process
    ("terminate called without an active exception", SIGABRT; seen once in 1 of ~10 full runs) after
    everything the test asserts was computed and written.
    """
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        with open(out_json, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def trainer_parser(description: str) -> argparse.ArgumentParser:
    """:func:`worker_parser` with the flags of a worker that runs the Trainer on the demo config's shape."""
    parser = worker_parser(description)
    parser.add_argument("--teacher", required=True, help="the teacher's directory")
    parser.add_argument("--shards", required=True, help="holds train/index.json and valid/index.json")
    parser.add_argument("--run-dir", required=True, help="the run's out_dir (TensorBoard in RUN_DIR/tb)")
    return parser


def finish_trainer(trainer, out_json: str, result: dict) -> None:
    """Closes the Trainer's monitors and engine, then :func:`write_all_ranks` (the process ends there)."""
    trainer.metrics.close()
    trainer.engine.destroy()
    write_all_ranks(out_json, result)
