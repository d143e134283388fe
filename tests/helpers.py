"""Shared test utilities: run a worker script on N real gloo ranks in fresh processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """Environment for child processes: offline, one thread a rank, CPU accelerator."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 300, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Runs `script` (a path, or a name under tests/workers/) on `nproc` ranks with torchrun.

    Each call is its own process group on a free port, so engine tests never
    share state. Raises with the combined output when a rank fails.
    """
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS / script
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script.name} failed on {nproc} ranks (rc={proc.returncode})\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-12000:]}"
        )
    return proc


def shard_of_cut(index_path) -> dict[str, str]:
    """cut id -> path of the shard that holds it, read from the tars the index lists."""
    from istack_ds.data.index import read_index

    owner = {}
    for shard in read_index(index_path).shards:
        with tarfile.open(shard.path) as tf:
            owner.update({name.split(".", 1)[0]: shard.path for name in tf.getnames()})
    return owner
