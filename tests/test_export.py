"""The export (istack_ds/export.py through tools/export_student.py): a checkpoint of a real 2-rank engine ->
a Hugging Face directory -> AutoModel, with a model card the Hub's metadata parser accepts.

The exported HF model must reproduce the hidden states the framework's student computed
inside the engine (max abs diff <= 1e-5), for ZeRO 2 and 3, a shared CNN front end, and a
universal checkpoint. In process: an export of a student of a normalizing teacher carries the
teacher's feature extractor, its heads as safetensors and a model card, and a student
initialised from it (`student.init: pretrained`) holds its weights.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from istack_ds.export import HEADS_FILE, read_heads, save_student
from tests.helpers import ROOT, child_env, load_tool, run_worker


def _hidden_states(model_dir, audio):
    from transformers import AutoFeatureExtractor, AutoModel

    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(model_dir, local_files_only=True)
    assert type(model).__name__ == "HubertModel" and extractor.sampling_rate == 16000
    inputs = extractor(list(audio.numpy()), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        return model(inputs["input_values"], output_hidden_states=True).hidden_states


@pytest.mark.procgroup
@pytest.mark.parametrize(
    "zero_stage, frontend, universal", [(2, "trainable", True), (3, "trainable", False), (2, "shared", False)]
)
def test_export_reproduces_the_framework_hidden_states(tmp_path, teacher_dir, zero_stage, frontend, universal):
    export_main = load_tool("tools/export_student.py").main

    run = tmp_path / "run"
    result = run_worker(
        "export_student.py",
        "--teacher",
        teacher_dir,
        "--run-dir",
        run,
        "--zero-stage",
        zero_stage,
        "--frontend",
        frontend,
        timeout=300,
    )[0]
    reference = torch.load(result["reference"])
    ckpt = Path(result["checkpoint"])
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0  # a run dir: latest checkpoint

    hidden = _hidden_states(tmp_path / "hf", reference["audio"])
    assert len(hidden) == len(reference["hidden"]) == 5  # depth 4 (+ the input of layer 1)
    diff = max((a - b).abs().max().item() for a, b in zip(hidden, reference["hidden"]))
    assert diff <= 1e-5, diff
    info = json.loads((tmp_path / "hf/istack_student.json").read_text())
    assert info["depth"] == 4 and info["supervised_layers"] == [2, 3] and info["step"] == 3
    assert set(read_heads(tmp_path / "hf")) == {"L4.weight", "L4.bias", "L8.weight", "L8.bias"}

    if universal:
        proc = subprocess.run(
            [sys.executable, "tools/convert_checkpoint.py", str(ckpt)],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=200,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (
            export_main(
                ["--checkpoint", str(ckpt.with_name(ckpt.name + "_universal")), "--out", str(tmp_path / "hf_universal")]
            )
            == 0
        )
        hidden_u = _hidden_states(tmp_path / "hf_universal", reference["audio"])
        assert max((a - b).abs().max().item() for a, b in zip(hidden_u, reference["hidden"])) <= 1e-5


def test_export_names_a_missing_checkpoint(tmp_path):
    export_main = load_tool("tools/export_student.py").main

    with pytest.raises(SystemExit, match="neither a complete istack_ds checkpoint"):
        export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")])


@pytest.fixture(scope="module")
def normalizing_teacher(make_teacher):
    """A teacher as the large SFMs are: `do_normalize: true`, layer-norm CNN, trained with attention masks."""
    return make_teacher(do_normalize=True, feat_extract_norm="layer")


def test_export_carries_the_teachers_input_heads_as_safetensors_and_a_card(tmp_path, normalizing_teacher):
    from transformers import AutoFeatureExtractor, AutoModel

    from istack_ds.config import load_config
    from istack_ds.models.student import Student, init_student
    from istack_ds.models.teacher import Teacher

    cfg = load_config(
        None,
        [
            f"teacher.path={normalizing_teacher}",
            "loss.teacher_layers=[4,8]",
            "growth.depths=[2,4]",
            "student.hidden_size=64",
            "student.intermediate_size=128",
            "student.num_attention_heads=4",
            "student.dropout=0.0",
        ],
    )
    teacher = Teacher(normalizing_teacher, [4, 8])
    torch.manual_seed(0)
    student = Student(cfg.student, cfg.loss, teacher.info, depth=2).eval()
    out = save_student(
        student, student.state_dict(), tmp_path / "hf", teacher_path=str(normalizing_teacher), step=7, config=cfg
    )

    # The teacher's feature extractor, as it is: the exported student gets the input it was trained on.
    assert json.loads((out / "preprocessor_config.json").read_text()) == json.loads(
        (normalizing_teacher / "preprocessor_config.json").read_text()
    )
    assert not (out / "heads.pt").exists()
    heads = read_heads(out)
    for name, value in student.heads.state_dict().items():
        assert torch.equal(heads[name], value), name

    g = torch.Generator().manual_seed(5)
    waves = [0.5 + 0.1 * torch.randn(9000, generator=g), 3.0 * torch.randn(6000, generator=g)]
    extractor = AutoFeatureExtractor.from_pretrained(out, local_files_only=True)
    inputs = extractor([w.numpy() for w in waves], sampling_rate=16000, padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True).hidden_states
    audio = torch.zeros(2, 9000)
    audio[0], audio[1, :6000] = waves[0], waves[1]
    lens = torch.tensor([9000, 6000])
    with torch.no_grad():
        mine = student.hidden_states(teacher.prepare_input(audio, lens), lens)
    frames = student.frame_lengths(lens)
    for a, b in zip(ref, mine, strict=True):
        for i in range(2):
            assert (a[i, : frames[i]] - b[i, : frames[i]]).abs().max().item() <= 1e-5

    card = (out / "README.md").read_text()
    assert str(normalizing_teacher) not in card  # a local teacher is named by its directory, never by its path
    for fact in (
        f"teacher `{normalizing_teacher.name}` (a local directory)",
        "after 7 optimizer steps",
        cfg.data.train_index,
        "depths [2, 4]",
        "zero mean, unit variance",
        HEADS_FILE,
        "hf_hubert_custom",
    ):
        assert fact in card, fact

    # student.init=pretrained: a fresh student starts from the export's weights, heads included.
    cfg.student.init, cfg.student.init_from = "pretrained", str(out)
    torch.manual_seed(1)
    fresh = Student(cfg.student, cfg.loss, teacher.info, depth=2)
    assert "export" in init_student(fresh, cfg.student, teacher)
    for name, value in student.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


@pytest.mark.parametrize("kind", ["output_heads", "distilhubert"])
def test_an_export_with_prediction_heads_loads_back_and_its_card_computes_them(tmp_path, teacher_dir, kind):
    """Prediction heads (Linear -> GELU -> Linear) travel in heads.safetensors, istack_student.json names each
    head's kind, the card's code computes the head's prediction, and `student.init: pretrained` restores them."""
    from istack_ds.config import ConfigError, LossConfig, StudentConfig
    from istack_ds.models.student import Student, init_student
    from istack_ds.models.teacher import Teacher

    teacher = Teacher(teacher_dir, [4, 8])
    cfg = StudentConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, dropout=0.0)
    loss = LossConfig(kind=kind, teacher_layers=[4, 8])
    torch.manual_seed(0)
    student = Student(cfg, loss, teacher.info, depth=2).eval()
    out = save_student(student, student.state_dict(), tmp_path / "hf", teacher_path=str(teacher_dir), step=3)

    info = json.loads((out / "istack_student.json").read_text())
    kinds = {"L4": "prediction", "L8": "linear" if kind == "output_heads" else "prediction"}
    assert info["loss"] == kind and info["heads"] == kinds and info["supervised_layers"] == [1, 1]
    heads = read_heads(out)
    assert set(heads) == set(student.heads.state_dict()) and "L4.2.weight" in heads
    assert all(torch.equal(heads[k], v) for k, v in student.heads.state_dict().items())

    card = (out / "README.md").read_text()
    assert "every head reads the top layer `hidden_states[2]`" in card
    code = [line for line in card.splitlines() if line.startswith(("inner =", "prediction ="))]
    audio, lens = torch.randn(1, 8000), torch.tensor([8000])
    with torch.no_grad():
        hidden = student.hidden_states(audio, lens)
        scope = {"torch": torch, "hidden": hidden, "heads": heads}
        exec("\n".join(code), scope)  # the card's lines, as a user would run them
        assert torch.allclose(scope["prediction"], student(audio, lens)["L4"], atol=1e-5)

    cfg.init, cfg.init_from = "pretrained", str(out)
    torch.manual_seed(1)
    fresh = Student(cfg, loss, teacher.info, depth=2)
    init_student(fresh, cfg, teacher)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in student.state_dict().items())
    other = Student(cfg, LossConfig(kind="l2l", teacher_layers=[4, 8]), teacher.info, depth=2)
    with pytest.raises(ConfigError, match="head kinds and widths must be the student's: loss.kind l2l"):
        init_student(other, cfg, teacher)


# ---- the model card and the provenance beside it ----------------------------------------------------------


def _small_export(out, teacher, *sets, **card):
    """A depth-2 student of `teacher` exported to `out` with the demo config and `sets` overrides."""
    from istack_ds.config import load_config
    from istack_ds.models.student import Student
    from istack_ds.models.teacher import read_teacher_info

    cfg = load_config(ROOT / "configs/demo.yaml", [f"teacher.path={teacher}", "growth.depths=[2,4]", *sets])
    torch.manual_seed(0)
    student = Student(cfg.student, cfg.loss, read_teacher_info(teacher), depth=2).eval()
    return save_student(student, student.state_dict(), out, teacher_path=str(teacher), step=5, config=cfg, **card)


def test_an_export_never_writes_over_a_model_it_did_not_make(tmp_path, teacher_dir, monkeypatch, capsys):
    """Issue 23, 6: `istack export --out DIR` replaced a teacher's config.json and weights by the student."""
    import istack_ds.export

    export_main = load_tool("tools/export_student.py").main
    target = tmp_path / "teacher"
    shutil.copytree(teacher_dir, target)

    def files():
        return {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}

    before = files()
    ckpt = tmp_path / "run/checkpoints/step00000005"  # refused before the checkpoint is read: a marker will do
    ckpt.mkdir(parents=True)
    (ckpt / "istack_meta.json").write_text(json.dumps({"step": 5, "depth": 2, "supervised": [1, 1]}))
    assert export_main(["--checkpoint", str(ckpt), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"{target} holds config.json" in err and "--force" in err
    from istack_ds.export import ExportError

    with pytest.raises(ExportError, match="holds config.json"):
        _small_export(target, teacher_dir)
    assert files() == before

    seen = {}
    monkeypatch.setattr(
        istack_ds.export, "export_checkpoint", lambda c, out, t, force, **_: seen.update(f=force) or out
    )
    assert export_main(["--checkpoint", str(ckpt), "--out", str(target), "--force"]) == 0 and seen == {"f": True}
    _small_export(target, teacher_dir, force=True)  # --force writes over it
    assert (target / "istack_student.json").is_file() and files() != before
    _small_export(target, teacher_dir)  # an earlier export is written over without --force
    _small_export(tmp_path / "new", teacher_dir)


ABSOLUTE = re.compile(r"(^|[\s`'\"(=:])/(?!/)[\w.-]")  # a path from the file system root


def test_card_passes_the_hub_parser_says_the_teacher_was_random_and_holds_no_local_path(tmp_path, teacher_dir):
    from huggingface_hub import ModelCard

    from istack_ds.provenance import PROVENANCE_FILE

    out = _small_export(tmp_path / "hf", teacher_dir, f"data.train_index={tmp_path / 'shards/train/index.json'}")
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "feature-extraction"
    assert meta["library_name"] == "transformers" and "knowledge-distillation" in meta["tags"]
    assert "base_model" not in meta  # a local random teacher has no Hub id
    assert "random-teacher" in meta["tags"] and "The teacher had RANDOM weights" in card.text
    assert json.loads((out / "istack_student.json").read_text())["teacher_random"] is True
    assert "schedule: EQL (alpha=0)" in card.text and "proportional" not in card.text
    assert "## Limitations" in card.text and "arXiv 2606.11766" in card.text and "eprint" in card.text
    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text and not ABSOLUTE.search(text), ABSOLUTE.search(text)
    assert "…/shards/train/index.json" in text
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["packages"]["transformers"] and record["packages"]["torch"]
    assert record["packages"]["istack_ds"] in text and PROVENANCE_FILE in text


def test_card_names_the_teachers_hub_id_as_base_model_the_probe_results_and_librispeech(tmp_path, teacher_dir):
    from huggingface_hub import ModelCard

    trained = tmp_path / "hubert-base-ls960"  # a trained teacher as transformers 4 saved it: no random marker
    trained.mkdir()
    for name in ("model.safetensors", "preprocessor_config.json"):
        (trained / name).symlink_to(teacher_dir / name)
    config = json.loads((teacher_dir / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**config, "_name_or_path": "facebook/hubert-base-ls960"}))
    index = tmp_path / "shards/train/index.json"
    index.parent.mkdir(parents=True)
    index.write_text(json.dumps({"settings": {"parts": {"train": ["train-clean-100", "train-other-500"]}}}))
    probe = {
        "train_index": str(tmp_path / "labelled/train/index.json"),
        "pr": {"per": 0.41234, "chance_per": 0.95},
        "sid": {"accuracy": 0.8, "chance": 0.1},
    }
    out = _small_export(
        tmp_path / "hf",
        trained,
        f"data.train_index={index}",
        "growth.alpha=1",
        "teacher.allow_random=false",
        probe=probe,
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "facebook/hubert-base-ls960" and "RANDOM" not in card.text
    assert card.data.datasets == ["openslr/librispeech_asr"] and card.data.language == "en"
    assert "schedule: PROP-1 (alpha=1)" in card.text
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"per": 0.4123, "accuracy": 0.8} and "not SUPERB" in card.text
    assert json.loads((out / "probe.json").read_text()) == probe
    assert str(tmp_path) not in (out / "README.md").read_text()


def test_schedule_names_of_the_shipped_configs():
    from istack_ds.config import load_config
    from istack_ds.model_card import schedule_name

    named = {
        name: schedule_name(load_config(ROOT / f"configs/{name}.yaml").growth)
        for name in ("paper_interleaved_eql", "paper_interleaved_prop1", "paper_full_depth", "demo")
    }
    assert named == {
        "paper_interleaved_eql": "EQL (alpha=0)",
        "paper_interleaved_prop1": "PROP-1 (alpha=1)",
        "paper_full_depth": "full depth, no growth",
        "demo": "EQL (alpha=0)",
    }
    growth = load_config(None, ["growth.boundaries=[10,20,30]"]).growth
    assert schedule_name(growth) == "explicit stage boundaries [10, 20, 30]"
