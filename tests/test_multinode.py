"""A two-node rehearsal on localhost with the README's own launch command, and Slurm's variables.

The command is read from README.md (between the cluster-no-ssh markers) and only
scaled down: 2 nodes x 1 rank instead of 4 x 8, localhost for node0, a free port,
the demo config with tiny data. So the documented command is the tested one.
"""

import json
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, free_port, ranks_env

STEPS = 12  # EQL over depths 2, 4, 8: growths before steps 5 and 9 (1-based)


def readme_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- cluster-no-ssh:begin -->\s*```bash\n(.*?)```", text, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_readme_command_is_the_documented_one():
    cmd = readme_command()
    assert cmd[0] == "deepspeed" and "--no_ssh" in cmd and "launchers/train.py" in cmd
    assert cmd[cmd.index("--hostfile") + 1] == "launchers/hostfile.example"
    assert (ROOT / "launchers/hostfile.example").exists() and (ROOT / "launchers/slurm_4node.sbatch").exists()
    assert "launchers/slurm_4node.sbatch" in (ROOT / "README.md").read_text()
    # a GPU job never falls back to the CPU: the script asks for cuda before the user's overrides
    assert '--config "$CONFIG" --set run.device=cuda "$@"' in (ROOT / "launchers/slurm_4node.sbatch").read_text()


def rehearsal_command(node_rank: int, port: int, overrides: list[str]) -> list[str]:
    """The README command scaled to 2 nodes x 1 rank on this machine."""
    swap = {
        "--num_nodes": "2",
        "--num_gpus": "1",
        "--node_rank": str(node_rank),
        "--master_addr": "127.0.0.1",
        "--master_port": str(port),
        "--config": str(ROOT / "configs/demo.yaml"),
    }
    cmd = readme_command()
    for flag, value in swap.items():
        cmd[cmd.index(flag) + 1] = value
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *cmd[1:]]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run_two_nodes(overrides: list[str], timeout: float = 400) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = [
        subprocess.Popen(
            rehearsal_command(r, port, overrides),
            cwd=ROOT,
            env=ranks_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-8000:]
    return outs


def audit(out_dir, rank):
    return [json.loads(line) for line in (out_dir / f"data_audit/rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.procgroup
def test_two_node_rehearsal_disjoint_data_same_growth_step_and_resume(tmp_path, teacher_dir, demo_shards):
    out = tmp_path / "run"
    overrides = [
        f"run.out_dir={out}",
        f"teacher.path={teacher_dir}",
        f"data.train_index={demo_shards / 'train/index.json'}",
        "data.valid_index=null",
        f"optim.total_steps={STEPS}",
        "log.every=2",
        "checkpoint.every=4",
        "checkpoint.keep=5",
        "data.num_workers=2",
        "data.crop_seconds=2",
        "data.batch_seconds=6",
        "log.data_audit=true",
    ]
    node0, _ = run_two_nodes(overrides)
    assert "topology: 2 node(s) x 1 rank(s) = 2 ranks, 2 data worker(s) per rank" in node0

    # In every epoch, every rank read its own shards (8 shards: node -> rank -> worker; reshuffled per epoch).
    owner = {}
    index = json.loads((demo_shards / "train/index.json").read_text())
    import tarfile

    for shard in index["shards"]:
        with tarfile.open(demo_shards / "train" / shard["path"]) as tar:
            owner.update({n.rsplit(".", 1)[0]: shard["path"] for n in tar.getnames()})
    read = {}  # (rank, epoch) -> shards
    for r in (0, 1):
        for e in audit(out, r):
            read.setdefault((r, e["epoch"]), set()).update(owner[c] for c in e["cut_ids"])
    epochs = {e for _, e in read}
    assert 0 in epochs
    for epoch in epochs:
        mine, theirs = read.get((0, epoch), set()), read.get((1, epoch), set())
        assert not mine & theirs, (epoch, mine, theirs)
    assert read[(0, 0)] and read[(1, 0)]

    # Every rank grew at the same optimizer step, to the same depth.
    depth_at = [{e["step"]: e["depth"] for e in audit(out, r)} for r in (0, 1)]
    assert depth_at[0] == depth_at[1]
    assert [depth_at[0][s] for s in (4, 5, 8, 9, 12)] == [2, 4, 4, 8, 8]

    # The checkpoint holds both ranks' partitions, and the job resumes from it on both nodes.
    ckpt = out / "checkpoints/step00000008"
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert json.loads((ckpt / "istack_meta.json").read_text())["world_size"] == 2
    node0, _ = run_two_nodes(overrides + [f"checkpoint.resume={ckpt}"])
    resumed = [line for line in node0.splitlines() if "resumed from" in line]
    # Saved after step 8, before the growth that opens stage 2: the resumed job grows first, as the unbroken one did.
    assert resumed and "step 8, stage 2, depth 4" in resumed[0], node0[-3000:]
    assert "growth: step 8: depth 4 -> 8" in node0
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS


@pytest.mark.procgroup
def test_slurm_variables_alone_start_a_job(tmp_path, teacher_dir, demo_shards):
    """srun gives each task only SLURM_* (and the batch script MASTER_*): the trainer maps them itself."""
    out = tmp_path / "run"
    port = free_port()
    args = [
        sys.executable,
        str(ROOT / "launchers/train.py"),
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--set",
        f"run.out_dir={out}",
        "--set",
        f"teacher.path={teacher_dir}",
        "--set",
        f"data.train_index={demo_shards / 'train/index.json'}",
        "--set",
        "data.valid_index=null",
        "--set",
        "optim.total_steps=6",
        "--set",
        "log.every=3",
        "--set",
        "checkpoint.every=0",
        "--set",
        "data.num_workers=1",
        "--set",
        "data.crop_seconds=2",
        "--set",
        "data.batch_seconds=6",
    ]
    procs = []
    for task in (0, 1):
        env = ranks_env(
            SLURM_PROCID=str(task),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(task),
            SLURM_NTASKS_PER_NODE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(var, None)
        procs.append(
            subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    start = time.time()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-4000:] + outs[1][-4000:]
    assert "topology: 1 node(s) x 2 rank(s) = 2 ranks" in outs[0]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert time.time() - start < 300
