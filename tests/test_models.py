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
    read_teacher_info,
)


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
def test_teacher_frozen_and_matches_full_model(make_teacher, model_type):
    from transformers import AutoModel

    path = make_teacher(model_type)
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


@pytest.mark.parametrize("tf32", [True, False])
def test_teacher_fp32_math_is_set_inside_its_forward_only(teacher_dir, tf32):
    """teacher.tf32 sets the fp32 matmul and convolution precision for the teacher's CNN and encoder, and torch's
    settings are back after each call (the student's fp32 parts keep them)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    teacher = Teacher(teacher_dir, [4], tf32=tf32)
    seen = []
    for module in (teacher.model.feature_extractor, teacher.model.encoder):
        module.register_forward_pre_hook(lambda *_: seen.append((matmul.fp32_precision, conv.fp32_precision)))
    audio, lens = torch.randn(1, 8000), torch.tensor([8000])
    teacher(audio, lens)
    teacher(audio, lens, teacher.cnn(audio))
    mode = "tf32" if tf32 else "ieee"
    assert len(seen) >= 3 and set(seen) == {(mode, mode)}  # CNN + encoder, then the shared front end's CNN
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    assert ("TF32 on CUDA" in teacher.describe()) == tf32


def test_teacher_tf32_is_named_only_for_an_fp32_teacher(teacher_dir):
    """A paper recipe (fp32 + TF32) tried with `--set teacher.dtype=bf16` loads: TF32 has no fp32 math to set."""
    from istack_ds.config import load_config

    cfg = load_config(
        Path(__file__).resolve().parent.parent / "configs/paper_interleaved_eql.yaml", ["teacher.dtype=bf16"]
    )
    assert cfg.teacher.tf32 and cfg.teacher.dtype == "bf16"
    assert "TF32" not in Teacher(teacher_dir, [4], dtype=torch.bfloat16, tf32=True).describe()


@pytest.mark.parametrize("model_type", SUPPORTED_TEACHERS)
def test_int8_teacher_targets_stay_close_to_fp32(make_teacher, model_type):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    path = make_teacher(model_type)
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
def normalizing_teachers(make_teacher):
    """One tiny random teacher per family, saved with `do_normalize: true` and a layer-norm CNN (as the large SFMs)."""
    return {kind: make_teacher(kind, do_normalize=True, feat_extract_norm="layer") for kind in SUPPORTED_TEACHERS}


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


def test_teacher_layers_init_refuses_other_widths_and_wavlm_layers(make_teacher, teacher_dir):
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
    wavlm = make_teacher("wavlm")
    wide = StudentConfig(hidden_size=96, intermediate_size=192, num_attention_heads=4, init="teacher_layers")
    wide.init_from = str(wavlm)
    student = Student(wide, LossConfig(teacher_layers=[4]), teacher.info, depth=2)
    with pytest.raises(ConfigError, match="wavlm model's layers compute something else"):
        init_student(student, wide, teacher)


# ---- heads on the top layer: output_heads and DistilHuBERT (issue 14, item 4) ------------------


def _cut_below_the_top(student):
    """Detaches the input of the student's top layer: what reaches the layers below then came through a direct
    target of theirs, not through the top layer."""
    top = student.sfm.encoder.layers[student.depth - 1]
    return top.register_forward_pre_hook(lambda module, args, kwargs: ((args[0].detach(),), kwargs), with_kwargs=True)


def test_output_heads_read_the_top_layer_and_no_intermediate_layer_has_a_target(teacher_dir):
    from istack_ds.models.losses import distillation_loss
    from istack_ds.models.sfm import length_mask

    teacher = Teacher(teacher_dir, [2, 4, 8])
    loss_cfg = LossConfig(kind="output_heads", teacher_layers=[2, 4, 8], inter_weight=0.5)
    cfg = StudentConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, dropout=0.0)
    torch.manual_seed(0)
    student = Student(cfg, loss_cfg, teacher.info, depth=3, supervised=[0, 1, 2])
    assert student.supervised == [2, 2, 2]  # the top layer, whatever a growth's carry would say
    # the last target through a Linear (the output projection); the others through prediction heads
    assert isinstance(student.heads["L8"], torch.nn.Linear) and student.heads["L8"].weight.shape == (96, 64)
    for t in (2, 4):
        head = student.heads[f"L{t}"]
        assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
        assert (head[0].in_features, head[0].out_features, head[2].in_features, head[2].out_features) == (
            64,
            64,
            64,
            96,
        )

    audio, lens = torch.randn(2, 8000), torch.tensor([8000, 6000])
    pred, target = student(audio, lens), teacher(audio, lens)
    top = student.hidden_states(audio, lens)[-1]
    for t in (2, 4, 8):
        assert torch.equal(pred[f"L{t}"], student.heads[f"L{t}"](top))
    # the exact value on this case: MSE(L8) + 0.5 x (MSE(L2) + MSE(L4)) over the valid frames
    mask = length_mask(teacher.frame_lengths(lens), pred["L8"].shape[1])
    total, _ = distillation_loss(loss_cfg, pred, target, mask)

    def mse(t):
        return ((pred[f"L{t}"] - target[t]) ** 2).mean(-1)[mask].mean()

    assert torch.allclose(total, mse(8) + 0.5 * (mse(2) + mse(4)), rtol=1e-6)

    # cut below the top layer: the heads still learn, no layer below the top gets any gradient
    hook = _cut_below_the_top(student)
    total, _ = distillation_loss(loss_cfg, student(audio, lens), target, mask)
    total.backward()
    hook.remove()
    for t in (2, 4, 8):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.heads[f"L{t}"].parameters()), t
    assert student.sfm.encoder.layers[2].feed_forward.output_dense.weight.grad.abs().sum() > 0  # the top layer
    for i in (0, 1):
        grads = [p.grad for p in student.sfm.encoder.layers[i].parameters()]
        assert all(g is None or g.abs().sum() == 0 for g in grads), f"layer {i} has a target of its own"

    # the contrast: l2l gives layer 0 a target of its own, so the same cut leaves it a gradient
    l2l = Student(cfg, LossConfig(kind="l2l", teacher_layers=[2, 4, 8]), teacher.info, depth=3)
    hook = _cut_below_the_top(l2l)
    distillation_loss(LossConfig(teacher_layers=[2, 4, 8]), l2l(audio, lens), target, mask)[0].backward()
    hook.remove()
    assert l2l.sfm.encoder.layers[0].attention.q_proj.weight.grad.abs().sum() > 0


def _s3prl_expand_last(x, w1, b1, split_weight, split_bias):
    """s3prl's distiller output layer (out_layer_type expand-last) as its definition reads: Linear(D, N x D) ->
    GELU -> SplitLinear, whose weight is [N, D, Dout] and bias [1, 1, N, Dout]; returns [B, N, T, Dout]."""
    b, t, _ = x.shape
    n, d, _ = split_weight.shape
    h = torch.nn.functional.gelu(x @ w1.T + b1).reshape(b, t, n, 1, d)
    out = torch.einsum("btnod,nde->btnoe", h, split_weight).squeeze(3) + split_bias
    return out.permute(0, 2, 1, 3)


def test_distilhubert_config_heads_and_init_are_s3prls(teacher_dir):
    """configs/distilhubert.yaml holds s3prl's distiller settings; its heads compute what s3prl's fused output layer
    (Linear(D, N*D) -> GELU -> SplitLinear) computes with the same weights (the structure, not the initial
    distributions), and student layer i starts as teacher layer i (init_teacher_conv_layers,
    init_teacher_encoder_layers)."""
    from istack_ds.config import load_config
    from istack_ds.models.student import init_student

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "distilhubert.yaml")
    s = cfg.student
    assert (s.hidden_size, s.intermediate_size, s.num_attention_heads) == (768, 3072, 12)
    assert (s.init, s.dropout, s.cnn_grad_scale, s.frontend) == ("teacher_layers", 0.1, 0.1, "trainable")
    assert (cfg.loss.kind, cfg.loss.teacher_layers, cfg.loss.cos_weight) == ("distilhubert", [4, 8, 12], 1.0)
    assert (cfg.growth.operator, cfg.growth.stage_depths, cfg.teacher.dtype) == ("none", [2], "fp32")
    o = cfg.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.warmup_fraction, o.total_steps, o.grad_clip) == (
        2e-4,
        [0.9, 0.98],
        1e-6,
        0.01,
        0.07,
        200000,
        5.0,
    )
    assert (cfg.data.global_batch, cfg.data.batch_unit, cfg.data.crop_seconds) == (24, "utterances", 15.625)

    # the same student at the tiny teacher's width (the structure does not depend on it)
    teacher = Teacher(teacher_dir, [2, 4, 8])
    tiny = StudentConfig(hidden_size=96, intermediate_size=192, num_attention_heads=4, init="teacher_layers")
    loss = LossConfig(kind="distilhubert", teacher_layers=[2, 4, 8])
    torch.manual_seed(0)
    student = Student(tiny, loss, teacher.info, depth=2)
    init_student(student, tiny, teacher)
    assert student.supervised == [1, 1, 1]
    for t in (2, 4, 8):
        head = student.heads[f"L{t}"]
        assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
        assert head[0].weight.shape == (96, 96) and head[2].weight.shape == (96, 96)  # inter dim = student width
    heads = [student.heads[f"L{t}"] for t in (2, 4, 8)]
    w1 = torch.cat([h[0].weight for h in heads])  # s3prl's Linear(768, 3 x 768)
    b1 = torch.cat([h[0].bias for h in heads])
    split_weight = torch.stack([h[2].weight.T for h in heads])  # SplitLinear.weight [N, D_in, D_out]
    split_bias = torch.stack([h[2].bias for h in heads]).reshape(1, 1, 3, 96)
    assert w1.shape == (3 * 96, 96) and split_weight.shape == (3, 96, 96)
    audio, lens = torch.randn(2, 8000), torch.tensor([8000, 6000])
    student.eval()
    pred = student(audio, lens)
    with torch.no_grad():
        ref = _s3prl_expand_last(student.hidden_states(audio, lens)[-1], w1, b1, split_weight, split_bias)
        mine = torch.stack([pred["L2"], pred["L4"], pred["L8"]], dim=1)
    assert (mine - ref).abs().max().item() <= 1e-5

    # initialisation: CNN, feature projection, positional convolution and layer i = the teacher's layer i
    own, src = student.sfm.state_dict(), teacher.model.state_dict()
    for i in (0, 1):
        names = [n for n in own if n.startswith(f"encoder.layers.{i}.")]
        assert names and all(torch.equal(own[n], src[n]) for n in names), i
    for prefix in ("feature_extractor.", "feature_projection.projection.", "encoder.pos_conv_embed."):
        names = [n for n in own if n.startswith(prefix)]
        assert names and all(torch.equal(own[n], src[n]) for n in names), prefix
