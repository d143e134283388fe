"""`istack compare`: compare training runs from their TensorBoard logs: plots and one markdown table.

Usage (`python tools/compare_runs.py` takes the same arguments):
    istack compare runs/paper_cpu/* --out docs/paper_cpu
    istack compare runs/a runs/b --out /tmp/cmp --baseline runs/a

Each RUN_DIR is a run directory (`<out_dir>` of a config: tb/ and config.yaml).
Writes into --out:
    comparison.png   train / valid loss against wall time and against step, depth against step,
                     and the CKA of the last target's supervised layer (when logged)
    cka_student.png  student layer x student layer linear CKA at each run's last validation, one panel
                     per run, one colour scale (the paper's layer-similarity analysis: a clone and its
                     source form a bright block)
    cka_teacher.png  student layer x teacher layer linear CKA at the same validation (supervised pairs boxed)
    comparison.md    the table below, then the figures and the step each CKA map is from
    comparison.json  the same numbers (the CKA maps too), machine-readable
The CKA maps are the tensors `diag/cka_student_matrix` and `diag/cka_matrix` that the layer
diagnostics (istack_ds/diagnostics.py, `eval.diagnostics`) write into tb/ at each validation: the
TensorBoard events are their only store. A run without them (diagnostics off, or a run older than
them) gets no panel and is named in comparison.md; with none at all the two CKA figures are not written.

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
Idempotent: re-running overwrites these files (and removes a CKA figure no run has data for).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from istack_ds.commands import HelpFormatter


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with tb/ and config.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="run directory of the baseline (default: the run with growth.operator none)",
    )
    args = parser.parse_args(argv)

    from istack_ds.evidence.compare import pick_baseline, read_run, write_comparison

    runs = [read_run(p) for p in args.runs]
    baseline = pick_baseline(runs, args.baseline)
    if baseline is None:
        print("compare_runs: no run with growth.operator none: speed-ups are not computed", file=sys.stderr)
    table, written = write_comparison(runs, baseline, args.out)
    print(table)
    print(f"wrote {', '.join(str(args.out / f) for f in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
