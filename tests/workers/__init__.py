"""Scripts the multi-rank tests run under torchrun, one process per rank (tests.helpers.run_worker).

Each takes argparse flags and ``--out FILE`` and ends with write_all_ranks (protocol.py):
rank 0 writes every rank's result to FILE as one JSON list. A package, so a worker imports
its helpers as ``tests.workers.<name>``: the repo root must be on PYTHONPATH, as
tests.helpers.child_env sets it. By hand, from the repo root:
    PYTHONPATH=. torchrun --standalone --nproc_per_node 2 tests/workers/<name>.py ... --out result.json

The exception: survivor_exit.py runs as plain processes (no launcher: torchrun would end the survivor itself when
a rank dies) and is judged by its exit code and stderr, not a result file.
"""
