"""Scripts the multi-rank tests run under torchrun (tests.helpers.run_worker), one process per rank.

A package, so a worker imports its helpers as ``tests.workers.<name>``: the child processes
have the repo root on PYTHONPATH (tests.helpers.child_env).
"""
