"""How a rank ends (istack_ds/process_exit.py): the exit comes whatever its clean-up meets."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from istack_ds.preemption import NOT_SAVED
from tests.helpers import ROOT, child_env

# A rank whose run lock sits on a hung file system: releasing it never returns.
HUNG = """
import sys, threading
sys.path.insert(0, {root!r})
from istack_ds import preemption, run_lock
run_lock.release_held = lambda: threading.Event().wait()
preemption.install(1, 0, 1)
print("armed", flush=True)
threading.Event().wait()
"""


def test_the_grace_period_ends_the_process_when_releasing_the_run_lock_hangs(tmp_path):
    """The grace bound exists for a hung file system; its exit released the lock (a file in the run directory)
    before ``os._exit``, so a hung release kept the process alive for good."""
    script = tmp_path / "hung.py"
    script.write_text(HUNG.format(root=str(ROOT)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "armed"
        start = time.time()
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=15) == NOT_SAVED
        assert time.time() - start < 12
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
