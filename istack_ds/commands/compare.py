"""`istack compare`: compare training runs from their TensorBoard logs: one plot, one markdown table.

Usage (`python tools/compare_runs.py` takes the same arguments):
    istack compare runs/paper_cpu/* --out docs/paper_cpu
    istack compare runs/a runs/b --out /tmp/cmp --baseline runs/a

Each RUN_DIR is a run directory (`<out_dir>` of a config: tb/ and config.yaml).
Writes into --out:
    comparison.png   train / valid loss against wall time and against step, depth against step,
                     and the CKA of the last target's supervised layer (when logged)
    comparison.md    the table below
    comparison.json  the same numbers, machine-readable

Table columns, and how each number is computed:
    wall time       seconds from the run's first TensorBoard event to its last `train/loss` event
    final valid     the last `valid/loss`
    speed-up, equal steps
                    T_base(N) / T_run(N): wall time to reach step N, N = the last step both runs
                    logged `train/loss` at (interpolated linearly between logged steps)
    speed-up, equal valid loss
                    T_base(L*) / T_run(L*), L* = the baseline's final valid loss; T(L*) = the
                    wall time at which the run's valid loss first reaches <= L*, interpolated
                    linearly between the two evaluations around the crossing ("not reached"
                    when it never does)
The baseline is the run with growth.operator `none` (full depth from step 0), or --baseline.
Idempotent: re-running overwrites the three files.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Run:
    path: Path
    name: str
    operator: str
    t0: float
    series: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    """tag -> [(step, wall time since t0, value)], increasing steps, as TensorBoard shows them (:func:`shown`)."""

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
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    raw = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    if not raw or not any(raw.values()):
        raise SystemExit(f"{tb} holds no scalars")
    t0 = min(e.wall_time for events in raw.values() for e in events)
    series = {tag: [(e.step, e.wall_time - t0, e.value) for e in shown(events)] for tag, events in raw.items()}
    return Run(path=path, name=name, operator=operator, t0=t0, series=series)


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
        row = {
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
        "speed-up, equal steps | speed-up, equal valid loss | steps to baseline loss | CKA supervised |"
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
            f"{_fmt(r.get('steps_to_target'), '.0f')} | {_fmt(r['final_cka_supervised'], '.3f')} |"
        )
    if base is not None and "target_valid_loss" in base:
        lines.append("")
        lines.append(
            f"Baseline: `{base['run']}`. Equal valid loss: the time to reach the baseline's final valid "
            f"loss {base['target_valid_loss']:.4f}; equal steps: the time to step {base.get('equal_steps')}."
        )
    return "\n".join(lines) + "\n"


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


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with tb/ and config.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="run directory of the baseline (default: the run with growth.operator none)",
    )
    args = parser.parse_args(argv)

    runs = [read_run(p) for p in args.runs]
    if args.baseline is not None:
        baseline = next((r for r in runs if r.path.resolve() == args.baseline.resolve()), None)
        if baseline is None:
            raise SystemExit(f"--baseline {args.baseline} is not one of the runs compared")
    else:
        baseline = next((r for r in runs if r.operator == "none"), None)
        if baseline is None:
            print("compare_runs: no run with growth.operator none: speed-ups are not computed", file=sys.stderr)
    rows = summarize(runs, baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (args.out / "comparison.md").write_text(table)
    (args.out / "comparison.json").write_text(json.dumps(rows, indent=1))
    plot(runs, args.out / "comparison.png")
    print(table)
    print(f"wrote {args.out / 'comparison.md'}, {args.out / 'comparison.json'} and {args.out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
