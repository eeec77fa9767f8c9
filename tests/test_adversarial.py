"""Adversarial end-to-end tests: each one broke a promise of README.md, config/README.md or
docs/design.md when it was written (a fresh clone, attacked as a user would), and guards
its fix. Real files, the real Snakemake, small inputs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from conftest import assert_every_file_accounted_for, write_dicom


def tree_files(output_dir: Path) -> list[str]:
    """Every file or link in the output tree (state folder left out), hidden ones too."""
    found = []
    for top, dirs, names in os.walk(output_dir):
        dirs[:] = [d for d in dirs if not (top == str(output_dir) and d == ".dcmsort")]
        found += [os.path.relpath(os.path.join(top, n), output_dir) for n in names]
    return sorted(found)


# --- 1. change detection lives in the working directory's .snakemake/ -------------------


def test_new_files_are_sorted_when_the_next_run_starts_from_another_folder(sorter, tmp_path):
    # README "Where to run from": run from the checkout or from any folder with -s; "Adding
    # new data": put new files into input_dir and run the same command again.
    for i in range(3):
        write_dicom(sorter.input_dir / "p1" / f"IM{i}.dcm", instance=i + 1)
    sorter.run()
    for i in range(3):
        write_dicom(
            sorter.input_dir / "p2" / f"IM{i}.dcm", name="ROE^JANE", pid="2", instance=i + 1
        )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sorter.workdir = elsewhere  # e.g. yesterday from the checkout, today from /data
    result = sorter.run()
    assert "nothing new" not in result.output, result.output[-1500:]
    assert_every_file_accounted_for(sorter)


def test_new_files_are_sorted_after_dot_snakemake_is_removed(sorter):
    # The state "travels with the output"; Snakemake's bookkeeping in the working directory
    # is not part of it, yet losing it makes new files invisible.
    write_dicom(sorter.input_dir / "p1" / "IM0.dcm")
    sorter.run()
    shutil.rmtree(sorter.workdir / ".snakemake")
    write_dicom(sorter.input_dir / "p1" / "IM1.dcm", instance=2)
    sorter.run()
    assert_every_file_accounted_for(sorter)


# --- 2. what a killed transfer leaves behind -----------------------------------------------


def kill_when(sorter, condition, timeout: float = 120) -> None:
    """Start a run and SIGKILL its whole process group as soon as condition() holds."""
    proc = subprocess.Popen(
        sorter.command(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and not condition():
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _kill_when_a_temp_file_appears(sorter) -> None:
    kill_when(
        sorter, lambda: any(n.endswith(".dcmsort-tmp") for n in tree_files(sorter.output_dir))
    )


def test_no_temp_file_or_unrecorded_copy_is_left_after_a_killed_run_and_a_rename(sorter):
    # README: a half-written file only exists under a hidden temporary name "which the rerun
    # replaces"; no temp files after a successful run; the summary equals the tree.
    # A big file (its copy takes a while) in one folder, small ones in others.
    for i in range(2):
        write_dicom(
            sorter.input_dir / "big" / f"IM{i}.dcm", name="BIG", pid="9", rows=6000, instance=i
        )
    for i in range(20):
        write_dicom(sorter.input_dir / "small" / f"IM{i}.dcm", instance=i + 1)
    _kill_when_a_temp_file_appears(sorter)
    temps = [n for n in tree_files(sorter.output_dir) if n.endswith(".dcmsort-tmp")]
    assert temps, "the run was not killed during a copy; retry"
    # Between the runs the user tidies the input: renames every file (the killed run may
    # have placed some without committing them).
    for folder in ("big", "small"):
        for path in sorted((sorter.input_dir / folder).iterdir()):
            path.rename(path.with_name("renamed_" + path.name))
    sorter.run()
    assert_every_file_accounted_for(sorter)
    files = tree_files(sorter.output_dir)
    assert not [n for n in files if n.endswith(".dcmsort-tmp")], files
    summary = sorter.summary()
    assert summary["files_sorted"] == len(files), (summary["files_sorted"], files)


# --- 3. a touched file with an identical twin becomes a duplicate ----------------------


def test_touching_a_placed_file_that_has_a_twin_does_not_make_it_a_duplicate(sorter):
    # README "Adding new data": a file with the same bytes but a new mtime "is recognised by
    # content: nothing is copied again, and it is neither a duplicate nor gone".
    write_dicom(sorter.input_dir / "p" / "IM1.dcm", sop="1.2.3")
    (sorter.input_dir / "q").mkdir()
    shutil.copyfile(sorter.input_dir / "p" / "IM1.dcm", sorter.input_dir / "q" / "copy.dcm")
    sorter.run()
    before = sorter.summary()
    assert (before["files_sorted"], before["duplicates"]) == (1, 1)
    os.utime(sorter.input_dir / "p" / "IM1.dcm", (1_800_000_000, 1_800_000_000))
    sorter.run()
    after = sorter.summary()
    result = assert_every_file_accounted_for(sorter)
    assert (after["files_sorted"], after["duplicates"]) == (1, 1), after
    assert sorted(result.column("action")) == ["duplicate", "sort"]


# --- 4. a sorted copy removed by hand: every later run fails -------------------------------


def test_a_copy_removed_from_the_output_does_not_make_every_later_run_fail(sorter):
    # README: a failed transfer "makes the run exit non-zero ... and the next run plans those
    # files again"; the log says "it is planned again by the next run". Here no run ever
    # succeeds again: the plan keeps pointing the file at the removed copy.
    write_dicom(sorter.input_dir / "p" / "IM1.dcm", sop="1.2.3")
    sorter.run(verify="checksum")
    (sorter.output_dir / "DOE^JOHN_1" / "T1_1" / "IM1.dcm").unlink()
    # The same image arrives again in a later export.
    (sorter.input_dir / "again").mkdir()
    shutil.copy2(sorter.input_dir / "p" / "IM1.dcm", sorter.input_dir / "again" / "IM1.dcm")
    for _ in range(2):
        result = sorter.run(check=False, verify="checksum")
    assert result.returncode == 0, result.output[-2000:]
    assert_every_file_accounted_for(sorter)


# --- 5. a report marked "running" by a killed run stays so forever ----------------------


def test_a_killed_run_followed_by_nothing_to_do_does_not_leave_the_report_running(sorter):
    # README: killed at any moment, "run the same command again"; the report says "running"
    # only while a run is going ("Rerun to update them"). A user drops a folder in by
    # mistake, stops the run, takes the folder out and reruns: the report must not say
    # "running" for good (it did: a run with nothing to do never cleared it).
    write_dicom(sorter.input_dir / "p" / "IM1.dcm")
    sorter.run()
    write_dicom(sorter.input_dir / "mistake" / "IM1.dcm", name="X", pid="2")
    kill_when(sorter, lambda: '"running"' in (sorter.state / "summary.json").read_text(), 30)
    shutil.rmtree(sorter.input_dir / "mistake")
    result = sorter.run()  # nothing to sort, but the report is rewritten: it was stale
    assert sorter.summary()["status"] == "complete", result.output[-600:]
    assert "Nothing to be done" in sorter.run().output


# --- 6. a file of the user's at a temporary name is deleted (issue 21, item 3) -------------


def test_a_users_file_and_link_at_a_temporary_name_are_left_as_they_are(sorter):
    # README "If a run is interrupted or fails": dcmsort removes only the temporary files
    # it can prove it made. A file and a link of the user's, there before the very first
    # run, at the names the temporary files had always had: both were deleted.
    write_dicom(sorter.input_dir / "p" / "a.dcm", name="ROE^JANE", pid="2", desc="SER")
    data = write_dicom(sorter.input_dir / "p" / "b.dcm", name="ROE^JANE", pid="2", desc="SER")
    series = sorter.output_dir / "ROE^JANE_2" / "SER_1"
    series.mkdir(parents=True)
    (series / ".a.dcm.dcmsort-tmp").write_bytes(b"the user's notes")
    (sorter.output_dir / "elsewhere").write_bytes(b"the user's other file")
    (series / ".b.dcm.dcmsort-tmp").symlink_to(sorter.output_dir / "elsewhere")
    sorter.run()
    sorter.run()  # a rerun (it settles the last plan) leaves them too
    assert (series / ".a.dcm.dcmsort-tmp").read_bytes() == b"the user's notes"
    assert os.readlink(series / ".b.dcm.dcmsort-tmp") == str(sorter.output_dir / "elsewhere")
    assert (sorter.output_dir / "elsewhere").read_bytes() == b"the user's other file"
    assert_every_file_accounted_for(sorter)
    assert (series / "b.dcm").read_bytes() == data
    temps = [n for n in tree_files(sorter.output_dir) if n.endswith(".dcmsort-tmp")]
    assert sorted(temps) == [f"ROE^JANE_2/SER_1/.{n}.dcm.dcmsort-tmp" for n in "ab"]
