"""What a published run or export carries and what it cannot be mistaken for: a random teacher refused unless the
config asks for it (istack_ds/preflight.py), the missing-teacher message, the provenance (istack_ds/provenance.py)
in summary.json and TensorBoard, the export command's card options, and the files a release needs (LICENSE,
CITATION.cff, CHANGELOG.md, the configs as package data). The model card: tests/test_export.py; `istack --version`
and `istack init-config`: tests/test_cli.py."""

import json
import subprocess

import pytest
import yaml

from istack_ds.config import ConfigError, load_config
from istack_ds.models.teacher import RANDOM_MARKER, TeacherError, read_teacher_info, teacher_hub_name
from istack_ds.preflight import check_teacher_trained
from tests.helpers import ROOT


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
    assert "AutoModel.from_pretrained(name).save_pretrained(out)" in message
    assert "AutoFeatureExtractor.from_pretrained(name).save_pretrained(out)" in message
    assert '"facebook/hubert-base-ls960"' in message and f'"{missing}"' in message
    assert "microsoft/wavlm-base-plus" in message and "facebook/wav2vec2-base" in message
    assert teacher_hub_name("facebook/hubert-base-ls960") == "facebook/hubert-base-ls960"  # a cached Hub id
    assert teacher_hub_name(tmp_path) is None  # a local directory that records no Hub id
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Getting a teacher") :].split("\n## ", 1)[0]
    for line in (
        "AutoModel.from_pretrained(name).save_pretrained(out)",
        "AutoFeatureExtractor",
        "teacher.allow_random",
    ):
        assert line in section, line


# ---- provenance ----------------------------------------------------------------------------------------


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_provenance_names_the_commit_and_a_dirty_tree_and_none_outside_a_checkout(tmp_path):
    from istack_ds.provenance import git_commit, provenance

    record = provenance()
    assert set(record["packages"]) >= {"torch", "deepspeed", "transformers", "lhotse", "webdataset", "istack_ds"}
    assert record["packages"]["istack_ds"] == __import__("istack_ds").__version__

    repo = tmp_path / "repo"
    (repo / "istack_ds").mkdir(parents=True)
    (repo / "istack_ds/__init__.py").write_text("")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = git_commit(repo / "istack_ds")
    assert clean is not None and len(clean["commit"]) == 40 and clean["dirty"] is False
    (repo / "istack_ds/__init__.py").write_text("x = 1\n")
    assert git_commit(repo / "istack_ds") == {**clean, "dirty": True}
    # a package installed inside some other repository (a venv in a checkout) is not that repository's commit
    (repo / "venv/site-packages/istack_ds").mkdir(parents=True)
    assert git_commit(repo / "venv/site-packages/istack_ds") is None
    assert git_commit(tmp_path / "nowhere") is None  # not a checkout, never an error


def test_summary_and_tensorboard_record_the_provenance(tmp_path):
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from istack_ds.config import Config, RunConfig
    from istack_ds.metrics import Metrics
    from istack_ds.provenance import provenance
    from istack_ds.report import write_summary

    trainer = SimpleNamespace(
        step=3,
        student=SimpleNamespace(depth=2),
        audio_seconds_total=36.0,
        utterances_total=4,
        plan=SimpleNamespace(describe=lambda: "plan"),
        first_loss=1.0,
        last_loss=0.5,
        out_dir=tmp_path,
        checkpointer=SimpleNamespace(dir=tmp_path / "checkpoints"),
    )
    write_summary(trainer, 1.0)
    assert json.loads((tmp_path / "summary.json").read_text())["provenance"] == provenance()

    metrics = Metrics.from_config(Config(run=RunConfig(name="p", out_dir=str(tmp_path / "run"))))
    metrics.close()
    acc = EventAccumulator(str(tmp_path / "run/tb"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("run/provenance/text_summary")
    text = tensor_util.make_ndarray(event.tensor_proto).item().decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == provenance()


def test_export_command_passes_the_probe_datasets_and_language_to_the_card(tmp_path, monkeypatch):
    import istack_ds.checkpoint
    import istack_ds.export
    from istack_ds.commands import export

    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"sid": {"accuracy": 0.5, "chance": 0.1}}))
    seen = {}
    monkeypatch.setattr(export, "resolve_checkpoint", lambda path: path)
    monkeypatch.setattr(istack_ds.checkpoint, "read_meta", lambda path: {"step": 1, "depth": 2, "supervised": [1]})
    monkeypatch.setattr(istack_ds.export, "export_checkpoint", lambda *a, **card: seen.update(card) or tmp_path)
    argv = ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf"), "--probe", str(probe)]
    assert export.main([*argv, "--dataset", "a/b", "--dataset", "c/d", "--language", "de"]) == 0
    assert seen == {"probe": json.loads(probe.read_text()), "datasets": ["a/b", "c/d"], "language": "de"}
    with pytest.raises(SystemExit, match="--probe"):
        export.main([*argv[:4], "--probe", str(tmp_path / "missing.json")])


# ---- what a release carries ----------------------------------------------------------------------------


def test_license_citation_and_changelog_agree_with_the_package_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert {"authors", "message", "title"} <= set(cff)
    assert cff["license"] == project["license"] and cff["version"] == project["version"]
    paper = cff["preferred-citation"]
    assert paper["type"] == "conference-paper" and paper["year"] == 2026
    assert paper["title"] == "Fast Speech Foundation Model Distillation Using Interleaved Stacking"
    assert [a["family-names"] for a in paper["authors"]] == ["Kim", "Lee"]
    assert "arXiv:2606.11766" in [i["value"] for i in paper["identifiers"]]

    assert f"## {project['version']}" in (ROOT / "CHANGELOG.md").read_text()


def test_the_configs_ship_as_package_data():
    """The wheel holds istack_ds/configs/*.yaml: package data of istack_ds.configs, a link to configs/."""
    from importlib import resources

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-data"] == {"istack_ds.configs": ["*.yaml"]}
    assert any(p == "istack_ds*" for p in setuptools["packages"]["find"]["include"])
    packaged = resources.files("istack_ds").joinpath("configs")
    assert (ROOT / "istack_ds/configs").resolve() == (ROOT / "configs").resolve()
    assert sorted(e.name for e in packaged.iterdir()) == sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
