"""Teacher loading (local only, frozen, clear errors) and the student's shape, heads and CNN copy."""

import json

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
