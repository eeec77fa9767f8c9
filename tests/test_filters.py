"""Filters (config keys include and exclude): which files are sorted, and every file left
out listed with the rule that left it out (issue 20). End to end through the real
snakemake, plus the pure pieces."""

from __future__ import annotations

import csv

import pyarrow as pa
import pytest

from conftest import assert_every_file_accounted_for, tree_snapshot, write_dicom
from dcmsort import filters, ledger
from dcmsort.plan import leave_out
from dcmsort.settings import ConfigError, resolve

LOCALIZERS = {"SeriesDescription": {"regex": "(?i)localizer|scout"}}
LOCALIZER_REASON = "left out by the filter exclude SeriesDescription: {regex: (?i)localizer|scout}"
DERIVED_REASON = "left out by the filter exclude ImageType: {contains: DERIVED}"
# Both exclude rules, as typed on the command line.
LOCALIZERS_AND_DERIVED = (
    "{SeriesDescription: {regex: '(?i)localizer|scout'}, ImageType: {contains: DERIVED}}"
)


def rules(include=None, exclude=None) -> filters.Filters:
    return filters.parse({"include": include or {}, "exclude": exclude or {}})


def test_each_kind_of_rule_matches_as_documented():
    chosen = rules(
        include={"Modality": ["MR", "CT"]},
        exclude={
            **LOCALIZERS,
            "ImageType": {"contains": "DERIVED"},
            "StudyDescription": [{"glob": "*research*"}, "TEST"],
        },
    )
    table = pa.table(
        {
            "Modality": ["MR", "CT", "SR", None, "MR", "MR", "MR", "MR"],
            "SeriesDescription": ["T1", "Scout", "T1", "T1", "T1", "T1", "T1", "T1"],
            "ImageType": [
                "ORIGINAL\\PRIMARY",
                *["", "", ""],
                "DERIVED\\SECONDARY",
                *["NOT_DERIVED", None, None],
            ],
            "StudyDescription": [None] * 6 + ["Head RESEARCH", "test"],
        }
    )
    include = "left out by the filter include Modality: [MR, CT] (not matched)"
    assert chosen.reasons(table).to_pylist() == [
        None,
        LOCALIZER_REASON,
        include,
        include,  # a missing tag is the empty text
        DERIVED_REASON,
        None,  # contains: one of the values equals it, not a part of one
        "left out by the filter exclude StudyDescription: [{glob: *research*}, TEST]",
        None,  # equality is exact; a glob ignores case
    ]
    assert chosen.keywords == ["ImageType", "Modality", "SeriesDescription", "StudyDescription"]


def test_rules_travel_to_the_jobs_unchanged_and_none_is_no_filter():
    chosen = rules(exclude={**LOCALIZERS, "Modality": "SR"})
    assert filters.Filters.from_json(chosen.to_json()) == chosen
    assert not rules() and not filters.Filters.from_json("{}")
    assert rules().reasons(pa.table({"Modality": ["MR"]})).to_pylist() == [None]


def test_only_files_not_placed_yet_are_left_out():
    files = pa.table(
        {
            "relpath": ["a", "b", "c"],
            "size": [1, 1, 1],
            "mtime_ns": [1, 1, 1],
            "ctime_ns": [1, 1, 1],
            "ino": pa.array([1, 2, 3], pa.uint64()),
            "dicom": [True, True, True],
            "Modality": ["SR", "SR", "MR"],
        }
    )
    committed = ledger.SCHEMA.empty_table()
    placed = pa.Table.from_pylist(
        [{"relpath": "a", "size": 1, "mtime_ns": 1, "ctime_ns": 1, "ino": 1}],
        schema=ledger.SCHEMA,
    )
    committed = pa.concat_tables([committed, placed])
    kept, excluded = leave_out(files, committed, rules(exclude={"Modality": "SR"}))
    assert kept["relpath"].to_pylist() == ["a", "c"]
    assert excluded["relpath"].to_pylist() == ["b"]
    assert excluded["reason"].to_pylist() == ["left out by the filter exclude Modality: SR"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"include": {"Modalty": "MR"}}, "include names 'Modalty', which is not a DICOM keyword"),
        ({"exclude": {"SeriesNumber": 1}}, "exclude.SeriesNumber: 1 is not text; .*quote it"),
        ({"exclude": {"SeriesDescription": {"regex": "("}}}, "exclude.SeriesDescription has the"),
        ({"exclude": {"Modality": []}}, "exclude.Modality is an empty list, which no file"),
        ({"exclude": {"ImageType": {"contain": "X"}}}, "exclude.ImageType: .* is not a rule; use"),
        ({"exclude": {"ImageType": {"glob": "a", "regex": "b"}}}, "is not a rule; use text"),
        ({"include": {"Modality": [["MR"]]}}, r"include.Modality: \['MR'\] is not a rule"),
    ],
)
def test_a_bad_rule_is_one_message_naming_the_key(tmp_path, values, message):
    (tmp_path / "in" / "p").mkdir(parents=True)
    config = {
        "input_dir": "in",
        "output_dir": "out",
        "folder_template": "{PatientID}",
        "file_template": "{filename}",
        "placeholder": "UNKNOWN",
        "keep_series_apart": True,
        "transfer_mode": "copy",
        "verify": "size",
        "batches": "auto",
        "state_dir": "",
        **values,
    }
    with pytest.raises(ConfigError, match=message):
        resolve(config, cwd=tmp_path)


# --- end to end ------------------------------------------------------------------------------


def write_series(sorter) -> dict[str, str]:
    """A localizer, an original T1, a derived T1 map and a T2 of one patient: relpath ->
    series description."""
    written = {
        "p/loc.dcm": ("LOCALIZER", ["ORIGINAL", "PRIMARY", "LOCALIZER"], 1),
        "p/t1.dcm": ("T1", ["ORIGINAL", "PRIMARY"], 2),
        "p/t1map.dcm": ("T1 map", ["DERIVED", "SECONDARY"], 3),
        "p/t2.dcm": ("T2", ["ORIGINAL", "PRIMARY"], 4),
    }
    for relpath, (desc, image_type, number) in written.items():
        write_dicom(
            sorter.input_dir / relpath, desc=desc, number=number, tags={"ImageType": image_type}
        )
    return {relpath: desc for relpath, (desc, _, _) in written.items()}


def skipped(sorter) -> dict[str, str]:
    with open(sorter.state / "skipped.csv", newline="", encoding="utf-8") as f:
        return {row["relpath"]: row["reason"] for row in csv.DictReader(f)}


def sorted_files(sorter) -> dict[str, str]:
    rows = assert_every_file_accounted_for(sorter)
    return {r["relpath"]: r["destination"] for r in rows if r["action"] != "skip"}


def test_files_a_filter_leaves_out_are_in_skipped_csv_with_the_rule(sorter):
    write_series(sorter)
    (sorter.input_dir / "p" / "notes.txt").write_text("not DICOM")
    sorter.run(exclude=LOCALIZERS_AND_DERIVED)
    assert sorted(sorted_files(sorter)) == ["p/t1.dcm", "p/t2.dcm"]
    assert skipped(sorter) == {
        "p/loc.dcm": LOCALIZER_REASON,
        "p/t1map.dcm": DERIVED_REASON,
        "p/notes.txt": "not DICOM (no DICM preamble and no DICOM identifiers)",
    }
    summary = sorter.summary()
    assert summary["skipped"] == 3 and summary["skipped_by_reason"][LOCALIZER_REASON] == 1
    assert LOCALIZER_REASON in (sorter.state / "report.html").read_text()
    # Nothing changed, nothing to do; the list stays whole.
    again = sorter.run(exclude=LOCALIZERS_AND_DERIVED)
    assert "nothing new" in again.stderr
    assert len(skipped(sorter)) == 3


def test_an_include_list_sorts_only_the_files_it_names(sorter):
    written = write_series(sorter)
    sorter.run(include="{SeriesDescription: [T1, T2]}")
    assert sorted(sorted_files(sorter)) == ["p/t1.dcm", "p/t2.dcm"]
    reason = "left out by the filter include SeriesDescription: [T1, T2] (not matched)"
    assert skipped(sorter) == {r: reason for r in written if r not in ("p/t1.dcm", "p/t2.dcm")}


def test_a_changed_filter_sorts_newly_included_files_and_removes_none(sorter):
    write_series(sorter)
    # First only CT: nothing here; the manifests carry no ImageType yet.
    sorter.run(include="{Modality: CT}")
    assert sorted_files(sorter) == {}
    # Then a rule on a keyword never extracted before: its files are sorted now.
    sorter.run(exclude="{ImageType: {contains: DERIVED}}")
    first = sorted_files(sorter)
    assert sorted(first) == ["p/loc.dcm", "p/t1.dcm", "p/t2.dcm"]
    assert skipped(sorter) == {"p/t1map.dcm": DERIVED_REASON}
    before = tree_snapshot(sorter.output_dir)
    # Then localizers out, derived in: the placed localizer stays, sorted and counted.
    sorter.run(exclude="{SeriesDescription: {regex: '(?i)localizer'}}")
    second = sorted_files(sorter)
    assert second == {**first, "p/t1map.dcm": second["p/t1map.dcm"]}
    assert skipped(sorter) == {}
    after = tree_snapshot(sorter.output_dir)
    kept = {path: entry for path, entry in before.items() if not path.startswith(".dcmsort")}
    assert kept.items() <= after.items(), "a placed file was removed or changed"
    # And back to no filter: nothing new, nothing removed.
    sorter.run()
    assert sorted_files(sorter) == second


def test_a_filter_given_in_a_config_file_and_partitions_sort_alike(sorter, tmp_path):
    written = write_series(sorter)
    for pid in ("2", "3", "4"):
        write_dicom(sorter.input_dir / f"q{pid}" / "loc.dcm", pid=pid, desc="Scout")
        write_dicom(sorter.input_dir / f"q{pid}" / "t1.dcm", pid=pid, desc="T1", number=2)
    config = tmp_path / "filters.yaml"
    config.write_text('exclude:\n  SeriesDescription: {regex: "(?i)localizer|scout"}\n')
    sorter.run("--configfile", str(config), partitions=3)
    assert sorted(sorted_files(sorter)) == sorted(
        ["p/t1.dcm", "p/t1map.dcm", "p/t2.dcm", "q2/t1.dcm", "q3/t1.dcm", "q4/t1.dcm"]
    )
    assert skipped(sorter) == {
        relpath: LOCALIZER_REASON
        for relpath in ["p/loc.dcm", "q2/loc.dcm", "q3/loc.dcm", "q4/loc.dcm"]
    }
    assert len(written) == 4


@pytest.mark.parametrize(
    ("config_file", "message"),
    [
        ("exclude: {Modalty: SR}", "exclude names 'Modalty', which is not a DICOM keyword"),
        # YAML reads a number in a config file (the command line reads text).
        ("exclude: {SeriesNumber: 1}", "exclude.SeriesNumber: 1 is not text"),
        ("include: MR", "include must be a mapping (keyword: value) or empty, not 'MR'"),
        ("exclude: {SeriesDescription: {regex: '('}}", "is not a regular expression"),
        ("folder_template: '{PatientID|}'", "has an empty fallback in '{PatientID|}'"),
        ("folder_template: '{PatientID|Modalty}'", "'{Modalty}', which is not a DICOM keyword"),
        ("folder_template: '{PatientID|\"x\"|Modality}'", "after the fallback text"),
    ],
)
def test_a_bad_filter_or_fallback_is_one_error_line(sorter, tmp_path, config_file, message):
    write_dicom(sorter.input_dir / "p" / "IM1.dcm")
    (tmp_path / "bad.yaml").write_text(config_file + "\n")
    result = sorter.run("--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("dcmsort: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert not sorter.output_dir.exists()


def test_a_bad_filter_on_the_command_line_is_one_error_line(sorter):
    write_dicom(sorter.input_dir / "p" / "IM1.dcm")
    result = sorter.run(check=False, exclude="{ImageType: {contain: DERIVED}}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("dcmsort: error:")]
    assert (
        len(errors) == 1 and "exclude.ImageType: {'contain': 'DERIVED'} is not a rule" in errors[0]
    )
    assert "Traceback" not in result.output and not sorter.output_dir.exists()


def test_a_placed_file_renamed_after_a_filter_now_leaves_it_out_is_not_gone(sorter):
    write_dicom(sorter.input_dir / "p" / "IM1.dcm", "DOE^JOHN", "1", "T1")
    write_dicom(sorter.input_dir / "p" / "LOC.dcm", "DOE^JOHN", "1", "LOCALIZER", number=2)
    sorter.run()
    (sorter.input_dir / "p" / "LOC.dcm").rename(sorter.input_dir / "p" / "LOC2.dcm")
    sorter.run(keys={"exclude": "{SeriesDescription: LOCALIZER}"})
    assert_every_file_accounted_for(sorter)
    summary = sorter.summary()
    assert summary["sources_gone"] == 0, summary
    assert (sorter.state / "removed_sources.csv").read_text().count("\n") == 1
    # The renamed file is its placement's (present), the copy a duplicate: neither is
    # listed as left out, and nothing is copied again.
    rows = {row["relpath"]: row for row in sorter.outcomes()}
    assert rows["p/LOC2.dcm"]["destination"] == "DOE^JOHN_1/LOCALIZER_2/LOC.dcm"
    assert rows["p/LOC2.dcm"]["action"] != "skip"
