"""Progress of a long stage, at a steady rate, readable in a terminal and in a job log.

One line every few seconds (never more often), e.g.::

    extract: 48,000 of 100,000 files (48%), 3,950 files/s, about 13 s left

Plain lines, no carriage returns: a cluster job's log and ``tail -f`` show the same.
"""

from __future__ import annotations

import logging
import resource
import time

EVERY_S = 5.0


class Progress:
    """Counts work done and logs a line at most every ``every`` seconds."""

    def __init__(self, stage: str, total: int, log: logging.Logger, every: float = EVERY_S):
        self.stage, self.total, self.log, self.every = stage, total, log, every
        self.done = 0
        self.started = self.last = time.monotonic()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = (
            f", about {(self.total - self.done) / rate:,.0f} s left"
            if rate > 0 and self.done < self.total
            else ""
        )
        return (
            f"{self.stage}: {self.done:,} of {self.total:,} files{percent}, "
            f"{rate:,.0f} files/s{left}"
        )

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line())

    def finish(self) -> None:
        if time.monotonic() - self.started >= self.every:
            self.log.info("%s", self.line())


def peak_rss_mb() -> int:
    """This process's peak resident memory: every stage logs it last, so a cluster's
    mem_mb can be set from a real run (and the benchmark reads it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
