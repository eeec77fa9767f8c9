"""Partitions: the plan and the transfer as P independent jobs, the same tree whatever P is."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pytest
from test_settings import DEFAULTS

from conftest import assert_every_file_accounted_for, write_dicom
from dcmsort import demo, fileops, ledger, naming, partition, routes, settings
from dcmsort.fileops import with_schema
from dcmsort.naming import Naming
from dcmsort.routes import Part, parse_part

DEFAULT = Naming("{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}", "{filename}")


def sorted_tree(output_dir: Path) -> dict[str, bytes]:
    """Every sorted file (path -> bytes), the state folder left out."""
    return {
        str(p.relative_to(output_dir)): p.read_bytes()
        for p in output_dir.rglob("*")
        if p.is_file() and ".dcmsort" not in p.relative_to(output_dir).parts
    }


def jobs_run(output: str, rule: str) -> list[str]:
    """The partitions whose `rule` job ran, from Snakemake's output."""
    return re.findall(rf"rule {rule}:\n(?:    .*\n)*?    wildcards: part=(p\d+of\d+)", output)


# --- the key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "top"),
    [
        (
            "{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}",
            "{PatientName}_{PatientID}",
        ),
        ("{PatientID}", "{PatientID}"),
        ("{{x}}{PatientID:>8}/{StudyDate}", "{{x}}{PatientID:>8}"),
        ("MR/{PatientID}", "MR"),
    ],
)
def test_the_top_level_of_a_template_is_what_renders_the_first_folder(template, top):
    assert naming.top_level(template) == top
    values = {"PatientName": "DOE^JANE", "PatientID": "7", "SeriesDescription": "T1"}
    rendered = naming.render_path(template, values, "UNKNOWN")
    assert naming.render_path(top, values, "UNKNOWN") == rendered.split("/")[0]


def test_names_a_case_insensitive_file_system_merges_have_one_key():
    assert partition.key("DOE^JANE_1") == partition.key("doe^jane_1")
    assert partition.key("Müller_1") == partition.key("Mu\u0308ller_1")  # NFC and NFD
    assert partition.key("DOE^JANE_1") != partition.key("DOE^JANE_2")


def test_auto_keeps_one_partition_for_a_workstation_sized_input():
    assert routes.auto_partitions(0) == 1
    assert routes.auto_partitions(250_000) == 1
    assert routes.auto_partitions(250_001) == 2
    assert routes.auto_partitions(10_000_000) == 64


def test_parts_are_named_and_parsed_one_way():
    assert parse_part(Part(3, 8).name) == Part(3, 8)
    assert parse_part("p8of8") is None
    assert parse_part("plan") is None


def test_more_partitions_than_one_need_a_top_level_made_of_header_values(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(b"x")
    config = {**DEFAULTS, "input_dir": "in", "output_dir": "out", "partitions": 4}
    config["folder_template"] = "{input_folder}/{PatientID}"
    with pytest.raises(settings.ConfigError, match="partitions=4 needs a folder_template"):
        settings.resolve(config, cwd=tmp_path)
    assert settings.resolve({**config, "partitions": "auto"}, cwd=tmp_path).partitions is None


# --- the ledger of partitions ---------------------------------------------------------------


def ledger_rows(*keys: tuple[str, int | None]) -> pa.Table:
    rows = pa.table(
        {
            "relpath": [relpath for relpath, _ in keys],
            "size": [1] * len(keys),
            "mtime_ns": [1] * len(keys),
            "status": ["placed"] * len(keys),
            "destination": [f"d/{relpath}" for relpath, _ in keys],
            "part_key": pa.array([k for _, k in keys], pa.int64()),
        }
    )
    return with_schema(rows, ledger.SCHEMA)


def test_a_partition_reads_its_own_rows_and_those_no_partition_wrote(tmp_path):
    ledger.append(tmp_path, ledger_rows(("old", None)))  # before partitions
    ledger.append(tmp_path, ledger_rows(("a", 4), ("b", 5)), Part(0, 2))  # P=2: both in p0
    ledger.append(tmp_path, ledger_rows(("c", 6)), Part(2, 4))
    assert sorted(ledger.read(tmp_path, part=Part(0, 4))["relpath"].to_pylist()) == ["a", "old"]
    assert sorted(ledger.read(tmp_path, part=Part(1, 4))["relpath"].to_pylist()) == ["b", "old"]
    assert sorted(ledger.read(tmp_path, part=Part(2, 4))["relpath"].to_pylist()) == ["c", "old"]
    assert ledger.read(tmp_path).num_rows == 4


def test_a_partition_compacts_only_its_own_segments(tmp_path):
    for name in "abc":
        ledger.append(tmp_path, ledger_rows((name, 0)), Part(0, 2))
    ledger.append(tmp_path, ledger_rows(("z", 1)), Part(1, 2))
    assert ledger.compact(tmp_path, max_segments=2, part=Part(0, 2))
    names = sorted(p.name for p in ledger.folder(tmp_path).iterdir())
    assert names == ["p0of2-base-0000000003.parquet", "p1of2-seg-0000000001.parquet"]
    assert sorted(ledger.read(tmp_path)["relpath"].to_pylist()) == ["a", "b", "c", "z"]


# --- end to end -------------------------------------------------------------------------------


def test_four_partitions_give_the_tree_of_one(sorter, tmp_path):
    demo.generate_messy(sorter.input_dir)
    one = sorter.run(partitions=1)
    assert jobs_run(one.stdout + one.stderr, "plan") == ["p0of1"]
    other = type(sorter)(sorter.workdir, sorter.input_dir, tmp_path / "four")
    four = other.run(partitions=4)
    output = four.stdout + four.stderr
    assert sorted(jobs_run(output, "plan")) == [f"p{k}of4" for k in range(4)]
    assert sorted(jobs_run(output, "transfer")) == [f"p{k}of4" for k in range(4)]
    assert sorted_tree(other.output_dir) == sorted_tree(sorter.output_dir)
    assert other.summary()["files_sorted"] == sorter.summary()["files_sorted"]
    assert_every_file_accounted_for(other)


def test_a_rerun_runs_jobs_only_for_the_partitions_that_got_new_files(sorter):
    demo.generate(sorter.input_dir, patients=6, series=1, instances=2, junk=False)
    sorter.run(partitions=4)
    before = sorted_tree(sorter.output_dir)
    demo.generate(sorter.input_dir, patients=1, series=1, instances=2, first_patient=40)
    rerun = sorter.run(partitions=4)
    output = rerun.stdout + rerun.stderr
    part = Part(partition.key("SMITH^ANNA_PID00040") % 4, 4).name
    assert (sorter.output_dir / "SMITH^ANNA_PID00040").is_dir()
    assert jobs_run(output, "plan") == [part]
    assert jobs_run(output, "transfer") == [part]
    assert "2 new this run" in rerun.stderr
    after = sorted_tree(sorter.output_dir)
    assert {k: v for k, v in after.items() if k in before} == before, "nothing placed moved"
    assert_every_file_accounted_for(sorter)


def test_changing_the_partition_count_copies_nothing_again(sorter):
    demo.generate(sorter.input_dir, patients=5, series=2, instances=2, junk=False)
    sorter.run(partitions=1)
    before = sorted_tree(sorter.output_dir)
    for count in (4, 2, 1):
        demo.generate(sorter.input_dir, patients=1, series=1, instances=1, first_patient=60 + count)
        result = sorter.run(partitions=count)
        summary = sorter.summary()
        assert summary["files_new"] == 1, "only the new file is copied"
        # One partition: the plan job partitions the manifests itself, no partition job.
        assert ("checkpoint partition" in result.output) == (count > 1), result.output
    after = sorted_tree(sorter.output_dir)
    assert {k: after[k] for k in before} == before
    assert len(after) == len(before) + 3
    assert_every_file_accounted_for(sorter)


def test_a_run_stopped_at_another_partition_count_leaves_skipped_csv_whole(sorter):
    # One partition's routes are written by its plan job: a run stopped after the
    # partition job of another count replaced them, and the next run with one partition,
    # nothing new to plan, rewrote the report from that count's (unrun) plans: the files
    # the filters leave out vanished from skipped.csv and `dcmsort config` named 4.
    demo.generate(sorter.input_dir, patients=3, series=2, instances=1, junk=False)
    leave_out = {"exclude": "{SeriesNumber: ['2']}"}
    sorter.run(**leave_out)
    excluded = sorter.summary()["skipped"]
    assert excluded == 3
    sorter.run("--until", "partition", partitions=4, **leave_out)
    sorter.run(**leave_out)
    assert sorter.summary()["skipped"] == excluded
    assert_every_file_accounted_for(sorter)
    assert json.loads(routes.current(sorter.state).read_text())["partitions"] == 1


def test_a_run_after_the_ledger_and_the_parts_folder_were_removed_plans_again(sorter):
    # A plan job reads parts/<its rows>, which only the partition job writes; its output
    # (the routes) was still there, so Snakemake did not run it again, and the plan jobs
    # the removed ledger asks for had no input: a MissingInputException at every run.
    demo.generate(sorter.input_dir, patients=3, series=1, instances=1, junk=False)
    sorter.run(partitions=4)
    before = sorted_tree(sorter.output_dir)
    shutil.rmtree(sorter.state / "parts")
    shutil.rmtree(sorter.state / "ledger")
    result = sorter.run(partitions=4, check=False)
    assert result.returncode == 0, result.output[-2000:]
    assert sorter.summary()["files_new"] == 0
    assert sorted_tree(sorter.output_dir) == before
    assert_every_file_accounted_for(sorter)
    sorter.run(partitions=4)  # the partition job once more, under the routes' own name
    assert "Nothing to be done" in sorter.run(partitions=4).output


def test_patients_whose_names_differ_only_in_case_meet_in_one_partition(sorter, tmp_path):
    for folder, name in [("a", "Roe^Ann"), ("b", "ROE^ANN"), ("c", "roe^ann")]:
        write_dicom(
            sorter.input_dir / folder / "IM1.dcm", name=name, pid="r1", sop=f"1.{ord(folder)}"
        )
    sorter.run(partitions=8)
    patient_folders = [p.name for p in sorter.output_dir.iterdir() if p.name != ".dcmsort"]
    assert len(patient_folders) == 1, patient_folders
    one = type(sorter)(sorter.workdir, sorter.input_dir, tmp_path / "one")
    one.run(partitions=1)
    assert sorted_tree(one.output_dir) == sorted_tree(sorter.output_dir)


def test_plan_jobs_side_by_side_write_the_layout_record_at_once_without_failing(tmp_path):
    # Found in CI: two partitions' plan jobs wrote layout.json through one temporary name,
    # and the slower one's rename found it gone (the run failed; a rerun went through).
    layout = tmp_path / "layout.json"
    both_written = threading.Barrier(2)
    errors = []

    def write(writer: str) -> None:
        try:
            with fileops.atomic_path(layout, writer=writer) as tmp:
                tmp.write_text("{}")
                both_written.wait(timeout=10)
        except Exception as error:
            errors.append((writer, error))

    threads = [threading.Thread(target=write, args=(w,)) for w in ("p0of2", "p1of2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert layout.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["layout.json"]
