"""Layer diagnostics: linear CKA between every student layer and every teacher layer, and between student layers.

Interleaved stacking claims that a growth keeps every layer "in its place":
the clones of student layer i sit right after it and still resemble the same
teacher layers. The CKA maps make that visible. Every ``eval.every`` steps,
on one fixed validation batch, :class:`LayerDiagnostics` computes the linear
CKA (Kornblith et al. 2019) between every student hidden state and every
teacher hidden state, and between every pair of student hidden states (the
paper's layer-similarity analysis: a clone and its source form a bright block),
over the valid (unpadded) frames, from one student forward, and logs

- ``diag/cka`` (image): the heatmap, student layers (rows) x teacher layers (columns), each
  supervised pair (student layer s, 1-indexed as HF ``hidden_states[s]``, and its teacher layer t)
  boxed with its value written in;
- ``diag/cka_L<t>`` (scalar): the CKA of the pair of teacher layer t, under a name that does not
  change when growth moves the supervised layer (one curve that follows the lineage, where a
  scalar per pair would be a new one-point chart at each depth);
- ``diag/cka_student`` (image): student layers x student layers (symmetric, unit diagonal);
- ``diag/cka_student_adjacent`` (scalar): the mean CKA of layers s and s + 1, s = 1 .. depth - 1
  (near 1 right after an interleaved growth, where every clone sits next to its source);
- ``diag/cka_student_first_last`` (scalar): the CKA of layer 1 and layer ``depth`` (how much the
  stack's layers differ);
- ``diag/cka_matrix`` and ``diag/cka_student_matrix`` (tensors, float64): both maps as numbers, what
  ``istack compare`` draws (:data:`MATRIX_TAGS`; TensorBoard events are their only store), and
  ``diag/cka_pairs`` (tensor, int64 [pairs, 2]): the supervised pairs (s, t) it boxes (:data:`PAIRS_TAG`).

Linear CKA is invariant to orthogonal transforms and isotropic scaling of
either representation, so student and teacher widths may differ.

In the trainer (on EVERY rank: under ZeRO-3 the student forward is a
collective; only rank 0 computes the CKA and writes)::

    self.diagnostics = LayerDiagnostics(cfg.data, self.device)               # __init__
    self.diagnostics.run(self.engine.module, self.teacher, self.metrics, self.step)  # validate(), in eval mode
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from .models.sfm import length_mask

log = logging.getLogger("istack_ds")

MATRIX_TAGS = {"student_teacher": "diag/cka_matrix", "student_student": "diag/cka_student_matrix"}
"""TensorBoard tensor tag of each CKA map (rows: student hidden states 0 .. depth)."""

PAIRS_TAG = "diag/cka_pairs"
"""TensorBoard tensor tag of the supervised pairs of each map: int64 [pairs, 2], rows (student layer, teacher layer)."""


# ---- the measure ------------------------------------------------------------------------


def _centered_gram(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the centred features x [n, d] (float64), [n, n]."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples: x [n, d1], y [n, d2] -> [0, 1].

    CKA = <Kc, Lc>_F / (||Kc||_F ||Lc||_F) with Kc, Lc the centred Gram matrices
    (equal to ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) for centred X, Y).
    """
    return float(cka_matrix([x], [y])[0, 0])


def normalised_grams(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """The centred Gram matrix of every representation [n, d_i], flattened and scaled to unit norm: [k, n * n].

    The CKA of two representations is the dot product of their rows. A constant representation
    (zero Gram matrix) keeps a zero row, so its CKA with anything is 0.
    """
    grams = torch.stack([_centered_gram(f).flatten() for f in feats])
    return grams / grams.norm(dim=1, keepdim=True).clamp(min=1e-30)


def cka_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """CKA of every x in `xs` against every y in `ys` (all [n, d_i], same n) -> [len(xs), len(ys)] float64.

    Each centred Gram matrix is computed once and normalised, so the whole map is one matmul.
    A constant representation (zero Gram matrix) gets CKA 0.
    """
    return (normalised_grams(xs) @ normalised_grams(ys).T).clamp(0.0, 1.0)


def self_cka(grams: torch.Tensor) -> torch.Tensor:
    """CKA of every pair of rows of :func:`normalised_grams` -> [k, k], symmetric, 1 on the diagonal
    (0 for a constant representation)."""
    m = grams @ grams.T
    return ((m + m.T) / 2).clamp(0.0, 1.0)  # exactly symmetric: a blocked matmul need not be


def self_cka_matrix(xs: list[torch.Tensor]) -> torch.Tensor:
    """CKA of every x in `xs` against every other (all [n, d_i], same n) -> [len(xs), len(xs)] float64, symmetric."""
    return self_cka(normalised_grams(xs))


def valid_frames(hidden: torch.Tensor, frame_lens: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] -> [n, H]: the frames of every utterance that are not padding."""
    return hidden[length_mask(frame_lens.to(hidden.device), hidden.shape[1])]


def subsample(n: int, max_frames: int) -> torch.Tensor:
    """Evenly spaced frame indices (deterministic): at most `max_frames` of `n`."""
    if n <= max_frames:
        return torch.arange(n)
    return torch.linspace(0, n - 1, max_frames).round().long()


# ---- the heatmap --------------------------------------------------------------------


TEACHER_AXIS = "teacher layer (0 = input of layer 1)"
STUDENT_AXIS = "student layer (0 = input of layer 1)"


def _draw_map(ax, cka, supervised: dict[int, int], xlabel: str, ylabel: str, title: str):
    """One CKA map on `ax`, colours on the fixed scale [0, 1]; returns the image (for a colour bar)."""
    from matplotlib.patches import Rectangle

    rows, cols = cka.shape
    im = ax.imshow(cka, origin="lower", vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.tick_params(labelsize=7)
    for si, ti in supervised.items():
        ax.add_patch(Rectangle((ti - 0.5, si - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        value = float(cka[si][ti])
        ax.text(ti, si, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if value > 0.6 else "white")
    if title:
        ax.set_title(title, fontsize=9)
    return im


def cka_figure(cka: torch.Tensor, supervised: dict[int, int], title: str = "", xlabel: str = TEACHER_AXIS):
    """A matplotlib figure of the CKA map; supervised pairs {student_index: teacher_index} are boxed, their value in.

    Rows are student layers; columns teacher layers, or student layers with ``xlabel=STUDENT_AXIS``.
    The figure has its own Agg canvas and is unknown to pyplot: nothing here selects a backend or
    keeps the figure alive after its last reference (a notebook that imports this keeps its own).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s, t = cka.shape
    # A floor on the size: the title and axis labels of a shallow student still fit.
    fig = Figure(figsize=(max(4.2, 1.6 + 0.32 * t), max(2.6, 1.2 + 0.3 * s)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = _draw_map(ax, cka.numpy(), supervised, xlabel, "student layer", title)
    fig.colorbar(im, ax=ax, fraction=0.05, label="linear CKA")
    fig.tight_layout()
    return fig


def cka_panels(
    panels: Sequence[tuple[str, torch.Tensor | Sequence[Sequence[float]], dict[int, int]]],
    xlabel: str,
    columns: int = 3,
):
    """One CKA map per (title, matrix [rows, cols], supervised pairs) panel, all on the colour scale [0, 1]
    with one colour bar: maps of different runs compare by colour. Same canvas rules as :func:`cka_figure`."""
    import math

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("cka_panels: no map to draw")
    matrices = [np.asarray(matrix, dtype=np.float64) for _, matrix, _ in panels]
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    side = 1.6 + 0.28 * max(max(m.shape) for m in matrices)
    fig = Figure(figsize=(cols * side + 1.2, rows * side), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    images = [
        _draw_map(ax, matrix, supervised, xlabel, "student layer", title)
        for ax, matrix, (title, _, supervised) in zip(axes, matrices, panels)
    ]
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    fig.tight_layout(rect=(0, 0, 1 - 1.0 / (cols * side + 1.2), 1))
    fig.colorbar(images[0], ax=list(axes), fraction=0.03, pad=0.02, label="linear CKA")
    return fig


def figure_image(fig):
    """The figure drawn by its Agg canvas: a numpy array [H, W, 3] of uint8 RGB."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ---- in the training loop -------------------------------------------------------------


@dataclasses.dataclass
class CkaMaps:
    """Both CKA maps of one evaluation (float64, CPU); rows and columns are hidden states 0 .. depth."""

    student_teacher: torch.Tensor
    """[depth + 1, teacher_layers + 1]."""
    student_student: torch.Tensor
    """[depth + 1, depth + 1], symmetric, 1 on the diagonal."""


class LayerDiagnostics:
    """CKA maps of the student against the teacher and against itself on one fixed validation batch.

    The batch is the first batch of the validation shards read as by a single
    process (rank 0 of 1, no crop), so it is the same on every rank and at every
    evaluation. At most `max_frames` valid frames (evenly spaced) enter the CKA.
    """

    def __init__(self, data, device: torch.device | str = "cpu", max_frames: int = 1024, batch: dict | None = None):
        self.data = data
        self.device = torch.device(device)
        self.max_frames = max_frames
        self._batch = batch
        self.last: torch.Tensor | None = None
        """The last student x teacher map."""
        self.last_student: torch.Tensor | None = None
        """The last student x student map."""

    def batch(self) -> dict | None:
        """The fixed batch (read once; None without validation shards)."""
        if self._batch is None and getattr(self.data, "valid_index", None):
            from .data import build_loader

            # One process view of the held-out shards: every rank reads the same first batch.
            data = dataclasses.replace(self.data, num_workers=0)
            loader = build_loader(
                data, data.valid_index, rank=0, world_size=1, seed=0, epochs=1, crop=False, local_world_size=1
            )
            self._batch = next(iter(loader), None)
        return self._batch

    @torch.no_grad()
    def compute_maps(self, student, teacher, batch: dict, matrix: bool = True) -> CkaMaps | None:
        """Both maps from one student forward and one teacher forward. Every rank must call it under ZeRO-3.

        `matrix=False` runs the student forward only (what ranks other than 0 need to do).
        """
        audio = batch["audio"].to(self.device)
        lens = batch["audio_lens"].to(self.device)
        audio = teacher.prepare_input(audio, lens)
        features = None
        if getattr(student, "frontend", "trainable") == "shared":
            features = teacher.cnn(audio)
        student_hidden = (
            student.hidden_states(audio, lens, features) if features is not None else student.hidden_states(audio, lens)
        )
        if not matrix:
            return None
        teacher_hidden = teacher.all_hidden_states(audio, lens)
        frames = teacher.frame_lengths(lens)
        n = int(frames.sum())
        keep = subsample(n, self.max_frames).to(audio.device)

        def flat(hidden):
            return [valid_frames(h.float(), frames)[keep].cpu() for h in hidden]

        # NOTE: each Gram matrix once: the student's serve both maps.
        student_grams = normalised_grams(flat(student_hidden))
        student_teacher = (student_grams @ normalised_grams(flat(teacher_hidden)).T).clamp(0.0, 1.0)
        return CkaMaps(student_teacher, self_cka(student_grams))

    def compute(self, student, teacher, batch: dict, matrix: bool = True) -> torch.Tensor | None:
        """[depth + 1, teacher_layers + 1] student x teacher map (:meth:`compute_maps`)."""
        maps = self.compute_maps(student, teacher, batch, matrix)
        return None if maps is None else maps.student_teacher

    def run(self, student, teacher, metrics, step: int) -> torch.Tensor | None:
        """Computes both maps and logs them (rank 0 writes through ``metrics``); returns the student x teacher map."""
        batch = self.batch()
        if batch is None:
            return None
        from .dist import is_main

        # NOTE: every rank runs the student forward (a collective under ZeRO-3); rank 0 alone builds the maps.
        maps = self.compute_maps(student, teacher, batch, matrix=is_main())
        if maps is None:
            return None
        cka, self_map = maps.student_teacher, maps.student_student
        self.last, self.last_student = cka, self_map
        pairs = supervised_pairs(student)
        values = {f"diag/cka_L{t}": float(cka[s + 1, t]) for s, t in pairs.items()}
        values.update(student_summary(self_map))
        metrics.scalars(step, values)
        for name, tag in MATRIX_TAGS.items():
            metrics.tensor(tag, getattr(maps, name), step)
        metrics.tensor(
            PAIRS_TAG, torch.tensor([[s + 1, t] for s, t in pairs.items()], dtype=torch.int64).view(-1, 2), step
        )
        if getattr(metrics, "writer", None) is not None:
            title = f"step {step}, depth {student.depth}: linear CKA, student x "
            supervised = {s + 1: t for s, t in pairs.items()}
            # NOTE: not writer.add_figure: it imports pyplot and closes the figure through it.
            metrics.image("diag/cka", figure_image(cka_figure(cka, supervised, title + "teacher")), step)
            student_fig = cka_figure(self_map, {}, title + "student", xlabel=STUDENT_AXIS)
            metrics.image("diag/cka_student", figure_image(student_fig), step)
        return cka


def student_summary(self_map: torch.Tensor) -> dict[str, float]:
    """``diag/cka_student_adjacent`` and ``diag/cka_student_first_last`` of a student x student map
    [depth + 1, depth + 1] (row 0, the input of layer 1, is left out); {} below depth 2."""
    depth = self_map.shape[0] - 1
    if depth < 2:
        return {}
    adjacent = torch.diagonal(self_map, offset=1)[1:]  # (s, s + 1), s = 1 .. depth - 1
    return {
        "diag/cka_student_adjacent": float(adjacent.mean()),
        "diag/cka_student_first_last": float(self_map[1, depth]),
    }


def supervised_pairs(student) -> dict[int, int]:
    """{supervised student layer (0-indexed): its teacher layer} of an l2l student; {} otherwise."""
    if getattr(student, "loss_kind", "l2l") != "l2l":
        return {}
    return dict(zip(student.supervised, student.teacher_layers))
