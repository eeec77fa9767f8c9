"""End to end: the real snakemake on real DICOM files (generated, and pydicom's own)."""

import os
import shutil

import pytest
from pydicom.data import get_testdata_files

from conftest import assert_every_file_accounted_for, tree_snapshot
from dcmsort import demo, naming


def test_demo_data_is_sorted_into_the_seed_layout_and_the_input_is_untouched(sorter):
    written = demo.generate(sorter.input_dir, patients=3, series=2, instances=3)
    before = tree_snapshot(sorter.input_dir)
    result = sorter.run()
    assert result.returncode == 0
    assert tree_snapshot(sorter.input_dir) == before
    plan = assert_every_file_accounted_for(sorter)
    assert (plan["action"] == "sort").sum() == len(written)
    first = sorter.output_dir / "GARCIA^FATIMA_PID00001" / "T1 MPRAGE_1" / "IM0001.dcm"
    assert (
        first.read_bytes()
        == (sorter.input_dir / "patient_1/study_1/series_1/IM0001.dcm").read_bytes()
    )
    assert set(plan.loc[plan["action"] == "skip", "reason"]) == {
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
        **{(name, "skip", not_dicom): 1 for name in ("crayons.icc", "zipMR.gz")},
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
    names = plan["relpath"].str.rsplit("/", n=1).str[-1].str[4:]
    reasons = [
        r if a == "skip" else None for a, r in zip(plan["action"], plan["reason"], strict=True)
    ]
    outcomes = Counter(zip(names, plan["action"], reasons, strict=True))
    not_sorted = {k: n for k, n in outcomes.items() if k[1] != "sort"}
    assert not_sorted == expected
    assert (plan["action"] == "sort").sum() == len(bundled) - sum(expected.values())
    for destination in plan["destination"].dropna():
        assert all(naming.is_safe_component(part) for part in destination.split("/"))


def test_messy_input_every_file_lands_where_promised_or_is_reported(sorter):
    expected = demo.generate_messy(sorter.input_dir)
    before = tree_snapshot(sorter.input_dir)
    result = sorter.run()
    assert tree_snapshot(sorter.input_dir) == before
    plan = assert_every_file_accounted_for(sorter).set_index("relpath")
    for relpath, expect in expected.items():
        row = plan.loc[relpath]
        assert row["action"] == expect.action, (relpath, row.to_dict())
        if expect.folder:
            assert row["destination"].rsplit("/", 1)[0] == expect.folder, relpath
        if expect.reason:
            assert expect.reason in row["reason"], (relpath, row["reason"])
        assert bool(row["conflict"]) == expect.conflict, relpath
    destinations = plan["destination"].dropna()
    for destination in destinations:
        assert all(naming.is_safe_component(part) for part in destination.split("/"))
    localizers = {d.rsplit("/", 1)[0] for d in destinations if "LOCALIZER" in d}
    assert len(localizers) == 2
    pair = plan.loc[["p_plain/IM1.dcm", "p_dups/copy_of_IM1.dcm"], "action"]
    assert sorted(pair) == ["duplicate", "sort"]
    same_name = plan.loc[["p_plain/a/IM9.dcm", "p_plain/b/IM9.dcm"], "destination"]
    assert same_name.nunique() == 2
    summary = sorter.summary()
    assert (summary["duplicates"], summary["conflicts"]) == (1, 2)
    assert f"{summary['skipped']} skipped" in result.stderr


@pytest.mark.parametrize("mode", ["hardlink", "symlink"])
def test_link_modes_place_every_file(sorter, mode):
    demo.generate(sorter.input_dir, patients=2, series=1, instances=2)
    sorter.run(transfer_mode=mode)
    plan = assert_every_file_accounted_for(sorter)
    first = sorter.output_dir / plan.loc[plan["action"] == "sort", "destination"].iloc[0]
    assert first.is_symlink() == (mode == "symlink")
    assert sorter.summary()["files_new"] == 4


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"input_dir": "/nonexistent/Unclassified"},
            "input_dir /nonexistent/Unclassified does not exist",
        ),
        ({"output_dir": "INPUT/sorted"}, "is inside input_dir"),
        ({"inptu_dir": "x"}, "'inptu_dir' was unexpected"),
        ({"folder_template": "{PatientNmae}"}, "PatientNmae"),
        ({"transfer_mode": "move"}, "'move' is not one of"),
        ({"batches": 0}, "batches"),
    ],
)
def test_bad_config_is_one_clear_line_and_no_traceback(sorter, config, message):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1)
    config = {k: str(v).replace("INPUT", str(sorter.input_dir)) for k, v in config.items()}
    result = sorter.run(check=False, **config)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("dcmsort: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output


def test_a_dry_run_lists_the_jobs_and_writes_nothing(sorter):
    demo.generate(sorter.input_dir, patients=3, series=1, instances=1)
    result = sorter.run("-n")
    assert "extract" in result.stdout and "transfer" in result.stdout
    assert not sorter.output_dir.exists()
