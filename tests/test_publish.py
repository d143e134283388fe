"""What a published run or export carries and what it cannot be mistaken for: a random teacher refused unless the
config asks for it (istack_ds/preflight.py), the missing-teacher message, the provenance (istack_ds/provenance.py)
in summary.json and TensorBoard, `istack --version`, `istack init-config`, and the files a release needs (LICENSE,
CITATION.cff, CHANGELOG.md, the configs as package data). The model card itself: tests/test_export.py."""

import json
import subprocess
import sys

import pytest
import yaml

from istack_ds.config import ConfigError, load_config
from istack_ds.models.teacher import RANDOM_MARKER, TeacherError, read_teacher_info, teacher_hub_name
from istack_ds.preflight import check_teacher_trained
from tests.helpers import ROOT, child_env


def test_a_random_teacher_trains_only_when_the_config_allows_it(teacher_dir):
    assert (teacher_dir / RANDOM_MARKER).exists()
    info = read_teacher_info(teacher_dir)
    strict = load_config(ROOT / "configs/demo.yaml", [f"teacher.path={teacher_dir}", "teacher.allow_random=false"])
    with pytest.raises(ConfigError) as e:
        check_teacher_trained(strict, info)
    assert "teacher.allow_random" in str(e.value) and str(teacher_dir) in str(e.value)
    assert "RANDOM weights" in str(e.value) and "Getting a teacher" in str(e.value)
    check_teacher_trained(load_config(ROOT / "configs/demo.yaml", [f"teacher.path={teacher_dir}"]), info)
    assert load_config(None).teacher.allow_random is False  # the default refuses


def test_the_paper_recipe_refuses_a_random_teacher_before_launch(teacher_dir, demo_shards, tmp_path, capsys):
    """Through `istack train`: exit 2 naming the key and the teacher, no process group."""
    import torch

    from istack_ds import cli

    argv = ["--config", str(ROOT / "configs/paper_interleaved_eql.yaml")]
    for s in (
        f"teacher.path={teacher_dir}",
        f"data.train_index={demo_shards / 'train/index.json'}",
        "data.valid_index=null",
        f"run.out_dir={tmp_path / 'run'}",
        "loss.teacher_layers=[4,8]",
        "student.hidden_size=64",
        "student.intermediate_size=128",
        "student.num_attention_heads=4",
        "data.num_workers=1",
        "data.global_batch=4",
        "data.max_micro_batch=4",
    ):
        argv += ["--set", s]
    assert cli.main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "teacher.allow_random=true" in err and str(teacher_dir) in err, err
    assert not torch.distributed.is_initialized()


def test_shipped_configs_allow_a_random_teacher_only_in_the_demo():
    allowed = {p.stem for p in (ROOT / "configs").glob("*.yaml") if load_config(p).teacher.allow_random}
    assert allowed == {"demo"}


def test_the_missing_teacher_message_says_how_to_save_a_trained_one(tmp_path):
    missing = tmp_path / "hubert-base-ls960"
    with pytest.raises(TeacherError) as e:
        read_teacher_info(missing)
    message = str(e.value)
    assert "make_teacher.py --out" not in message and "--out" not in message  # no random weights under that name
    assert 'AutoModel.from_pretrained(name).save_pretrained(out)' in message
    assert "AutoFeatureExtractor.from_pretrained(name).save_pretrained(out)" in message
    assert '"facebook/hubert-base-ls960"' in message and f'"{missing}"' in message
    assert "microsoft/wavlm-base-plus" in message and "facebook/wav2vec2-base" in message
    assert teacher_hub_name("facebook/hubert-base-ls960") == "facebook/hubert-base-ls960"  # a cached Hub id
    assert teacher_hub_name(tmp_path) is None  # a local directory that records no Hub id
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Getting a teacher") :].split("\n## ", 1)[0]
    for line in ("AutoModel.from_pretrained(name).save_pretrained(out)", "AutoFeatureExtractor", "teacher.allow_random"):
        assert line in section, line
