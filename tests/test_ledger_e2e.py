"""The ledger tells the truth across interrupted and failed runs (issue 10), and the output
folder is never written through what it already holds (issue 11): end to end, real files,
the real Snakemake."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import assert_every_file_accounted_for, tree_snapshot, write_dicom
from dcmsort import demo, ledger
from dcmsort.naming import fold
from dcmsort.runner import REPO


def output_files(sorter) -> dict[str, bytes]:
    """Every file dcmsort placed in the output tree (state folder left out), by path."""
    return {
        str(p.relative_to(sorter.output_dir)): (
            os.readlink(p).encode() if p.is_symlink() and p.is_dir() else p.read_bytes()
        )
        for p in sorter.output_dir.rglob("*")
        if (p.is_file() or p.is_symlink()) and ".dcmsort" not in p.parts
    }


def output_names(sorter) -> list[str]:
    """Every file or link in the output tree (state folder left out), dangling or not."""
    return sorted(
        str(p.relative_to(sorter.output_dir))
        for p in sorter.output_dir.rglob("*")
        if (p.is_symlink() or p.is_file()) and ".dcmsort" not in p.parts
    )


def touch_all(root: Path, seconds: int) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (seconds, seconds))


def test_a_duplicate_of_a_file_never_written_is_not_lost(sorter):
    # Issue 10 case 1: the same bytes twice, a run stopped after planning, both touched.
    content = write_dicom(sorter.input_dir / "p" / "a.dcm", sop="9.9")
    shutil.copyfile(sorter.input_dir / "p" / "a.dcm", sorter.input_dir / "b.dcm")
    sorter.run_until_planned()
    assert output_files(sorter) == {}
    touch_all(sorter.input_dir, 1_700_000_000)
    result = sorter.run()
    assert list(output_files(sorter).values()) == [content]
    summary = sorter.summary()
    assert (summary["files_sorted"], summary["duplicates"], summary["conflicts"]) == (1, 1, 0)
    assert "1 files sorted (1 new this run), 1 duplicates" in result.stderr
    assert_every_file_accounted_for(sorter)


def test_a_file_planned_but_never_written_keeps_its_plain_name_and_no_conflict(sorter):
    write_dicom(sorter.input_dir / "p" / "c.dcm")
    sorter.run_until_planned()
    touch_all(sorter.input_dir, 1_700_000_000)
    sorter.run()
    assert list(output_files(sorter)) == ["DOE^JOHN_1/T1_1/c.dcm"]
    assert sorter.summary()["conflicts"] == 0


def test_a_file_that_changes_between_plan_and_transfer_is_copied_once(sorter):
    # Issue 10 case 2: the plan read one version, the transfer finds another.
    path = sorter.input_dir / "p" / "a.dcm"
    write_dicom(path)
    sorter.run_until_planned()
    with path.open("ab") as handle:
        handle.write(b"\0\0")  # still being written when the transfer comes
    # The transfer job of that run, as the rule runs it, with the plan in hand (stale now).
    state = sorter.state
    transfer = subprocess.run(
        [
            *(sys.executable, str(REPO / "workflow" / "scripts" / "dcmsort_stage.py"), "transfer"),
            *("--plan", str(sorter.plan_files()[0]), "--input-dir", str(sorter.input_dir)),
            *("--output-dir", str(sorter.output_dir), "--state-dir", str(state)),
            *("--partition", "p0of1", "--results", str(sorter.workdir / "results.parquet")),
        ],
        capture_output=True,
        text=True,
    )
    assert transfer.returncode == 0, transfer.stderr
    assert "1 changed since read" in transfer.stderr
    assert output_files(sorter) == {}
    sorter.run()
    assert list(output_files(sorter).values()) == [path.read_bytes()]
    summary = sorter.summary()
    assert (summary["files_sorted"], summary["conflicts"]) == (1, 0)
    assert_every_file_accounted_for(sorter)


@pytest.mark.parametrize("how", ["touch", "copy without -p"])
def test_same_bytes_with_a_new_mtime_are_the_same_files(sorter, how):
    # Issue 10 case 3.
    demo.generate(sorter.input_dir, patients=2, series=1, instances=2, junk=False)
    sorter.run()
    before = output_files(sorter)
    if how == "touch":
        touch_all(sorter.input_dir, 1_800_000_000)
    else:
        copied = sorter.input_dir.with_name("copied")
        shutil.copytree(sorter.input_dir, copied, copy_function=shutil.copyfile)
        shutil.rmtree(sorter.input_dir)
        copied.rename(sorter.input_dir)
    sorter.run()
    summary = sorter.summary()
    assert output_files(sorter) == before, "no new copy"
    assert (summary["duplicates"], summary["sources_gone"], summary["files_new"]) == (0, 0, 0)
    assert summary["files_already_present"] == 4
    assert_every_file_accounted_for(sorter)


def test_files_deleted_after_an_interrupted_run_are_not_called_kept_copies(sorter):
    # Issue 10 case 4, copies: nothing was copied, so nothing is "gone (copies kept)".
    demo.generate(sorter.input_dir, patients=2, series=1, instances=2, junk=False)
    sorter.run_until_planned()
    shutil.rmtree(sorter.input_dir / "patient_2")
    sorter.run()
    summary = sorter.summary()
    assert (summary["files_sorted"], summary["sources_gone"]) == (2, 0)
    assert_every_file_accounted_for(sorter)


def test_a_deleted_input_in_symlink_mode_is_a_dangling_link_not_a_kept_copy(sorter):
    demo.generate(sorter.input_dir, patients=2, series=1, instances=1, junk=False)
    sorter.run(transfer_mode="symlink")
    shutil.rmtree(sorter.input_dir / "patient_2")
    result = sorter.run(transfer_mode="symlink")
    summary = sorter.summary()
    assert (summary["sources_gone"], summary["dangling_links"]) == (0, 1), "not a kept copy"
    assert "1 links dangling (their input is gone)" in result.stderr
    assert "point to input files that are gone" in (sorter.state / "report.html").read_text()


def test_a_failed_run_leaves_a_report_that_says_so_and_the_next_run_heals(sorter):
    # Issue 10 case 5: a transfer fails (someone puts a file where the plan put ours).
    write_dicom(sorter.input_dir / "first" / "IM1.dcm", name="FIRST")
    sorter.run()
    write_dicom(sorter.input_dir / "p" / "a.dcm")
    sorter.run_until_planned()
    planned = pq.read_table(sorter.plan_files()[0])["destination"][0].as_py()
    (sorter.output_dir / planned).parent.mkdir(parents=True)
    (sorter.output_dir / planned).write_bytes(b"someone else's file")
    failed = sorter.run(check=False)
    assert failed.returncode != 0
    assert "could not place p/a.dcm" in failed.output
    assert sorter.summary()["status"] == "failed"
    assert "failed" in (sorter.state / "report.html").read_text()
    healed = sorter.run()
    assert sorter.summary()["status"] == "complete"
    assert "dcmsort: 2 files sorted (1 new this run)" in healed.stderr
    assert (sorter.output_dir / planned).read_bytes() == b"someone else's file"
    assert_every_file_accounted_for(sorter)


def test_a_report_of_a_run_that_stopped_early_says_it_is_stale(sorter):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1, junk=False)
    sorter.run()
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1, first_patient=9)
    result = sorter.run_until_planned()
    assert sorter.summary()["status"] == "stale"
    assert "dcmsort [stale]: 1 files sorted" in result.stderr


def test_a_rerun_plans_and_commits_only_the_new_files(sorter):
    # Issue 10 case 6: the plan (and plan.csv) hold this run's new files only.
    demo.generate(sorter.input_dir, patients=3, series=1, instances=2, junk=False)
    sorter.run()
    demo.generate(sorter.input_dir, patients=1, series=1, instances=2, first_patient=40)
    sorter.run()
    (plan_file,) = sorter.plan_files()
    plan = pq.read_table(plan_file)
    assert {r.split("/")[0] for r in plan["relpath"].to_pylist()} == {"patient_40"}
    assert len((sorter.state / "plan.csv").read_text().splitlines()) == 1 + 2
    assert len(list(ledger.folder(sorter.state).glob("*.parquet"))) >= 2, "appended"
    assert sorter.summary()["files_sorted"] == 8
    assert_every_file_accounted_for(sorter)


# --- issue 11: what the output folder already holds --------------------------------------


def test_a_symlink_in_the_output_folder_is_never_followed(sorter, tmp_path):
    write_dicom(sorter.input_dir / "p" / "a.dcm", name="ROE^JANE", pid="2")
    write_dicom(sorter.input_dir / "q" / "b.dcm", name="OTHER", pid="3")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sorter.output_dir.mkdir()
    (sorter.output_dir / "ROE^JANE_2").symlink_to(sorter.input_dir / "q")
    (sorter.output_dir / "OTHER_3").symlink_to(elsewhere)
    before = tree_snapshot(sorter.input_dir)
    sorter.run()
    assert tree_snapshot(sorter.input_dir) == before
    assert list(elsewhere.iterdir()) == []
    assert sorted(output_files(sorter)) == [
        "OTHER_3",
        "OTHER_3_2/T1_1/b.dcm",
        "ROE^JANE_2",
        "ROE^JANE_2_2/T1_1/a.dcm",
    ]
    assert_every_file_accounted_for(sorter)


def test_a_regular_file_where_a_folder_must_go_is_a_taken_name(sorter):
    write_dicom(sorter.input_dir / "p" / "a.dcm")
    sorter.output_dir.mkdir()
    (sorter.output_dir / "DOE^JOHN_1").write_bytes(b"not a folder")
    sorter.run()
    assert (sorter.output_dir / "DOE^JOHN_1").read_bytes() == b"not a folder"
    assert "DOE^JOHN_1_2/T1_1/a.dcm" in output_files(sorter)
    assert "Nothing to be done" in sorter.run().output


def test_names_differing_only_in_case_are_distinct_destinations(sorter):
    write_dicom(sorter.input_dir / "p1" / "IM1.dcm", name="Doe^John", desc="t1")
    write_dicom(sorter.input_dir / "p2" / "IM1.dcm", name="DOE^JOHN", desc="T1")
    sorter.run()
    placed = list(output_files(sorter))
    assert len(placed) == 2
    assert len({fold(p) for p in placed}) == 2, placed
    assert_every_file_accounted_for(sorter)


# --- symlink mode: an input folder renamed --------------------------------------------------


def test_a_renamed_patient_folder_in_symlink_mode_is_relinked_not_a_conflict(sorter):
    write_dicom(sorter.input_dir / "p1" / "a.dcm", sop="1.1")
    write_dicom(sorter.input_dir / "p1" / "b.dcm", sop="1.2", instance=2)
    write_dicom(sorter.input_dir / "p2" / "c.dcm", name="ROE^JANE", pid="2")
    sorter.run(transfer_mode="symlink")
    before = output_names(sorter)
    (sorter.input_dir / "p1").rename(sorter.input_dir / "p1_renamed")
    result = sorter.run(transfer_mode="symlink")
    assert output_names(sorter) == before, "the same destinations, no _2 names"
    for name in ("a.dcm", "b.dcm"):
        link = sorter.output_dir / "DOE^JOHN_1" / "T1_1" / name
        assert os.readlink(link) == str(sorter.input_dir / "p1_renamed" / name)
        assert link.read_bytes() == (sorter.input_dir / "p1_renamed" / name).read_bytes()
    summary = sorter.summary()
    assert summary["files_relinked"] == 2
    assert (summary["conflicts"], summary["files_new"], summary["duplicates"]) == (0, 0, 0)
    assert (summary["sources_gone"], summary["dangling_links"]) == (0, 0)
    assert "2 relinked (their input moved)" in result.stderr
    assert_every_file_accounted_for(sorter)
    assert "Nothing to be done" in sorter.run(transfer_mode="symlink").output


# --- issue 21: any change a stat can see is a new version; a removed ledger is noticed --


def replace_keeping_mtime(path: Path, data: bytes, in_place: bool) -> None:
    """What ``cp -p``, ``rsync -t`` or an unzip with stored times do: other bytes, the old
    mtime set back (written in place, or a new file renamed over the old one)."""
    old = path.stat()
    if in_place:
        path.write_bytes(data)
    else:
        part = path.with_name(path.name + ".part")
        part.write_bytes(data)
        os.replace(part, path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))


@pytest.mark.parametrize("in_place", [True, False], ids=["written in place", "renamed over"])
def test_a_file_replaced_with_the_same_size_and_its_old_mtime_is_sorted(sorter, in_place):
    path = sorter.input_dir / "p" / "a.dcm"
    first = write_dicom(path, name="DOE^JOHN", pid="1", sop="1.2.3.1")
    sorter.run()
    corrected = write_dicom(sorter.workdir / "new.dcm", name="ROE^JANE", pid="2", sop="1.2.3.2")
    assert len(corrected) == len(first), "the test needs a replacement of the same size"
    replace_keeping_mtime(path, corrected, in_place)
    result = sorter.run()
    assert "nothing new" not in result.stderr
    placed = output_files(sorter)
    # Sorted by its own header (another patient), the first content's copy kept.
    assert placed == {"DOE^JOHN_1/T1_1/a.dcm": first, "ROE^JANE_2/T1_1/a.dcm": corrected}
    summary = sorter.summary()
    assert (summary["files_new"], summary["sources_gone"], summary["duplicates"]) == (1, 1, 0)
    assert_every_file_accounted_for(sorter)


def test_a_file_rewritten_with_its_own_bytes_and_old_mtime_is_present_not_copied(sorter):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=2, junk=False)
    sorter.run()
    before = output_files(sorter)
    path = next(p for p in sorter.input_dir.rglob("*") if p.is_file())
    replace_keeping_mtime(path, path.read_bytes(), in_place=True)  # cp -p onto itself
    sorter.run()
    summary = sorter.summary()
    assert output_files(sorter) == before, "no new copy"
    assert (summary["duplicates"], summary["sources_gone"], summary["files_new"]) == (0, 0, 0)
    assert summary["files_already_present"] == 1
    assert_every_file_accounted_for(sorter)
    assert "Nothing to be done" in sorter.run().output


def test_an_output_sorted_by_v03_is_recognised_by_content_and_nothing_is_copied_again(sorter):
    # State as v0.3 wrote it: one ledger group without partitions, no ctime, inode,
    # PatientID or partition key in the ledger, the manifests or the plan, batch manifests
    # named by the v0.3 fingerprint, no plan marker in the ledger folder, one pending plan.
    demo.generate(sorter.input_dir, patients=2, series=1, instances=2)
    sorter.run()
    before = output_files(sorter)
    placed = sorter.summary()["files_sorted"]
    state = sorter.state
    (plan_file,) = sorter.plan_files()
    plan_file.rename(state / "pending.parquet")  # as if its transfer had been killed
    old = [
        *(state / "ledger").glob("*.parquet"),
        *(state / "manifests").rglob("*.parquet"),
        state / "pending.parquet",
    ]
    for path in old:
        table = pq.read_table(path)
        added = {"ctime_ns", "ino", "patient_id", "part_key"} & set(table.column_names)
        pq.write_table(table.drop_columns(sorted(added)), path)
    for path in (state / "ledger").glob("p0of1-*.parquet"):
        path.rename(path.with_name(path.name.removeprefix("p0of1-")))
    for path in (state / "manifests").glob("batch-*.parquet"):
        path.rename(path.with_name(path.name.rsplit("-", 1)[0] + "-0123456789abcdef.parquet"))
    for path in (state / "ledger").glob("planned*.txt"):
        path.unlink()
    sorter.run()
    summary = sorter.summary()
    assert output_files(sorter) == before, "no new copy"
    assert (summary["files_new"], summary["sources_gone"]) == (0, 0)
    assert summary["files_already_present"] == placed
    assert_every_file_accounted_for(sorter)
    result = sorter.run(count_opens=True)
    print(result.output)
    assert "Nothing to be done" in result.output
    assert result.opened == []


def test_a_rerun_after_a_hardlink_run_reads_no_input_again(sorter):
    # A new hard link changes its input's ctime (the link count is in the inode).
    demo.generate(sorter.input_dir, patients=2, series=1, instances=2, junk=False)
    sorter.run(transfer_mode="hardlink")
    result = sorter.run(transfer_mode="hardlink", count_opens=True)
    assert result.opened == []
    summary = sorter.summary()
    assert (summary["files_new"], summary["files_already_present"]) == (0, 0)
    assert summary["headers_read"] == 0
    assert "Nothing to be done" in sorter.run(transfer_mode="hardlink").output
    assert_every_file_accounted_for(sorter)


@pytest.mark.parametrize("how", ["removed", "emptied"])
def test_a_run_after_the_ledger_was_removed_finds_every_sorted_file_again(sorter, how):
    demo.generate(sorter.input_dir, patients=2, series=2, instances=2)
    (sorter.input_dir / "patient_1" / "again.dcm").write_bytes(
        next((sorter.input_dir / "patient_1").rglob("*.dcm")).read_bytes()
    )  # a duplicate, found again as one
    sorter.run()
    before = output_files(sorter)
    sorted_before = sorter.summary()
    if how == "removed":
        shutil.rmtree(sorter.state / "ledger")
    else:
        for path in (sorter.state / "ledger").iterdir():
            path.unlink()
    result = sorter.run()
    assert "nothing new" not in result.stderr
    assert output_files(sorter) == before, "nothing copied twice"
    summary = sorter.summary()
    assert summary["files_new"] == 0
    assert summary["files_already_present"] == sorted_before["files_sorted"]
    for key in ("files_sorted", "duplicates", "skipped", "sources_gone", "conflicts"):
        assert summary[key] == sorted_before[key], key
    assert_every_file_accounted_for(sorter)
    assert "Nothing to be done" in sorter.run().output
