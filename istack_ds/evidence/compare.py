"""Training runs compared from their TensorBoard logs: the runs read as TensorBoard shows them, the speed-ups over
a baseline (at equal steps, at equal valid loss), and the figures and table ``istack compare`` writes.

What each number is and how it is computed: the usage of ``istack compare`` (:mod:`istack_ds.commands.compare`).
The CKA maps are the tensors the layer diagnostics (:mod:`istack_ds.diagnostics`) write into tb/ at each
validation; the TensorBoard events are their only store.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from istack_ds.tbview import find_events


@dataclass
class Run:
    path: Path
    name: str
    operator: str
    t0: float
    series: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    """tag -> [(step, wall time since t0, value)], increasing steps, as TensorBoard shows them (:func:`shown`)."""
    matrices: dict[str, tuple[int, list[list[float]]]] = field(default_factory=dict)
    """CKA map name (``student_student``, ``student_teacher``) -> (step, rows) of its last shown event."""
    pairs: dict[int, dict[int, int]] = field(default_factory=dict)
    """step -> {student layer: teacher layer} supervised at that step's CKA map (``diag/cka_pairs``)."""

    def get(self, tag: str) -> list[tuple[int, float, float]]:
        return self.series.get(tag, [])


def shown(events) -> list:
    """The events of one tag that TensorBoard shows: in the order written, each one drops every earlier
    event at its step or a later one (a resume logs steps after its checkpoint again).

    Runs written since Metrics sets ``purge_step`` are already purged when read (EventAccumulator drops
    what the resume's START event supersedes); older runs and an event re-written at the same step
    (a re-done validation) need this rule, which is the one TensorBoard's data server applies per tag.
    """
    kept: list = []
    for e in sorted(events, key=lambda e: e.wall_time):  # stable: the file order for equal times
        while kept and kept[-1].step >= e.step:
            kept.pop()
        kept.append(e)
    return kept


def read_run(path: str | Path) -> Run:
    """Reads every scalar of RUN_DIR/tb (all event files: a resumed run has several), as TensorBoard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(path)
    tb = path / "tb"
    if not tb.is_dir():
        raise SystemExit(f"{path} has no tb/ directory: not an istack_ds run directory")
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    name = config.get("run", {}).get("name") or path.name
    operator = config.get("growth", {}).get("operator", "?")
    events = find_events(tb, config.get("run", {}).get("name") or "")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    raw = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    if not raw or not any(raw.values()):
        raise SystemExit(f"{tb} holds no scalars")
    t0 = min(e.wall_time for events in raw.values() for e in events)
    series = {tag: [(e.step, e.wall_time - t0, e.value) for e in shown(events)] for tag, events in raw.items()}
    run = Run(path=path, name=name, operator=operator, t0=t0, series=series, matrices=read_matrices(acc))
    run.pairs = read_pairs(acc)
    return run


def read_pairs(acc) -> dict[int, dict[int, int]]:
    """The supervised pairs of each CKA map: {step: {student layer: teacher layer}} (``diag/cka_pairs``)."""
    from tensorboard.util.tensor_util import make_ndarray

    from istack_ds.diagnostics import PAIRS_TAG

    if PAIRS_TAG not in acc.Tags().get("tensors", []):
        return {}
    return {
        int(e.step): {int(s): int(t) for s, t in make_ndarray(e.tensor_proto)} for e in shown(acc.Tensors(PAIRS_TAG))
    }


def read_matrices(acc) -> dict[str, tuple[int, list[list[float]]]]:
    """The last shown CKA map of each name in :data:`istack_ds.diagnostics.MATRIX_TAGS`: (step, rows)."""
    from tensorboard.util.tensor_util import make_ndarray

    from istack_ds.diagnostics import MATRIX_TAGS

    tags = set(acc.Tags().get("tensors", []))
    out = {}
    for name, tag in MATRIX_TAGS.items():
        events = shown(acc.Tensors(tag)) if tag in tags else []
        if events:
            matrix = make_ndarray(events[-1].tensor_proto)
            if matrix.ndim != 2:
                raise SystemExit(f"{tag} at step {events[-1].step} is not a matrix: shape {matrix.shape}")
            out[name] = (int(events[-1].step), matrix.tolist())
    return out


# ---- the arithmetic -------------------------------------------------------------------


def time_at_step(points: list[tuple[int, float, float]], step: int) -> float | None:
    """Wall time at `step`, linearly interpolated between logged steps (None outside them)."""
    for (s0, t0, _), (s1, t1, _) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)
    if points and points[-1][0] == step:
        return points[-1][1]
    return None


def time_to_loss(points: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    """(wall time, step) when the loss first reaches <= target, interpolated between evaluations."""
    prev = None
    for step, t, value in points:
        if value <= target:
            if prev is None or prev[2] == value:
                return t, float(step)
            frac = (prev[2] - target) / (prev[2] - value)
            return prev[1] + (t - prev[1]) * frac, prev[0] + (step - prev[0]) * frac
        prev = (step, t, value)
    return None


def summarize(runs: list[Run], baseline: Run | None) -> list[dict]:
    """One row per run: wall time, final losses, depth, speed-ups over `baseline`."""
    rows = []
    base_train = baseline.get("train/loss") if baseline else []
    base_valid = baseline.get("valid/loss") if baseline else []
    target = base_valid[-1][2] if base_valid else None
    base_t_loss = time_to_loss(base_valid, target) if target is not None else None
    for run in runs:
        train, valid = run.get("train/loss"), run.get("valid/loss")
        depth = run.get("model/depth")
        row: dict[str, Any] = {
            "run": run.name,
            "path": str(run.path),
            "operator": run.operator,
            "steps": train[-1][0] if train else None,
            "wall_s": train[-1][1] if train else None,
            "final_depth": int(depth[-1][2]) if depth else None,
            "final_train_loss": train[-1][2] if train else None,
            "final_valid_loss": valid[-1][2] if valid else None,
            "baseline": run is baseline,
        }
        cka = [v[-1][2] for tag, v in run.series.items() if tag.startswith("diag/cka_L") and v]
        row["final_cka_supervised"] = sum(cka) / len(cka) if cka else None
        adjacent = run.get("diag/cka_student_adjacent")
        row["final_cka_student_adjacent"] = adjacent[-1][2] if adjacent else None
        for name, (step, matrix) in run.matrices.items():
            row[f"cka_{name}_step"] = step
            row[f"cka_{name}"] = matrix
        if baseline is not None and train and base_train:
            n = min(train[-1][0], base_train[-1][0])
            t_run, t_base = time_at_step(train, n), time_at_step(base_train, n)
            row["equal_steps"] = n
            row["speedup_equal_steps"] = t_base / t_run if t_run and t_base is not None else None
        if target is not None and base_t_loss is not None:
            reached = time_to_loss(valid, target)
            row["target_valid_loss"] = target
            row["time_to_target_s"] = reached[0] if reached else None
            row["steps_to_target"] = reached[1] if reached else None
            row["speedup_equal_loss"] = base_t_loss[0] / reached[0] if reached and reached[0] > 0 else None
        rows.append(row)
    return rows


def _fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["baseline"]), None)
    head = (
        "| run | operator | steps | final depth | wall time (s) | final train loss | final valid loss | "
        "speed-up, equal steps | speed-up, equal valid loss | steps to baseline loss | CKA supervised | "
        "CKA neighbours |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        speed_loss = (
            _fmt(r.get("speedup_equal_loss"), ".2f") + "x"
            if r.get("speedup_equal_loss")
            else ("not reached" if "target_valid_loss" in r else "—")
        )
        speed_steps = _fmt(r.get("speedup_equal_steps"), ".2f") + "x" if r.get("speedup_equal_steps") else "—"
        lines.append(
            f"| {r['run']}{' (baseline)' if r['baseline'] else ''} | {r['operator']} | {_fmt(r['steps'], 'd')} | "
            f"{_fmt(r['final_depth'], 'd')} | {_fmt(r['wall_s'], '.1f')} | {_fmt(r['final_train_loss'], '.4f')} | "
            f"{_fmt(r['final_valid_loss'], '.4f')} | {speed_steps} | {speed_loss} | "
            f"{_fmt(r.get('steps_to_target'), '.0f')} | {_fmt(r['final_cka_supervised'], '.3f')} | "
            f"{_fmt(r['final_cka_student_adjacent'], '.3f')} |"
        )
    if base is not None and "target_valid_loss" in base:
        lines.append("")
        lines.append(
            f"Baseline: `{base['run']}`. Equal valid loss: the time to reach the baseline's final valid "
            f"loss {base['target_valid_loss']:.4f}; equal steps: the time to step {base.get('equal_steps')}."
        )
    lines.append("")
    lines.append(
        "CKA supervised: the mean of the last `diag/cka_L<t>`; CKA neighbours: the last "
        "`diag/cka_student_adjacent`, the mean linear CKA of student layers s and s + 1."
    )
    return "\n".join(lines) + "\n"


CKA_FIGURES = {
    "student_student": ("cka_student.png", "student layer x student layer linear CKA"),
    "student_teacher": ("cka_teacher.png", "student layer x teacher layer linear CKA (supervised pairs boxed)"),
}
"""CKA map name -> (file written into --out, what it shows)."""


def figures_section(runs: list[Run], written: list[str]) -> str:
    """The markdown that lists the figures, the validation step each run's CKA maps are from, and the runs without."""
    lines = ["", "## Figures", "", "- `comparison.png`: losses against wall time and step, depth, supervised CKA"]
    for name, (filename, what) in CKA_FIGURES.items():
        if filename not in written:
            lines.append(f"- no `{filename}`: no run logged `{name}` CKA maps (`eval.diagnostics`)")
            continue
        have = [f"{r.name} (step {r.matrices[name][0]})" for r in runs if name in r.matrices]
        lines.append(f"- `{filename}`: {what} at each run's last validation: {', '.join(have)}")
        missing = [r.name for r in runs if name not in r.matrices]
        if missing:
            lines.append(f"  - not logged, no panel: {', '.join(missing)}")
    return "\n".join(lines) + "\n"


def supervised_at(run: Run, step: int) -> dict[int, int]:
    """{student layer: teacher layer} supervised at `step`: from ``diag/cka_pairs``, or for runs written before
    it from the ``diag/cka_<s>_<t>`` scalars logged at `step`."""
    if step in run.pairs:
        return run.pairs[step]
    pairs = {}
    for tag, points in run.series.items():
        match = re.fullmatch(r"diag/cka_(\d+)_(\d+)", tag)
        if match and any(p[0] == step for p in points):
            pairs[int(match.group(1))] = int(match.group(2))
    return pairs


def plot_cka(runs: list[Run], out: Path) -> list[str]:
    """Writes one figure per CKA map name that some run logged (a panel per run); returns the file names.

    A figure no run has data for is removed from `out`, so the directory matches comparison.md.
    """
    from istack_ds.diagnostics import STUDENT_AXIS, TEACHER_AXIS, cka_panels

    written = []
    for name, (filename, _) in CKA_FIGURES.items():
        panels = []
        for run in runs:
            if name not in run.matrices:
                continue
            step, matrix = run.matrices[name]
            supervised = supervised_at(run, step) if name == "student_teacher" else {}
            panels.append((f"{run.name} ({run.operator})\nstep {step}, depth {len(matrix) - 1}", matrix, supervised))
        if not panels:
            (out / filename).unlink(missing_ok=True)
            continue
        fig = cka_panels(panels, STUDENT_AXIS if name == "student_student" else TEACHER_AXIS)
        fig.savefig(out / filename)
        written.append(filename)
    return written


# ---- the plot -------------------------------------------------------------------------


def plot(runs: list[Run], out: Path) -> None:
    # A figure with its own Agg canvas: no pyplot, so a caller's matplotlib backend stays as it is.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        ("train/loss", "wall", "train loss vs wall time"),
        ("train/loss", "step", "train loss vs step"),
        ("model/depth", "step", "depth vs step"),
        ("valid/loss", "wall", "valid loss vs wall time"),
        ("valid/loss", "step", "valid loss vs step"),
        ("diag/cka_L", "step", "CKA, last target's layer"),
    ]
    fig = Figure(figsize=(15, 8), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for ax, (tag, x, title) in zip(axes.flat, panels):
        for run in runs:
            if tag == "diag/cka_L":
                tags = sorted((t for t in run.series if t.startswith(tag)), key=lambda t: int(t.rsplit("L", 1)[1]))
                points = run.get(tags[-1]) if tags else []
            else:
                points = run.get(tag)
            if not points:
                continue
            xs = [p[1] if x == "wall" else p[0] for p in points]
            ys = [p[2] for p in points]
            style = {"drawstyle": "steps-post"} if tag == "model/depth" else {"marker": "." if len(xs) < 30 else None}
            ax.plot(xs, ys, label=f"{run.name} ({run.operator})", linewidth=1.3, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("wall time (s)" if x == "wall" else "step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


# ---- the whole comparison ----------------------------------------------------------------


def pick_baseline(runs: list[Run], path: Path | None) -> Run | None:
    """The run at `path`, or without one the run with growth.operator `none` (full depth from step 0); None when
    there is no such run. Raises SystemExit when `path` is not one of `runs`."""
    if path is None:
        return next((r for r in runs if r.operator == "none"), None)
    baseline = next((r for r in runs if r.path.resolve() == path.resolve()), None)
    if baseline is None:
        raise SystemExit(f"--baseline {path} is not one of the runs compared")
    return baseline


def write_comparison(runs: list[Run], baseline: Run | None, out: Path) -> tuple[str, list[str]]:
    """Writes comparison.{md,json,png} and the CKA figures into `out` (overwriting them); returns the markdown and
    the names of the files written."""
    rows = summarize(runs, baseline)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "comparison.png")
    figures = plot_cka(runs, out)
    table = markdown_table(rows) + figures_section(runs, figures)
    (out / "comparison.md").write_text(table)
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    return table, ["comparison.md", "comparison.json", "comparison.png", *figures]
