"""Rank-aware helpers. Collectives are called on every rank; only human-facing output is rank-0."""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from . import phase
from .data.index import DataError
from .device import local_device_index
from .startup import prepare_ops, single_process_env

log = logging.getLogger("istack_ds")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Waits for every rank (a collective; nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def log0(msg: str, *args) -> None:
    """Logs on rank 0 only (every rank may call it)."""
    if is_main():
        log.info(msg, *args)


def setup_logging() -> None:
    level = logging.INFO if is_main() else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [r{rank()}] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import warnings

    import transformers

    # One progress line per interval is ours; per-load progress bars and deprecation chatter are noise.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def ranks_per_node(world: int) -> int:
    """Ranks on each node: $LOCAL_WORLD_SIZE when it divides `world`, else all ranks on one node."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return per_node if per_node > 0 and world % per_node == 0 else world


def topology() -> dict:
    """Nodes and ranks per node of this job (from the launcher's variables)."""
    world = world_size()
    per_node = ranks_per_node(world)
    return {"nodes": world // per_node, "ranks_per_node": per_node, "world_size": world}


def init_distributed(timeout_s: int | None = None) -> None:
    """Starts the process group once per process (gloo on CPU, nccl on GPU); a no-op when it exists.

    Works under the deepspeed launcher, torchrun and Slurm (srun sets SLURM_* instead of RANK);
    a plain `python` run becomes rank 0 of 1 on a free port. DeepSpeed builds no unused op
    (:func:`prepare_ops`). `timeout_s` bounds every collective of every process
    group, the default one and those DeepSpeed creates (None: torch's defaults), so a dead or hung
    rank cannot hang the rest. With more than one rank, each rank then keeps a heartbeat in the
    job's store (:func:`start_heartbeat`), which :func:`unresponsive_ranks` reads and a watch
    (:func:`istack_ds.watch.start_watch`) checks while the job runs, logging a silent rank before
    the timeout; under NCCL, NCCL's error handling and flight recorder are switched on
    (:func:`istack_ds.watch.nccl_failure_env`).
    """
    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    from .watch import nccl_failure_env, start_watch

    single_process_env()
    bind_device()
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        set_default_group_timeout(kwargs["timeout"])
    prepare_ops()
    nccl_failure_env(backend())
    deepspeed.init_distributed(dist_backend=backend(), **kwargs)
    control_group()  # NOTE: here, at the same point on every rank: creating a group is a collective
    start_heartbeat()
    start_watch(timeout_s)


def set_default_group_timeout(timeout: datetime.timedelta) -> None:
    """Makes `timeout` the timeout of every process group created from now on that names none.

    NOTE: ZeRO's collectives (the gradient reduce in backward, the full-state gathers of a growth)
    run on the data-parallel group, which DeepSpeed creates with ``torch.distributed.new_group(ranks)``
    (deepspeed/utils/groups.py, through deepspeed.comm): it passes no timeout and offers no setting
    for one. torch then takes ``distributed_c10d._get_default_timeout(backend)``, which reads the
    module's ``default_pg_timeout`` (gloo and others) or ``default_pg_nccl_timeout`` (NCCL) at each
    call. Setting those two here, before any group exists, reaches every group that any code creates
    (new_group, new_subgroups, split_group, device meshes). The alternatives reach less: wrapping
    new_group misses torch's own paths, and ``_set_pg_timeout`` on each group after the engine is
    built is private and misses groups created later. tests/test_dist.py checks the data-parallel
    group's timeout, so a torch that stops reading these names fails there.
    """
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


# ---- heartbeats: naming the rank that died or hangs -----------------------------------------------

HEARTBEAT_S = 2.0
"""Seconds between two heartbeats of a rank."""
HEARTBEAT_KEY = "istack_ds/heartbeat/{rank}"
"""The store key of a rank's heartbeat; its value is the rank's wall-clock time of writing."""
_STORE_TIMEOUT = datetime.timedelta(seconds=5)


class Heartbeat(threading.Thread):
    """A daemon thread that writes this rank's heartbeat into `store` every HEARTBEAT_S seconds.

    It beats as long as the process runs: a SIGKILLed or SIGSTOPped process (or a frozen host)
    stops beating, a process stuck in a collective does not. `failures` counts the writes that
    failed (the store's host gone); :func:`unresponsive_ranks` reports them.
    """

    def __init__(self, store: dist.Store, rank: int):
        super().__init__(name=f"istack_ds-heartbeat-r{rank}", daemon=True)
        self.store = store
        self.key = HEARTBEAT_KEY.format(rank=rank)
        self.phase_key = phase.PHASE_KEY.format(rank=rank)
        self.failures = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.store.set(self.key, f"{time.time():.3f}")
                self.store.set(self.phase_key, phase.current())
            except Exception:  # noqa: BLE001 -- any store failure counts; the next failed collective reports it
                self.failures += 1
            self.stopped.wait(HEARTBEAT_S)

    def stop(self) -> None:
        """Ends the beat and waits for the thread (at exit: a store call cut off by the interpreter's
        shutdown, its server on rank 0 possibly gone already, aborts the process)."""
        self.stopped.set()
        self.join(timeout=2 * _STORE_TIMEOUT.total_seconds())


_heartbeat: Heartbeat | None = None


def _store_address() -> tuple[str, int] | None:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    return (addr, int(port)) if addr and port.isdigit() else None


def _store_client(address: tuple[str, int]) -> dist.TCPStore:
    """A connection of our own to the job's rendezvous store (rank 0's, or torchrun's agent's).

    NOTE: its own connection, so that heartbeats never queue behind (or in front of) the process
    group's store traffic; wait_for_workers=False: it must not count as a worker of the rendezvous.
    """
    return dist.TCPStore(*address, is_master=False, timeout=_STORE_TIMEOUT, wait_for_workers=False)


def start_heartbeat() -> None:
    """Starts this rank's :class:`Heartbeat` once per process (nothing to do on a single rank)."""
    global _heartbeat
    if _heartbeat is not None or world_size() == 1:
        return
    address = _store_address()
    if address is None:
        log.warning("no heartbeat: MASTER_ADDR / MASTER_PORT unset, a failed collective cannot name the dead rank")
        return
    _heartbeat = Heartbeat(_store_client(address), rank())
    _heartbeat.start()
    atexit.register(_heartbeat.stop)


def silent_ranks(store: dist.Store, ranks: list[int], wait_s: float, wait=time.sleep) -> dict[int, float | None]:
    """The ranks of `ranks` whose heartbeat did not change in `wait_s` seconds (`wait(wait_s)` between the reads).

    Maps each to its last heartbeat (wall-clock time), or None when it never wrote one.
    NOTE: a change, not an age, decides: clocks of different hosts need not agree.
    """

    def read() -> dict[int, float | None]:
        keys = {r: HEARTBEAT_KEY.format(rank=r) for r in ranks}
        return {r: float(store.get(k)) if store.check([k]) else None for r, k in keys.items()}

    before = read()
    wait(wait_s)
    after = read()
    return {r: after[r] for r in ranks if after[r] is None or after[r] == before[r]}


def unresponsive_ranks(wait_s: float = 3 * HEARTBEAT_S) -> str:
    """Says which ranks are dead or hung, from the heartbeats (for the message of a failed collective).

    Every other rank's heartbeat is read twice, `wait_s` apart. When the store does not answer,
    its host is gone: rank 0's (or, under torchrun, the launcher's on rank 0's node).
    """
    address = _store_address()
    if _heartbeat is None or address is None:
        return "no heartbeats were kept, so the rank that stopped answering is unknown"
    others = [r for r in range(world_size()) if r != rank()]
    found: dict = {}

    def check() -> None:
        try:
            client = _store_client(address)
            found["silent"] = silent_ranks(client, others, wait_s)
            keys = {r: phase.PHASE_KEY.format(rank=r) for r in others}
            found["phases"] = {r: client.get(k).decode() if client.check([k]) else None for r, k in keys.items()}
        except Exception as e:  # noqa: BLE001 -- any failure to reach the store means the same here
            found["error"] = type(e).__name__

    # NOTE: in a thread with a deadline: a store whose process is stopped (SIGSTOP, a frozen host)
    # still accepts connections, and then a client waits on it past its own timeout.
    checker = threading.Thread(target=check, name="istack_ds-heartbeat-check", daemon=True)
    checker.start()
    deadline = wait_s + _STORE_TIMEOUT.total_seconds()
    checker.join(deadline)
    if "silent" not in found:
        return (
            f"the job's store at {address[0]}:{address[1]} does not answer "
            f"({found.get('error', f'no answer in {deadline:.0f} s')}; {_heartbeat.failures} heartbeat "
            "write(s) of this rank failed): rank 0 or its host died or hangs"
        )
    silent = found["silent"]
    waits = phase.describe(found.get("phases", {}))
    if not silent:
        live = "every other rank's heartbeat is live, so none died or froze"
        if waits:  # the others wait for it in a collective
            return f"{live}: {waits}"
        return f"{live}: a rank may wait in another collective (ranks out of step) or the network between ranks failed"
    now = time.time()
    parts = [
        f"rank {r} (no heartbeat ever)" if t is None else f"rank {r} (last heartbeat {now - t:.0f} s ago)"
        for r, t in sorted(silent.items())
    ]
    return f"dead or hung: {', '.join(parts)}"


def backend() -> str:
    """The collective backend of DeepSpeed's accelerator: gloo on the CPU one, its own (nccl on CUDA) otherwise.

    Chosen by the accelerator, not by whether a GPU is visible: DS_ACCELERATOR=cpu on a GPU
    host runs CPU tensors, which nccl cannot carry.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()


def bind_device() -> None:
    """Makes this rank's own GPU (LOCAL_RANK, or the one GPU a task sees) the current device before anything is
    put on one (:func:`istack_ds.device.local_device_index`).

    NOTE: without it every rank of a node would build its teacher and batches on GPU 0
    (DeepSpeed binds the device only inside deepspeed.initialize, after the teacher exists).
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_device_index(int(os.environ.get("LOCAL_RANK", "0")), accelerator.device_count()))


def comm_device() -> torch.device:
    """Where collective tensors must live: the GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_control_group: dist.ProcessGroup | None = None


def control_group() -> dist.ProcessGroup | None:
    """The group of the control collectives (:func:`all_reduce_sum`, :func:`all_ranks`): the default group under
    gloo; under NCCL a gloo group over every rank, created once (a collective).

    NOTE: their values (a flag, a data status, the log line's sums) are on the host: over NCCL each would be
    copied to the GPU and read back, two host syncs that stall the GPU's queue every micro-batch; over gloo
    they never touch the GPU.
    """
    global _control_group
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo")
    return _control_group


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sums a dict of floats over ranks (a collective on :func:`control_group`: every rank, same keys)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=control_group())
    return dict(zip(keys, t.tolist()))


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank (a collective on :func:`control_group`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control_group())
    return bool(t.item())


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (a collective; any picklable value)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_all(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (a collective; any picklable value)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(key: str, fn, wait_s: float) -> str:
    """Rank 0 runs `fn` (which returns "" or an error message); every rank returns rank 0's result.

    The other ranks wait on the job's store, for up to `wait_s`, not in a collective: a long
    single-process job (a checkpoint conversion) must not run into deepspeed.dist_timeout_s.
    `key` names this job in the store (unique per job).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    store = dist.distributed_c10d._get_default_store()
    key = f"istack/run_on_main/{key}"
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 -- every rank must hear how it ended
            result = f"{type(e).__name__}: {e}"
        store.set(key, result)
        return result
    store.wait([key], datetime.timedelta(seconds=wait_s))
    return store.get(key).decode()


def next_on_all_ranks(batches: Iterator[dict], inject: bool = False) -> dict | None:
    """Every rank's next batch, or None on every rank when any rank's stream ended (a collective).

    A data failure on any rank raises DataError on every rank, naming each failed rank and its
    error. NOTE: called before the forward, which under ZeRO-3 is itself a collective: a rank that
    raised alone would leave the others waiting in it. `inject`: fault injection (ISTACK_FAULTS).
    """
    batch, error = None, ""
    try:
        if inject:
            raise DataError("injected by ISTACK_FAULTS")
        batch = next(batches, None)
    except DataError as e:
        error = f"rank {rank()}: {e}"
    status = all_reduce_sum({"ended": float(batch is None and not error), "failed": float(bool(error))})
    if status["failed"]:
        raise DataError("the data stream failed: " + " | ".join(e for e in gather_all(error) if e))
    return None if status["ended"] else batch
