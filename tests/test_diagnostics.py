"""The layer diagnostics (istack_ds/diagnostics.py): the properties of linear CKA they rely on, valid frames,
subsampling, the student x student map, the heatmaps, and that drawing them leaves the process's matplotlib
backend alone."""

import pytest
import torch

from istack_ds.diagnostics import (
    MATRIX_TAGS,
    CkaMaps,
    LayerDiagnostics,
    cka_figure,
    cka_matrix,
    cka_panels,
    figure_image,
    linear_cka,
    self_cka_matrix,
    subsample,
    valid_frames,
)


def _x(n=300, d=24, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_cka_of_a_layer_with_itself_is_one():
    x = _x()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_one_under_an_orthogonal_transform_scaling_and_shift():
    x = _x()
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(1)))
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.0 * (x @ q) + 5.0) == pytest.approx(1.0, abs=1e-10)
    # Another width: an orthonormal embedding into 40 dimensions keeps every inner product.
    e, _ = torch.linalg.qr(torch.randn(40, 24, generator=torch.Generator().manual_seed(2)))
    assert linear_cka(x, x @ e.T) == pytest.approx(1.0, abs=1e-10)


def test_cka_is_low_for_unrelated_and_not_one_for_a_general_linear_map():
    x, y = _x(2000, 16, 0), _x(2000, 16, 5)
    assert linear_cka(x, y) < 0.05
    skew = torch.diag(torch.tensor([10.0] + [0.1] * 15))
    assert linear_cka(x, x @ skew) < 0.5  # CKA is not invariant to arbitrary invertible maps


def test_cka_matrix_matches_pairwise_and_the_feature_space_formula():
    xs, ys = [_x(200, 8, i) for i in range(3)], [_x(200, 12, 10 + i) for i in range(2)]
    ys[1] = xs[2] @ torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    m = cka_matrix(xs, ys)
    assert m.shape == (3, 2)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
            direct = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
            assert m[i, j].item() == pytest.approx(direct.item(), abs=1e-10)


def test_only_valid_frames_enter_and_subsampling_is_even():
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    frames = valid_frames(hidden, torch.tensor([3, 5]))
    assert frames.flatten().tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert subsample(5, 10).tolist() == [0, 1, 2, 3, 4]
    idx = subsample(1000, 11)
    assert idx[0] == 0 and idx[-1] == 999 and len(set(idx.tolist())) == 11


def test_heatmap_renders(tmp_path):
    fig = cka_figure(torch.rand(5, 9, dtype=torch.float64), {2: 4, 4: 8}, "step 10")
    fig.savefig(tmp_path / "cka.png")
    assert (tmp_path / "cka.png").stat().st_size > 1000
    image = figure_image(fig)
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0


class _Student:
    """Hidden states 0..4 of 2 utterances (5 and 3 valid frames of 5): layer 2 is layer 1, layer 3 is unrelated
    noise, layer 4 an orthogonal transform of layer 1 scaled by 3. Padding frames hold large junk."""

    depth, loss_kind, supervised, teacher_layers = 4, "l2l", [1, 3], [2, 4]

    def __init__(self, frames=(500, 300), t=500, d=16):
        g = torch.Generator().manual_seed(7)
        base, noise, inp = (torch.randn(2, t, d, generator=g) for _ in range(3))
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        self.hidden = [inp, base, base.clone(), noise, 3.0 * base @ q]
        for h in self.hidden:
            h[1, frames[1] :] = 1e3 * torch.randn(t - frames[1], d, generator=g)
        self.calls = 0

    def hidden_states(self, audio, lens):
        self.calls += 1
        return self.hidden


class _Teacher:
    def __init__(self, frames=(500, 300), t=500):
        g = torch.Generator().manual_seed(8)
        self.frames = torch.tensor(frames)
        self.hidden = [torch.randn(2, t, 12, generator=g) for _ in range(3)]

    def prepare_input(self, audio, lens):
        return audio

    def frame_lengths(self, lens):
        return self.frames

    def all_hidden_states(self, audio, lens):
        return self.hidden


_BATCH = {"audio": torch.zeros(2, 8), "audio_lens": torch.tensor([8, 5])}


def test_student_map_is_symmetric_with_unit_diagonal_and_comes_from_the_same_forward():
    student, teacher = _Student(), _Teacher()
    maps = LayerDiagnostics(None, max_frames=10_000).compute_maps(student, teacher, _BATCH)
    assert student.calls == 1  # both maps from one student forward
    m = maps.student_student
    assert m.shape == (5, 5) and m.dtype == torch.float64
    assert torch.equal(m, m.T)
    assert torch.allclose(torch.diagonal(m), torch.ones(5, dtype=torch.float64), atol=1e-12)
    assert m[1, 2] == pytest.approx(1.0, abs=1e-12)  # a clone and its source
    assert m[1, 4] == pytest.approx(1.0, abs=1e-10)  # CKA's invariances hold across student layers too
    assert m[1, 3] < 0.1  # unrelated noise
    # The same numbers as linear_cka over the valid frames only (the padding junk stays out).
    flat = [valid_frames(h, teacher.frames) for h in student.hidden]
    for i in range(5):
        for j in range(5):
            assert m[i, j].item() == pytest.approx(linear_cka(flat[i], flat[j]), abs=1e-10)
    assert torch.equal(self_cka_matrix(flat), m)
    teacher_flat = [valid_frames(h, teacher.frames) for h in teacher.hidden]
    assert torch.allclose(maps.student_teacher, cka_matrix(flat, teacher_flat), atol=1e-12)
    # compute() keeps returning the student x teacher map.
    plain = LayerDiagnostics(None, max_frames=10_000).compute(_Student(), teacher, _BATCH)
    assert torch.equal(plain, maps.student_teacher)


def test_one_map_per_run_panels_render(tmp_path):
    panels = [
        ("a", torch.rand(5, 5).tolist(), {}),
        ("b", torch.rand(3, 3).tolist(), {}),
        ("c", torch.rand(4, 9), {1: 2}),
    ]
    fig = cka_panels(panels, "student layer")
    fig.savefig(tmp_path / "panels.png")
    maps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in maps] == ["a", "b", "c"] and len(fig.axes) == 3 + 1  # one shared colour bar
    assert {im.get_clim() for ax in maps for im in ax.images} == {(0.0, 1.0)}  # one colour scale


class _Metrics:
    def __init__(self):
        self.writer, self.values, self.images, self.tensors = object(), {}, [], {}

    def scalars(self, step, values):
        self.values.update(values)

    def image(self, tag, image, step):
        self.images.append((tag, image.shape, step, image.dtype.name))

    def tensor(self, tag, tensor, step):
        self.tensors[tag] = (step, tensor)


def test_logging_the_map_keeps_the_matplotlib_backend_of_the_process(monkeypatch):
    import matplotlib

    # A notebook's interactive backend stands in as "template": drawing the map must not switch it to Agg.
    before = matplotlib.get_backend()
    matplotlib.use("template")
    try:
        diagnostics = LayerDiagnostics(None, batch={"audio": None})
        student_student = torch.tensor(
            [[1.0, 0.5, 0.4, 0.3], [0.5, 1.0, 0.9, 0.2], [0.4, 0.9, 1.0, 0.6], [0.3, 0.2, 0.6, 1.0]],
            dtype=torch.float64,
        )
        maps = CkaMaps(torch.rand(4, 5, dtype=torch.float64), student_student)
        monkeypatch.setattr(diagnostics, "compute_maps", lambda *a, **k: maps)
        student = type("Student", (), {"depth": 3, "loss_kind": "l2l", "supervised": [0, 2], "teacher_layers": [2, 4]})
        metrics = _Metrics()
        assert diagnostics.run(student, None, metrics, step=7) is maps.student_teacher
        assert matplotlib.get_backend() == "template"
    finally:
        matplotlib.use(before)
    assert set(metrics.values) == {
        "diag/cka_L2",
        "diag/cka_L4",
        "diag/cka_student_adjacent",
        "diag/cka_student_first_last",
    }
    # Layers 1..3 (row 0 is the input of layer 1): neighbours (1, 2) and (2, 3), first and last (1, 3).
    assert metrics.values["diag/cka_student_adjacent"] == pytest.approx((0.9 + 0.6) / 2)
    assert metrics.values["diag/cka_student_first_last"] == pytest.approx(0.2)
    assert [(tag, step, len(shape), shape[2], dtype) for tag, shape, step, dtype in metrics.images] == [
        ("diag/cka", 7, 3, 3, "uint8"),
        ("diag/cka_student", 7, 3, 3, "uint8"),
    ]
    assert metrics.tensors[MATRIX_TAGS["student_student"]][1] is student_student
    step, logged = metrics.tensors[MATRIX_TAGS["student_teacher"]]
    assert step == 7 and logged is maps.student_teacher
    assert diagnostics.last_student is student_student
