"""The transfer carries out plan rows and commits to the ledger only what is in place.

Real files in a temporary folder throughout; faults the disk would have to produce (a short
write, flipped bytes, a writer appending during the copy) are injected by replacing
``dcmsort.transfer.copy_range``, the one call that moves the bytes and says how many it
wrote, or the system calls under it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import stat
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcmsort import ledger, permissions, transfer
from dcmsort.fileops import TEMP_SUFFIX, copy_range, file_digest, temp_name_for, temp_path_for
from dcmsort.plan import PLAN_SCHEMA
from dcmsort.transfer import (
    CHANGED,
    COPIED,
    DUPLICATE,
    ERROR,
    LINKED,
    PRESENT,
    RELINKED,
    OutputTree,
    Row,
    TransferError,
    pending_rows,
    put,
    transfer_plan,
)

MODES = ["copy", "hardlink", "symlink"]


class Job:
    """An input folder, an output folder, a state folder and a plan, as a run has them."""

    def __init__(self, root: Path):
        self.root = root
        self.input, self.output, self.state = root / "in", root / "out", root / "state"
        for folder in (self.input, self.output, self.state):
            folder.mkdir()
        self.plan_file = self.state / "plan.parquet"

    def add(self, relpath: str, content: bytes | None = None, mode: int = 0o640) -> Path:
        path = self.input / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if content is not None else f"DICOM {relpath}".encode() * 50)
        os.chmod(path, mode)
        os.utime(path, ns=(1_000_000_000, 2_000_000_000))
        return path

    def row(self, relpath: str, destination: str, action: str = "sort", **extra) -> dict:
        """A plan row for the input's current version (as the plan would make it)."""
        info = (self.input / relpath).stat()
        return {
            "folder": relpath.split("/")[0],
            "relpath": relpath,
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "ctime_ns": info.st_ctime_ns,
            "ino": info.st_ino,
            "action": action,
            "destination": destination,
            "committed": False,
            "digest": None,
            "base_folder": destination.rsplit("/", 2)[0],
            "conflict": False,
            "SeriesInstanceUID": "1.2.3",
            "SOPInstanceUID": f"1.2.3.{relpath}",
            "StudyInstanceUID": "1.2",
            "Modality": "MR",
            "previous_relpath": None,
            **extra,
        }

    def plan(self, *rows: dict) -> Path:
        """A plan file of rows, with a token for its temporary files, as the plan writes it."""
        table = transfer.with_temp_token(pa.Table.from_pylist(list(rows), schema=PLAN_SCHEMA))
        pq.write_table(table, self.plan_file)
        return self.plan_file

    def temp_path(self, destination: str) -> Path:
        """The temporary path a transfer of the current plan writes destination under."""
        token = transfer.temp_token(pq.read_table(self.plan_file))
        path = self.output / destination
        return path.with_name(temp_name_for(path.name, token))

    def transfer(self, mode: str = "copy", verify: str = "size", workers: int = 2) -> dict:
        """Results by relpath."""
        results = transfer_plan(
            self.plan_file, self.input, self.output, self.state, mode, verify, workers
        )
        return {r["relpath"]: r for r in results.to_pylist()}

    def committed(self) -> list[dict]:
        return ledger.read(self.state).to_pylist()

    def main(self, mode: str = "copy", verify: str = "size") -> int:
        return transfer.main(
            [
                *("--plan", str(self.plan_file), "--input-dir", str(self.input)),
                *("--output-dir", str(self.output), "--state-dir", str(self.state)),
                *("--mode", mode, "--verify", verify, "--results", str(self.root / "r.pq")),
            ]
        )

    def temp_files(self) -> list[Path]:
        return [p for p in self.output.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


@pytest.fixture
def job(tmp_path) -> Job:
    return Job(tmp_path)


@pytest.fixture
def umask_022():
    previous = permissions.set_umask(0o022)
    yield
    permissions.set_umask(previous)


def assert_not_placed(job: Job, destination: str) -> None:
    """Nothing at the destination, no temp file left, nothing in the ledger."""
    assert not os.path.lexists(job.output / destination)
    assert job.temp_files() == []
    assert job.committed() == []


# --- each mode places the file, once --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_places_the_file_and_a_rerun_of_the_plan_commits_nothing_twice(job, mode):
    source = job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    results = job.transfer(mode)
    assert results["p/IM1"]["status"] == (COPIED if mode == "copy" else LINKED)
    placed = job.output / "P/S/IM1"
    assert placed.read_bytes() == source.read_bytes()
    assert placed.is_symlink() == (mode == "symlink")
    if mode == "symlink":  # absolute: valid wherever the output is read from
        assert os.readlink(placed) == str(source.absolute())
    assert os.path.samefile(placed, source) == (mode != "copy")
    assert job.temp_files() == []
    planned = job.row("p/IM1", "P/S/IM1")  # as the input is now
    committed = job.committed()
    # A new hard link changed the input's ctime (its link count): the placement is
    # committed for the planned version and for the one the input is now.
    assert len(committed) == (2 if mode == "hardlink" else 1)
    assert committed[-1]["ctime_ns"] == planned["ctime_ns"]
    for row in committed:
        assert (row["relpath"], row["destination"]) == ("p/IM1", "P/S/IM1")
        assert (row["status"], row["mode"]) == (ledger.PLACED, mode)
        assert (row["size"], row["mtime_ns"]) == (source.stat().st_size, 2_000_000_000)
        assert row["ino"] == source.stat().st_ino

    # The same plan again (Snakemake reruns a transfer job whose report failed): nothing to do.
    assert job.transfer(mode) == {}
    assert len(job.committed()) == len(committed)
    # Nor a plan of the input as it is now.
    assert (
        ledger.rows_by_key(
            pa.Table.from_pylist([planned]), ledger.read(job.state), "missing"
        ).num_rows
        == 0
    )


def test_a_symbolic_link_is_absolute_when_input_dir_is_given_relative(job, monkeypatch):
    source = job.add("p/IM1")
    monkeypatch.chdir(job.root)
    job.plan(job.row("p/IM1", "P/IM1"))
    transfer_plan(job.plan_file, Path("in"), job.output, job.state, "symlink", "size", 1)
    assert os.readlink(job.output / "P/IM1") == str(source)
    monkeypatch.chdir(job.output)  # the link works from wherever it is read
    assert (job.output / "P/IM1").read_bytes() == source.read_bytes()


@pytest.mark.parametrize("mode", MODES)
def test_put_twice_finds_the_file_in_place_and_never_doubles_it(job, mode):
    job.add("p/IM1")
    row = Row(**{k: job.row("p/IM1", "IM1")[k] for k in Row.__dataclass_fields__ if k != "index"})
    fd = OutputTree(job.output).open_folder("")
    try:
        assert put(fd, row, job.input, mode, "size")[0] == (COPIED if mode == "copy" else LINKED)
        assert put(fd, row, job.input, mode, "size")[0] == PRESENT
    finally:
        os.close(fd)
    assert sorted(p.name for p in job.output.iterdir()) == ["IM1"]


def test_a_killed_transfer_is_resumed_with_only_the_rows_it_did_not_commit(job):
    job.add("p/IM1")
    job.add("p/IM2")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    job.transfer()  # as a run killed after committing IM1 only
    plan = job.plan(job.row("p/IM1", "P/S/IM1"), job.row("p/IM2", "P/S/IM2"))
    pending = pending_rows(pq.read_table(plan), ledger.read(job.state))
    assert pending["relpath"].to_pylist() == ["p/IM2"]
    assert list(job.transfer()) == ["p/IM2"]
    assert sorted(r["relpath"] for r in job.committed()) == ["p/IM1", "p/IM2"]


def test_a_copy_keeps_the_source_mtime_and_mode(job, umask_022):
    source = job.add("p/IM1", mode=0o640)
    job.plan(job.row("p/IM1", "P/S/IM1"))
    job.transfer("copy", "checksum")
    placed = job.output / "P/S/IM1"
    assert placed.stat().st_mtime_ns == source.stat().st_mtime_ns == 2_000_000_000
    assert stat.S_IMODE(placed.stat().st_mode) == 0o640
    assert placed.stat().st_ino != source.stat().st_ino


def test_a_copy_works_where_the_file_system_refuses_copy_file_range(job, monkeypatch):
    def refused(*_args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    source = job.add("p/IM1", os.urandom(3 << 20))  # more than one chunk of the fallback
    job.plan(job.row("p/IM1", "P/S/IM1"))
    assert job.transfer("copy", "checksum")["p/IM1"]["status"] == COPIED
    assert (job.output / "P/S/IM1").read_bytes() == source.read_bytes()
    assert (job.output / "P/S/IM1").stat().st_mtime_ns == source.stat().st_mtime_ns


# --- never over another file ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_different_file_at_the_destination_is_never_overwritten(job, mode):
    job.add("p/IM1")
    (job.output / "P").mkdir()
    (job.output / "P/IM1").write_bytes(b"someone else's file")
    job.plan(job.row("p/IM1", "P/IM1"))
    result = job.transfer(mode)["p/IM1"]
    assert result["status"] == ERROR and "never overwritten" in result["detail"]
    assert (job.output / "P/IM1").read_bytes() == b"someone else's file"
    assert not (job.output / "P/IM1").is_symlink()
    assert job.temp_files() == [] and job.committed() == []


def test_a_different_file_of_the_same_size_is_never_overwritten_nor_taken_as_present(job):
    content = b"DICOM" * 100
    job.add("p/IM1", content)
    (job.output / "P").mkdir()
    (job.output / "P/IM1").write_bytes(b"X" * len(content))
    job.plan(job.row("p/IM1", "P/IM1", action="present"))
    assert job.transfer()["p/IM1"]["status"] == ERROR
    assert (job.output / "P/IM1").read_bytes() == b"X" * len(content)
    assert job.committed() == []


def test_a_present_row_is_committed_when_the_destination_holds_the_content(job):
    source = job.add("p/IM1")
    (job.output / "P").mkdir()
    (job.output / "P/IM1").write_bytes(source.read_bytes())
    job.plan(job.row("p/IM1", "P/IM1", action="present", digest=file_digest(source)))
    assert job.transfer()["p/IM1"]["status"] == PRESENT
    assert [r["destination"] for r in job.committed()] == ["P/IM1"]


def test_a_failed_transfer_job_exits_1_names_the_file_and_removes_the_plan(job, caplog):
    job.add("p/IM1")
    job.add("p/IM2")
    (job.output / "P").mkdir()
    (job.output / "P/IM1").write_bytes(b"a different file")
    job.plan(job.row("p/IM1", "P/IM1"), job.row("p/IM2", "P/IM2"))
    assert job.main() == 1
    assert "could not place p/IM1 at P/IM1: the destination already holds a different" in (
        caplog.text
    )
    assert "1 files were not placed" in caplog.text
    assert not job.plan_file.exists(), "the next run must plan the file again"
    assert (job.output / "P/IM1").read_bytes() == b"a different file"
    # Everything else is placed and committed.
    assert [r["relpath"] for r in job.committed()] == ["p/IM2"]
    assert (job.output / "P/IM2").is_file()


def test_a_successful_transfer_job_exits_0_and_keeps_the_plan(job):
    job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/IM1"))
    assert job.main() == 0
    assert job.plan_file.exists()
    assert pq.read_table(job.root / "r.pq")["status"].to_pylist() == [COPIED]


def test_a_temp_file_a_killed_transfer_of_the_plan_left_is_removed(job):
    source = job.add("p/IM1")
    (job.output / "P").mkdir()
    job.plan(job.row("p/IM1", "P/IM1"))
    job.temp_path("P/IM1").write_bytes(b"half a fi")  # the plan's token: ours
    assert job.transfer()["p/IM1"]["status"] == COPIED
    assert (job.output / "P/IM1").read_bytes() == source.read_bytes()
    assert list((job.output / "P").iterdir()) == [job.output / "P/IM1"]


@pytest.mark.parametrize("kind", ["file", "link", "folder"])
def test_what_stands_at_a_temporary_name_without_the_plans_token_is_never_touched(job, kind):
    # A user's file at the name temporary files had before they carried a token, one at
    # another plan's temporary name, a link to a file elsewhere, a folder.
    source = job.add("p/IM1")
    (job.output / "P").mkdir()
    elsewhere = job.root / "elsewhere"
    elsewhere.write_bytes(b"someone's")
    job.plan(job.row("p/IM1", "P/IM1"))
    theirs = [temp_path_for(job.output / "P/IM1"), job.output / "P" / temp_name_for("IM1", "0")]
    for path in theirs:
        if kind == "file":
            path.write_bytes(b"someone's")
        elif kind == "link":
            path.symlink_to(elsewhere)
        else:
            path.mkdir()
    assert transfer.settle(job.plan_file, job.input, job.output, job.state, "copy") == 0
    assert job.transfer()["p/IM1"]["status"] == COPIED
    assert (job.output / "P/IM1").read_bytes() == source.read_bytes()
    for path in theirs:
        assert os.path.lexists(path)
        if kind == "file":
            assert path.read_bytes() == b"someone's"
        elif kind == "link":
            assert os.readlink(path) == str(elsewhere)
    assert elsewhere.read_bytes() == b"someone's"


def test_something_at_the_plans_temporary_name_during_the_transfer_is_never_touched(
    job, monkeypatch
):
    # After settle, only someone else can have put it there: the file is not placed, the
    # plan is dropped, and the next plan's token gives another temporary name.
    job.add("p/IM1")
    job.add("p/IM2")
    job.plan(job.row("p/IM1", "P/IM1"), job.row("p/IM2", "P/IM2"))
    (job.output / "P").mkdir()
    theirs = job.temp_path("P/IM1")
    real_settle = transfer._settle

    def settle_then_someone_writes(*args):
        settled = real_settle(*args)
        theirs.write_bytes(b"someone's")
        return settled

    monkeypatch.setattr(transfer, "_settle", settle_then_someone_writes)
    assert job.main() == 1
    assert theirs.read_bytes() == b"someone's"
    assert not (job.output / "P/IM1").exists()
    assert [r["relpath"] for r in job.committed()] == ["p/IM2"]
    assert not job.plan_file.exists(), "the next run must plan the file again"


# --- file systems without renameat2(RENAME_NOREPLACE), or without hard links too -----------


def _without(monkeypatch, calls: str) -> None:
    """A file system refusing renameat2 (EINVAL), and with "link" hard links too (EPERM)."""

    def refused(code: int):
        def call(*_args, **_kwargs):
            raise OSError(code, os.strerror(code))

        return call

    monkeypatch.setattr(transfer, "rename_no_replace", refused(errno.EINVAL))
    if "link" in calls:
        monkeypatch.setattr(os, "link", refused(errno.EPERM))


@pytest.mark.parametrize("calls", ["renameat2", "renameat2 and link"])
def test_a_copy_is_placed_without_renameat2_and_leaves_no_temp_file(job, monkeypatch, calls):
    _without(monkeypatch, calls)
    source = job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    assert job.transfer()["p/IM1"]["status"] == COPIED
    assert (job.output / "P/S/IM1").read_bytes() == source.read_bytes()
    assert (job.output / "P/S/IM1").stat().st_nlink == 1
    assert job.temp_files() == []


@pytest.mark.parametrize("calls", ["renameat2", "renameat2 and link"])
@pytest.mark.parametrize("same", [True, False])
def test_without_renameat2_a_taken_name_is_never_replaced_and_no_temp_file_is_left(
    job, monkeypatch, calls, same
):
    _without(monkeypatch, calls)
    source = job.add("p/IM1")
    (job.output / "P").mkdir()
    held = source.read_bytes() if same else b"someone else's file"
    (job.output / "P/IM1").write_bytes(held)
    job.plan(job.row("p/IM1", "P/IM1"))
    assert job.transfer()["p/IM1"]["status"] == (PRESENT if same else ERROR)
    assert (job.output / "P/IM1").read_bytes() == held
    assert job.temp_files() == []


# --- symlink mode: a link follows its renamed input -----------------------------------------


def test_symlink_mode_records_the_digest_a_relink_needs_later(job):
    source = job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/IM1"))
    job.transfer("symlink")
    assert [r["digest"] for r in job.committed()] == [file_digest(source)]


def renamed_link(job: Job, held: str = "old link") -> dict:
    """p/IM1 linked at P/IM1 by an earlier run, then renamed to q/IM1: the relink row.
    ``held``: what P/IM1 holds now (the old link, or what someone put in its place)."""
    source = job.add("p/IM1")
    (job.output / "P").mkdir()
    place = job.output / "P/IM1"
    if held == "old link":
        place.symlink_to(source)
    elif held == "link elsewhere":
        place.symlink_to(job.root / "elsewhere")
    elif held == "other file":
        place.write_bytes(b"someone else's file")
    elif held == "same bytes":
        place.write_bytes(source.read_bytes())
    (job.input / "q").mkdir()
    source.rename(job.input / "q/IM1")
    return job.row(
        "q/IM1",
        "P/IM1",
        "relink",
        digest=file_digest(job.input / "q/IM1"),
        previous_relpath="p/IM1",
    )


@pytest.mark.parametrize("swap", ["exchange", "no exchange"])
def test_a_relink_points_the_link_at_the_renamed_input_in_place(job, monkeypatch, swap):
    if swap == "no exchange":  # a file system without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(transfer, "exchange", refuse(errno.EINVAL))
    job.plan(renamed_link(job))
    assert job.transfer("copy")["q/IM1"]["status"] == RELINKED, "whatever this run's mode"
    assert os.readlink(job.output / "P/IM1") == str(job.input / "q/IM1")
    assert sorted(p.name for p in (job.output / "P").iterdir()) == ["IM1"], "no temp left"
    [row] = job.committed()
    assert (row["relpath"], row["status"], row["mode"]) == ("q/IM1", ledger.PLACED, "symlink")
    assert row["digest"] == file_digest(job.input / "q/IM1")
    assert job.transfer("symlink") == {}, "committed: a rerun of the plan does nothing"


def test_a_link_already_pointing_at_the_new_path_is_present(job):
    row = renamed_link(job)
    (job.output / "P/IM1").unlink()
    (job.output / "P/IM1").symlink_to(job.input / "q/IM1")  # a run killed before its commit
    fd = OutputTree(job.output).open_folder("P")
    try:
        fields = {k: row[k] for k in Row.__dataclass_fields__ if k != "index"}
        assert put(fd, Row(**fields), job.input, "symlink", "size")[0] == PRESENT
    finally:
        os.close(fd)
    job.plan(row)
    job.transfer("symlink")  # settled: committed as it is
    assert [(r["relpath"], r["mode"]) for r in job.committed()] == [("q/IM1", "symlink")]
    assert os.readlink(job.output / "P/IM1") == str(job.input / "q/IM1")


@pytest.mark.parametrize("held", ["link elsewhere", "other file"])
def test_a_relink_never_replaces_what_is_not_the_old_link(job, held):
    job.plan(renamed_link(job, held))
    before = tree_of(job.output)
    result = job.transfer("symlink")["q/IM1"]
    assert result["status"] == ERROR and "never replaced" in result["detail"]
    assert tree_of(job.output) == before
    assert job.committed() == []


def test_a_file_with_the_same_bytes_in_the_links_place_is_present(job):
    job.plan(renamed_link(job, "same bytes"))
    assert job.transfer("symlink")["q/IM1"]["status"] == PRESENT
    assert not (job.output / "P/IM1").is_symlink()


def test_a_link_replaced_during_the_relink_is_swapped_back_not_lost(job, monkeypatch):
    job.plan(renamed_link(job))
    real_exchange = transfer.exchange

    def someone_first(name, other, dir_fd):  # a file takes the link's place just before
        if not (job.output / "P/IM1").is_file():
            (job.output / "P/IM1").unlink()
            (job.output / "P/IM1").write_bytes(b"someone else's file")
        real_exchange(name, other, dir_fd)

    monkeypatch.setattr(transfer, "exchange", someone_first)
    result = job.transfer("symlink")["q/IM1"]
    assert result["status"] == ERROR and "never replaced" in result["detail"]
    assert sorted(p.name for p in (job.output / "P").iterdir()) == ["IM1"]
    assert (job.output / "P/IM1").read_bytes() == b"someone else's file"


def test_a_duplicate_of_a_failed_relink_is_not_committed(job):
    row = renamed_link(job, "other file")
    job.add("r/IM1", (job.input / "q/IM1").read_bytes())
    duplicate = job.row("r/IM1", "P/IM1", "duplicate", committed=True)
    job.plan(row, duplicate)
    results = job.transfer("symlink")
    assert (results["q/IM1"]["status"], results["r/IM1"]["status"]) == (ERROR, ERROR)
    assert job.committed() == []


def refuse(code: int):
    def refused(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))

    return refused


def tree_of(root: Path) -> dict[str, object]:
    return {
        str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes()
        for p in root.rglob("*")
        if p.is_symlink() or p.is_file()
    }


# --- a copy is checked before it is linked into place ------------------------------------


def _short_write(fd_in, fd_out, size):
    return os.write(fd_out, os.pread(fd_in, size - 7, 0))  # a full disk, say


def _stops_early(fd_in, fd_out, count, *_args, real=os.copy_file_range):
    # copy_file_range writes part, then says 0 (no error), as a file system can.
    return 0 if os.lseek(fd_out, 0, os.SEEK_CUR) else real(fd_in, fd_out, min(count, 100))


# copy_range reports what it wrote; the real one counts what copy_file_range says it wrote.
# The check goes by that count (there is no fstat of the copy).
@pytest.mark.parametrize("fault", ["copy_range", "copy_file_range"])
def test_a_short_copy_is_not_placed_and_not_committed(job, monkeypatch, fault):
    if fault == "copy_range":
        monkeypatch.setattr(transfer, "copy_range", _short_write)
    else:
        monkeypatch.setattr(os, "copy_file_range", _stops_early)
    size = len(job.add("p/IM1").read_bytes())
    job.plan(job.row("p/IM1", "P/S/IM1"))
    result = job.transfer()["p/IM1"]
    written = size - 7 if fault == "copy_range" else 100
    assert result["status"] == ERROR and f"short copy: {written} of {size}" in result["detail"]
    assert_not_placed(job, "P/S/IM1")


def test_a_short_copy_fails_the_job_and_says_so(job, monkeypatch, caplog):
    monkeypatch.setattr(transfer, "copy_range", lambda fd_in, fd_out, size: 0)
    job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    assert job.main() == 1
    assert "could not place p/IM1 at P/S/IM1: short copy: 0 of" in caplog.text
    assert_not_placed(job, "P/S/IM1")


def test_a_copy_that_differs_from_its_source_is_not_placed_with_verify_checksum(job, monkeypatch):
    def flipped(fd_in, fd_out, size):
        data = bytearray(os.pread(fd_in, size, 0))
        data[size // 2] ^= 0xFF  # a bad disk or controller: right size, wrong bytes
        return os.write(fd_out, bytes(data))

    monkeypatch.setattr(transfer, "copy_range", flipped)
    job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    result = job.transfer("copy", "checksum")["p/IM1"]
    assert result["status"] == ERROR and "checksum" in result["detail"]
    assert_not_placed(job, "P/S/IM1")


def test_verify_checksum_commits_the_digest_of_the_bytes_written(job):
    source = job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    job.transfer("copy", "checksum")
    assert [r["digest"] for r in job.committed()] == [file_digest(source)]


@pytest.mark.parametrize("mode", MODES)
def test_a_source_changed_since_it_was_planned_is_not_placed(job, mode):
    source = job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    with open(source, "ab") as handle:  # a scanner still writing into the input folder
        handle.write(b"more")
    assert job.transfer(mode)["p/IM1"]["status"] == CHANGED
    assert_not_placed(job, "P/S/IM1")


def test_a_source_changed_while_it_was_copied_is_not_placed(job, monkeypatch):
    source = job.add("p/IM1")

    def copy_while_written(fd_in, fd_out, size):
        written = copy_range(fd_in, fd_out, size)
        with open(source, "r+b") as handle:  # rewritten in place during the copy
            handle.write(b"NEW!")
        os.utime(source, ns=(3_000_000_000, 3_000_000_000))
        return written

    monkeypatch.setattr(transfer, "copy_range", copy_while_written)
    job.plan(job.row("p/IM1", "P/S/IM1"))
    assert job.transfer()["p/IM1"]["status"] == CHANGED
    assert_not_placed(job, "P/S/IM1")


def test_a_source_gone_since_it_was_planned_is_not_placed(job):
    source = job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    source.unlink()
    assert job.transfer()["p/IM1"]["status"] == CHANGED
    assert_not_placed(job, "P/S/IM1")


# --- never through a link -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["P", "P/S"])
@pytest.mark.parametrize("blocker", ["link", "file"])
def test_a_link_or_file_where_a_folder_must_go_is_never_followed(job, mode, where, blocker):
    outside = job.root / "outside"
    outside.mkdir()
    job.add("p/IM1")
    (job.output / where).parent.mkdir(parents=True, exist_ok=True)
    if blocker == "link":
        (job.output / where).symlink_to(outside, target_is_directory=True)
    else:
        (job.output / where).write_bytes(b"a file")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    result = job.transfer(mode)["p/IM1"]
    assert result["status"] == ERROR
    assert "a link or a file stands where folder" in result["detail"]
    assert list(outside.rglob("*")) == [], "something was written through the link"
    assert (job.output / where).is_symlink() == (blocker == "link")
    assert job.committed() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_link_at_the_destination_name_is_never_written_through(job, mode):
    outside = job.root / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"not yours")
    job.add("p/IM1")
    (job.output / "P").mkdir()
    (job.output / "P/IM1").symlink_to(outside / "victim")
    job.plan(job.row("p/IM1", "P/IM1"))
    assert job.transfer(mode)["p/IM1"]["status"] == ERROR
    assert (outside / "victim").read_bytes() == b"not yours"
    assert os.readlink(job.output / "P/IM1") == str(outside / "victim")
    assert job.committed() == []


def test_output_tree_refuses_a_link_in_the_middle_of_a_folder_path(job):
    outside = job.root / "outside"
    outside.mkdir()
    (job.output / "P").mkdir()
    (job.output / "P/S").symlink_to(outside)
    tree = OutputTree(job.output)
    with pytest.raises(TransferError, match="never followed"):
        tree.open_folder("P/S/T")
    assert list(outside.iterdir()) == []


# --- duplicates follow their destination ------------------------------------------------------


def test_a_duplicate_is_committed_with_its_destination_placed_in_the_same_transfer(job):
    job.add("p/IM1", b"same bytes" * 20)
    job.add("q/IM1", b"same bytes" * 20)
    job.plan(job.row("p/IM1", "P/S/IM1"), job.row("q/IM1", "P/S/IM1", action="duplicate"))
    results = job.transfer()
    assert (results["p/IM1"]["status"], results["q/IM1"]["status"]) == (COPIED, DUPLICATE)
    rows = {r["relpath"]: r for r in job.committed()}
    assert rows["q/IM1"]["status"] == ledger.DUPLICATE
    assert rows["q/IM1"]["destination"] == "P/S/IM1"
    assert sorted(p.name for p in (job.output / "P/S").iterdir()) == ["IM1"]


@pytest.mark.parametrize("blocked", ["P/S", "P/S/IM1"])
def test_a_duplicate_of_a_file_that_could_not_be_placed_is_an_error(job, blocked):
    job.add("p/IM1", b"same bytes" * 20)
    job.add("q/IM1", b"same bytes" * 20)
    (job.output / blocked).parent.mkdir(parents=True)
    (job.output / blocked).write_bytes(b"someone else's file")
    job.plan(job.row("p/IM1", "P/S/IM1"), job.row("q/IM1", "P/S/IM1", action="duplicate"))
    results = job.transfer()
    assert (results["p/IM1"]["status"], results["q/IM1"]["status"]) == (ERROR, ERROR)
    assert "planned again" in results["q/IM1"]["detail"]
    assert job.committed() == []
    assert (job.output / blocked).read_bytes() == b"someone else's file"


def test_a_duplicate_of_a_source_that_changed_is_changed_too_and_sorted_next_run(job):
    first = job.add("p/IM1", b"same bytes" * 20)
    job.add("q/IM1", b"same bytes" * 20)
    job.plan(job.row("p/IM1", "P/S/IM1"), job.row("q/IM1", "P/S/IM1", action="duplicate"))
    with open(first, "ab") as handle:
        handle.write(b"more")
    results = job.transfer()
    assert (results["p/IM1"]["status"], results["q/IM1"]["status"]) == (CHANGED, CHANGED)
    assert_not_placed(job, "P/S/IM1")


def test_a_duplicate_of_a_committed_placement_is_committed_only_while_it_is_on_disk(job):
    job.add("p/IM1", b"same bytes" * 20)
    job.add("q/IM1", b"same bytes" * 20)
    job.add("r/IM1", b"same bytes" * 20)
    job.plan(job.row("p/IM1", "P/S/IM1"))
    job.transfer()
    job.plan(job.row("q/IM1", "P/S/IM1", action="duplicate", committed=True))
    assert job.transfer()["q/IM1"]["status"] == DUPLICATE
    (job.output / "P/S/IM1").unlink()  # removed by hand since
    job.plan(job.row("r/IM1", "P/S/IM1", action="duplicate", committed=True))
    assert job.transfer()["r/IM1"]["status"] == ERROR
    assert sorted(r["relpath"] for r in job.committed()) == ["p/IM1", "q/IM1"]


# --- commits: the bytes first, then the record ----------------------------------------------


def test_commits_come_in_segments_and_name_only_files_already_on_disk(job, monkeypatch):
    monkeypatch.setattr(transfer, "COMMIT_EVERY_S", -1.0)  # commit after every folder
    appended = []
    real_append = ledger.append

    def checked_append(state_dir, rows, part=None):
        for destination in rows["destination"].to_pylist():
            assert os.path.lexists(job.output / destination), f"committed first: {destination}"
        appended.append(rows.num_rows)
        real_append(state_dir, rows, part)

    monkeypatch.setattr(ledger, "append", checked_append)
    rows = []
    for patient in range(4):
        for image in range(3):
            job.add(f"p{patient}/IM{image}")
            rows.append(job.row(f"p{patient}/IM{image}", f"P{patient}/S/IM{image}"))
    job.add("dup/IM0", (job.input / "p0/IM0").read_bytes())
    rows.append(job.row("dup/IM0", "P0/S/IM0", action="duplicate"))
    job.plan(*rows)
    results = job.transfer(workers=1)
    assert sum(r["status"] in (COPIED, DUPLICATE) for r in results.values()) == 13
    assert len([n for n in appended if n]) >= 4, "one segment per folder, then duplicates"
    assert len(list(ledger.folder(job.state).glob("seg-*.parquet"))) >= 4
    # What the state says is on disk is on disk, byte for byte.
    committed = job.committed()
    assert sorted(r["relpath"] for r in committed) == sorted(r["relpath"] for r in rows)
    for row in committed:
        placed = job.output / row["destination"]
        assert placed.read_bytes() == (job.input / row["relpath"]).read_bytes()


def test_only_what_is_in_place_is_committed_when_some_rows_fail(job):
    job.add("p/ok")
    job.add("p/changed")
    job.add("p/blocked")
    (job.output / "P").mkdir()
    (job.output / "P/blocked").write_bytes(b"someone else's")
    job.plan(
        job.row("p/ok", "P/ok"),
        job.row("p/changed", "P/changed"),
        job.row("p/blocked", "P/blocked"),
    )
    with open(job.input / "p/changed", "ab") as handle:
        handle.write(b"more")
    statuses = {k: v["status"] for k, v in job.transfer().items()}
    assert statuses == {"p/ok": COPIED, "p/changed": CHANGED, "p/blocked": ERROR}
    assert [r["relpath"] for r in job.committed()] == ["p/ok"]
    assert not (job.output / "P/changed").exists()


# --- an input that is no longer a regular file (replaced since the plan) ---------------------


def test_copy_range_copies_no_more_than_it_was_asked_where_copy_file_range_is_refused(tmp_path):
    # copy_file_range refuses a pipe or a device (EINVAL): the copy in user space must stop
    # at size too, or an input replaced by a link to /dev/zero fills the output's disk.
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 1000)
    os.close(write_end)
    with open(tmp_path / "copy", "wb") as out:
        try:
            written = copy_range(read_end, out.fileno(), 100)
        finally:
            os.close(read_end)
    assert written == 100 and (tmp_path / "copy").stat().st_size == 100


@pytest.fixture
def small_files():
    """Files this process writes are limited to 1 MB (a write past it fails, EFBIG): a test
    of an endless input fails instead of filling the disk."""
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, previous_limit[1]))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
    signal.signal(signal.SIGXFSZ, previous_handler)


def test_a_source_replaced_by_a_link_to_a_device_is_not_placed(job, small_files):
    source = job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    source.unlink()
    source.symlink_to("/dev/zero")
    result = job.transfer()["p/IM1"]
    assert result["status"] == CHANGED, result["detail"]
    assert_not_placed(job, "P/S/IM1")


@pytest.mark.parametrize("mode", MODES)
def test_a_source_replaced_by_a_fifo_is_not_placed_and_blocks_nothing(job, mode):
    source = job.add("p/IM1")
    job.plan(job.row("p/IM1", "P/S/IM1"))
    source.unlink()
    os.mkfifo(source)

    def release() -> None:  # a blocked open of it returns (the test fails, never hangs)
        time.sleep(5)
        for _ in range(60):
            with contextlib.suppress(OSError):
                os.close(os.open(source, os.O_WRONLY | os.O_NONBLOCK))
            time.sleep(0.5)

    threading.Thread(target=release, daemon=True).start()
    started = time.monotonic()
    result = job.transfer(mode)["p/IM1"]
    assert time.monotonic() - started < 4, "the transfer blocked on a FIFO"
    assert result["status"] == CHANGED, result["detail"]
    assert_not_placed(job, "P/S/IM1")


# --- a duplicate or a present row is the planned version too ---------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_duplicate_whose_own_input_changed_since_the_plan_is_changed_not_committed(job, mode):
    # Its twin is placed; the duplicate itself was rewritten after the plan hashed it (same
    # size, its mtime set back): committing it would say its content is in the output.
    job.add("p/IM1", b"same bytes" * 20)
    second = job.add("q/IM1", b"same bytes" * 20)
    job.plan(job.row("p/IM1", "P/S/IM1"), job.row("q/IM1", "P/S/IM1", action="duplicate"))
    second.write_bytes(b"new  bytes" * 20)
    os.utime(second, ns=(1_000_000_000, 2_000_000_000))
    results = job.transfer(mode)
    assert results["p/IM1"]["status"] in (COPIED, LINKED)
    assert results["q/IM1"]["status"] == CHANGED
    assert [r["relpath"] for r in job.committed()] == ["p/IM1"] * len(job.committed())


def test_a_present_row_whose_input_changed_since_the_plan_is_changed_not_committed(job):
    source = job.add("p/IM1", b"same bytes" * 20)
    (job.output / "P/S").mkdir(parents=True)
    (job.output / "P/S/IM1").write_bytes(b"same bytes" * 20)
    row = job.row("p/IM1", "P/S/IM1", action="present", digest=file_digest(source))
    job.plan(row)
    source.write_bytes(b"new  bytes" * 20)
    os.utime(source, ns=(1_000_000_000, 2_000_000_000))
    assert job.transfer()["p/IM1"]["status"] == CHANGED
    assert job.committed() == []


def test_a_duplicate_hard_linked_to_its_twin_in_the_input_is_committed_as_it_is_now(job):
    # Two names of one inode in the input: hard-linking the first into the output changes
    # the ctime of both; the duplicate is committed at that ctime too, as its twin is.
    job.add("p/IM1", b"same bytes" * 20)
    os.link(job.input / "p/IM1", job.input / "p/IM2")
    job.plan(job.row("p/IM1", "P/S/IM1"), job.row("p/IM2", "P/S/IM1", action="duplicate"))
    results = job.transfer("hardlink")
    assert (results["p/IM1"]["status"], results["p/IM2"]["status"]) == (LINKED, DUPLICATE)
    now = (job.input / "p/IM2").stat()
    held = {(r["relpath"], r["ctime_ns"]) for r in job.committed()}
    assert ("p/IM2", now.st_ctime_ns) in held
