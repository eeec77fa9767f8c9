"""The ledger grows by whole-file appends; a torn or unreadable file is ignored, never fatal."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcmsort import ledger
from dcmsort.fileops import TEMP_SUFFIX


def rows(*relpaths: str) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "relpath": r,
                "size": 10,
                "mtime_ns": 1,
                "ctime_ns": 1,
                "ino": 1,
                "status": ledger.PLACED,
                "destination": f"P/S/{r}",
                "mode": "copy",
                "committed_at": 0.0,
            }
            for r in relpaths
        ],
        schema=ledger.SCHEMA,
    )


def relpaths(state) -> list[str]:
    return ledger.read(state)["relpath"].to_pylist()


def test_appends_accumulate_in_order_and_nothing_is_lost(tmp_path):
    ledger.append(tmp_path, rows("a", "b"))
    ledger.append(tmp_path, rows())  # nothing to commit: no file
    ledger.append(tmp_path, rows("c"))
    assert relpaths(tmp_path) == ["a", "b", "c"]
    assert len(list(ledger.folder(tmp_path).iterdir())) == 2


def test_an_append_that_fails_half_way_leaves_no_file_and_the_ledger_as_it_was(
    tmp_path, monkeypatch, caplog
):
    ledger.append(tmp_path, rows("a"))

    seen_mid_write = []

    def torn(table, path, **_kwargs):
        with open(path, "wb") as handle:
            handle.write(b"PAR1 half a segment")
        # What a run killed at this moment leaves: the ledger as it was, nothing torn.
        seen_mid_write.append(relpaths(tmp_path))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", torn)
    with pytest.raises(OSError):
        ledger.append(tmp_path, rows("b"))
    monkeypatch.undo()
    assert seen_mid_write == [["a"]]
    assert "unreadable" not in caplog.text
    names = [p.name for p in ledger.folder(tmp_path).iterdir()]
    assert len(names) == 1 and not any(n.endswith(TEMP_SUFFIX) for n in names)
    assert relpaths(tmp_path) == ["a"]
    ledger.append(tmp_path, rows("c"))
    assert relpaths(tmp_path) == ["a", "c"]


def test_an_unreadable_segment_is_ignored_with_a_warning(tmp_path, caplog):
    ledger.append(tmp_path, rows("a"))
    (ledger.folder(tmp_path) / "seg-0000000002.parquet").write_bytes(b"not parquet")
    ledger.append(tmp_path, rows("c"))
    assert relpaths(tmp_path) == ["a", "c"]
    assert "seg-0000000002.parquet is unreadable and ignored" in caplog.text


def test_an_empty_or_missing_ledger_reads_as_no_rows(tmp_path):
    assert ledger.read(tmp_path).num_rows == 0
    assert ledger.read(tmp_path, ledger.SOURCE_KEY).column_names == ledger.SOURCE_KEY


def test_compacting_keeps_every_row_once_and_later_appends_follow(tmp_path):
    for name in "abcde":
        ledger.append(tmp_path, rows(name))
    assert ledger.compact(tmp_path, max_segments=2)
    assert relpaths(tmp_path) == list("abcde")
    assert [p.name.split("-")[0] for p in ledger.folder(tmp_path).iterdir()] == ["base"]
    ledger.append(tmp_path, rows("f"))
    assert relpaths(tmp_path) == list("abcdef")
    assert not ledger.compact(tmp_path, max_segments=2)


def test_segments_left_by_a_crash_during_compaction_are_not_read_twice(tmp_path):
    for name in "abc":
        ledger.append(tmp_path, rows(name))
    kept = tmp_path / "kept"
    shutil.copytree(ledger.folder(tmp_path), kept)
    ledger.compact(tmp_path, max_segments=1)
    for segment in kept.iterdir():  # as if the crash came before they were removed
        shutil.copy(segment, ledger.folder(tmp_path) / segment.name)
    assert relpaths(tmp_path) == ["a", "b", "c"]
    ledger.append(tmp_path, rows("d"))
    assert relpaths(tmp_path) == ["a", "b", "c", "d"]


def test_rows_by_key_matches_on_the_whole_file_version(tmp_path):
    table = pa.table(
        {
            "relpath": ["a", "b", "c", "a", "a"],
            "size": [10, 10, 11, 10, 10],
            "mtime_ns": [1, 2, 1, 1, 1],
            "ctime_ns": [1, 1, 1, 2, 1],  # the 4th: rewritten, its old mtime set back
            "ino": pa.array([1, 1, 1, 1, 2], pa.uint64()),  # the 5th: renamed over it
            "x": [1, 2, 3, 4, 5],
        }
    )
    known = rows("a", "b", "c")  # all size 10, mtime 1, ctime 1, inode 1
    assert ledger.rows_by_key(table, known, keep="found")["x"].to_pylist() == [1]
    assert ledger.rows_by_key(table, known, keep="missing")["x"].to_pylist() == [2, 3, 4, 5]
    assert ledger.rows_by_key(table, rows(), keep="missing").num_rows == 5


def test_the_ledger_prints_as_csv_where_every_file_went(tmp_path, capsysbinary):
    ledger.append(tmp_path, rows("a.dcm", "b.dcm"))
    assert ledger.main([str(tmp_path)]) == 0
    lines = capsysbinary.readouterr().out.decode().splitlines()
    header = '"relpath","size","mtime_ns","ctime_ns","ino","status","destination"'
    assert lines[0].startswith(header)
    assert [line.split(",")[6] for line in lines[1:]] == ['"P/S/a.dcm"', '"P/S/b.dcm"']


def test_a_v03_row_without_ctime_and_inode_matches_no_current_file(tmp_path):
    """A segment written before ctime and inode were recorded is read with nulls; its row
    is no current file's version (the file may have been rewritten since): such a file is
    planned again and found on disk by content. Between two v0.3 tables (an old pending
    plan against an old ledger) the key is (relpath, size, mtime), as it was."""
    v03 = rows("a").drop_columns(["ctime_ns", "ino"])
    ledger.folder(tmp_path).mkdir()
    pq.write_table(v03, ledger.folder(tmp_path) / "seg-0000000001.parquet")
    read = ledger.read(tmp_path)
    assert read.schema == ledger.SCHEMA
    assert read.to_pylist()[0]["ctime_ns"] is None and read.to_pylist()[0]["ino"] is None
    assert ledger.read(tmp_path, ledger.SOURCE_KEY).column_names == ledger.SOURCE_KEY
    current = rows("a")  # the same relpath, size and mtime, with a ctime and an inode
    assert ledger.rows_by_key(current, read, keep="missing").num_rows == 1
    assert ledger.rows_by_key(v03, read, keep="found").num_rows == 1


def test_a_ledger_written_before_patient_ids_were_kept_reads_with_nulls(tmp_path):
    old = rows("a", "b").drop_columns(["patient_id"])
    ledger.folder(tmp_path).mkdir(parents=True)
    pq.write_table(old, ledger.folder(tmp_path) / "seg-0000000001.parquet")
    new = rows("c")
    index = new.schema.get_field_index("patient_id")
    ledger.append(tmp_path, new.set_column(index, "patient_id", pa.array(["R1"])))
    committed = ledger.read(tmp_path)
    assert committed["relpath"].to_pylist() == ["a", "b", "c"]
    assert committed["patient_id"].to_pylist() == [None, None, "R1"]
    assert ledger.read(tmp_path, ["relpath", "patient_id"]).num_rows == 3


def test_patient_ids_compare_exactly_after_trimming_padding_spaces():
    values = pa.array(["r1", "R1", " r1 ", None, ""])
    assert ledger.patient_ids(values).to_pylist() == ["r1", "R1", "r1", "", ""]
