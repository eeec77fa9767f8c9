import errno
import os

import pandas as pd
import pytest

from dcmsort.fileops import temp_path_for
from dcmsort.transfer import (
    COPIED,
    ERROR,
    LINKED,
    PRESENT,
    TransferError,
    main,
    put,
    transfer_plan,
)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in" / "IM1"
    path.parent.mkdir()
    path.write_bytes(b"DICOM" * 100)
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    return path


@pytest.mark.parametrize("mode", ["copy", "hardlink", "symlink"])
def test_each_mode_places_the_file_and_recognises_it_on_rerun(tmp_path, source, mode):
    destination = tmp_path / "out" / "P" / "S" / "IM1"
    assert put(source, destination, mode) in (COPIED, LINKED)
    assert destination.read_bytes() == source.read_bytes()
    assert not temp_path_for(destination).exists()
    assert put(source, destination, mode) == PRESENT


def test_a_copy_keeps_the_source_mtime_so_reruns_need_not_open_it(tmp_path, source):
    destination = tmp_path / "out" / "IM1"
    put(source, destination, "copy", verify="checksum")
    assert destination.stat().st_mtime_ns == source.stat().st_mtime_ns
    assert not os.path.samefile(source, destination)


def test_a_different_file_at_the_destination_is_never_overwritten(tmp_path, source):
    destination = tmp_path / "out" / "IM1"
    destination.parent.mkdir()
    destination.write_bytes(b"someone else's file")
    with pytest.raises(TransferError, match="never overwritten"):
        put(source, destination, "copy")
    assert destination.read_bytes() == b"someone else's file"


def test_a_stale_temp_file_from_a_killed_run_is_replaced(tmp_path, source):
    destination = tmp_path / "out" / "IM1"
    destination.parent.mkdir()
    temp_path_for(destination).write_bytes(b"half a fi")
    assert put(source, destination, "copy") == COPIED
    assert destination.read_bytes() == source.read_bytes()
    assert list(destination.parent.iterdir()) == [destination]


def test_a_mode_change_recognises_files_placed_the_old_way(tmp_path, source):
    destination = tmp_path / "out" / "IM1"
    put(source, destination, "copy")
    assert put(source, destination, "hardlink") == PRESENT


def test_transfer_plan_reports_each_row_and_errors_without_stopping(tmp_path, source):
    plan = pd.DataFrame(
        {
            "relpath": ["IM1", "gone", "IM1"],
            "size": [500, 1, 500],
            "action": ["sort", "sort", "duplicate"],
            "destination": ["A/IM1", "A/gone", "A/IM1"],
        }
    )
    plan.to_parquet(tmp_path / "plan.parquet")
    results = transfer_plan(
        tmp_path / "plan.parquet", source.parent, tmp_path / "out", "copy", "size", workers=2
    ).to_pandas()
    assert list(results["status"]) == [COPIED, ERROR]
    assert "source unreadable" in results.loc[1, "detail"]


def test_the_transfer_job_fails_and_names_the_file_when_one_cannot_be_placed(
    tmp_path, source, caplog
):
    pd.DataFrame(
        {"relpath": ["IM1"], "size": [500], "action": ["sort"], "destination": ["A/IM1"]}
    ).to_parquet(tmp_path / "plan.parquet")
    (tmp_path / "out" / "A").mkdir(parents=True)
    (tmp_path / "out" / "A" / "IM1").write_bytes(b"a different file")
    code = main(
        [
            "--plan",
            str(tmp_path / "plan.parquet"),
            "--input-dir",
            str(source.parent),
            "--output-dir",
            str(tmp_path / "out"),
            "--results",
            str(tmp_path / "r.parquet"),
        ]
    )
    assert code == 1
    assert "could not place IM1 at A/IM1: destination already holds a different file" in caplog.text
    assert (tmp_path / "out" / "A" / "IM1").read_bytes() == b"a different file"


def test_a_copy_works_where_the_file_system_refuses_copy_file_range(tmp_path, source, monkeypatch):
    def refused(*_args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    destination = tmp_path / "out" / "IM1"
    assert put(source, destination, "copy") == COPIED
    assert destination.read_bytes() == source.read_bytes()
    assert destination.stat().st_mtime_ns == source.stat().st_mtime_ns
