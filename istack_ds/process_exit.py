"""How a rank of a multi-rank run ends after a failure or a preemption: flushed, its run lock released, then
``os._exit``, skipping the interpreter's finalization.

NOTE: after a failed collective (a peer SIGKILLed) the process group's C++ objects are left with broken pairs and
pending work; destroying them in the interpreter's finalization can abort the process ("terminate called without
an active exception", SIGABRT, rc 134) after the exit code was chosen and the message printed. A process whose
message is out and whose files are written has nothing left to finalize, so it ends here instead
(tests/workers/protocol.py's write_all_ranks does the same for the test workers).
"""

from __future__ import annotations

import logging
import os
import sys


def exit_now(code: int) -> None:
    """Flushes stdout, stderr and the log handlers, releases this process's run lock, and exits with `code`."""
    from .run_lock import release_held

    for flush in (sys.stdout.flush, sys.stderr.flush, logging.shutdown):
        try:
            flush()
        except Exception:  # noqa: BLE001 -- a closed stream must not keep the process from ending
            pass
    release_held()
    os._exit(code)
