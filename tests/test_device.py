"""istack_ds/device.py, watch.py and the GPU path on a CPU host (issue 25 items 1, 2, 5, 6): run.device refused
before any process group when torch cannot use CUDA, each rank's GPU under one-visible-GPU binding, the optimizer
states on their parameters' device after a (universal) load, NCCL's failure reporting and the silent-rank watch."""

import logging
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from istack_ds import cli, dist, resume
from istack_ds.config import ConfigError, DeepSpeedConfig, load_config
from istack_ds.device import check_run_device, local_device_index, settle_optimizer_states
from istack_ds.watch import NCCL_FAILURE_ENV, SilentRankWatch, nccl_failure_env, watch_interval
from tests.helpers import ROOT, child_env, run_worker

DEMO = str(ROOT / "configs/demo.yaml")


def _demo_argv(teacher_dir, demo_shards, tmp_path, *sets):
    argv = ["--config", DEMO]
    for s in (
        f"run.out_dir={tmp_path / 'run'}",
        f"teacher.path={teacher_dir}",
        f"data.train_index={demo_shards / 'train/index.json'}",
        "data.valid_index=null",
        *sets,
    ):
        argv += ["--set", s]
    return argv


# ---- item 1: no silent CPU fallback ---------------------------------------------------------------


@pytest.mark.parametrize("dry_run", [False, True], ids=["train", "dry_run"])
def test_cuda_without_cuda_is_refused_before_any_process_group(
    teacher_dir, demo_shards, tmp_path, capsys, monkeypatch, dry_run
):
    """This host's torch cannot use CUDA: run.device=cuda exits 2 naming the torch build, and no group starts."""
    assert not torch.cuda.is_available()

    def no_group(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(dist, "init_distributed", no_group)
    argv = _demo_argv(teacher_dir, demo_shards, tmp_path, "run.device=cuda") + (["--dry-run"] if dry_run else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"run.device=cuda but torch {torch.__version__} (built for CUDA " in err, err
    assert "torch.cuda.is_available()=False" in err and "would train on the CPU" in err, err
    assert not torch.distributed.is_initialized()


def test_auto_is_cpu_here_and_the_dry_run_names_the_device(teacher_dir, demo_shards, tmp_path, capsys):
    argv = _demo_argv(teacher_dir, demo_shards, tmp_path, "optim.total_steps=30", "data.num_workers=1")
    assert cli.istack(["train", *argv, "--dry-run", "--nodes", "1", "--ranks-per-node", "2"]) == 0
    out = capsys.readouterr().out
    assert "device: cpu, 2 process(es); student fp32, teacher fp32 (run.device=auto)" in out, out


def test_deepspeed_accelerator_must_agree_with_run_device(monkeypatch):
    """torch sees CUDA (pretended) but DeepSpeed's accelerator is the CPU one: refused, naming DS_ACCELERATOR."""
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cpu"  # chosen now, as a run's earlier import would have
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(DEMO, ["run.device=cuda"])
    with pytest.raises(ConfigError, match=r"run\.device=cuda means cuda, but DeepSpeed's accelerator is cpu .*DS_ACC"):
        check_run_device(cfg)
    check_run_device(load_config(DEMO, ["run.device=cpu"]))  # agrees


# On a host where torch sees CUDA (pretended), DeepSpeed not imported yet: run.device=cpu chooses its accelerator.
CPU_ON_A_GPU_HOST = """
import os, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
from istack_ds.config import load_config
from istack_ds.device import check_run_device
check_run_device(load_config(None, ["run.device=cpu"]))
from deepspeed.accelerator import get_accelerator
print(os.environ["DS_ACCELERATOR"], get_accelerator().device_name())
"""


def test_run_device_cpu_makes_deepspeed_use_the_cpu_on_a_gpu_host():
    env = {k: v for k, v in child_env().items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run(
        [sys.executable, "-c", CPU_ON_A_GPU_HOST], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["cpu", "cpu"], proc.stdout


# ---- item 5: one visible GPU per task -----------------------------------------------------------------


def test_local_device_index():
    assert local_device_index(3, 1) == 0  # Slurm's per-task binding: the task's one GPU is device 0
    assert local_device_index(3, 8) == 3
    assert local_device_index(0, 1) == 0
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=3 but this rank sees 2 GPU\(s\)"):
        local_device_index(3, 2)


def test_bind_device_with_one_visible_gpu_takes_device_0(monkeypatch):
    """LOCAL_RANK 3 with CUDA_VISIBLE_DEVICES of one device: DeepSpeed's CUDA accelerator is bound to GPU 0
    (LOCAL_RANK itself is "invalid device ordinal")."""
    import deepspeed.accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    bound = []
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", CUDA_Accelerator)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    dist.bind_device()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    dist.bind_device()
    assert bound == [0, 3]


# ---- item 2: optimizer states on their parameters' device after a load ----------------------------------


def _adamw_after_a_universal_load(fused: bool):
    """A torch AdamW after one step whose parameter lives on "meta" (the stand-in for a GPU) while its states
    stay on the CPU, as DeepSpeed's universal load writes them; returns (optimizer, parameter)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
    p.grad = torch.ones(3)
    opt.step()
    on_gpu = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt.param_groups[0]["params"] = [on_gpu]
    opt.state[on_gpu] = opt.state.pop(p)
    return opt, on_gpu


def test_optimizer_states_move_to_their_parameters_device():
    opt, p = _adamw_after_a_universal_load(fused=True)
    assert opt.state[p]["step"].device.type == "cpu"
    wrapper = SimpleNamespace(optimizer=opt)  # DeepSpeed's ZeRO optimizer wraps torch's
    assert settle_optimizer_states(wrapper) == 3
    assert {k: v.device for k, v in opt.state[p].items()} == dict.fromkeys(("step", "exp_avg", "exp_avg_sq"), p.device)
    assert opt.state[p]["step"].dtype == torch.float32
    # ZeRO-3 empties the groups' parameter lists between steps: the states are found all the same
    opt, p = _adamw_after_a_universal_load(fused=True)
    opt.param_groups[0]["params"] = []
    assert settle_optimizer_states(opt) == 3 and opt.state[p]["step"].device == p.device
    # unfused, not capturable: torch keeps `step` on the CPU (its kernels read it there); the moments move
    opt, p = _adamw_after_a_universal_load(fused=False)
    assert settle_optimizer_states(opt) == 2
    assert opt.state[p]["step"].device.type == "cpu" and opt.state[p]["exp_avg"].device == p.device


def test_a_step_tensor_shared_by_two_partitions_is_untied():
    """ZeRO-3's universal load gives every flat partition one `step` tensor: the fused kernel would increment it
    once per partition."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=0.1, fused=True)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    shared = torch.tensor(3.0)
    opt.state[a]["step"] = opt.state[b]["step"] = shared
    assert settle_optimizer_states(opt) == 1
    assert opt.state[a]["step"] is not opt.state[b]["step"]
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    assert float(opt.state[a]["step"]) == float(opt.state[b]["step"]) == 4.0


def test_a_loaded_checkpoint_has_its_optimizer_states_on_the_parameters_device(tmp_path):
    """resume.load_on_every_rank applies the move after the engine's load (a CPU `step` from a universal load
    reaches the fused kernel on the parameter's device)."""
    opt, p = _adamw_after_a_universal_load(fused=True)
    engine = SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt), lr_scheduler=None)
    checkpointer = SimpleNamespace(load=lambda engine, path: None)
    assert resume.load_on_every_rank(checkpointer, engine, tmp_path) == (None, [])
    assert all(v.device == p.device for v in opt.state[p].values())


# ---- item 6: NCCL failures named, a timeout sized for GPU jobs ---------------------------------------------


def test_nccl_failure_reporting_is_set_for_nccl_only_and_keeps_the_users(monkeypatch):
    for key in NCCL_FAILURE_ENV:
        monkeypatch.delenv(key, raising=False)
    assert nccl_failure_env("gloo") == {} and not any(k in os.environ for k in NCCL_FAILURE_ENV)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")
    added = nccl_failure_env("nccl")
    assert added == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50"  # the user's value stays
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_the_default_timeout_is_sized_for_gpu_jobs_and_stated():
    assert DeepSpeedConfig().dist_timeout_s == 600
    readme = (ROOT / "README.md").read_text()
    assert "`deepspeed.dist_timeout_s` (default 600 s" in readme


class FakeStore:
    """The heartbeat keys of a job's store; `beat(r)` writes rank r's next heartbeat."""

    def __init__(self):
        self.values: dict[str, bytes] = {}

    def beat(self, r: int) -> None:
        key = dist.HEARTBEAT_KEY.format(rank=r)
        self.values[key] = str(float(self.values.get(key, b"0")) + 1).encode()

    def check(self, keys):
        return all(k in self.values for k in keys)

    def get(self, key):
        return self.values[key]


def test_the_watch_logs_a_silent_rank_once_and_its_return(caplog):
    """Between two reads rank 1 beats and rank 2 does not: rank 2 is logged, once, before any timeout."""
    store = FakeStore()
    for r in (1, 2):
        store.beat(r)
    watch = SilentRankWatch(lambda: store, [1, 2], interval=6.0, timeout_s=600)
    watch.stopped.wait = lambda s: store.beat(1)  # the look's wait: rank 1 beats meanwhile, rank 2 is silent
    with caplog.at_level(logging.WARNING, logger="istack_ds"):
        watch.look(store)
        watch.look(store)
        watch.stopped.wait = lambda s: [store.beat(1), store.beat(2)]
        watch.look(store)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "rank 2: no heartbeat for 6 s or more (dead, stopped or its host frozen); collectives with it fail after "
        "deepspeed.dist_timeout_s=600",
        "rank 2 beats again",
    ], lines


def test_the_watch_says_when_the_store_is_gone(caplog):
    def gone():
        raise ConnectionError("refused")

    watch = SilentRankWatch(gone, [0], interval=6.0, timeout_s=600)
    with caplog.at_level(logging.WARNING, logger="istack_ds"):
        thread = threading.Thread(target=watch.run)
        watch.stopped.wait = lambda s: watch.stopped.set()  # one round
        thread.start()
        thread.join(10)
    assert [r.getMessage() for r in caplog.records] == [
        "the job's store does not answer (ConnectionError): rank 0 or its host died or hangs; collectives fail "
        "after deepspeed.dist_timeout_s=600"
    ]


def test_the_watch_ends_quietly_when_the_store_goes_at_exit(caplog):
    watch = SilentRankWatch(lambda: None, [0], interval=6.0, timeout_s=600)

    def store_gone_at_exit(store):
        watch.stopped.set()  # the watch is stopped (atexit) and rank 0's store is gone
        raise ConnectionError("refused")

    watch.look = store_gone_at_exit
    with caplog.at_level(logging.WARNING, logger="istack_ds"):
        watch.run()
    assert caplog.records == []


def test_the_watch_looks_well_before_the_timeout():
    assert watch_interval(600) == 30 and watch_interval(15) == 3 * dist.HEARTBEAT_S and watch_interval(None) == 30
    assert all(watch_interval(t) <= t / 2 for t in (15, 60, 600, 1800))


@pytest.mark.procgroup
def test_a_silent_rank_is_logged_before_the_timeout_in_a_real_group():
    """init_distributed starts the watch: rank 1's heartbeat stops, rank 0 names it well within the 24 s timeout."""
    rank0, rank1 = run_worker("watch_silent_rank.py", timeout=120)
    assert rank0["warnings"] == [
        "rank 1: no heartbeat for 6 s or more (dead, stopped or its host frozen); collectives with it fail after "
        "deepspeed.dist_timeout_s=24"
    ], rank0
    assert rank1["warnings"] == [], rank1  # rank 0 beats on
