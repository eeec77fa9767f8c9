"""A sorted copy changed or removed by hand (issue 21, item 5): a plain run trusts the ledger
and does not look; a run with ``check`` finds it, restores it from its input, and reports
what it cannot restore. End to end, the real Snakemake."""

from __future__ import annotations

import csv
import os

import pytest

from conftest import assert_every_file_accounted_for, write_dicom
from dcmsort.status import DAMAGE_LEFT

COPY = "DOE^JOHN_1/T1_1/IM1.dcm"


@pytest.fixture
def sorted_once(sorter):
    original = write_dicom(sorter.input_dir / "p" / "IM1.dcm", sop="1.2.3", rows=64)
    write_dicom(sorter.input_dir / "p" / "IM2.dcm", sop="1.2.4", instance=2)
    sorter.run()
    sorter.original = original
    return sorter


def check_rows(sorter) -> dict[str, dict]:
    with open(sorter.state / "check.csv", newline="", encoding="utf-8") as f:
        return {row["destination"]: row for row in csv.DictReader(f)}


def test_a_truncated_copy_is_restored_by_a_run_with_check_and_the_report_lists_it(sorted_once):
    sorter = sorted_once
    copy = sorter.output_dir / COPY
    os.truncate(copy, 1000)
    plain = sorter.run(count_opens=True, opens_below=sorter.output_dir)
    assert copy.stat().st_size == 1000, "a plain run does not look at placed files"
    assert sorter.summary()["check"] is None
    assert not [p for p in plain.opened if not p.startswith(".dcmsort")]

    result = sorter.run(keys={"check": "true"})
    assert copy.read_bytes() == sorted_once.original
    kept = sorter.output_dir / (COPY + ".dcmsort-damaged-1")
    assert kept.read_bytes() == sorted_once.original[:1000], "the damaged file is kept"
    row = check_rows(sorter)[COPY]
    assert (row["outcome"], row["source"]) == ("restored", "p/IM1.dcm")
    assert row["problem"] == f"wrong size: 1,000 of {len(sorted_once.original):,} bytes"
    check = sorter.summary()["check"]
    assert (check["placements"], check["restored"], check["damaged"]) == (2, 1, 0)
    assert "checked 2 placements: 1 restored" in result.stderr
    report = (sorter.state / "report.html").read_text()
    assert "Check: placements missing or damaged" in report and "IM1.dcm" in report
    assert_every_file_accounted_for(sorter)


def test_the_plain_run_after_a_check_opens_no_input_and_the_next_has_nothing_to_do(sorted_once):
    sorter = sorted_once
    sorter.run(keys={"check": "true"})
    plain = sorter.run(count_opens=True)  # this run's check result is gone from its inputs
    assert plain.opened == []
    assert sorter.summary()["files_new"] == 0
    assert "Nothing to be done" in sorter.run().output
    assert_every_file_accounted_for(sorter)


def test_a_deleted_copy_is_restored_by_a_run_with_check(sorted_once):
    sorter = sorted_once
    (sorter.output_dir / COPY).unlink()
    sorter.run(keys={"check": "true"})
    assert (sorter.output_dir / COPY).read_bytes() == sorted_once.original
    assert check_rows(sorter)[COPY]["problem"] == "missing"
    assert_every_file_accounted_for(sorter)


def test_a_damaged_copy_whose_input_is_gone_is_kept_reported_and_fails_the_run(sorted_once):
    sorter = sorted_once
    os.truncate(sorter.output_dir / COPY, 1000)
    (sorter.input_dir / "p" / "IM1.dcm").unlink()
    result = sorter.run(check=False, keys={"check": "true"})
    assert result.returncode == DAMAGE_LEFT, result.output[-2000:]
    assert (sorter.output_dir / COPY).stat().st_size == 1000, "never deleted"
    row = check_rows(sorter)[COPY]
    assert row["outcome"] == "damaged"
    assert "input is gone" in row["detail"]
    assert sorter.summary()["check"]["damaged"] == 1
    assert sorter.summary()["status"] == "complete"
    assert "1 damaged (see" in result.stderr and "check.csv" in result.stderr
    assert_every_file_accounted_for(sorter)


def test_check_checksum_restores_a_copy_whose_touched_input_a_plain_run_cannot_place(sorter):
    # With digests in the ledger, a touched input's plan row names the damaged copy as its
    # content: every plain run fails on it (the copy is never overwritten); a run with
    # check restores the copy first, and the run succeeds.
    write_dicom(sorter.input_dir / "p" / "IM1.dcm", sop="1.2.3", rows=64)
    sorter.run(verify="checksum")
    os.truncate(sorter.output_dir / COPY, 1000)
    os.utime(sorter.input_dir / "p" / "IM1.dcm", (1_800_000_000, 1_800_000_000))
    assert sorter.run(check=False, verify="checksum").returncode != 0
    sorter.run(verify="checksum", keys={"check": "checksum"})
    assert check_rows(sorter)[COPY]["outcome"] == "restored"
    assert_every_file_accounted_for(sorter)


def test_check_checksum_finds_changed_bytes_that_a_size_check_cannot(sorted_once):
    sorter = sorted_once
    copy = sorter.output_dir / COPY
    damaged = bytearray(copy.read_bytes())
    damaged[-1] ^= 0xFF
    copy.write_bytes(damaged)
    sorter.run(keys={"check": "size"})
    assert check_rows(sorter) == {}
    sorter.run(keys={"check": "checksum"})
    assert check_rows(sorter)[COPY]["problem"] == "content differs from its input"
    assert copy.read_bytes() == sorted_once.original
