"""Progress of a long stage, at a steady rate, readable in a terminal and in a job log.

One line every few seconds (never more often), e.g.::

    extract: 48,000 of 100,000 files (48%), 3,950 files/s, about 13 s left

A stage that ends within the interval prints none. Plain lines, no carriage returns: a
cluster job's log, ``tail -f`` and a console piped into a file show the same.

Each line goes to the job's log. In a local run it goes to the console too: the Snakefile
sets ``CONSOLE_ENV`` for local runs only (``onstart``), and a local shell job's standard
output is Snakemake's own (the local executor starts it with Snakemake's stdout; the job's
stderr is its log). A cluster job's stdout is the scheduler's log file, which keeps only
the log's lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import time
from collections.abc import Callable

EVERY_S = 5.0
# Seconds between lines (EVERY_S unless set; the tests set it small).
EVERY_ENV = "DCMSORT_PROGRESS_EVERY"
# "1": lines also go to standard output (set by the Snakefile for local runs only).
CONSOLE_ENV = "DCMSORT_PROGRESS_CONSOLE"


def every_s() -> float:
    """The interval between lines: EVERY_ENV, or EVERY_S when unset or not a number >= 0."""
    try:
        every = float(os.environ.get(EVERY_ENV, EVERY_S))
    except ValueError:
        return EVERY_S
    return every if every >= 0 else EVERY_S


class Progress:
    """Counts work done and logs a line at most every ``every`` seconds (``every_s()``
    unless given); with ``console`` (CONSOLE_ENV unless given) the line goes to standard
    output too."""

    def __init__(
        self,
        stage: str,
        total: int,
        log: logging.Logger,
        every: float | None = None,
        console: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stage, self.total, self.log = stage, total, log
        self.every = every_s() if every is None else every
        self.console = os.environ.get(CONSOLE_ENV) == "1" if console is None else console
        self.clock = clock
        self.done = 0
        self.shown = -1  # done as of the last line
        self.started = self.last = clock()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
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

    def _emit(self) -> None:
        self.shown = self.done
        line = self.line()
        self.log.info("%s", line)
        if self.console:
            try:
                sys.stdout.write(f"dcmsort {line}\n")  # one write: whole lines side by side
                sys.stdout.flush()
            except (OSError, ValueError):
                # A console that went away (a closed pipe) must never fail the job, nor
                # the flush of what is left in the buffer at exit.
                self.console = False
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._emit()

    def finish(self) -> None:
        """The last line (the stage's rate), unless the stage was short or it was shown."""
        if self.clock() - self.started >= self.every and self.done != self.shown:
            self._emit()


def peak_rss_mb() -> int:
    """This process's peak resident memory: every stage logs it last, so a cluster's
    mem_mb can be set from a real run (and the benchmark reads it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
