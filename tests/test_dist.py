"""istack_ds/dist.py: every process group gets the configured timeout; heartbeats name the ranks that stopped."""

import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as tdist

from istack_ds.dist import HEARTBEAT_KEY, silent_ranks
from tests.helpers import ROOT, free_port, ranks_env

# One process, one rank: the timeouts of the default group, of DeepSpeed's data-parallel group (ZeRO's
# gradient reduce and growth's gathers run on it) and of any later new_group.
GROUP_TIMEOUTS = """
import torch, torch.distributed as dist
from deepspeed.utils import groups
from istack_ds.dist import init_distributed, skip_shm_build
skip_shm_build()
init_distributed(timeout_s=7)
timeout = lambda g: g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
print(timeout(dist.group.WORLD), timeout(groups._get_data_parallel_group()), timeout(dist.new_group([0])))
"""


@pytest.mark.procgroup
def test_every_process_group_gets_the_configured_timeout():
    env = ranks_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, "-c", GROUP_TIMEOUTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    default, data_parallel, later = map(float, proc.stdout.split()[-3:])
    assert (default, data_parallel, later) == (7.0, 7.0, 7.0)


def test_silent_ranks_are_those_whose_heartbeat_stopped():
    store = tdist.HashStore()
    store.set(HEARTBEAT_KEY.format(rank=1), "100.000")  # beat once, then stopped
    stop = threading.Event()

    def beat():  # rank 2 keeps beating
        while not stop.is_set():
            store.set(HEARTBEAT_KEY.format(rank=2), f"{time.time():.3f}")
            time.sleep(0.02)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        silent = silent_ranks(store, [1, 2, 3], wait_s=0.3)
    finally:
        stop.set()
        beater.join()
    assert silent == {1: 100.0, 3: None}  # rank 3 never wrote one
