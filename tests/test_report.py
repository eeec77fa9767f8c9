"""The report: numbers from the ledger (what is in place), escaped for a web page, and
honest about a run that did not finish."""

from __future__ import annotations

import csv
import html
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import assert_every_file_accounted_for, write_dicom
from dcmsort import demo, ledger, status
from dcmsort.fileops import from_spreadsheet_safe, spreadsheet_safe, write_csv
from dcmsort.headers import NOT_DICOM
from dcmsort.report import MAX_PATIENTS_LISTED, catalog, placements, render_html, summarise
from dcmsort.status import last_history
from dcmsort.transfer import RESULT_SCHEMA

FILES_SCHEMA = pa.schema(
    [
        ("relpath", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("dicom", pa.bool_()),
        ("skip_reason", pa.string()),
    ]
)


def files(*rows: tuple) -> pa.Table:
    """Current input files: (relpath, size, mtime_ns[, skip reason])."""
    return pa.Table.from_pylist(
        [
            {
                "relpath": r[0],
                "size": r[1],
                "mtime_ns": r[2],
                "dicom": len(r) < 4,
                "skip_reason": r[3] if len(r) > 3 else None,
            }
            for r in rows
        ],
        schema=FILES_SCHEMA,
    )


def committed(*rows: dict) -> pa.Table:
    defaults = {
        "size": 10,
        "mtime_ns": 1,
        "status": ledger.PLACED,
        "digest": None,
        "mode": "copy",
        "base_folder": "P",
        "series_uid": "1.1",
        "sop_uid": None,
        "study_uid": "1",
        "modality": "MR",
        "committed_at": 0.0,
    }
    return pa.Table.from_pylist([{**defaults, **r} for r in rows], schema=ledger.SCHEMA)


def transfers(*rows: tuple) -> pa.Table:
    """This run's results: (relpath, destination, status[, bytes])."""
    return pa.Table.from_pylist(
        [
            {
                "relpath": r[0],
                "destination": r[1],
                "status": r[2],
                "bytes": r[3] if len(r) > 3 else 0,
                "detail": None,
            }
            for r in rows
        ],
        schema=RESULT_SCHEMA,
    )


def report(tmp_path: Path, f: pa.Table, c: pa.Table, t: pa.Table, mode="copy", previous=None):
    summary, tables = summarise(
        f, c, t, [], previous, tmp_path / "out", mode, str(tmp_path / "report.html")
    )
    return summary, tables, render_html(summary, tables)


# --- the numbers --------------------------------------------------------------------------


def test_counts_come_from_the_ledger_and_this_runs_results(tmp_path):
    f = files(("p/a", 10, 1), ("p/b", 20, 1), ("q/a", 10, 1), ("p/x.txt", 3, 1, "not DICOM"))
    c = committed(
        {"relpath": "p/a", "destination": "P/S1/a", "sop_uid": "1"},
        {"relpath": "p/b", "size": 20, "destination": "P/S2/b", "sop_uid": "2"},
        {"relpath": "q/a", "destination": "P/S1/a", "status": ledger.DUPLICATE},
    )
    t = transfers(
        ("p/a", "P/S1/a", "copied", 10),
        ("p/b", "P/S2/b", "present"),
        ("q/a", "P/S1/a", "duplicate"),
        ("p/c", "P/S2/c", "changed"),
        ("p/d", "P/S2/d", "error"),
    )
    summary, tables, _ = report(tmp_path, f, c, t)
    assert summary["files_sorted"] == 2 and summary["bytes_sorted"] == 30
    assert (summary["files_new"], summary["bytes_written"]) == (1, 10)
    assert summary["files_already_present"] == 1
    assert (summary["duplicates"], summary["conflicts"], summary["skipped"]) == (1, 0, 1)
    assert (summary["changed_during_run"], summary["errors"]) == (1, 1)
    assert (summary["patients"], summary["series"], summary["studies"]) == (1, 2, 1)
    assert (summary["sources_gone"], summary["dangling_links"]) == (0, 0)
    assert summary["skipped_by_reason"] == {"not DICOM": 1}
    assert sorted(tables["unplaced"]["relpath"].to_pylist()) == ["p/c", "p/d"]


def test_a_touched_input_whose_content_is_in_place_is_not_gone(tmp_path):
    # Sorted at mtime 1, touched to mtime 2, then confirmed present by the next run.
    c = committed(
        {"relpath": "p/a", "mtime_ns": 1, "destination": "P/S/a"},
        {"relpath": "p/a", "mtime_ns": 2, "destination": "P/S/a"},
    )
    summary, tables, _ = report(tmp_path, files(("p/a", 10, 2)), c, transfers())
    assert (summary["files_sorted"], summary["sources_gone"], summary["duplicates"]) == (1, 0, 0)
    assert tables["gone"].num_rows == 0


def test_sources_gone_count_placements_only_and_dangling_links_are_told_apart(tmp_path):
    out = tmp_path / "out"
    (out / "P/S").mkdir(parents=True)
    (out / "P/S/copy").write_bytes(b"x" * 10)  # a copy: stays when its input goes
    (out / "P/S/link").symlink_to(tmp_path / "in/gone")  # its input is gone: dangles
    (tmp_path / "in").mkdir()
    (tmp_path / "in/replaced").write_bytes(b"new version")
    (out / "P/S/relinked").symlink_to(tmp_path / "in/replaced")  # still points to a file
    (out / "P/S/relinked2").symlink_to(tmp_path / "in/replaced")
    c = committed(
        {"relpath": "kept", "destination": "P/S/kept"},
        {"relpath": "copy", "destination": "P/S/copy"},
        {"relpath": "gone", "destination": "P/S/link", "mode": "symlink"},
        {"relpath": "replaced", "destination": "P/S/relinked", "mode": "symlink"},
        {"relpath": "replaced2", "destination": "P/S/relinked2", "mode": "symlink"},
        # Its input is gone and its copy was deleted by hand: not a kept copy.
        {"relpath": "deleted", "destination": "P/S/deleted"},
        # A duplicate whose input is gone is no placement: never counted as gone.
        {"relpath": "dup", "destination": "P/S/kept", "status": ledger.DUPLICATE},
    )
    summary, tables, page = report(tmp_path, files(("kept", 10, 1)), c, transfers())
    assert summary["sources_gone"] == 3, "kept copies and links that still reach a file"
    assert sorted(tables["gone"]["destination"].to_pylist()) == [
        "P/S/copy",
        "P/S/deleted",
        "P/S/link",
        "P/S/relinked",
        "P/S/relinked2",
    ]
    assert summary["dangling_links"] == 1
    assert summary["gone_and_removed_from_output"] == 1
    assert "1 symbolic links point to input files that are gone" in page
    assert summary["duplicates"] == 0, "a duplicate whose input is gone is not current"


def test_a_link_whose_input_is_gone_dangles_even_when_a_duplicate_is_current(tmp_path):
    out = tmp_path / "out"
    (out / "P/S").mkdir(parents=True)
    (out / "P/S/link").symlink_to(tmp_path / "in/deleted")
    c = committed(
        {"relpath": "deleted", "destination": "P/S/link", "mode": "symlink"},
        {"relpath": "copy", "destination": "P/S/link", "status": ledger.DUPLICATE},
    )
    summary, tables, _ = report(tmp_path, files(("copy", 10, 1)), c, transfers())
    assert (summary["dangling_links"], summary["sources_gone"], summary["duplicates"]) == (1, 0, 1)
    assert tables["gone"]["destination"].to_pylist() == ["P/S/link"], "listed"


def test_relinked_files_are_counted_and_said_in_the_summary_line(tmp_path):
    c = committed(
        {"relpath": "old/a", "destination": "P/S/a", "mode": "symlink"},
        {"relpath": "new/a", "destination": "P/S/a", "mode": "symlink"},
    )
    t = transfers(("new/a", "P/S/a", "relinked"))
    summary, _, page = report(tmp_path, files(("new/a", 10, 1)), c, t)
    assert (summary["files_relinked"], summary["files_new"], summary["dangling_links"]) == (1, 0, 0)
    assert summary["sources_gone"] == 0
    assert "Relinked this run" in page
    summary_file = tmp_path / "summary.json"
    summary_file.write_text(json.dumps({**summary, "report": "r.html"}))
    assert ", 1 relinked (their input moved) ·" in status.summary_line(summary_file)


def test_conflicts_are_placements_sharing_a_sop_uid(tmp_path):
    c = committed(
        {"relpath": "a", "destination": "P/S/a", "sop_uid": "9"},
        {"relpath": "b", "destination": "P/S/a_2", "sop_uid": "9"},
        {"relpath": "c", "destination": "P/S/c", "sop_uid": "8"},
    )
    f = files(("a", 10, 1), ("b", 10, 1), ("c", 10, 1))
    summary, tables, _ = report(tmp_path, f, c, transfers())
    assert summary["conflicts"] == 2
    assert sorted(tables["conflicts"]["destination"].to_pylist()) == ["P/S/a", "P/S/a_2"]


def test_a_changed_transfer_mode_is_said_on_the_page(tmp_path):
    c = committed({"relpath": "a", "destination": "P/S/a"})
    _, _, page = report(
        tmp_path, files(("a", 10, 1)), c, transfers(), "hardlink", {"transfer_mode": "copy"}
    )
    assert "transfer_mode changed from copy to hardlink" in page


def test_patient_folders_holding_more_than_one_patient_id_are_listed(tmp_path):
    c = committed(
        {"relpath": "a", "destination": "Roe/S/a", "patient_id": "r1"},
        {"relpath": "b", "destination": "Roe/S_2/b", "patient_id": "R1"},
        {"relpath": "c", "destination": "Doe/S/c", "patient_id": "1"},
        {"relpath": "d", "destination": "Doe/S/d", "patient_id": "1"},
    )
    f = files(("a", 10, 1), ("b", 10, 1), ("c", 10, 1), ("d", 10, 1))
    summary, _, page = report(tmp_path, f, c, transfers())
    assert summary["patient_folders_with_several_ids"] == [
        {"folder": "Roe", "patient_ids": ["R1", "r1"]}
    ]
    assert "1 patient folders hold files of more than one PatientID" in page
    assert "R1, r1" in page


def test_a_merge_an_earlier_version_made_is_listed_from_the_inputs_patient_ids(tmp_path):
    # Placed before the ledger kept PatientIDs: the current inputs tell them.
    c = committed(
        {"relpath": "a", "destination": "Roe_r1/S/a"},
        {"relpath": "b", "destination": "Roe_r1/S_2/b"},
        {"relpath": "gone", "destination": "Roe_r1/S_2/gone"},
    )
    f = files(("a", 10, 1), ("b", 10, 1)).append_column("PatientID", pa.array(["r1", "R1 "]))
    summary, _, _ = report(tmp_path, f, c, transfers())
    assert summary["patient_folders_with_several_ids"] == [
        {"folder": "Roe_r1", "patient_ids": ["R1", "r1"]}
    ]


def test_the_patient_folder_is_the_templates_level_with_the_patient_id(tmp_path):
    c = committed(
        {"relpath": "a", "destination": "MR/r1/S/a", "patient_id": "r1"},
        {"relpath": "b", "destination": "MR/r2/S/b", "patient_id": "r2"},
    )
    f = files(("a", 10, 1), ("b", 10, 1))
    summary, _ = summarise(f, c, transfers(), [], None, tmp_path, "copy", "r.html", patient_level=1)
    assert summary["patient_folders_with_several_ids"] == []
    summary, _ = summarise(
        f, c, transfers(), [], None, tmp_path, "copy", "r.html", patient_level=None
    )
    assert summary["patient_folders_with_several_ids"] == [
        {"folder": "MR", "patient_ids": ["r1", "r2"]}
    ]


# --- untrusted values on a web page --------------------------------------------------------


@pytest.mark.parametrize("modality", ["$\\foo$", "<b>MR</b>", "$x^{2}$ & <i>", "%s {0}"])
def test_header_values_are_escaped_in_the_html_and_never_crash_it(tmp_path, modality):
    hostile = "p/<img src=x onerror=alert(1)>"
    c = committed(
        {"relpath": hostile, "destination": "<script>alert(1)</script>_1/S_1/f", "sop_uid": "1"},
        {"relpath": "q/y", "destination": "Q/S/y", "modality": modality, "sop_uid": "2"},
    )
    f = files((hostile, 10, 1), ("q/y", 10, 1), (f"{hostile}.txt", 1, 1, "not DICOM <em>"))
    t = transfers(
        (hostile, "<script>alert(1)</script>_1/S_1/f", "copied", 10),
        ("q/<u>z", "Q/S/<u>z", "error"),
    )
    summary, _, page = report(tmp_path, f, c, t)
    assert summary["files_per_modality"] == {"MR": 1, modality: 1}
    for raw in ("<script>alert", "<img src=x", "<b>MR", "<i>", "<em>", "<u>"):
        assert raw not in page
    assert "<b>&lt;script&gt;alert(1)&lt;</b>" in page  # its patient folder (up to the /)
    assert "p/&lt;img src=x onerror=alert(1)&gt;.txt" in page
    assert "Q/S/&lt;u&gt;z" in page
    assert f"<span class='label'>{html_escape(modality)}</span>" in page
    assert "not DICOM &lt;em&gt;" in page


def test_the_page_for_10000_patients_stays_small_and_the_rest_is_in_the_csv_files(tmp_path):
    patients, series, per_series, added = 10_000, 3, 2, 50
    rows = [
        {
            "relpath": f"in/{p}/{s}/{i}",
            "size": 1_000 + p,
            "destination": f"PATIENT^WITH^A^LONGISH^NAME^{p:05d}_ID{p:08d}/"
            f"SERIES DESCRIPTION {s}_{s}/IM{i}.dcm",
        }
        for p in range(patients)
        for s in range(series)
        for i in range(per_series)
    ]
    c = committed(*rows)
    skipped = [(f"in/junk/{r}/file{i}", 5, 1, f"reason {r}") for r in range(200) for i in range(5)]
    f = files(*[(r["relpath"], r["size"], 1) for r in rows], *skipped)
    # This run added the files of the first 50 patients: the smallest.
    new_rows = rows[: added * series * per_series]
    t = transfers(*[(r["relpath"], r["destination"], "copied", r["size"]) for r in new_rows])
    summary, tables = summarise(f, c, t, [], None, tmp_path, "copy", "r.html")
    page = render_html(summary, tables, {"patients": "patients.csv", "series": "series.csv"})

    assert len(page.encode()) < 2_000_000
    assert (summary["patients"], summary["series"]) == (patients, patients * series)
    assert (summary["patients_with_new_files"], summary["series_with_new_files"]) == (
        added,
        added * series,
    )
    more = patients - MAX_PATIENTS_LISTED
    assert f"{more:,} more patient folders are in <a href='patients.csv'>patients.csv</a>" in page
    assert "150 more reasons, of 750 skipped files, are counted in summary.json" in page
    write_csv(tables["patients"], tmp_path / "patients.csv")
    write_csv(tables["series"], tmp_path / "series.csv")
    listed = csv_rows(tmp_path / "patients.csv")
    assert len(listed) == patients and len(csv_rows(tmp_path / "series.csv")) == patients * series
    # This run's patients first (the largest of them first), then the largest.
    assert [int(r["patient folder"][-8:]) for r in listed[:51]] == [*range(49, -1, -1), 9_999]
    assert int(listed[0]["new files this run"]) == series * per_series
    assert listed[0]["bytes"] == str(series * per_series * (1_000 + 49))
    first, last_shown = (
        listed[0]["patient folder"],
        listed[MAX_PATIENTS_LISTED - 1]["patient folder"],
    )
    assert page.index(html.escape(first)) < page.index(html.escape(last_shown))
    assert html.escape(listed[MAX_PATIENTS_LISTED]["patient folder"]) not in page


def test_csv_cells_a_spreadsheet_would_run_are_quoted_and_read_back():
    values = ["=1+2", "+cmd", "-2+3", "@SUM(A1)", "\t=x", "\r=x", "'quoted", "plain", "a=b", None]
    table = pa.table({"text": values, "number": list(range(-5, 5))})
    safe = spreadsheet_safe(table)
    assert safe["text"].to_pylist() == [
        *(f"'{v}" for v in values[:7]),
        "plain",
        "a=b",
        None,
    ]
    assert safe["number"] == table["number"], "numbers are never text"
    assert [from_spreadsheet_safe(v) for v in safe["text"].to_pylist()[:-1]] == values[:-1]


def csv_rows(path: Path) -> list[dict]:
    """A CSV file of dcmsort's as a user's program reads it: text cells as the values."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [
            {k: from_spreadsheet_safe(v) for k, v in row.items()} for row in csv.DictReader(handle)
        ]


def html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- end to end ---------------------------------------------------------------------------


def test_report_numbers_equal_what_is_on_disk(sorter):
    demo.generate_messy(sorter.input_dir)
    sorter.run()
    outcomes = assert_every_file_accounted_for(sorter)
    summary = sorter.summary()
    placed = outcomes.where(action="sort")
    assert summary["status"] == status.COMPLETE
    assert summary["files_sorted"] == len(placed) == summary["files_new"]
    assert summary["skipped"] == len(outcomes.where(action="skip"))
    assert summary["duplicates"] == len(outcomes.where(action="duplicate"))
    assert summary["conflicts"] == sum(outcomes.column("conflict"))
    assert summary["patients"] == len({d.split("/")[0] for d in placed.column("destination")})
    assert summary["bytes_sorted"] == sum(placed.column("size"))
    assert sum(summary["skipped_by_reason"].values()) == summary["skipped"]
    on_disk = [
        p
        for p in sorter.output_dir.rglob("*")
        if p.is_file() and ".dcmsort" not in p.relative_to(sorter.output_dir).parts
    ]
    assert len(on_disk) == summary["files_sorted"]
    page = (sorter.state / "report.html").read_text()
    assert f"<div class='n'>{summary['files_sorted']:,}</div><div>Files sorted</div>" in page
    assert "<div class='chart'>" in page and "Files per modality" in page
    # Self-contained: nothing is fetched when the page opens.
    for loader in ('src="http', "src='http", 'href="http', "<link", "<script", "@import"):
        assert loader not in page
    assert last_history(sorter.state / "history.jsonl")["files_sorted"] == len(placed)
    assert os.path.exists(sorter.state / "summary.json")


def test_this_runs_numbers_leave_out_what_a_killed_run_transferred(tmp_path):
    # A killed run's partitions that finished wrote their results before this run started
    # (it rewrites its lock first): their files are in the ledger, not "new this run".
    import pyarrow.parquet as pq

    from dcmsort import report

    state = tmp_path / "state"
    state.mkdir()
    killed_run, this_run = state / "t-p0of2.parquet", state / "t-p1of2.parquet"
    pq.write_table(transfers(("a", "P/S/a", "copied", 10)), killed_run)
    (state / "run.lock").write_text("pid 1")
    pq.write_table(transfers(("b", "P/S/b", "copied", 20)), this_run)
    os.utime(killed_run, (1_000, 1_000))
    os.utime(state / "run.lock", (2_000, 2_000))
    args = ["--transfers", str(killed_run), str(this_run), "--state-dir", str(state)]
    args += ["--output-dir", str(tmp_path / "out"), "--mode", "copy"]
    args += ["--html", str(state / "r.html"), "--summary", str(state / "s.json")]
    args += ["--removed", str(state / "gone.csv")]
    args += ["--naming", json.dumps({"folder_template": "{PatientID}"})]
    assert report.main(args) == 0
    summary = json.loads((state / "s.json").read_text())
    assert (summary["files_new"], summary["bytes_written"]) == (1, 20)


def sorted_tree(output_dir: Path) -> dict[str, int]:
    """Every sorted file below output_dir (not the state folder) with its size."""
    return {
        str(p.relative_to(output_dir)): p.stat().st_size
        for p in output_dir.rglob("*")
        if p.is_file() and ".dcmsort" not in p.relative_to(output_dir).parts
    }


def test_files_and_bytes_per_patient_and_series_folder_match_the_sorted_tree(sorter):
    write_dicom(sorter.input_dir / "a" / "1.dcm", "DOE^ANN", "1", "T1", instance=1)
    write_dicom(sorter.input_dir / "a" / "2.dcm", "DOE^ANN", "1", "T1", instance=2, rows=32)
    write_dicom(sorter.input_dir / "a" / "3.dcm", "DOE^ANN", "1", "T2", number=2, rows=24)
    write_dicom(sorter.input_dir / "b" / "1.dcm", "ROE^BOB", "2", "T1", rows=64)
    sorter.run()
    assert_every_file_accounted_for(sorter)
    per_series, per_patient = Counter(), Counter()
    files_per_series, files_per_patient = Counter(), Counter()
    for path, size in sorted_tree(sorter.output_dir).items():
        series_folder, patient = path.rsplit("/", 1)[0], path.split("/")[0]
        per_series[series_folder] += size
        files_per_series[series_folder] += 1
        per_patient[patient] += size
        files_per_patient[patient] += 1
    series = csv_rows(sorter.state / "series.csv")
    assert {r["series folder"]: (int(r["files"]), int(r["bytes"])) for r in series} == {
        folder: (files_per_series[folder], per_series[folder]) for folder in per_series
    }
    patients = csv_rows(sorter.state / "patients.csv")
    assert {
        r["patient folder"]: (int(r["series"]), int(r["files"]), int(r["bytes"])) for r in patients
    } == {
        "DOE^ANN_1": (2, 3, per_patient["DOE^ANN_1"]),
        "ROE^BOB_2": (1, 1, per_patient["ROE^BOB_2"]),
    }
    page = (sorter.state / "report.html").read_text()
    assert "<b>DOE^ANN_1</b> · 2 series · 3 files" in page
    assert "<a href='patients.csv'>patients.csv</a>" in page
    assert "<a href='series.csv'>series.csv</a>" in page


def test_a_rerun_lists_the_patient_it_added_first(sorter):
    for i in range(3):
        write_dicom(
            sorter.input_dir / "big" / f"{i}.dcm", "BIG^ONE", "1", "CT", instance=i, rows=64
        )
    write_dicom(sorter.input_dir / "small" / "1.dcm", "SMALL^ONE", "2", "MR")
    sorter.run()
    first = csv_rows(sorter.state / "patients.csv")
    assert [(r["patient folder"], r["new files this run"]) for r in first] == [
        ("BIG^ONE_1", "3"),
        ("SMALL^ONE_2", "1"),
    ]
    write_dicom(sorter.input_dir / "new" / "1.dcm", "NEW^ONE", "3", "MR", rows=8)
    sorter.run()
    again = csv_rows(sorter.state / "patients.csv")
    assert [(r["patient folder"], r["new files this run"]) for r in again] == [
        ("NEW^ONE_3", "1"),
        ("BIG^ONE_1", "0"),
        ("SMALL^ONE_2", "0"),
    ]
    assert csv_rows(sorter.state / "series.csv")[0]["patient folder"] == "NEW^ONE_3"
    summary = sorter.summary()
    assert (summary["patients_with_new_files"], summary["series_with_new_files"]) == (1, 1)
    page = (sorter.state / "report.html").read_text()
    assert page.index("<b>NEW^ONE_3</b>") < page.index("<b>BIG^ONE_1</b>")
    assert "1 new this run" in page


def test_skipped_files_are_summarised_by_reason_with_a_few_examples(sorter):
    write_dicom(sorter.input_dir / "a" / "1.dcm")
    for i in range(5):
        (sorter.input_dir / "a" / f"notes{i}.txt").write_text("hello")
    (sorter.input_dir / "a" / "empty.dcm").write_bytes(b"")
    sorter.run()
    assert_every_file_accounted_for(sorter)
    page = (sorter.state / "report.html").read_text()
    section = page[page.index("Skipped files by reason") :]
    examples = "<br>".join(f"a/notes{i}.txt" for i in range(3))
    assert (
        f"<tr><td>{html.escape(NOT_DICOM)}</td><td>5</td><td>25 B</td><td>{examples}</td>"
        in section
    )
    assert "a/notes3.txt" not in section, "a few examples, not every file"
    assert "<tr><td>empty file (0 bytes)</td><td>1</td><td>0 B</td><td>a/empty.dcm</td>" in section
    assert len(csv_rows(sorter.state / "skipped.csv")) == 6, "every one in skipped.csv"


FORMULA = ("=", "+", "-", "@")


def test_hostile_names_are_escaped_on_the_page_and_never_formulas_in_the_csv_files(sorter):
    folder = sorter.input_dir / "=cmd|' calc'!A0"
    write_dicom(folder / "-2+3.dcm", "=HYPERLINK(1)", "@1", "+SER")
    (folder / "<img src=x onerror=alert(1)>.txt").write_text("not an image")
    sorter.run()
    outcomes = assert_every_file_accounted_for(sorter)
    [sorted_file] = outcomes.where(action="sort").column("destination")
    patient, series_folder = sorted_file.split("/")[0], sorted_file.rsplit("/", 1)[0]
    assert patient.startswith("=") and series_folder.split("/")[1].startswith("+")
    for name in ("patients", "series", "skipped", "plan", "removed_sources"):
        with open(sorter.state / f"{name}.csv", newline="", encoding="utf-8") as handle:
            cells = [cell for row in csv.reader(handle) for cell in row]
        assert not [c for c in cells if c.startswith(FORMULA)], name
    assert csv_rows(sorter.state / "patients.csv")[0]["patient folder"] == patient
    assert csv_rows(sorter.state / "series.csv")[0]["series folder"] == series_folder
    [skipped] = csv_rows(sorter.state / "skipped.csv")
    assert skipped["relpath"] == "=cmd|' calc'!A0/<img src=x onerror=alert(1)>.txt"
    page = (sorter.state / "report.html").read_text()
    assert "<img src" not in page
    assert html.escape(skipped["relpath"]) in page
    assert f"<b>{html.escape(patient)}</b>" in page


def test_patient_folders_are_counted_at_the_templates_level_with_the_patient_id(tmp_path):
    c = committed(
        {"relpath": "a", "destination": "MR/r1/S/a", "size": 5},
        {"relpath": "b", "destination": "MR/r1/T/b", "size": 6},
        {"relpath": "c", "destination": "MR/r2/S/c", "size": 7},
    )
    f = files(("a", 5, 1), ("b", 6, 1), ("c", 7, 1))
    summary, tables = summarise(f, c, transfers(), [], None, tmp_path, "r", "r.html", None, 1)
    assert tables["patients"].select(
        ["patient folder", "series", "files", "bytes"]
    ).to_pylist() == [
        {"patient folder": "MR/r1", "series": 2, "files": 2, "bytes": 11},
        {"patient folder": "MR/r2", "series": 1, "files": 1, "bytes": 7},
    ]
    assert (summary["patients"], summary["series"]) == (2, 3)


# --- the series catalogue -------------------------------------------------------------------


def test_catalogue_has_one_row_per_series_folder_also_when_its_inputs_are_gone():
    f = files(("p/1/a", 10, 1), ("q/a", 10, 1)).append_column(
        "SeriesDescription", pa.array(["=T1 axial", "=T1 axial"])
    )
    c = committed(
        {"relpath": "p/1/a", "destination": "P/S1/a", "patient_id": "7", "committed_at": 5.0},
        {"relpath": "p/1/b", "destination": "P/S1/b", "committed_at": 9.0},  # gone since
        {"relpath": "q/a", "destination": "P/S1/a", "status": ledger.DUPLICATE},
        {"relpath": "old/c", "destination": "P/S2/c", "series_uid": "2.2", "modality": "CT"},
    )
    table = catalog(c, ledger.live(c, f), placements(c), f, ["Modality"], level=0)
    rows = {row["series folder"]: row for row in table.to_pylist()}
    assert rows.keys() == {"P/S1", "P/S2"}
    s1, s2 = rows["P/S1"], rows["P/S2"]
    assert (s1["files"], s1["bytes"], s1["input folders"]) == (2, 20, ["p/1", "q"])
    assert (s1["SeriesDescription"], s1["PatientID"], s1["Modality"]) == ("=T1 axial", "7", "MR")
    assert s1["first added"].timestamp() == 5.0 and s1["last added"].timestamp() == 9.0
    # Every input of S2 is gone: what the ledger keeps is still there.
    assert (s2["files"], s2["SeriesInstanceUID"], s2["Modality"]) == (1, "2.2", "CT")
    assert s2["SeriesDescription"] is None and s2["input folders"] == ["old"]


def test_catalogue_types_dates_and_numbers_and_nulls_what_is_not_one():
    from dcmsort.report import typed_values

    table = typed_values(
        pa.table(
            {
                "StudyDate": ["20240131", "2024-01-31", None],
                "SeriesNumber": [" 3", "+4", "x"],
                "SliceThickness": ["1.25", "1e-1", "1\\2"],
                "SeriesDescription": ["20240131", "3", "x"],
            }
        )
    ).to_pylist()
    assert [r["StudyDate"] and r["StudyDate"].isoformat() for r in table] == [
        "2024-01-31",
        None,
        None,
    ]
    assert [r["SeriesNumber"] for r in table] == [3, 4, None]
    assert [r["SliceThickness"] for r in table] == [1.25, 0.1, None]
    assert [r["SeriesDescription"] for r in table] == ["20240131", "3", "x"]


def test_catalogue_of_an_empty_output_is_empty(tmp_path):
    table = report(tmp_path, files(), committed(), transfers())[1]["catalog"]
    assert table.num_rows == 0 and "input folders" in table.column_names
