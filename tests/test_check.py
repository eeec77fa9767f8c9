"""The check finds every placement that is missing or not whole, restores it from an input
that still holds its content, keeps what stood there, and reports what it cannot restore.

Real files placed by the real transfer (``test_transfer.Job``), then damaged by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_transfer import Job

from dcmsort import check, transfer
from dcmsort.check import DAMAGED, MISSING, RESTORED, aside_name, check_tree, set_aside
from dcmsort.fileops import MAX_NAME_BYTES, file_digest

DESTINATION = "P/S/IM1"


@pytest.fixture
def job(tmp_path) -> Job:
    return Job(tmp_path)


def placed(job: Job, mode: str = "copy", verify: str = "size", *relpaths: str) -> Job:
    """Input p/IM1 (and relpaths, the same bytes: duplicates) sorted to P/S/IM1."""
    job.add("p/IM1")
    rows = [job.row("p/IM1", DESTINATION)]
    for relpath in relpaths:
        job.add(relpath, (job.input / "p/IM1").read_bytes())
        rows.append(job.row(relpath, DESTINATION, "duplicate"))
    job.plan(*rows)
    job.transfer(mode, verify)
    return job


def run_check(job: Job, how: str = "size") -> dict[str, dict]:
    results, checked = check_tree(job.input, job.output, job.state, how, workers=2)
    assert checked == 1
    return {r["destination"]: r for r in results.to_pylist()}


def original(job: Job) -> bytes:
    return (job.input / "p/IM1").read_bytes()


def test_a_whole_tree_has_nothing_to_report(job):
    placed(job)
    assert run_check(job) == {}
    assert run_check(job, "checksum") == {}


def test_a_truncated_copy_is_restored_and_the_damaged_file_kept_beside_it(job):
    placed(job)
    (job.output / DESTINATION).write_bytes(original(job)[:100])
    row = run_check(job)[DESTINATION]
    assert (row["outcome"], row["source"]) == (RESTORED, "p/IM1")
    assert "wrong size" in row["problem"]
    assert (job.output / DESTINATION).read_bytes() == original(job)
    assert row["kept_as"] == "P/S/IM1.dcmsort-damaged-1"
    assert (job.output / row["kept_as"]).read_bytes() == original(job)[:100]
    assert not job.temp_files()
    assert run_check(job) == {}, "a second check finds it whole"


@pytest.mark.parametrize("how", ["chmod", "moved out and back"])
def test_a_copy_is_restored_from_an_input_whose_ctime_alone_changed(job, how):
    placed(job)  # verify size: the ledger records no digest
    (job.output / DESTINATION).unlink()
    source = job.input / "p/IM1"
    if how == "chmod":
        source.chmod(0o600)
    else:
        source.rename(job.root / "IM1")
        (job.root / "IM1").rename(source)
    row = run_check(job)[DESTINATION]
    assert (row["outcome"], row["source"]) == (RESTORED, "p/IM1")
    assert (job.output / DESTINATION).read_bytes() == original(job)


def test_an_input_replaced_with_the_same_size_and_old_mtime_is_no_source_to_restore_from(job):
    placed(job)  # verify size: the ledger records no digest
    first = original(job)
    (job.output / DESTINATION).write_bytes(first[:100])
    source = job.input / "p/IM1"
    old = source.stat()
    # cp -p of a corrected file: the same size, another file renamed over the input
    source.with_name("new").write_bytes(bytes(reversed(first)))
    source.with_name("new").rename(source)
    os.utime(source, ns=(old.st_atime_ns, old.st_mtime_ns))
    row = run_check(job)[DESTINATION]
    assert (row["outcome"], row["source"]) == (DAMAGED, None)
    assert (job.output / DESTINATION).read_bytes() == first[:100], "left as it is"


@pytest.mark.parametrize("mode", ["copy", "hardlink", "symlink"])
def test_a_deleted_placement_is_put_back_in_its_mode(job, mode):
    placed(job, mode)
    (job.output / DESTINATION).unlink()
    row = run_check(job)[DESTINATION]
    assert (row["problem"], row["outcome"], row["kept_as"]) == (MISSING, RESTORED, None)
    path = job.output / DESTINATION
    assert path.is_symlink() == (mode == "symlink")
    assert path.read_bytes() == original(job)
    if mode == "hardlink":
        assert path.stat().st_ino == (job.input / "p/IM1").stat().st_ino


def test_a_folder_removed_by_hand_is_made_again(job):
    placed(job)
    (job.output / DESTINATION).unlink()
    (job.output / "P/S").rmdir()
    assert run_check(job)[DESTINATION]["outcome"] == RESTORED
    assert (job.output / DESTINATION).read_bytes() == original(job)


def test_a_damaged_copy_whose_input_is_gone_is_reported_and_left_as_it_is(job):
    placed(job)
    (job.output / DESTINATION).write_bytes(b"half")
    (job.input / "p/IM1").unlink()
    row = run_check(job)[DESTINATION]
    assert row["outcome"] == DAMAGED
    assert "input is gone" in row["detail"]
    assert (job.output / DESTINATION).read_bytes() == b"half"  # never deleted
    assert [p.name for p in (job.output / "P/S").iterdir()] == ["IM1"]


def test_a_damaged_copy_is_never_restored_from_an_input_that_changed(job):
    placed(job)
    (job.output / DESTINATION).write_bytes(b"half")
    (job.input / "p/IM1").write_bytes(b"x" * len(original(job)))  # same size, other bytes
    row = run_check(job)[DESTINATION]
    assert row["outcome"] == DAMAGED
    assert "changed" in row["detail"]
    assert (job.output / DESTINATION).read_bytes() == b"half"


def test_a_duplicate_input_restores_when_the_first_input_is_gone(job):
    placed(job, "copy", "size", "q/IM1")
    (job.input / "p/IM1").unlink()
    content = (job.input / "q/IM1").read_bytes()
    (job.output / DESTINATION).unlink()
    row = run_check(job)[DESTINATION]
    assert (row["outcome"], row["source"]) == (RESTORED, "q/IM1")
    assert (job.output / DESTINATION).read_bytes() == content


def test_a_touched_input_restores_only_when_the_digest_says_it_holds_the_same_bytes(job):
    placed(job, "copy", "checksum")  # the ledger knows the digest
    (job.output / DESTINATION).write_bytes(b"half")
    os.utime(job.input / "p/IM1", ns=(5, 5_000_000_000))
    assert run_check(job)[DESTINATION]["outcome"] == RESTORED
    assert (job.output / DESTINATION).read_bytes() == original(job)


def test_a_touched_input_without_a_known_digest_is_not_trusted(job):
    placed(job, "copy", "size")
    (job.output / DESTINATION).write_bytes(b"half")
    os.utime(job.input / "p/IM1", ns=(5, 5_000_000_000))
    assert run_check(job)[DESTINATION]["outcome"] == DAMAGED


def test_only_checksum_finds_flipped_bytes_of_the_right_size(job):
    placed(job, "copy", "checksum")
    damaged = bytearray(original(job))
    damaged[10] ^= 0xFF
    (job.output / DESTINATION).write_bytes(damaged)
    assert run_check(job, "size") == {}, "size: one stat, no read"
    row = run_check(job, "checksum")[DESTINATION]
    assert (row["problem"], row["outcome"]) == ("content differs", RESTORED)
    assert file_digest(job.output / DESTINATION) == file_digest(job.input / "p/IM1")


def test_checksum_compares_with_the_input_when_the_ledger_has_no_digest(job):
    placed(job, "copy", "size")
    assert {r["digest"] for r in job.committed()} == {None}
    damaged = bytearray(original(job))
    damaged[-1] ^= 0xFF
    (job.output / DESTINATION).write_bytes(damaged)
    row = run_check(job, "checksum")[DESTINATION]
    assert (row["problem"], row["outcome"]) == ("content differs from its input", RESTORED)
    assert (job.output / DESTINATION).read_bytes() == original(job)


def test_a_link_to_another_file_is_kept_aside_and_the_link_to_its_input_made_again(job):
    placed(job, "symlink")
    other = job.add("elsewhere", original(job))  # same size and bytes, another file
    (job.output / DESTINATION).unlink()
    (job.output / DESTINATION).symlink_to(other)
    row = run_check(job)[DESTINATION]
    assert row["outcome"] == RESTORED
    assert os.readlink(job.output / DESTINATION) == str(job.input / "p/IM1")
    assert os.readlink(job.output / row["kept_as"]) == str(other)


def test_its_own_dangling_link_is_replaced_not_kept(job):
    placed(job, "symlink", "size", "q/IM1")
    (job.input / "p/IM1").unlink()  # the link dangles; q/IM1 holds the same bytes
    row = run_check(job)[DESTINATION]
    assert (row["outcome"], row["source"], row["kept_as"]) == (RESTORED, "q/IM1", None)
    assert os.readlink(job.output / DESTINATION) == str(job.input / "q/IM1")


def test_a_folder_standing_at_the_name_is_kept_aside(job):
    placed(job)
    (job.output / DESTINATION).unlink()
    (job.output / DESTINATION).mkdir()
    (job.output / DESTINATION / "someone's file").write_bytes(b"keep me")
    row = run_check(job)[DESTINATION]
    assert row["outcome"] == RESTORED
    assert (job.output / row["kept_as"] / "someone's file").read_bytes() == b"keep me"


def test_a_failed_restore_puts_the_damaged_file_back_under_its_name(job, monkeypatch):
    placed(job)
    (job.output / DESTINATION).write_bytes(b"half")

    def disk_full(*args, **kwargs):
        raise transfer.TransferError("no space left on device")

    monkeypatch.setattr(check, "put", disk_full)
    row = run_check(job)[DESTINATION]
    assert row["outcome"] == DAMAGED
    assert "no space left" in row["detail"]
    assert (job.output / DESTINATION).read_bytes() == b"half"
    assert [p.name for p in (job.output / "P/S").iterdir()] == ["IM1"]


def test_an_aside_name_never_replaces_an_earlier_one(tmp_path):
    (tmp_path / "IM1").write_bytes(b"second")
    (tmp_path / "IM1.dcmsort-damaged-1").write_bytes(b"first")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert set_aside(fd, "IM1") == "IM1.dcmsort-damaged-2"
    finally:
        os.close(fd)
    assert (tmp_path / "IM1.dcmsort-damaged-1").read_bytes() == b"first"
    assert (tmp_path / "IM1.dcmsort-damaged-2").read_bytes() == b"second"


@pytest.mark.parametrize("name", ["IM1.dcm", "é" * 127, "a" * 255])
def test_an_aside_name_fits_every_file_system_and_hides_the_extension(name):
    aside = aside_name(name, 12)
    assert len(os.fsencode(aside)) <= MAX_NAME_BYTES
    assert aside.endswith(".dcmsort-damaged-12")
    aside.encode("utf-8")  # a whole character


def test_the_check_reads_only_the_placements_folders(job, monkeypatch):
    """Size: one lstat per placement, relative to its folder; nothing is opened."""
    placed(job)
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    run_check(job)
    assert "IM1" not in [Path(p).name for p in opened]
