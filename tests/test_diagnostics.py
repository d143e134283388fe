"""The layer diagnostics (istack_ds/diagnostics.py): the properties of linear CKA they rely on, valid frames,
subsampling, the heatmap, and that drawing it leaves the process's matplotlib backend alone."""

import pytest
import torch

from istack_ds.diagnostics import (
    LayerDiagnostics,
    cka_figure,
    cka_matrix,
    figure_image,
    linear_cka,
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


class _Writer:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image.shape, step, dataformats))


class _Metrics:
    def __init__(self):
        self.writer, self.values = _Writer(), {}

    def scalars(self, step, values):
        self.values.update(values)


def test_logging_the_map_keeps_the_matplotlib_backend_of_the_process(monkeypatch):
    import matplotlib

    # A notebook's interactive backend stands in as "template": drawing the map must not switch it to Agg.
    before = matplotlib.get_backend()
    matplotlib.use("template")
    try:
        diagnostics = LayerDiagnostics(None, batch={"audio": None})
        monkeypatch.setattr(diagnostics, "compute", lambda *a, **k: torch.rand(4, 5, dtype=torch.float64))
        student = type("Student", (), {"depth": 3, "loss_kind": "l2l", "supervised": [0, 2], "teacher_layers": [2, 4]})
        metrics = _Metrics()
        diagnostics.run(student, None, metrics, step=7)
        assert matplotlib.get_backend() == "template"
    finally:
        matplotlib.use(before)
    assert set(metrics.values) == {"diag/cka_1_2", "diag/cka_3_4", "diag/cka_L2", "diag/cka_L4"}
    ((tag, shape, step, fmt),) = metrics.writer.images
    assert (tag, step, fmt, len(shape), shape[2]) == ("diag/cka", 7, "HWC", 3, 3)
