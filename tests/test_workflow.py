"""End to end: the real snakemake on real DICOM files (generated, and pydicom's own)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from pydicom.data import get_testdata_files

from conftest import Sorter, assert_every_file_accounted_for, tree_snapshot
from dcmsort import archives, demo, inventory, naming
from dcmsort.runner import SNAKEFILE, snakemake_command


def test_demo_data_is_sorted_into_the_seed_layout_and_the_input_is_untouched(sorter):
    written = demo.generate(sorter.input_dir, patients=3, series=2, instances=3)
    before = tree_snapshot(sorter.input_dir)
    result = sorter.run()
    assert result.returncode == 0
    assert tree_snapshot(sorter.input_dir) == before
    plan = assert_every_file_accounted_for(sorter)
    assert len(plan.where(action="sort")) == len(written)
    first = sorter.output_dir / "GARCIA^FATIMA_PID00001" / "T1 MPRAGE_1" / "IM0001.dcm"
    assert (
        first.read_bytes()
        == (sorter.input_dir / "patient_1/study_1/series_1/IM0001.dcm").read_bytes()
    )
    assert set(plan.where(action="skip").column("reason")) == {
        "not DICOM (no DICM preamble and no DICOM identifiers)"
    }
    assert (
        "dcmsort: 18 files sorted (18 new this run), 0 duplicates, 0 conflicts, 6 skipped"
        in result.stderr
    )


def test_every_bundled_pydicom_test_file_is_accounted_for(sorter):
    bundled = sorted(p for p in get_testdata_files() if os.path.isfile(p))
    for index, path in enumerate(bundled):
        # Spread over a few patient folders, some flat, one nested, names kept.
        target = sorter.input_dir / f"folder_{index % 4}" / ("sub" if index % 3 else "")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / f"{index:03d}_{path.rsplit('/', 1)[-1]}")
    before = tree_snapshot(sorter.input_dir)
    sorter.run()
    assert tree_snapshot(sorter.input_dir) == before
    plan = assert_every_file_accounted_for(sorter)
    from collections import Counter

    # Every file not listed here is sorted: DICOM with or without UIDs (anonymised objects
    # and bare file meta groups included), big and little endian, every transfer syntax.
    not_dicom = "not DICOM (no DICM preamble and no DICOM identifiers)"
    dicomdir = "DICOMDIR (an index of a DICOM medium, not an image)"
    expected = {
        ("DICOMDIR", "skip", dicomdir): 2,
        **{(f"DICOMDIR-{k}", "skip", dicomdir): 1 for k in ("nooffset", "bigEnd")},
        **{(f"DICOMDIR-{k}", "skip", dicomdir): 1 for k in ("nopatient", "reordered")},
        ("DICOMDIR-implicit", "skip", dicomdir): 1,
        ("DICOMDIR-empty.dcm", "skip", dicomdir): 1,
        ("README.txt", "skip", not_dicom): 2,
        **{(name, "skip", not_dicom): 1 for name in ("README", "test1.json", "test_PN.json")},
        ("crayons.icc", "skip", not_dicom): 1,
        # A gzip of one DICOM file: compressed, but no tar inside (README, "Archives").
        ("zipMR.gz", "skip", archives.NOT_A_TAR): 1,
        **{(name, "skip", not_dicom): 1 for name in ("rtplan.dump", "rtstruct.dump")},
        # One stray byte before the first element: not recognisable as DICOM.
        ("no_meta.dcm", "skip", not_dicom): 1,
        (
            "meta_missing_tsyntax.dcm",
            "skip",
            "damaged DICOM: file meta information without a transfer syntax, and no SOP, "
            "series or study UID",
        ): 1,
        # The same bytes as SC_rgb_jpeg_app14_dcmd.dcm, which is kept: its name is shorter.
        ("SC_jpeg_no_color_transform_2.dcm", "duplicate", None): 1,
    }
    outcomes = Counter(
        (
            row["relpath"].rsplit("/", 1)[-1][4:],
            row["action"],
            row["reason"] if row["action"] == "skip" else None,
        )
        for row in plan
    )
    not_sorted = {k: n for k, n in outcomes.items() if k[1] != "sort"}
    assert not_sorted == expected
    assert len(plan.where(action="sort")) == len(bundled) - sum(expected.values())
    for destination in [d for d in plan.column("destination") if d is not None]:
        assert all(naming.is_safe_component(part) for part in destination.split("/"))


def test_messy_input_every_file_lands_where_promised_or_is_reported(sorter):
    expected = demo.generate_messy(sorter.input_dir)
    before = tree_snapshot(sorter.input_dir)
    result = sorter.run()
    assert tree_snapshot(sorter.input_dir) == before
    plan = assert_every_file_accounted_for(sorter)
    by_relpath = plan.by_relpath()
    for relpath, expect in expected.items():
        row = by_relpath[relpath]
        assert row["action"] == expect.action, (relpath, row)
        if expect.folder:
            assert row["destination"].rsplit("/", 1)[0] == expect.folder, relpath
        if expect.reason:
            assert expect.reason in row["reason"], (relpath, row["reason"])
        assert bool(row["conflict"]) == expect.conflict, relpath
    destinations = [d for d in plan.column("destination") if d is not None]
    for destination in destinations:
        assert all(naming.is_safe_component(part) for part in destination.split("/"))
    localizers = {d.rsplit("/", 1)[0] for d in destinations if "LOCALIZER" in d}
    assert len(localizers) == 2
    pair = [by_relpath[r]["action"] for r in ("p_plain/IM1.dcm", "p_dups/copy_of_IM1.dcm")]
    assert sorted(pair) == ["duplicate", "sort"]
    same_name = [by_relpath[r]["destination"] for r in ("p_plain/a/IM9.dcm", "p_plain/b/IM9.dcm")]
    assert len(set(same_name) - {None}) == 2
    summary = sorter.summary()
    assert (summary["duplicates"], summary["conflicts"]) == (1, 2)
    assert f"{summary['skipped']} skipped" in result.stderr


@pytest.mark.parametrize("mode", ["hardlink", "symlink"])
def test_link_modes_place_every_file(sorter, mode):
    demo.generate(sorter.input_dir, patients=2, series=1, instances=2)
    sorter.run(transfer_mode=mode)
    plan = assert_every_file_accounted_for(sorter)
    for row in plan.where(action="sort"):
        placed = sorter.output_dir / row["destination"]
        assert placed.is_symlink() == (mode == "symlink")
        if mode == "symlink":  # absolute, as promised: valid wherever the output is read
            assert os.readlink(placed) == str(sorter.input_dir / row["relpath"])
        else:
            assert placed.samefile(sorter.input_dir / row["relpath"])
    assert sorter.summary()["files_new"] == 4


# Each line names the key and says what to do about it.
@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"input_dir": "/nonexistent/Unclassified"},
            "input_dir /nonexistent/Unclassified does not exist; set input_dir to the folder",
        ),
        ({"output_dir": "INPUT/sorted"}, "is inside input_dir INPUT; choose an output_dir"),
        ({"output_dir": "WORK/out{x}"}, "contains '{' or '}', which Snakemake reads as a wildcard"),
        ({"output_dir": "WORK/a_file"}, "output_dir WORK/a_file is a file, not a folder; choose"),
        ({"inptu_dir": "x"}, "'inptu_dir' is not a dcmsort key (did you mean input_dir?)"),
        ({"folder_template": "{PatientNmae}"}, "PatientNmae}', which is not a DICOM keyword"),
        ({"folder_template": "{}"}, "empty field '{}'; put a DICOM keyword in the braces"),
        ({"folder_template": "{SeriesNumber:%Y}"}, "formats no value"),
        ({"folder_template": "{PatientID, Modality}"}, "quote it on the command line: --config"),
        # Snakemake reads `key=""` as None: refused as empty, not as unquoted.
        ({"folder_template": '""'}, "folder_template is empty; leave it out for the default"),
        ({"placeholder": "''"}, "placeholder is empty; leave it out for the default"),
        ({"file_template": "a/{filename}"}, "contains '/', but it names one file; put folders"),
        ({"folder_template": "{PatientID}//{Modality}"}, "has an empty folder level ('//'"),
        # A file system that makes no folder where it is asked to (was: RecursionError).
        ({"output_dir": "/proc/dcmsort-out"}, "/proc/dcmsort-out: No such file or directory"),
        ({"transfer_mode": "move"}, "transfer_mode must be one of copy, hardlink, symlink"),
        ({"batches": 0}, "batches must be a whole number from 1 to 10000, or auto, not 0"),
    ],
)
def test_bad_config_is_one_clear_line_and_no_traceback(sorter, config, message):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1)
    (sorter.workdir / "a_file").write_text("")
    places = {"INPUT": str(sorter.input_dir), "WORK": str(sorter.workdir)}
    for name, path in places.items():
        config = {k: str(v).replace(name, path) for k, v in config.items()}
        message = message.replace(name, path)
    result = sorter.run(check=False, **config)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("dcmsort: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert not sorter.output_dir.exists()


@pytest.mark.parametrize("given", [{"batches": 1}, {"input_dir": "."}, {"output_dir": "out"}])
def test_a_run_without_both_folders_says_what_to_pass(tmp_path, given):
    proc = subprocess.run(
        snakemake_command(tmp_path, **given), capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dcmsort: error:")]
    assert len(errors) == 1, proc.stderr
    assert "not set; every run names its folders: snakemake --config input_dir=" in errors[0]
    assert "Traceback" not in proc.stderr


def test_a_template_of_no_dicom_keyword_sorts_by_input_folder(sorter):
    # No keyword to read but the identifying ones: the extract job gets an empty list.
    demo.generate(sorter.input_dir, patients=2, series=1, instances=2, junk=False)
    sorter.run(folder_template="{input_folder}")
    folders = sorted(p.name for p in sorter.output_dir.iterdir() if p.name != ".dcmsort")
    assert folders == ["patient_1", "patient_2"]
    assert_every_file_accounted_for(sorter)


def test_a_template_typed_without_quotes_is_taken_as_text(sorter):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1)
    # The shell passes `folder_template={PatientID}`, which Snakemake reads as YAML.
    result = sorter.run("-n", folder_template="{PatientID}")
    assert "extract" in result.stdout and "plan" in result.stdout


def test_a_run_started_inside_the_input_is_refused_and_leaves_it_untouched(sorter):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1)
    before = tree_snapshot(sorter.input_dir)
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--config"]
    for cwd in (sorter.input_dir, sorter.input_dir / "patient_1"):
        proc = subprocess.run(
            [*command, f"input_dir={sorter.input_dir}", f"output_dir={sorter.output_dir}"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode != 0
        assert "working directory" in proc.stderr and "is inside input_dir" in proc.stderr
        assert "; run from outside it" in proc.stderr
    assert tree_snapshot(sorter.input_dir) == before  # no .snakemake/ left behind


def test_snakemake_s_from_any_folder_finds_the_config_and_the_profile(tmp_path):
    """As the README says: `snakemake -s path/to/Snakefile` from anywhere, no --cores (the
    default profile beside the Snakefile gives it) and no configfile argument."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sorter = Sorter(elsewhere, tmp_path / "in", tmp_path / "out")
    demo.generate(sorter.input_dir, patients=1, series=1, instances=2)
    folders = ["input_dir=../in", "output_dir=../out"]
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--config", *folders],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Using workflow specific profile {SNAKEFILE.parent / 'profiles' / 'default'}" in (
        proc.stdout + proc.stderr
    )
    assert_every_file_accounted_for(sorter)
    assert (elsewhere / ".snakemake").is_dir()


def test_a_state_dir_elsewhere_holds_all_state(sorter):
    demo.generate(sorter.input_dir, patients=2, series=1, instances=2)
    state = sorter.workdir / "state"
    result = sorter.run(state_dir=state)
    assert any(state.glob("partitions-*.json")) and (state / "report.html").is_file()
    assert (state / "logs").is_dir()
    assert not (sorter.output_dir / ".dcmsort").exists()
    assert f"report: {state / 'report.html'}" in result.stderr
    assert not any(p.name.startswith(".") for p in sorter.output_dir.iterdir())


def test_a_file_template_with_a_format_spec_names_files_as_rendered(sorter):
    demo.generate(sorter.input_dir, patients=2, series=2, instances=2, junk=False)
    sorter.run(file_template="{InstanceNumber:04d}.dcm")
    plan = assert_every_file_accounted_for(sorter)
    names = [d.rsplit("/", 1)[-1] for d in plan.where(action="sort").column("destination")]
    assert sorted(names) == ["0001.dcm"] * 4 + ["0002.dcm"] * 4


def test_input_folder_in_a_template_keeps_each_input_folder_apart(sorter):
    demo.generate(sorter.input_dir, patients=2, series=2, instances=2, junk=False)
    sorter.run(folder_template="{input_folder}/{SeriesNumber:03d}")
    plan = assert_every_file_accounted_for(sorter)
    for row in plan.where(action="sort"):
        folder, series, _ = row["destination"].split("/")
        assert folder == row["relpath"].split("/")[0], row
        assert re.fullmatch(r"\d{3}", series), row


def test_four_batches_sort_every_file_and_a_rerun_with_nothing_new_says_so(sorter):
    demo.generate(sorter.input_dir, patients=6, series=1, instances=2)
    first = sorter.run(batches=4)
    assert_every_file_accounted_for(sorter)
    used = {inventory.batch_of(f"patient_{p}", 4) for p in range(1, 7)}
    assert len(used) > 1
    manifests = sorted(p.name for p in (sorter.state / "manifests").glob("batch-*.parquet"))
    # One manifest per batch used, named by the batch and its fingerprint.
    assert [name.split("-")[1] for name in manifests] == sorted(str(b) for b in used)
    last = [line for line in first.stderr.splitlines() if line.startswith("dcmsort: ")][-1]
    # Snakemake calls no onsuccess when nothing is to be done; the line comes all the same.
    again = sorter.run(batches=4)
    assert "Nothing to be done" in again.output
    nothing_new = [line for line in again.stderr.splitlines() if line.startswith("dcmsort: ")]
    assert nothing_new == [
        last.replace("dcmsort: ", "dcmsort: nothing new; last run: ").replace(
            " new this run)", " new in it)"
        )
    ]


def jobs_listed(dry_run_output: str) -> dict[str, int]:
    """The job counts of a dry run's table ("extract  1")."""
    table = dry_run_output.partition("Job stats:")[2].partition("total")[0]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)}


# A run of one partition with new files: one job of each stage, no partition job.
EVERY_STAGE = {"all": 1, "extract": 1, "plan": 1, "report": 1, "transfer": 1}


def test_a_dry_run_lists_the_jobs_and_writes_nothing(sorter):
    demo.generate(sorter.input_dir, patients=3, series=1, instances=1)
    # One partition (auto, a small input): every job is known before any ran, and no
    # partition job runs (the plan job partitions the manifests itself).
    result = sorter.run("-n")
    assert jobs_listed(result.stdout) == EVERY_STAGE, result.stdout
    assert "checkpoint" not in result.stdout
    # More partitions: their plan and transfer jobs are known once the partition job ran.
    result = sorter.run("-n", partitions=2)
    assert jobs_listed(result.stdout) == {"all": 1, "extract": 1, "partition": 1}, result.stdout
    assert "checkpoint jobs" in result.stdout
    assert not sorter.output_dir.exists()
    sorter.run()
    assert "Nothing to be done" in sorter.run("-n").output
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1, first_patient=9)
    result = sorter.run("-n")  # new files: extract and plan again, then what follows
    assert jobs_listed(result.stdout) == EVERY_STAGE, result.stdout


def test_snakemakes_own_report_includes_the_dcmsort_report(sorter, tmp_path):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=2)
    sorter.run()
    bundle = tmp_path / "report.zip"
    sorter.run("--report", str(bundle))
    with zipfile.ZipFile(bundle) as archive:
        embedded = [n for n in archive.namelist() if n.endswith("/report.html") and "/data/" in n]
        assert embedded and b"dcmsort report" in archive.read(embedded[0])


# Written at the exit of each Python process of a run: whether Snakemake's main process
# (the one that imported snakemake) imported pandas.
PANDAS_WATCH = """
import atexit, os, sys
def _note():
    if "snakemake" in sys.modules:
        with open(os.environ["DCMSORT_PANDAS_LOG"], "a") as log:
            log.write(f"{'pandas' in sys.modules}\\n")
atexit.register(_note)
"""


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="pandas is not installed")
def test_a_run_does_not_spend_its_start_importing_pandas(sorter, tmp_path, monkeypatch):
    """pandas is installed (for dcmsort.tables), and Snakemake's job metadata imports it
    whenever it can (~0.4 CPU-s a run); no rule of dcmsort's needs it."""
    watch = tmp_path / "watch"
    watch.mkdir()
    (watch / "sitecustomize.py").write_text(PANDAS_WATCH)
    log = tmp_path / "pandas.log"
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(watch), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("DCMSORT_PANDAS_LOG", str(log))
    demo.generate(sorter.input_dir, patients=2, series=1, instances=2)
    sorter.run()
    again = sorter.run()
    # The SLURM executor plugin, once installed (make install-slurm), is imported by
    # Snakemake at every start to list its options, and it imports pandas itself.
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        assert log.read_text().split() == ["False", "False"]
    # The job metadata is the same as pandas' serialiser would have written: nothing reruns.
    assert "Nothing to be done" in again.output
    assert_every_file_accounted_for(sorter)
