"""Teacher loading (local only, frozen, clear errors) and the student's shape, heads and CNN copy."""

import json
from pathlib import Path

import pytest
import torch

from istack_ds.config import LossConfig, StudentConfig
from istack_ds.models.student import LAYER_PREFIX, Student, initial_supervised_layers
from istack_ds.models.teacher import (
    SUPPORTED_TEACHERS,
    Teacher,
    TeacherError,
    make_random_teacher,
    read_teacher_info,
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_random_teacher(tmp_path_factory.mktemp("teacher") / "hubert", size="tiny")


def test_missing_teacher_dir_is_named(tmp_path):
    with pytest.raises(TeacherError, match=str(tmp_path / "nope")):
        read_teacher_info(tmp_path / "nope")


def test_teacher_dir_without_weights_or_bad_type(tmp_path, teacher_dir):
    (tmp_path / "config.json").write_text((teacher_dir / "config.json").read_text())
    with pytest.raises(TeacherError, match="no weights"):
        read_teacher_info(tmp_path)
    bad = json.loads((teacher_dir / "config.json").read_text()) | {"model_type": "bert"}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(TeacherError, match="'bert' is not supported"):
        read_teacher_info(tmp_path)


def test_teacher_layer_out_of_range(teacher_dir):
    with pytest.raises(TeacherError, match=r"has 8 layers, so \[12\] do not exist"):
        Teacher(teacher_dir, [4, 12])


@pytest.mark.parametrize("model_type", SUPPORTED_TEACHERS)
def test_teacher_frozen_and_matches_full_model(tmp_path, model_type):
    from transformers import AutoModel

    path = make_random_teacher(tmp_path / model_type, size="tiny", model_type=model_type)
    teacher = Teacher(path, [2, 4])
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training  # the teacher never leaves eval mode
    audio = torch.randn(2, 8000)
    lens = torch.tensor([8000, 6000])
    out = teacher(audio, lens)
    full = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        ref = full(audio, output_hidden_states=True).hidden_states
    for i in (2, 4):
        assert torch.allclose(out[i], ref[i], atol=1e-5)
    assert len(teacher.model.encoder.layers) == 4  # runs only up to the deepest layer used


@pytest.mark.parametrize("model_type", SUPPORTED_TEACHERS)
def test_int8_teacher_targets_stay_close_to_fp32(tmp_path, model_type):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    path = make_random_teacher(tmp_path / model_type, size="tiny", model_type=model_type)
    fp32, int8 = Teacher(path, [4, 8]), Teacher(path, [4, 8], int8=True)
    kinds = {
        name.rsplit(".", 1)[-1]: type(m)
        for name, m in int8.model.named_modules()
        if isinstance(m, (torch.nn.Linear, DynamicInt8Linear))
    }
    assert kinds["intermediate_dense"] is DynamicInt8Linear and kinds["output_dense"] is DynamicInt8Linear
    # WavLM's attention reads its projections' raw weights, so they stay fp32 there
    assert kinds["q_proj"] is (torch.nn.Linear if model_type == "wavlm" else DynamicInt8Linear)
    torch.manual_seed(0)
    audio, lens = 0.1 * torch.randn(2, 16000), torch.tensor([16000, 12000])
    ref, out = fp32(audio, lens), int8(audio, lens)  # runs: no raw-weight access hits a quantized Linear
    for i in (4, 8):
        assert out[i].dtype == torch.float32 and out[i].shape == ref[i].shape
        rel = ((out[i] - ref[i]).norm() / ref[i].norm()).item()
        assert 0 < rel < 0.1, f"layer {i}: int8 targets {rel:.3f} from fp32"


def test_initial_supervised_layers():
    assert initial_supervised_layers(3, 3) == [0, 1, 2]  # paper: student 1,2,3 -> teacher 4,8,12
    assert initial_supervised_layers(12, 3) == [3, 7, 11]
    assert initial_supervised_layers(2, 2) == [0, 1]
    assert initial_supervised_layers(4, 1) == [3]


def test_student_shapes_names_and_cnn_copy(teacher_dir):
    info = read_teacher_info(teacher_dir)
    cfg = StudentConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, dropout=0.0)
    student = Student(cfg, LossConfig(teacher_layers=[4, 8]), info, depth=2)
    assert student.supervised == [0, 1]
    names = [n for n, _ in student.named_parameters()]
    assert any(n.startswith(LAYER_PREFIX + "1.") for n in names)
    assert not any(n.startswith(LAYER_PREFIX + "2.") for n in names)
    teacher = Teacher(teacher_dir, [4, 8])
    assert student.copy_frontend_from(teacher.model)
    for (n, a), (_, b) in zip(
        student.sfm.feature_extractor.state_dict().items(), teacher.model.feature_extractor.state_dict().items()
    ):
        assert torch.equal(a, b), n
    audio, lens = torch.randn(2, 8000), torch.tensor([8000, 4000])
    pred = student(audio, lens)
    target = teacher(audio, lens)
    assert set(pred) == {"L4", "L8"}
    assert pred["L4"].shape == target[4].shape == (2, 24, 96)
    assert student.frame_lengths(lens).tolist() == teacher.frame_lengths(lens).tolist() == [24, 12]


def _tiny_student(info, **overrides):
    cfg = StudentConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, dropout=0.0, **overrides)
    return Student(cfg, LossConfig(teacher_layers=[4, 8]), info, depth=2)


def test_shared_frontend_teacher_and_student_match_their_full_models(teacher_dir, tmp_path):
    """The teacher's CNN output, computed once, gives the teacher's own targets and a student without a CNN."""
    from transformers import AutoModel

    from istack_ds.export import save_student

    teacher = Teacher(teacher_dir, [4, 8])
    audio, lens = torch.randn(2, 8000), torch.tensor([8000, 5000])
    features = teacher.cnn(audio)
    with_shared, plain = teacher(audio, lens, features), teacher(audio, lens)
    for t in (4, 8):
        assert torch.equal(with_shared[t], plain[t])

    torch.manual_seed(0)
    student = _tiny_student(teacher.info, frontend="shared")
    assert student.sfm.feature_extractor is None
    assert not any("feature_extractor" in n for n, _ in student.named_parameters())
    with pytest.raises(ValueError, match="shared"):
        student(audio, lens)
    pred = student(audio, lens, features)
    assert pred["L8"].shape == with_shared[8].shape

    # The export puts the teacher's CNN back: AutoModel then reproduces the student from raw audio.
    full = dict(student.state_dict())
    full.update({f"sfm.feature_extractor.{k}": v for k, v in teacher.model.feature_extractor.state_dict().items()})
    save_student(student, full, tmp_path / "student")
    exported = AutoModel.from_pretrained(tmp_path / "student", local_files_only=True).eval()
    with torch.no_grad():
        ref = exported(audio, output_hidden_states=True).hidden_states
        mine = student.eval().hidden_states(audio, lens, features)
    assert len(ref) == len(mine) == 3
    assert max((a - b).abs().max().item() for a, b in zip(ref, mine)) <= 1e-5


def test_trainable_frontend_gradient_is_scaled(teacher_dir):
    info = read_teacher_info(teacher_dir)
    audio, lens = torch.randn(1, 8000), torch.tensor([8000])
    grads = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        student = _tiny_student(info, cnn_grad_scale=scale)
        sum(p.sum() for p in student(audio, lens).values()).backward()
        grads[scale] = (
            student.sfm.feature_extractor.conv_layers[0].conv.weight.grad.clone(),
            student.sfm.encoder.layers[0].attention.q_proj.weight.grad.clone(),
        )
    assert torch.allclose(grads[0.1][0], 0.1 * grads[1.0][0], rtol=1e-3, atol=1e-6)
    assert torch.equal(grads[0.1][1], grads[1.0][1])  # only the CNN is slowed


def test_receptive_field_is_the_shortest_input_that_gives_a_frame():
    """The loader drops members shorter than this (min_samples), so no empty frame sequence reaches the teacher."""
    from transformers import HubertConfig, HubertModel

    from istack_ds.models.sfm import receptive_field

    cfg = HubertConfig()
    field = receptive_field(cfg.conv_kernel, cfg.conv_stride)
    assert field == 400
    lengths = HubertModel(
        HubertConfig(
            num_hidden_layers=1, hidden_size=32, intermediate_size=32, num_attention_heads=2, conv_dim=(8,) * 7
        )
    )._get_feat_extract_output_lengths(torch.tensor([field - 1, field]))
    assert lengths.tolist() == [0, 1]


# ---- teachers as HF defines them (issue 15, item 1) -------------------------------------


@pytest.fixture(scope="module")
def normalizing_teachers(tmp_path_factory):
    """One tiny random teacher per family, saved with `do_normalize: true` and a layer-norm CNN (as the large SFMs)."""
    root = tmp_path_factory.mktemp("normalizing")
    return {
        kind: make_random_teacher(root / kind, model_type=kind, do_normalize=True, feat_extract_norm="layer")
        for kind in SUPPORTED_TEACHERS
    }


def _hf_reference(path, waves):
    """What HF itself does: AutoFeatureExtractor (padding, attention mask) then AutoModel, by hand."""
    from transformers import AutoFeatureExtractor, AutoModel

    extractor = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
    inputs = extractor(
        [w.numpy() for w in waves], sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt"
    )
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    return inputs["input_values"], hidden


def _padded(waves):
    audio = torch.zeros(len(waves), max(len(w) for w in waves))
    for i, w in enumerate(waves):
        audio[i, : len(w)] = w
    return audio, torch.tensor([len(w) for w in waves])


@pytest.mark.parametrize("model_type", SUPPORTED_TEACHERS)
def test_normalizing_teacher_targets_and_student_input_equal_hf(normalizing_teachers, model_type):
    path = normalizing_teachers[model_type]
    g = torch.Generator().manual_seed(3)
    # Different offsets and scales: normalization must act per utterance, over its own samples only.
    waves = [0.3 + 0.05 * torch.randn(12000, generator=g), -0.2 + 2.0 * torch.randn(7000, generator=g)]
    ref_input, ref_hidden = _hf_reference(path, waves)
    teacher = Teacher(path, [2, 4])
    assert teacher.info.do_normalize and teacher.info.attention_mask
    audio, lens = _padded(waves)
    prepared = teacher.prepare_input(audio, lens)  # what teacher AND student hear
    assert (prepared - ref_input).abs().max().item() <= 1e-6
    assert torch.equal(prepared[1, 7000:], torch.zeros(5000))  # padding stays padding_value
    targets = teacher(prepared, lens)
    frames = teacher.frame_lengths(lens)
    for t in (2, 4):
        for b in range(2):  # valid frames (HF leaves padded frames unspecified)
            diff = (targets[t][b, : frames[b]] - ref_hidden[t][b, : frames[b]]).abs().max().item()
            assert diff <= 1e-5, (model_type, t, b, diff)


def test_teacher_without_normalization_leaves_audio_as_it_is(teacher_dir):
    teacher = Teacher(teacher_dir, [4])
    audio = torch.randn(2, 4000)
    assert not teacher.info.do_normalize and teacher.prepare_input(audio, torch.tensor([4000, 3000])) is audio


def _fake_hub_cache(cache, repo_id, src):
    """`src`'s files laid out as huggingface_hub caches a downloaded snapshot of `repo_id`."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_teacher_named_by_a_cached_hub_id_loads_offline(tmp_path, monkeypatch, teacher_dir):
    from huggingface_hub import constants

    snapshot = _fake_hub_cache(tmp_path / "hub", "someorg/tiny-hubert", teacher_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    info = read_teacher_info("someorg/tiny-hubert")
    assert Path(info.path).resolve() == snapshot.resolve() and info.num_layers == 8 and info.sample_rate == 16000
    teacher = Teacher("someorg/tiny-hubert", [4])
    audio, lens = torch.randn(1, 8000), torch.tensor([8000])
    assert torch.equal(teacher(audio, lens)[4], Teacher(teacher_dir, [4])(audio, lens)[4])
    with pytest.raises(TeacherError, match=r"'someorg/not-cached' is neither a directory nor a Hub id in the local"):
        read_teacher_info("someorg/not-cached")


# ---- student.init from an HF directory (issue 15, item 2) -------------------------------


def test_student_init_config_is_checked():
    from istack_ds.config import ConfigError

    with pytest.raises(ConfigError, match="student.init=pretrained needs student.init_from"):
        StudentConfig(init="pretrained")
    with pytest.raises(ConfigError, match="student.init_from=x is used by student.init=teacher_layers or pretrained"):
        StudentConfig(init="random", init_from="x")
    assert StudentConfig(init="teacher_layers").init_from is None  # default: the teacher


def test_teacher_layers_init_copies_the_teachers_first_layers(teacher_dir):
    """DistilHuBERT's initialisation: student layer i = teacher layer i, so its hidden states are the teacher's."""
    from istack_ds.models.student import init_student

    teacher = Teacher(teacher_dir, [4, 8])
    cfg = StudentConfig(
        hidden_size=96, intermediate_size=192, num_attention_heads=4, dropout=0.0, init="teacher_layers"
    )
    torch.manual_seed(0)
    student = Student(cfg, LossConfig(teacher_layers=[4, 8]), teacher.info, depth=2)
    assert "from" in init_student(student, cfg, teacher)
    own, src = student.sfm.state_dict(), teacher.model.state_dict()
    for name, value in own.items():
        assert torch.equal(value, src[name]), name
    assert any(n.startswith("encoder.layers.1.") for n in own) and not any(
        n.startswith("encoder.layers.2.") for n in own
    )
    audio, lens = torch.randn(2, 8000), torch.tensor([8000, 6000])
    mine, ref = student.eval().hidden_states(audio, lens), teacher.all_hidden_states(audio, lens)
    assert max((a - b).abs().max().item() for a, b in zip(mine, ref[:3])) <= 1e-5


def test_teacher_layers_init_refuses_other_widths_and_wavlm_layers(tmp_path, teacher_dir):
    from istack_ds.config import ConfigError
    from istack_ds.models.student import check_init, init_student

    teacher = Teacher(teacher_dir, [4])
    narrow = StudentConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, init="teacher_layers")
    student = Student(narrow, LossConfig(teacher_layers=[4]), teacher.info, depth=2)
    with pytest.raises(ConfigError, match=r"student.init=teacher_layers: .*hidden_size 64 \(student\) != 96"):
        init_student(student, narrow, teacher)
    with pytest.raises(ConfigError, match=r"student.init=teacher_layers from .*hidden_size 64 \(student\) != 96"):
        check_init(narrow, teacher.info, depth=2)  # the same, before any process group (preflight)
    check_init(
        StudentConfig(hidden_size=96, intermediate_size=192, num_attention_heads=4, init="teacher_layers"),
        teacher.info,
        depth=8,
    )
    with pytest.raises(ConfigError, match="it has 8 layers, the student 9"):
        check_init(
            StudentConfig(hidden_size=96, intermediate_size=192, num_attention_heads=4, init="teacher_layers"),
            teacher.info,
            depth=9,
        )
    with pytest.raises(ConfigError, match=r"heads.safetensors does not exist; student.init_from must be an istack_ds"):
        check_init(StudentConfig(init="pretrained", init_from=str(teacher_dir)), teacher.info, depth=2)
    wavlm = make_random_teacher(tmp_path / "wavlm", model_type="wavlm")
    wide = StudentConfig(hidden_size=96, intermediate_size=192, num_attention_heads=4, init="teacher_layers")
    wide.init_from = str(wavlm)
    student = Student(wide, LossConfig(teacher_layers=[4]), teacher.info, depth=2)
    with pytest.raises(ConfigError, match="wavlm model's layers compute something else"):
        init_student(student, wide, teacher)
