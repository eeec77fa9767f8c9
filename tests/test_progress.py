"""Progress lines: at most one per interval, none for a short stage, plain lines; on the
console of a local run (end to end through the real Snakemake)."""

from __future__ import annotations

import logging

import pytest

from conftest import Sorter, assert_every_file_accounted_for, write_dicom
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


# --- end to end: the console of a local run ------------------------------------------------

FOLDERS, PER_FOLDER = 6, 50


def many_files(sorter: Sorter) -> int:
    for folder in range(FOLDERS):
        for number in range(PER_FOLDER):
            write_dicom(
                sorter.input_dir / f"p{folder}" / f"IM{number}.dcm",
                f"P^{folder}",
                str(folder),
                "T1",
                sop=f"1.2.{folder}.{number}",
                instance=number,
            )
    return FOLDERS * PER_FOLDER


def test_a_local_run_shows_progress_lines_on_the_console(sorter, monkeypatch):
    files = many_files(sorter)
    # A line at every step of every stage, as a long stage gives one every 5 s.
    monkeypatch.setenv(progress.EVERY_ENV, "0")
    result = sorter.run()
    lines = result.stdout.splitlines()
    stages = {line.split(":")[0] for line in lines}
    assert stages == {"dcmsort extract", "dcmsort plan", "dcmsort transfer"}, lines
    assert len(lines) >= 3
    assert all(" of " in line and "files/s" in line for line in lines), lines
    assert "\r" not in result.stdout
    # No flood: even a line at every step is a line per folder or per batch of files,
    # never one per file.
    assert len(lines) < files / 5, lines
    # The job's log keeps them too.
    log = next((sorter.state / "logs" / "extract").glob("*.log")).read_text()
    assert "extract: " in log and "files/s" in log
    assert_every_file_accounted_for(sorter)


def test_a_run_shorter_than_the_interval_prints_no_progress_line(sorter, monkeypatch):
    many_files(sorter)
    monkeypatch.delenv(progress.EVERY_ENV, raising=False)
    result = sorter.run()
    assert result.stdout == ""
    assert "files sorted" in result.stderr
