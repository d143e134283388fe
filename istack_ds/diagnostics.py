"""Layer diagnostics: linear CKA between every student layer and every teacher layer.

Interleaved stacking claims that a growth keeps every layer "in its place":
the clones of student layer i sit right after it and still resemble the same
teacher layers. The CKA map makes that visible. Every ``eval.every`` steps,
on one fixed validation batch, :class:`LayerDiagnostics` computes the linear
CKA (Kornblith et al. 2019) between every student hidden state and every
teacher hidden state, over the valid (unpadded) frames, and logs

- ``diag/cka`` (image): the heatmap, student layers (rows) x teacher layers (columns);
- ``diag/cka_<s>_<t>`` (scalar) for each supervised pair: student layer s
  (1-indexed, as HF ``hidden_states[s]``) and its teacher layer t;
- ``diag/cka_L<t>`` (scalar): the same value under a name that does not change
  when growth moves the supervised layer (the curve follows the lineage).

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

import torch

from .models.sfm import length_mask

log = logging.getLogger("istack_ds")


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


def cka_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """CKA of every x in `xs` against every y in `ys` (all [n, d_i], same n) -> [len(xs), len(ys)] float64.

    Each centred Gram matrix is computed once and normalised, so the whole map is one matmul.
    A constant representation (zero Gram matrix) gets CKA 0.
    """

    def normalised(feats):
        grams = torch.stack([_centered_gram(f).flatten() for f in feats])
        return grams / grams.norm(dim=1, keepdim=True).clamp(min=1e-30)

    return (normalised(xs) @ normalised(ys).T).clamp(0.0, 1.0)


def valid_frames(hidden: torch.Tensor, frame_lens: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] -> [n, H]: the frames of every utterance that are not padding."""
    return hidden[length_mask(frame_lens.to(hidden.device), hidden.shape[1])]


def subsample(n: int, max_frames: int) -> torch.Tensor:
    """Evenly spaced frame indices (deterministic): at most `max_frames` of `n`."""
    if n <= max_frames:
        return torch.arange(n)
    return torch.linspace(0, n - 1, max_frames).round().long()


# ---- the heatmap --------------------------------------------------------------------


def cka_figure(cka: torch.Tensor, supervised: dict[int, int], title: str = ""):
    """A matplotlib figure of the CKA map; supervised pairs {student_index: teacher_index} are boxed.

    The figure has its own Agg canvas and is unknown to pyplot: nothing here selects a backend or
    keeps the figure alive after its last reference (a notebook that imports this keeps its own).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    s, t = cka.shape
    fig = Figure(figsize=(1.6 + 0.32 * t, 1.2 + 0.3 * s), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(cka.numpy(), origin="lower", vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xlabel("teacher layer (0 = input of layer 1)")
    ax.set_ylabel("student layer")
    ax.set_xticks(range(t))
    ax.set_yticks(range(s))
    ax.tick_params(labelsize=7)
    for si, ti in supervised.items():
        ax.add_patch(Rectangle((ti - 0.5, si - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="linear CKA")
    fig.tight_layout()
    return fig


def figure_image(fig):
    """The figure drawn by its Agg canvas: a numpy array [H, W, 3] of uint8 RGB."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ---- in the training loop -------------------------------------------------------------


class LayerDiagnostics:
    """CKA map of the student against the teacher on one fixed validation batch.

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
    def compute(self, student, teacher, batch: dict, matrix: bool = True) -> torch.Tensor | None:
        """[depth + 1, teacher_layers + 1] CKA map (float64, CPU). Every rank must call it under ZeRO-3.

        `matrix=False` runs the forward passes only (what ranks other than 0 need to do).
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

        return cka_matrix(flat(student_hidden), flat(teacher_hidden))

    def run(self, student, teacher, metrics, step: int) -> torch.Tensor | None:
        """Computes the map and logs it (rank 0 writes through ``metrics.writer``); returns it."""
        batch = self.batch()
        if batch is None:
            return None
        from .dist import is_main

        # NOTE: every rank runs the student forward (a collective under ZeRO-3); rank 0 alone builds the map.
        cka = self.compute(student, teacher, batch, matrix=is_main())
        if cka is None:
            return None
        self.last = cka
        pairs = supervised_pairs(student)
        values = {f"diag/cka_{s + 1}_{t}": float(cka[s + 1, t]) for s, t in pairs.items()}
        values.update({f"diag/cka_L{t}": float(cka[s + 1, t]) for s, t in pairs.items()})
        metrics.scalars(step, values)
        writer = getattr(metrics, "writer", None)
        if writer is not None:
            fig = cka_figure(
                cka,
                {s + 1: t for s, t in pairs.items()},
                f"step {step}, depth {student.depth}: linear CKA, student x teacher",
            )
            # NOTE: not writer.add_figure: it imports pyplot and closes the figure through it.
            writer.add_image("diag/cka", figure_image(fig), step, dataformats="HWC")
        return cka


def supervised_pairs(student) -> dict[int, int]:
    """{supervised student layer (0-indexed): its teacher layer} of an l2l student; {} otherwise."""
    if getattr(student, "loss_kind", "l2l") != "l2l":
        return {}
    return dict(zip(student.supervised, student.teacher_layers))
