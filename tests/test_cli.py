"""The command line (issue 15 item 3): the `istack` and `istack-train` console scripts, `istack train
--print-config` and `--dry-run` without any process group, and `deepspeed.extra` merged into the DeepSpeed JSON,
its conflicts and typos refused before launch. Issue 24: the paper recipe prints and dry-runs before its data
exists, a dry run reports every problem at once, a busy master port is one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from istack_ds import cli
from istack_ds.batching import plan_batches
from istack_ds.commands import COMMANDS
from istack_ds.config import ConfigError, load_config
from istack_ds.deepspeed_json import deepspeed_json
from tests.helpers import ROOT, child_env

BIN = Path(sys.executable).parent
DEMO = str(ROOT / "configs/demo.yaml")
PAPER = str(ROOT / "configs/paper_interleaved_eql.yaml")


def demo_args(teacher_dir, demo_shards, tmp_path, *sets: str) -> list[str]:
    args = ["--config", DEMO]
    for s in (
        f"run.out_dir={tmp_path / 'run'}",
        f"teacher.path={teacher_dir}",
        f"data.train_index={demo_shards / 'train/index.json'}",
        f"data.valid_index={demo_shards / 'valid/index.json'}",
        *sets,
    ):
        args += ["--set", s]
    return args


@pytest.mark.parametrize("script", ["istack", "istack-train"])
def test_console_scripts_installed_and_answer_help(script):
    """`pip install -e .` installs both scripts; `istack --help` lists every command."""
    proc = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    if script == "istack":
        for name in cli.available():
            assert name in proc.stdout
    else:
        assert "--print-config" in proc.stdout and "--dry-run" in proc.stdout


def test_every_command_answers_help(capsys):
    available = cli.available()
    assert set(COMMANDS) - set(available) <= {"probe"}  # the slot for `istack probe`
    for name in available:
        with pytest.raises(SystemExit) as e:
            cli.istack([name, "--help"])
        assert e.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name
    with pytest.raises(SystemExit) as e:
        cli.istack(["nonsense"])
    assert e.value.code == 2


def test_tool_scripts_are_the_commands():
    """tools/<x>.py runs `istack <x>`'s main (the README's `python tools/...` commands keep working)."""
    for tool, module in [
        ("check_shards", "check"),
        ("shard_corpus", "shard"),
        ("prepare_librilight", "prepare"),
        ("export_student", "export"),
        ("convert_checkpoint", "convert"),
        ("make_teacher", "make_teacher"),
        ("make_demo_corpus", "make_demo_corpus"),
        ("prepare_corpus", "prepare"),
        ("train_teacher", "train_teacher"),
        ("probe", "probe"),
    ]:
        text = (ROOT / "tools" / f"{tool}.py").read_text()
        assert f"from istack_ds.commands.{module} import main" in text and "sys.path" not in text, tool


def test_print_config_prints_the_resolved_yaml_and_the_deepspeed_json(tmp_path, capsys):
    argv = ["train", "--config", DEMO, "--set", "optim.total_steps=90", "--print-config", "--nodes", "2"]
    argv += ["--ranks-per-node", "4", "--set", "deepspeed.extra.zero_optimization.contiguous_gradients=true"]
    assert cli.istack(argv) == 0
    out = capsys.readouterr().out
    head, _, ds_json = out.partition("# DeepSpeed JSON on 8 rank(s)")
    cfg = load_config(DEMO, ["optim.total_steps=90", "deepspeed.extra.zero_optimization.contiguous_gradients=true"])
    assert yaml.safe_load(head) == cfg.to_dict()
    ds = json.loads(ds_json.split("\n", 1)[1])
    assert ds == deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, 8))
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["contiguous_gradients"] is True
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()


def test_dry_run_checks_and_prints_the_plan_without_a_process_group(teacher_dir, demo_shards, tmp_path, capsys):
    argv = demo_args(teacher_dir, demo_shards, tmp_path, "data.num_workers=1", "optim.total_steps=30")
    assert cli.istack(["train", *argv, "--dry-run", "--nodes", "1", "--ranks-per-node", "2"]) == 0
    out = capsys.readouterr().out
    assert "topology: 1 node(s) x 2 rank(s) = 2 rank(s)" in out
    assert "shards per worker and epoch: 4..4" in out  # 8 training shards over 2 ranks x 1 worker
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert rows[:3] == [["1", "2", "0", "10"], ["2", "4", "10", "10"], ["3", "8", "20", "10"]]  # EQL over 30 steps
    assert "model states only" in out and "fp32, ZeRO 2 on 2 rank(s)" in out
    memory = {int(r[0]): int(r[1].replace(",", "")) for r in rows[3:]}
    assert sorted(memory) == [2, 4, 8] and memory[2] < memory[4] < memory[8]
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()

    # a check that needs the data stops the dry run like the run: 2 nodes x 8 ranks need more shards
    argv = demo_args(teacher_dir, demo_shards, tmp_path, "data.valid_index=null")
    assert cli.istack(["train", *argv, "--dry-run", "--nodes", "2", "--ranks-per-node", "8"]) == 2
    assert "(2 node(s) x 8 ranks x 1 workers each read their own shards)" in capsys.readouterr().err


def test_deepspeed_extra_is_merged_and_checked():
    cfg = load_config(
        DEMO,
        [
            "deepspeed.extra={zero_optimization: {contiguous_gradients: true, reduce_bucket_size: 2.0e+7}, "
            "communication_data_type: fp32, flops_profiler: {enabled: true, profile_step: 3}}",
            "deepspeed.extra.zero_optimization.stage=2",  # the same value as deepspeed.zero_stage: allowed
        ],
    )
    ds = deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, 2))
    assert ds["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": True,
        "reduce_bucket_size": 2e7,
        "allgather_bucket_size": 2e7,
        "contiguous_gradients": True,
    }
    assert ds["flops_profiler"] == {"enabled": True, "profile_step": 3} and ds["communication_data_type"] == "fp32"
    assert ds["train_batch_size"] == 2 and ds["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        ("zero_optimization.overlap_com=true", r"overlap_com\n.*Extra inputs are not permitted"),
        ("flops_profiler={enabled: true, profile_stp: 1}", r"does not know the key `flops_profiler\.profile_stp`"),
        ("flops_profilr={enabled: true}", r"does not know the key `flops_profilr`"),
        ("zero_optimization.stage=3", r"extra\.zero_optimization\.stage=3 conflicts .*deepspeed\.zero_stage"),
        ("bf16.enabled=true", r"deepspeed\.extra\.bf16\.enabled=True conflicts .*deepspeed\.precision"),
        ("train_batch_size=64", r"deepspeed\.extra\.train_batch_size=64 conflicts"),
        ("optimizer={type: Adam}", r"deepspeed\.extra\.optimizer=.* conflicts .*optim section"),
        ("zero_optimization.overlap_comm=false", r"overlap_comm=False conflicts .*deepspeed\.overlap_comm"),
        ("zero_optimization.reduce_bucket_size=5.0e+8", r"reduce_bucket_size=.* conflicts .*deepspeed\.reduce_bucket"),
        ("communication_data_type=bf16", r"communication_data_type='bf16' conflicts .*deepspeed\.communication_data"),
        # ZeRO-Offload: DeepSpeed's config classes accept it, deepspeed.initialize refuses the client optimizer
        ("zero_optimization.offload_optimizer={device: cpu}", r"offload_optimizer=.* is refused: .*ZeRORuntimeExc"),
        ("zero_optimization.offload_param={device: nvme}", r"offload_param=.* is refused: .*offloaded parameters"),
    ],
)
def test_deepspeed_extra_refuses_typos_and_conflicts(extra, message):
    cfg = load_config(DEMO, [f"deepspeed.extra.{extra}"])
    with pytest.raises(ConfigError, match=message):
        deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, 2))


@pytest.mark.parametrize("stage", [2, 3])
def test_the_communication_settings_reach_the_deepspeed_json(stage):
    """Multi-node ZeRO: overlap, bucket sizes, the gradients' reduction dtype, ZeRO-3's persistence threshold."""
    defaults = load_config(DEMO, [f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16"])
    ds = deepspeed_json(defaults, plan_batches(defaults.data, defaults.deepspeed, 2))
    zero = {"stage": stage, "overlap_comm": True, "reduce_bucket_size": 20_000_000}
    zero.update({"stage3_param_persistence_threshold": 100_000} if stage == 3 else {"allgather_bucket_size": 2e7})
    assert ds["zero_optimization"] == zero and ds["communication_data_type"] == "fp32"
    cfg = load_config(
        DEMO,
        [
            f"deepspeed.zero_stage={stage}",
            "deepspeed.overlap_comm=false",
            "deepspeed.reduce_bucket_size=1000",
            "deepspeed.allgather_bucket_size=2000",
            "deepspeed.communication_data_type=bf16",
            "deepspeed.stage3_param_persistence_threshold=0",
        ],
    )
    ds = deepspeed_json(cfg, plan_batches(cfg.data, cfg.deepspeed, 2))
    zero = {"stage": stage, "overlap_comm": False, "reduce_bucket_size": 1000}
    zero.update({"stage3_param_persistence_threshold": 0} if stage == 3 else {"allgather_bucket_size": 2000})
    assert ds["zero_optimization"] == zero and ds["communication_data_type"] == "bf16"


def test_offload_is_refused_in_preflight_not_in_deepspeed_initialize(teacher_dir, demo_shards, tmp_path, capsys):
    argv = demo_args(
        teacher_dir, demo_shards, tmp_path, "deepspeed.extra.zero_optimization.offload_optimizer.device=cpu"
    )
    assert cli.main(argv) == 2
    assert "deepspeed.extra.zero_optimization.offload_optimizer={'device': 'cpu'}" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_a_bad_extra_stops_train_before_any_process_group(teacher_dir, demo_shards, tmp_path, capsys):
    argv = demo_args(teacher_dir, demo_shards, tmp_path, "deepspeed.extra.zero_optimization.overlap_com=true")
    assert cli.main(argv) == 2
    assert "overlap_com" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_the_paper_recipe_prints_before_its_shards_exist(tmp_path, capsys):
    """Issue 24 item 3: optim.epochs is resolved from the train index; without it --print-config failed, so the
    recipe could not be inspected before sharding 960 h. Now the steps say they are resolved at launch."""
    index = tmp_path / "librispeech/train/index.json"
    argv = ["train", "--config", PAPER, "--set", f"data.train_index={index}", "--print-config"]
    assert cli.istack(argv) == 0
    out, err = capsys.readouterr()
    assert f"optim.epochs=75: steps resolved at launch from {index} (not there yet)" in err
    head, _, ds_json = out.partition("# DeepSpeed JSON on 1 rank(s)")
    assert f"# optim.total_steps: steps resolved at launch from {index}" in head
    optim = yaml.safe_load(head)["optim"]
    assert optim["epochs"] == 75 and optim["total_steps"] is None
    scheduler = json.loads(ds_json[ds_json.index("\n{") :])["scheduler"]["params"]  # after any DeepSpeed warning
    assert (
        scheduler["total_num_steps"]
        == scheduler["warmup_num_steps"]
        == f"steps resolved at launch from {index} (not there yet)"
    )
    assert cli.main(["--config", PAPER, "--set", f"data.train_index={index}"]) == 2  # a real run still needs it
    assert "does not exist" in capsys.readouterr().err


def test_dry_run_reports_every_problem_at_once(tmp_path, capsys):
    """Issue 24 item 3: a missing teacher and two missing indexes: one dry run names all three, each message as
    preflight words it alone, and still prints the plan its inputs allow."""
    sets = [f"teacher.path={tmp_path / 'hubert'}", f"data.train_index={tmp_path / 'train/index.json'}"]
    sets += [f"data.valid_index={tmp_path / 'valid/index.json'}", f"run.out_dir={tmp_path / 'run'}"]
    argv = ["train", "--config", PAPER, *(a for s in sets for a in ("--set", s)), "--dry-run"]
    assert cli.istack([*argv, "--nodes", "4", "--ranks-per-node", "8"]) == 2
    out, err = capsys.readouterr()
    problems = [line for line in err.splitlines() if line.startswith("istack_ds: ") and "not there yet" not in line]
    assert len(problems) == 3, err
    assert f"teacher directory {tmp_path / 'hubert'} does not exist" in problems[0]
    assert problems[1].startswith(f"istack_ds: shard index {tmp_path / 'train/index.json'} does not exist")
    assert f"shard index {tmp_path / 'valid/index.json'} does not exist" in problems[2]
    assert "dry run: 3 pre-launch problem(s) above; nothing was started" in err
    assert "batch: 64 utterances per step (data.global_batch) = 32 rank(s) x 1 micro-batch(es) x 2 utterances" in out
    assert "stage depths [3, 6, 9, 12] (optim.epochs=75); steps resolved at launch from" in out
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()


def test_a_run_reports_every_problem_too(tmp_path, capsys):
    """Issue 24 item 3: the run itself (not only --dry-run) names every pre-launch problem, the steps that
    optim.epochs cannot resolve from a bad index among them, once each."""
    empty = tmp_path / "index.json"
    empty.write_text(json.dumps({"shards": []}))
    sets = [f"teacher.path={tmp_path / 'hubert'}", f"data.train_index={empty}", "data.valid_index=null"]
    assert cli.main(["--config", PAPER, *(a for s in sets for a in ("--set", s))]) == 2
    start, err = capsys.readouterr().err.split("\n", 1)
    assert "[r0] starting run `paper_interleaved_eql`" in start  # at once, before the checks import torch
    assert err.startswith(f"istack_ds: teacher directory {tmp_path / 'hubert'} does not exist")
    assert err.count("lists no shards") == 1
    assert err.splitlines()[-1] == f"istack_ds: shard index {empty} lists no shards (empty split?)"
    assert not torch.distributed.is_initialized()


def test_a_busy_master_port_stops_train_in_one_line(teacher_dir, demo_shards, tmp_path, capsys, monkeypatch):
    """Issue 24 item 2: MASTER_PORT held by another job: exit 2 and one line naming the port, before any
    process group (it was a 40-line EADDRINUSE traceback from every rank after the start-up)."""
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_PROCID", "MASTER_ADDR"}
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in launcher})
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        os.environ["MASTER_PORT"] = str(port)
        assert cli.main(demo_args(teacher_dir, demo_shards, tmp_path, "checkpoint.resume=none")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "[r0] starting run" not in line]
    assert len(err) == 1 and err[0].startswith(f"istack_ds: port {port} (MASTER_PORT")
    assert not torch.distributed.is_initialized()


def test_version_prints_the_version_commit_and_packages(capsys):
    from istack_ds import __version__
    from istack_ds.provenance import git_commit

    with pytest.raises(SystemExit) as e:
        cli.istack(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    commit = git_commit()
    assert out.startswith(f"istack_ds {__version__} (")
    assert (commit["commit"][:12] if commit else "no git checkout") in out
    assert "torch " in out and "deepspeed " in out and "transformers " in out


def test_init_config_writes_a_shipped_config_and_its_bases(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.istack(["init-config", "demo"]) == 0
    assert (tmp_path / "demo.yaml").read_text() == (ROOT / "configs/demo.yaml").read_text()
    # a config built on another gets that one beside it, so its `base:` resolves outside the repository
    assert cli.istack(["init-config", "paper_interleaved_prop1.yaml", "--out", str(tmp_path / "my/prop1.yaml")]) == 0
    assert (tmp_path / "my/prop1.yaml").read_text() == (ROOT / "configs/paper_interleaved_prop1.yaml").read_text()
    assert (
        load_config(tmp_path / "my/prop1.yaml").to_dict()
        == load_config(ROOT / "configs/paper_interleaved_prop1.yaml").to_dict()
    )
    capsys.readouterr()
    # the same text again is fine; a file that differs is refused unless --force
    assert cli.istack(["init-config", "demo"]) == 0
    (tmp_path / "demo.yaml").write_text("run: {name: mine}\n")
    assert cli.istack(["init-config", "demo"]) == 2
    assert "demo.yaml exists and differs" in capsys.readouterr().err
    assert cli.istack(["init-config", "demo", "--force"]) == 0
    assert (tmp_path / "demo.yaml").read_text() == (ROOT / "configs/demo.yaml").read_text()
    assert cli.istack(["init-config", "nonsense"]) == 2
    assert "no shipped config 'nonsense'" in capsys.readouterr().err
    assert cli.istack(["init-config", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(p.stem in listed for p in (ROOT / "configs").glob("*.yaml"))
