"""Shared test utilities: workers on N real gloo ranks in fresh processes, tool scripts as modules, run logs.

Every test that starts a process group carries the `procgroup` marker, so `make test-fast` (-m "not procgroup")
can leave it out. The helpers here that start ranks (torchrun, run_worker, ranks_env) refuse to run in a test
without it, so the marker cannot be forgotten.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"


#: The marker of tests that start process groups (registered in pyproject.toml); `make test-fast` deselects it.
PROCGROUP = "procgroup"

#: The test that runs now, as tests/conftest.py records it before each test's setup: (node id, marked?).
#: None outside pytest (a helper used from a script checks nothing).
_running: tuple[str, bool] | None = None


def record_running_test(item) -> None:
    """Records the test `item` (a pytest.Item, or None when it ended) whose fixtures and body run now."""
    global _running
    _running = None if item is None else (item.nodeid, item.get_closest_marker(PROCGROUP) is not None)


def require_procgroup_marker(what: str) -> None:
    """Raises unless the running test is marked `procgroup`: `what` is about to start a process group."""
    if _running is not None and not _running[1]:
        nodeid = _running[0]
        raise AssertionError(
            f"{nodeid} starts a process group ({what}) but is not marked @pytest.mark.{PROCGROUP}: "
            f"mark the test (or its module: pytestmark = pytest.mark.{PROCGROUP}), so that `make test-fast` "
            f"(pytest -m 'not {PROCGROUP}') leaves it out"
        )


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


def ranks_env(**extra: str) -> dict:
    """child_env() for a process that starts a process group by itself (a launcher, a rank started by hand).

    Only a test marked `procgroup` may ask for it.
    """
    require_procgroup_marker("a child process that starts a process group")
    return child_env(**extra)


def torchrun(
    script: str | Path, *args: str, nproc: int = 2, timeout: float = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Runs `script` (a path, or a name under tests/workers/) on `nproc` ranks with torchrun.

    Each call is its own process group on a free port, so engine tests never
    share state. Raises with the combined output when a rank fails. Only a test marked `procgroup` may call it.
    """
    require_procgroup_marker(f"torchrun of {Path(script).name} on {nproc} rank(s)")
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS / script
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *map(str, args),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script.name} failed on {nproc} ranks (rc={proc.returncode})\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-12000:]}"
        )
    return proc


def run_worker(script: str, *args, nproc: int = 2, timeout: float = 300, env: dict | None = None) -> list:
    """Runs a worker of tests/workers/ on `nproc` ranks and returns every rank's result, rank 0's first.

    The worker protocol (tests/workers/protocol.py): the worker gets `args` and ``--out FILE``,
    and ends with write_all_ranks(FILE, result), which rank 0 writes as one JSON list.
    """
    with tempfile.TemporaryDirectory(prefix="worker_") as tmp:
        out = Path(tmp) / "result.json"
        torchrun(script, *args, "--out", out, nproc=nproc, timeout=timeout, env=env)
        return json.loads(out.read_text())


def load_tool(relpath: str) -> ModuleType:
    """Imports a tool script (e.g. "tools/compare_runs.py") as `python relpath` runs it: its folder on sys.path."""
    path = ROOT / relpath
    folder = str(path.parent)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    sys.path.insert(0, folder)  # so it finds its siblings (tools/bench/benchlib.py)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


# ---- a short run of the demo config (tests/test_checkpoint.py, tests/test_faults.py) ------------------

TOTAL = 14  # EQL over depths 2, 4, 8: depth 4 from step 5, depth 8 from step 9 (0-based step indices)


def run_args(out, teacher_dir, shards, *extra) -> list[str]:
    """launchers/train.py's arguments: TOTAL steps, a checkpoint every 3, the data audit on; `extra` as --set."""
    args = [
        "--config",
        ROOT / "configs/demo.yaml",
        "--set",
        f"run.out_dir={out}",
        "--set",
        f"teacher.path={teacher_dir}",
        "--set",
        f"data.train_index={shards / 'train/index.json'}",
        "--set",
        "data.valid_index=null",
        "--set",
        f"optim.total_steps={TOTAL}",
        "--set",
        "log.every=1",
        "--set",
        "checkpoint.every=3",
        "--set",
        "checkpoint.keep=10",
        "--set",
        "data.num_workers=1",
        "--set",
        "data.crop_seconds=2",
        "--set",
        "data.batch_seconds=6",
        "--set",
        "deepspeed.dist_timeout_s=60",
        "--set",
        "log.data_audit=true",
    ]
    for e in extra:
        args += ["--set", e]
    return [str(a) for a in args]


def scalars(tb_dir, tag) -> dict[int, list[float]]:
    """Every (step, value) of `tag` over all event files of a run directory (a resumed run appends a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = defaultdict(list)
    for f in sorted(Path(tb_dir).rglob("events.out.tfevents.*")):  # tb/<run name>/ (or tb/ of older runs)
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                out[e.step].append(e.value)
    return out


def shard_of_cut(index_path) -> dict[str, str]:
    """cut id -> path of the shard that holds it, read from the tars the index lists."""
    from istack_ds.data.index import read_index

    owner = {}
    for shard in read_index(index_path).shards:
        with tarfile.open(shard.path) as tf:
            owner.update({name.split(".", 1)[0]: shard.path for name in tf.getnames()})
    return owner
