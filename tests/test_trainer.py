"""Training with real DeepSpeed engines on 2 gloo ranks: the student learns a fixed batch with the teacher frozen,
the Trainer runs the demo end to end through launchers/train.py, and the CLI stops bad input before any
process group."""

import json

import pytest
import torch

from tests.helpers import ROOT, run_worker, torchrun


@pytest.mark.procgroup
@pytest.mark.parametrize("zero_stage, precision", [(2, "fp32"), (2, "bf16"), (3, "fp32")])
def test_fixed_batch_loss_falls_and_teacher_is_frozen(teacher_dir, zero_stage, precision):
    result = run_worker(
        "train_fixed_batch.py",
        "--teacher",
        teacher_dir,
        "--zero-stage",
        zero_stage,
        "--precision",
        precision,
        timeout=300,
    )[0]
    losses = result["losses"]
    assert result["teacher_moved"] == 0.0
    assert result["dtype"] == ("torch.bfloat16" if precision == "bf16" else "torch.float32")
    assert losses[-1] < 0.5 * losses[0], losses


def _events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from istack_ds.tbview import find_events

    acc = EventAccumulator(str(find_events(tb_dir)), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.procgroup
def test_demo_pipeline_end_to_end(tmp_path, teacher_dir, demo_shards):
    """Shards -> 2 ranks with two growths -> TensorBoard tags, checkpoints, an AutoModel-loadable student."""
    out = tmp_path / "run"
    args = [
        "--config",
        ROOT / "configs/demo.yaml",
        "--set",
        f"run.out_dir={out}",
        "--set",
        f"teacher.path={teacher_dir}",
        "--set",
        f"data.train_index={demo_shards / 'train/index.json'}",
        "--set",
        f"data.valid_index={demo_shards / 'valid/index.json'}",
        "--set",
        "optim.total_steps=12",
        "--set",
        "log.every=2",
        "--set",
        "eval.every=6",
        "--set",
        "checkpoint.every=6",
        "--set",
        "data.num_workers=1",
        "--set",
        "data.crop_seconds=2",
        "--set",
        "data.batch_seconds=6",
        # the CPU speed option end to end (the other training tests run an fp32 teacher)
        "--set",
        "teacher.dtype=int8",
    ]
    proc = torchrun(ROOT / "launchers/train.py", *args, timeout=400)
    assert "depth 2 -> 4" in proc.stderr + proc.stdout and "depth 4 -> 8" in proc.stderr + proc.stdout
    assert "int8 (49 Linear layers quantized)" in proc.stderr + proc.stdout  # 8 layers x 6 + the projection
    # the start line names the device, its count and the precisions
    assert "; device: cpu, 2 process(es); student fp32, teacher int8 (run.device=auto)" in proc.stderr + proc.stdout

    acc = _events(out / "tb")
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/loss_L4",
        "train/loss_L8",
        "train/lr",
        "train/grad_norm",
        "model/depth",
        "model/params",
        "growth/pause_s",
        "perf/audio_s_per_s",
        "perf/step_s",
        "perf/teacher_frac",
        "data/skipped",
        "data/shards_done",
        "data/epoch",
        "valid/loss",
        "valid/loss_L4",
        "valid/loss_L8",
        "diag/cka_L4",
        "diag/cka_L8",
    }
    assert expected <= tags, expected - tags
    assert "diag/cka" in acc.Tags()["images"]  # the student x teacher CKA heatmap
    depth = {e.step: e.value for e in acc.Scalars("model/depth")}
    assert depth[2] == 2 and depth[6] == 4 and depth[12] == 8  # EQL thirds of 12 steps
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["depth"] == 8
    assert (out / "config.yaml").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000008", "step00000012"]

    from transformers import AutoModel

    student = AutoModel.from_pretrained(out / "student", local_files_only=True).eval()
    assert type(student).__name__ == "HubertModel" and student.config.num_hidden_layers == 8
    with torch.no_grad():
        hidden = student(torch.randn(1, 16000), output_hidden_states=True).hidden_states
    assert len(hidden) == 9 and hidden[-1].shape == (1, 49, 64)
    assert json.loads((out / "student/istack_student.json").read_text())["supervised_layers"] == [3, 7]

    # Running the finished job again (make demo twice) resumes, finds it complete and keeps its summary.
    again = torchrun(ROOT / "launchers/train.py", *args, timeout=400)
    assert "run already complete at step 12 of 12" in again.stderr
    assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.parametrize("problem", ["teacher", "index", "empty_index", "typo", "valid_shards", "train_shards"])
def test_bad_input_stops_before_any_process_group(tmp_path, teacher_dir, demo_shards, problem, capsys, monkeypatch):
    """Each problem is one clear message naming the path or key, exit code 2, and no process group."""
    from istack_ds import cli

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"shards": []}))
    sets = {
        "teacher": [f"teacher.path={tmp_path / 'no_teacher'}"],
        "index": [f"data.train_index={tmp_path / 'no_index.json'}"],
        "empty_index": [f"data.train_index={empty}"],
        "typo": ["optim.lr_max=1"],
        # 64 ranks would validate on a held-out split of a few shards: found before the run, not at step 5000
        "valid_shards": [f"data.valid_index={demo_shards / 'valid/index.json'}"],
        # 2 nodes x 8 ranks x 2 workers need more training shards than the split has
        "train_shards": ["data.num_workers=2"],
    }[problem]
    if problem == "valid_shards":
        monkeypatch.setenv("WORLD_SIZE", "64")
    if problem == "train_shards":
        monkeypatch.setenv("WORLD_SIZE", "16")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    argv = [
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--set",
        f"teacher.path={teacher_dir}",
        "--set",
        f"data.train_index={demo_shards / 'train/index.json'}",
        "--set",
        "data.valid_index=null",
        "--set",
        f"run.out_dir={tmp_path / 'run'}",  # not whatever a demo run left in runs/demo
    ]
    for s in sets:
        argv += ["--set", s]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    needle = {
        "teacher": "no_teacher",
        "index": "no_index.json",
        "empty_index": str(empty),
        "typo": "optim.lr_max",
        "valid_shards": "for 64 ranks",
        "train_shards": "(2 node(s) x 8 ranks x 2 workers each read their own shards)",
    }[problem]
    assert needle in err, err
    assert not torch.distributed.is_initialized()
