"""Where a rank's main thread waits, for its heartbeat: a survivor of a failed collective reads the other ranks'
phases and names the rank that waits for its data loader while the others wait for it in a collective.

A phase is a name and the time it began: ``data`` while the training loop waits for the DataLoader's next batch
(:class:`istack_ds.data.loader.ShardLoader`), ``save`` while it writes a checkpoint and ``validate`` while it
validates (:class:`istack_ds.trainer.Trainer`), ``step`` otherwise (computing, in a training step's collectives).
The heartbeat thread (:class:`istack_ds.dist.Heartbeat`) writes ``"<name> <seconds in it>"`` under PHASE_KEY every beat;
:func:`describe` turns the other ranks' entries into the survivor's words.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASE_KEY = "istack_ds/phase/{rank}"
"""The store key of a rank's phase."""
STEP = "step"
"""The phase outside any named wait (computing, a training step's collectives)."""
_WORDS = {
    "data": "waits for its data loader's next batch (a shard read hangs or is slow)",
    "save": "is writing a checkpoint (a slow, hung or full file system)",
    "validate": "is validating (held-out shards read and scored)",
}

_now: tuple[str, float] = (STEP, time.time())


def current() -> str:
    """This rank's phase and the whole seconds it has been in it, as the heartbeat writes them."""
    name, since = _now
    return f"{name} {time.time() - since:.0f}"


@contextmanager
def waiting(name: str) -> Iterator[None]:
    """This rank is in phase `name` while inside (the phase before it afterwards)."""
    global _now
    before = _now
    _now = (name, time.time())
    try:
        yield
    finally:
        _now = before


def describe(phases: dict[int, str | None]) -> str:
    """The ranks of `phases` (rank -> what the heartbeat wrote, None where nothing) in a named wait, in words;
    "" when none is."""
    parts = []
    for r, value in sorted(phases.items()):
        name, _, seconds = (value or STEP).partition(" ")
        if name != STEP:
            parts.append(f"rank {r} {_WORDS.get(name, f'is in {name}')} for {seconds or '?'} s")
    return "; ".join(parts)
