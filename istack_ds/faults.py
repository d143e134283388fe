"""Fault injection for the resilience tests, off unless ISTACK_FAULTS is set.

``ISTACK_FAULTS="nan@5,6;crash_in_save@8;die@6:1"`` makes the loss non-finite at
steps 5 and 6, kills the process in the middle of the save at step 8, and kills
rank 1 with SIGKILL at step 6. Each entry is ``kind@step[,step...][:rank]``.
The hooks sit where a real fault would strike, so the tests exercise the real
recovery paths.
"""

from __future__ import annotations

import os
import signal

from .dist import rank as this_rank


def _parse(spec: str) -> list[tuple[str, set[int], int | None]]:
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        kind, _, rest = entry.partition("@")
        steps, _, rank = rest.partition(":")
        out.append((kind, {int(s) for s in steps.split(",") if s}, int(rank) if rank else None))
    return out


def active(kind: str, step: int) -> bool:
    spec = os.environ.get("ISTACK_FAULTS")
    if not spec:
        return False
    rank = this_rank()
    return any(k == kind and step in steps and (r is None or r == rank) for k, steps, r in _parse(spec))


def maybe(kind: str, step: int) -> None:
    """Strikes a process-ending fault (`crash_in_save`, `die`) when one is configured for this step."""
    if active(kind, step):
        if kind == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(17)
