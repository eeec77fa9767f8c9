"""Reruns: only new work is done, placements never move, a killed run is completed."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_every_file_accounted_for, tree_snapshot
from dcmsort import demo
from dcmsort.fileops import TEMP_SUFFIX


def output_files(sorter) -> dict:
    return {
        k: v for k, v in tree_snapshot(sorter.output_dir).items() if not k.startswith(".dcmsort")
    }


@pytest.fixture
def sorted_once(sorter):
    demo.generate(sorter.input_dir, patients=6, series=2, instances=3)
    sorter.run()
    return sorter


def test_a_rerun_with_nothing_new_opens_no_input_and_writes_nothing(sorted_once):
    before = tree_snapshot(sorted_once.output_dir)
    result = sorted_once.run(count_opens=True)
    assert "Nothing to be done" in result.output
    assert result.opened == []
    assert tree_snapshot(sorted_once.output_dir) == before


def test_a_new_patient_folder_is_the_only_one_read_and_transferred(sorted_once):
    sorter = sorted_once
    old_outputs = output_files(sorter)
    new = demo.generate(sorter.input_dir, patients=1, series=2, instances=2, first_patient=50)
    result = sorter.run(count_opens=True)
    assert result.opened, "the open counter saw nothing: it is not working"
    assert {p.split("/")[0] for p in result.opened} == {"patient_50"}
    assert sorter.summary()["files_new"] == len(new)
    assert sorter.summary()["headers_read"] == len(new) + 2  # + Thumbs.db and notes.txt
    # The walk the Snakefile handed to the extract job is gone once it was read.
    assert list((sorter.state / "walks").iterdir()) == []
    after = output_files(sorter)
    assert all(after[k] == v for k, v in old_outputs.items()), "an earlier file was touched"
    assert_every_file_accounted_for(sorter)


def test_new_and_replaced_files_in_an_existing_folder_are_the_only_ones_read(sorted_once):
    sorter = sorted_once
    folder = sorter.input_dir / "patient_1" / "study_1" / "series_1"
    replaced = folder / "IM0001.dcm"
    before = sorter.outcomes().by_relpath()
    old_destination = before["patient_1/study_1/series_1/IM0001.dcm"]["destination"]
    old_copy = (sorter.output_dir / old_destination).read_bytes()
    replaced.write_bytes(replaced.read_bytes() + b"\0\0")  # re-exported: other size
    added = folder / "IM0099.dcm"
    added.write_bytes((folder / "IM0002.dcm").read_bytes())  # an identical copy, other name
    result = sorter.run(count_opens=True)
    opened = set(result.opened)
    assert opened <= {
        "patient_1/study_1/series_1/IM0001.dcm",
        "patient_1/study_1/series_1/IM0099.dcm",
        "patient_1/study_1/series_1/IM0002.dcm",
    }  # digest of a duplicate pair
    plan = assert_every_file_accounted_for(sorter).by_relpath()
    assert (sorter.output_dir / old_destination).read_bytes() == old_copy  # old copy stays
    assert plan["patient_1/study_1/series_1/IM0001.dcm"]["destination"] != old_destination
    assert plan["patient_1/study_1/series_1/IM0099.dcm"]["action"] == "duplicate"


def test_a_removed_source_keeps_its_sorted_copy_and_is_reported(sorted_once):
    sorter = sorted_once
    gone = sorter.input_dir / "patient_1" / "study_1" / "series_1" / "IM0001.dcm"
    before = output_files(sorter)
    gone.unlink()
    sorter.run()
    assert output_files(sorter) == before
    removed = (sorter.state / "removed_sources.csv").read_text()
    assert "patient_1/study_1/series_1/IM0001.dcm" in removed
    assert sorter.summary()["sources_gone"] == 1


def test_a_changed_naming_template_is_refused_for_an_existing_output(sorted_once):
    result = sorted_once.run(check=False, folder_template="{PatientID}/{Modality}")
    assert result.returncode != 0
    assert "dcmsort: error: folder_template is '{PatientID}/{Modality}' but" in result.stderr


def test_a_changed_transfer_mode_keeps_earlier_files_and_says_so(sorted_once):
    sorter = sorted_once
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1, first_patient=60)
    sorter.run(transfer_mode="hardlink")
    summary = sorter.summary()
    assert (summary["previous_transfer_mode"], summary["transfer_mode"]) == ("copy", "hardlink")
    assert (
        "transfer_mode changed from copy to hardlink" in (sorter.state / "report.html").read_text()
    )
    assert_every_file_accounted_for(sorter)


def test_a_second_run_on_the_same_output_is_refused(sorted_once):
    sorter = sorted_once
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1, first_patient=70)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from dcmsort.settings import acquire_run_lock as a; a(Path(sys.argv[1])); "
            "print('held', flush=True); time.sleep(120)",
            str(sorter.state),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = sorter.run(check=False)
        assert result.returncode != 0
        assert "dcmsort: error: another dcmsort run (pid" in result.stderr
        assert not (sorter.output_dir / "ROSSI^FATIMA_PID00070").exists()
    finally:
        holder.kill()
        holder.wait()
    sorter.run()  # the holder died: no stale lock, no --unlock needed
    assert_every_file_accounted_for(sorter)


@pytest.mark.parametrize(
    ("stage", "partitions", "rerun_partitions"),
    # (4, 1): the rerun has no partition job; its plan job settles the killed transfers.
    [("extract", 1, 1), ("transfer", 1, 1), ("transfer", 4, 4), ("transfer", 4, 1)],
)
def test_a_run_killed_with_sigkill_is_completed_by_a_plain_rerun(
    sorter, stage, partitions, rerun_partitions
):
    demo.generate(sorter.input_dir, patients=24, series=3, instances=30, rows=128, junk=False)
    before = tree_snapshot(sorter.input_dir)
    process = subprocess.Popen(
        sorter.command(partitions=partitions),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def reached() -> bool:
        if stage == "extract":
            return (sorter.state / "manifests" / "folders").exists()
        return any((sorter.state / "plan").glob("p*.parquet"))

    deadline = time.monotonic() + 120
    while not reached() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(stage).uniform(0.05, 0.4))
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    sorter.run(partitions=rerun_partitions)
    assert tree_snapshot(sorter.input_dir) == before
    assert_every_file_accounted_for(sorter)
    stray = [p for p in sorter.output_dir.rglob(f"*{TEMP_SUFFIX}")]
    assert stray == []
