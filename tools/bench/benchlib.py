"""Shared pieces of the benchmarks in tools/bench/ (bench_step, bench_schedules, bench_teacher) and the GPU check.

They run the REAL trainer (istack_ds.trainer.Trainer, one rank, a real DeepSpeed
engine) on fixed in-memory batches, so the numbers are the framework's own code
path minus data loading, beside references measured in the same process.
"""

from __future__ import annotations

import itertools
import json
import os
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # a GPU host keeps DeepSpeed's CUDA accelerator (tools/bench/gpu_check.py)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

CACHE = ROOT / "data" / "bench"


def paper_teacher() -> Path:
    """A RANDOM HuBERT-Base-shaped teacher (12 x 768, 512-channel CNN), made once under data/bench/."""
    from istack_ds.models.teacher import make_random_teacher

    path = CACHE / "teacher-base"
    if not (path / "config.json").exists():
        make_random_teacher(path, size="base")
    return path


def bench_shards() -> Path:
    """A stub shard index (two empty tars): the Trainer wants one at start, the benchmarks feed fixed batches.

    Written with the standard library only, so the GPU check needs no audio stack (soundfile,
    lhotse, webdataset) on the GPU machine: nothing ever reads these shards.
    """
    out = CACHE / "shards-stub" / "train"
    index = out / "index.json"
    if not index.exists():
        out.mkdir(parents=True, exist_ok=True)
        entries = []
        for i in range(2):
            tar = out / f"shard-{i:06d}.tar"
            with tarfile.open(tar, "w"):
                pass
            entries.append({"path": tar.name, "samples": 0, "seconds": 0.0, "bytes": tar.stat().st_size, "sha256": ""})
        index.write_text(
            json.dumps(
                {
                    "split": "train",
                    "sample_rate": 16000,
                    "shards": entries,
                    "duration_histogram": {"bin_seconds": 1.0, "counts": [1]},
                },
                indent=1,
            )
        )
    return index


def fixed_batches(count: int, utterances: int, seconds: float, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * 16000)
    return [
        {
            "audio": 0.1 * torch.randn(utterances, n, generator=g),
            "audio_lens": torch.full((utterances,), n),
            "seconds": utterances * seconds,
            "pad_frac": 0.0,  # equal lengths: no padding (the stream's batches carry theirs)
            "cut_ids": [],
        }
        for _ in range(count)
    ]


def init_single_process() -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    from istack_ds.dist import init_distributed, setup_logging
    from istack_ds.startup import skip_shm_build

    skip_shm_build()
    setup_logging()
    init_distributed(600)


def paper_overrides(teacher: Path, index: Path, out_dir: Path, **extra) -> list[str]:
    """The paper's student (12 x 384, FFN 1536, 8 heads) and schedule, on this machine's CPU, no I/O."""
    sets = {
        "teacher.path": str(teacher),
        "data.train_index": str(index),
        "data.valid_index": "null",
        "data.num_workers": 0,
        "run.out_dir": str(out_dir),
        "log.tensorboard": "false",
        "log.every": 10**6,
        "checkpoint.every": 0,
        "checkpoint.resume": "none",
        "eval.every": 0,
        "deepspeed.precision": "fp32",
        "deepspeed.zero_stage": 2,
        "student.dropout": 0.0,
        "optim.total_steps": 1000,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def make_trainer(overrides: list[str], batches: list[dict]):
    """A real Trainer whose batch stream is the given batches, cycled."""
    from istack_ds.config import load_config
    from istack_ds.trainer import Trainer

    trainer = Trainer(load_config(None, overrides), batches=itertools.cycle(batches))
    trainer.start()
    return trainer


def close_trainer(trainer) -> None:
    from istack_ds.engine import destroy_engine

    destroy_engine(trainer.engine)
    trainer.engine = None
    trainer.close()
