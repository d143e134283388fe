"""preflight(): the checks of a config against the files it names, run in-process before any process group
(istack_ds/preflight.py). Checks of the config alone are in tests/test_config.py; through the CLI (exit 2, no
process group) in tests/test_trainer.py."""

import json

import pytest

from istack_ds.config import ConfigError, load_config
from istack_ds.preflight import PreflightError, preflight
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """A plain single-process job, whatever the environment pytest runs in."""
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)


def demo_config(teacher, shards, *overrides):
    return load_config(
        ROOT / "configs/demo.yaml",
        [
            f"teacher.path={teacher}",
            f"data.train_index={shards / 'train/index.json'}",
            f"data.valid_index={shards / 'valid/index.json'}",
            "checkpoint.resume=none",  # not whatever a demo run left in runs/demo
            *overrides,
        ],
    )


def teacher_copy(src, dst, sampling_rate):
    """`src`'s model with another `sampling_rate` in its preprocessor_config.json (None: no such file)."""
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        (dst / name).symlink_to(src / name)
    if sampling_rate is not None:
        extractor = json.loads((src / "preprocessor_config.json").read_text())
        (dst / "preprocessor_config.json").write_text(json.dumps(extractor | {"sampling_rate": sampling_rate}))
    return dst


def test_teacher_sample_rate_must_equal_data_sample_rate(tmp_path, teacher_dir, demo_shards):
    """Issue 13 item 8: a teacher fed audio at another rate than it was trained on is refused before launch."""
    preflight(demo_config(teacher_dir, demo_shards))  # 16 kHz teacher, data.sample_rate 16000
    at_8k = teacher_copy(teacher_dir, tmp_path / "teacher_8k", 8000)
    with pytest.raises(ConfigError, match=r"data\.sample_rate=16000 .*expects 8000 Hz") as e:
        preflight(demo_config(at_8k, demo_shards))
    assert str(at_8k / "preprocessor_config.json") in str(e.value)
    preflight(demo_config(at_8k, demo_shards, "data.sample_rate=8000"))

    undeclared = teacher_copy(teacher_dir, tmp_path / "teacher_undeclared", None)
    with pytest.raises(ConfigError, match=r"declares no sample rate") as e:
        preflight(demo_config(undeclared, demo_shards))
    assert str(undeclared / "preprocessor_config.json") in str(e.value) and "data.sample_rate" in str(e.value)


def test_resume_must_name_a_checkpoint(tmp_path, teacher_dir, demo_shards):
    """Issue 13 item 8: a typo in checkpoint.resume is refused before launch, naming the path."""
    ckpt = tmp_path / "checkpoints" / "step00000010"
    ckpt.mkdir(parents=True)
    config = demo_config(teacher_dir, demo_shards).to_dict()
    (ckpt / "istack_meta.json").write_text(json.dumps({"step": 10, "depth": 2, "config": config}))
    for resume in ("auto", "none", str(ckpt)):
        preflight(demo_config(teacher_dir, demo_shards, f"checkpoint.resume={resume}"))

    typo = tmp_path / "checkpoints" / "step0000010"
    with pytest.raises(ConfigError, match=r"checkpoint\.resume=.* is not a directory") as e:
        preflight(demo_config(teacher_dir, demo_shards, f"checkpoint.resume={typo}"))
    assert str(typo) in str(e.value)

    unmarked = tmp_path / "checkpoints" / "step00000020"  # an unfinished save: no marker
    unmarked.mkdir()
    with pytest.raises(ConfigError, match=r"checkpoint\.resume=.*istack_meta\.json") as e:
        preflight(demo_config(teacher_dir, demo_shards, f"checkpoint.resume={unmarked}"))
    assert str(unmarked) in str(e.value)

    (unmarked / "istack_meta.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"checkpoint\.resume=") as e:
        preflight(demo_config(teacher_dir, demo_shards, f"checkpoint.resume={unmarked}"))
    assert str(unmarked) in str(e.value)


def test_the_checkpoint_to_resume_must_fit_the_config(tmp_path, teacher_dir, demo_shards, monkeypatch):
    """Item 8/9: another shape, a schedule that would shrink the student, or a global batch this world size
    cannot keep is refused before launch, for `auto` (the newest checkpoint) as for a path."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step00000150"
    ckpt.mkdir(parents=True)
    config = demo_config(teacher_dir, demo_shards).to_dict()
    # the demo schedule: depth 2 until step 100, 4 until 200, then 8
    (ckpt / "istack_meta.json").write_text(json.dumps({"step": 150, "depth": 4, "config": config, "world_size": 1}))
    for resume in ("auto", str(ckpt)):
        preflight(demo_config(teacher_dir, demo_shards, f"run.out_dir={out}", f"checkpoint.resume={resume}"))
        with pytest.raises(ConfigError, match=r"student\.hidden_size=64 but this run has student\.hidden_size=96"):
            preflight(
                demo_config(
                    teacher_dir,
                    demo_shards,
                    f"run.out_dir={out}",
                    f"checkpoint.resume={resume}",
                    "student.hidden_size=96",
                )
            )
        with pytest.raises(ConfigError, match=r"has depth 4, but this config's schedule has depth 2 at step 150"):
            preflight(
                demo_config(
                    teacher_dir,
                    demo_shards,
                    f"run.out_dir={out}",
                    f"checkpoint.resume={resume}",
                    "growth.boundaries=[160,200]",
                )
            )
    # more depth at the resume step is fine: the trainer grows at once
    preflight(
        demo_config(
            teacher_dir, demo_shards, f"run.out_dir={out}", "checkpoint.resume=auto", "growth.boundaries=[50,140]"
        )
    )
    meta = json.loads((ckpt / "istack_meta.json").read_text())
    (ckpt / "istack_meta.json").write_text(json.dumps(meta | {"world_size": 3, "gradient_accumulation": 1}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"3 rank\(s\) x 1 accumulation = 3 micro-batches"):
        preflight(demo_config(teacher_dir, demo_shards, f"run.out_dir={out}", "checkpoint.resume=auto"))


@pytest.mark.parametrize(
    "override, key",
    [("student.frontend=shared", "student.frontend"), ("deepspeed.zero_stage=3", "deepspeed.zero_stage")],
)
def test_a_resume_must_keep_the_frontend_and_zero_stage(tmp_path, teacher_dir, demo_shards, override, key):
    """Issue 23 item 9: these changes passed --dry-run and failed inside the run on every checkpoint."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step00000150"
    ckpt.mkdir(parents=True)
    config = demo_config(teacher_dir, demo_shards).to_dict()
    (ckpt / "istack_meta.json").write_text(json.dumps({"step": 150, "depth": 4, "config": config, "world_size": 1}))
    overrides = [f"run.out_dir={out}", "checkpoint.resume=auto", override]
    if key == "student.frontend":
        overrides.append("student.conv_dim=null")
    with pytest.raises(ConfigError, match=rf"was made with {key}=.* but this run has {key}="):
        preflight(demo_config(teacher_dir, demo_shards, *overrides))


def test_student_conv_dim_must_match_the_teacher_cnn(teacher_dir, demo_shards):
    """Issue 13 item 8: the student's CNN takes the teacher's kernels; a conv_dim of another length failed only
    when the student was built, after the process group started."""
    preflight(demo_config(teacher_dir, demo_shards, "student.conv_dim=[16,16,16,16,16,16,16]"))
    with pytest.raises(ConfigError, match=r"student\.conv_dim=\[16, 16, 16, 16, 16, 16\] has 6 conv layers") as e:
        preflight(demo_config(teacher_dir, demo_shards, "student.conv_dim=[16,16,16,16,16,16]"))
    assert str(teacher_dir) in str(e.value)


def test_auto_refuses_to_start_over_when_no_checkpoint_verifies(tmp_path, teacher_dir, demo_shards):
    """A requeued job whose only checkpoints are damaged must not silently restart from step 0."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step00000150"
    ckpt.mkdir(parents=True)
    (ckpt / "rank0.pt").write_bytes(b"cut short")
    config = demo_config(teacher_dir, demo_shards).to_dict()
    meta = {"step": 150, "depth": 4, "config": config, "world_size": 1, "files": {"rank0.pt": 4096}}
    (ckpt / "istack_meta.json").write_text(json.dumps(meta))
    for resume in ("auto", str(ckpt)):
        with pytest.raises(ConfigError, match=r"rank0\.pt has 9 bytes, the marker lists 4096"):
            preflight(demo_config(teacher_dir, demo_shards, f"run.out_dir={out}", f"checkpoint.resume={resume}"))
    preflight(demo_config(teacher_dir, demo_shards, f"run.out_dir={out}", "checkpoint.resume=none"))


def test_every_problem_is_reported_at_once(tmp_path, teacher_dir, demo_shards):
    """Issue 24 item 3: a run with three problems names all three in one round trip, each message as it reads
    alone."""
    at_8k = teacher_copy(teacher_dir, tmp_path / "teacher_8k", 8000)
    typo = tmp_path / "checkpoints" / "step0000010"
    missing = tmp_path / "valid" / "index.json"
    bad = [f"checkpoint.resume={typo}", f"data.valid_index={missing}"]
    alone = []
    for config in (demo_config(at_8k, demo_shards), *(demo_config(teacher_dir, demo_shards, b) for b in bad)):
        with pytest.raises(ConfigError) as e:
            preflight(config)
        alone.append(str(e.value))
    with pytest.raises(PreflightError) as e:
        preflight(demo_config(at_8k, demo_shards, *bad))
    assert e.value.problems == alone and str(e.value) == "\n".join(alone)
