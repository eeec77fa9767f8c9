"""Progress lines: at most one per interval, none for a short stage, plain lines."""

from __future__ import annotations

import logging

import pytest

from dcmsort import progress
from dcmsort.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.INFO, logger="test.progress")
    return logging.getLogger("test.progress")


def test_a_stage_shorter_than_the_interval_prints_nothing(log, caplog, capsys):
    clock = Clock()
    bar = Progress("extract", 1000, log, every=5, console=True, clock=clock)
    for _ in range(1000):
        clock.now += 0.004  # 4 s in all
        bar.advance()
    bar.finish()
    assert lines(caplog) == []
    assert capsys.readouterr().out == ""


def test_a_long_stage_prints_one_line_per_interval_however_many_files(log, caplog, capsys):
    clock = Clock()
    bar = Progress("transfer", 100_000, log, every=5, console=True, clock=clock)
    for _ in range(100_000):
        clock.now += 0.0003  # 30 s in all
        bar.advance()
    bar.finish()
    logged = lines(caplog)
    assert 5 <= len(logged) <= 7  # one per 5 s, and the last
    assert logged[0].startswith("transfer: 16,667 of 100,000 files (17%), 3,333 files/s, about")
    assert logged[-1] == "transfer: 100,000 of 100,000 files (100%), 3,333 files/s"
    out = capsys.readouterr().out
    assert out.splitlines() == [f"dcmsort {line}" for line in logged]
    assert "\r" not in out


def test_the_console_gets_nothing_unless_asked(log, caplog, capsys, monkeypatch):
    monkeypatch.delenv(progress.CONSOLE_ENV, raising=False)
    clock = Clock()
    bar = Progress("plan", 10, log, every=1, clock=clock)
    clock.now += 2
    bar.advance(10)
    bar.finish()
    assert len(lines(caplog)) == 1  # the job's log has it, the console not
    assert capsys.readouterr().out == ""


def test_the_interval_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.EVERY_ENV, "0.5")
    assert progress.every_s() == 0.5
    for bad in ("soon", "-1", ""):
        monkeypatch.setenv(progress.EVERY_ENV, bad)
        assert progress.every_s() == progress.EVERY_S


def test_a_closed_console_does_not_fail_the_stage(log, caplog, monkeypatch):
    class Closed:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise ValueError("no descriptor")

    monkeypatch.setattr("sys.stdout", Closed())
    clock = Clock()
    bar = Progress("extract", 10, log, every=0, console=True, clock=clock)
    bar.advance(5)
    bar.advance(5)
    assert not bar.console
    assert len(lines(caplog)) == 2  # the log goes on
