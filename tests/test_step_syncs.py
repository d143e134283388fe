"""Host syncs out of the step (issue 25 item 4): losses stay on the device until the log line reads them, and the
control collectives (data status, finite loss) run on a gloo group on host tensors, never through the GPU."""

import pytest
import torch

from istack_ds import dist
from tests.helpers import run_worker


@pytest.mark.procgroup
def test_a_step_reads_the_device_once_per_micro_batch(tmp_path, teacher_dir, demo_shards):
    """Per micro-batch istack_ds reads one device value (the finite-loss flag) and issues two control
    collectives (the data status before the forward, the finite flag before backward), both on the control group.
    Before: also each loss and loss part read with .item() (4 reads per micro-batch here)."""
    results = run_worker(
        "step_syncs.py", "--teacher", teacher_dir, "--shards", demo_shards, "--run-dir", tmp_path / "run", timeout=300
    )
    for result in results:
        micro = result["micro_batches"]
        assert micro == 4 and result["loss_parts"] == 2, result  # 2 steps x 2 micro-batches; targets L4, L8
        # the finite flag read from the device, and the control collectives' host tensors (CPU under NCCL too:
        # the test below)
        assert result["reads"] == {
            "trainer:train_step __bool__": micro,
            "dist:all_reduce_sum tolist": micro,
            "dist:all_ranks item": micro,
        }, result
        assert result["collectives"] == {
            "dist:all_reduce_sum all_reduce control": micro,
            "dist:all_ranks all_reduce control": micro,
        }, result


class FakeGroups:
    """torch.distributed pretending to be an NCCL job of 2 ranks: records new_group and all_reduce."""

    def __init__(self, monkeypatch):
        self.created, self.reduced = [], []
        monkeypatch.setattr(dist.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist.dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist.dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(dist.dist, "new_group", lambda **kw: self.created.append(kw) or "gloo-group")
        monkeypatch.setattr(dist.dist, "all_reduce", lambda t, op=None, group=None: self.reduced.append((t, group)))
        monkeypatch.setattr(dist, "_control_group", None)


def test_under_nccl_the_control_collectives_run_on_a_gloo_group_on_host_tensors(monkeypatch):
    fake = FakeGroups(monkeypatch)
    dist.all_reduce_sum({"ended": 0.0, "failed": 0.0})
    dist.all_ranks(True)
    assert fake.created == [{"backend": "gloo"}]  # created once
    assert [(t.device, g) for t, g in fake.reduced] == [(torch.device("cpu"), "gloo-group")] * 2


def test_the_window_reads_its_device_sums_once(monkeypatch):
    """LogWindow sums the losses as tensors and reads them with one copy to the host, at log time."""
    from istack_ds.metrics import LogWindow

    window = LogWindow()
    for v in (1.0, 3.0):
        window.add_micro_batch(torch.tensor(v), {"L4": torch.tensor(v / 2), "L8": torch.tensor(v / 4)}, 1.0)
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    means = window.mean_losses()
    assert means == {"loss": 2.0, "loss_L4": 1.0, "loss_L8": 0.5} and {type(v) for v in means.values()} == {float}
    assert reads == [torch.Size([3])]
