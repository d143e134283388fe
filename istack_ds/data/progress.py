"""The progress line of a long sharding run: shards, hours written of the total, audio rate, ETA, cuts skipped."""

from __future__ import annotations

import sys
import time


class Progress:
    """One line: shards, hours written of the total, audio s per wall s, ETA, and the cuts skipped so far when any.

    Overwrites itself on a tty.
    """

    def __init__(self, label: str, shards: int, total_seconds: float, stream=None, every: float = 5.0):
        self.label, self.shards, self.total = label, shards, total_seconds
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.t0, self.last = every, time.monotonic(), -1e9
        self.done = self.written_shards = 0
        self.done_s = self.written_s = 0.0
        self.skipped = 0

    def update(self, seconds: float, written: bool, skipped: int = 0) -> None:
        """One shard done: `seconds` of audio in it, `written` (or kept), `skipped` cuts left out of it."""
        self.done += 1
        self.done_s += seconds
        self.skipped += skipped
        if written:
            self.written_shards += 1
            self.written_s += seconds
        now = time.monotonic()
        if self.tty or now - self.last >= self.every or self.done == self.shards:
            self.last = now
            self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
            if self.tty and self.done == self.shards:
                self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-6, (now or time.monotonic()) - self.t0)
        rate = self.written_s / elapsed  # audio seconds written per wall second
        left = self.total - self.done_s
        eta = (
            "0:00:00"
            if left <= 0 or self.done >= self.shards
            else (time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "?")
        )
        return (
            f"{self.label}: {self.done}/{self.shards} shards ({self.done - self.written_shards} already there), "
            f"{self.done_s / 3600:.2f}/{self.total / 3600:.2f} h, {rate:.0f} audio s/s, ETA {eta}"
            + (f", {self.skipped} cuts skipped" if self.skipped else "")
        )


class Ticker:
    """A count of items done (files read, shards checked), a line every `every` seconds and at the end.

    `total` None: the count alone (a stream of unknown length, e.g. files found while walking a tree).
    """

    def __init__(self, label: str, unit: str, total: int | None = None, stream=None, every: float = 5.0):
        self.label, self.unit, self.total = label, unit, total
        self.stream = stream if stream is not None else sys.stderr
        self.every, self.t0, self.last = every, time.monotonic(), time.monotonic()
        self.done = 0

    def tick(self, note: str = "") -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            self.stream.write(self.line(now, note) + "\n")
            self.stream.flush()

    def line(self, now: float, note: str = "") -> str:
        elapsed = max(1e-6, now - self.t0)
        rate = self.done / elapsed
        of = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and rate > 0:
            eta = ", ETA " + time.strftime("%H:%M:%S", time.gmtime(max(0, self.total - self.done) / rate))
        return f"{self.label}: {self.done}{of} {self.unit}, {rate:.1f}/s{eta}" + (f", {note}" if note else "")
