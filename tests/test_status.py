"""What a run says about itself: the summary line, a history that survives a torn append,
and marks on a report that is not current."""

from __future__ import annotations

import json

from test_report import committed, files, report, transfers

from dcmsort import status
from dcmsort.status import append_history, last_history, mark, summary_line


def test_summary_line_states_the_counts_and_where_the_report_is(tmp_path):
    summary = {
        "files_sorted": 1234,
        "files_new": 56,
        "duplicates": 3,
        "conflicts": 1,
        "skipped": 7,
        "sources_gone": 0,
        "report": "/out/.dcmsort/report.html",
    }
    (tmp_path / "s.json").write_text(json.dumps(summary))
    assert summary_line(tmp_path / "s.json") == (
        "dcmsort: 1,234 files sorted (56 new this run), 3 duplicates, 1 conflicts, "
        "7 skipped · report: /out/.dcmsort/report.html"
    )
    summary.update(status="failed", dangling_links=2, changed_during_run=1, sources_gone=4)
    (tmp_path / "s.json").write_text(json.dumps(summary))
    line = summary_line(tmp_path / "s.json")
    assert line.startswith("dcmsort [failed]: ")
    assert "4 sources gone (copies kept), 2 links dangling" in line
    assert "1 changed during the run (rerun to sort them)" in line


def test_summary_line_says_what_a_check_restored_and_what_damage_is_left(tmp_path):
    summary = {
        "files_sorted": 10,
        "files_new": 0,
        "duplicates": 0,
        "conflicts": 0,
        "skipped": 0,
        "report": "/out/.dcmsort/report.html",
        "check": {"how": "size", "placements": 10, "restored": 2, "damaged": 0},
    }
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert ", checked 10 placements: 2 restored ·" in summary_line(path)
    assert not status.damage_left(path)
    summary["check"]["damaged"] = 1
    path.write_text(json.dumps(summary))
    line = summary_line(path)
    assert f", checked 10 placements: 2 restored, 1 damaged (see {tmp_path}/check.csv)" in line
    assert status.damage_left(path)


def test_a_torn_last_line_in_the_history_is_skipped_and_the_next_entry_starts_anew(tmp_path):
    history = tmp_path / "history.jsonl"
    append_history(history, {"run": 1, "transfer_mode": "copy"})
    with open(history, "ab") as handle:  # a full disk during the append of run 2
        handle.write(json.dumps({"run": 2, "transfer_mode": "copy"}).encode()[:15])
    assert last_history(history) == {"run": 1, "transfer_mode": "copy"}
    append_history(history, {"run": 3})
    assert last_history(history) == {"run": 3}
    lines = history.read_bytes().splitlines()
    assert json.loads(lines[0]) == {"run": 1, "transfer_mode": "copy"}
    assert json.loads(lines[-1]) == {"run": 3}, "the new entry starts on its own line"
    assert len(lines) == 3


def test_history_without_a_file_or_with_only_torn_lines_is_no_history(tmp_path):
    assert last_history(tmp_path / "none.jsonl") is None
    (tmp_path / "torn.jsonl").write_bytes(b'{"run": ')
    assert last_history(tmp_path / "torn.jsonl") is None


def test_mark_puts_a_banner_on_the_report_and_the_status_in_the_summary(tmp_path):
    c = committed({"relpath": "a", "destination": "P/S/a"})
    summary, _, page = report(tmp_path, files(("a", 10, 1)), c, transfers())
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    mark(tmp_path, status.FAILED, "the run failed <at transfer>; rerun")
    marked = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<b>failed:</b> the run failed &lt;at transfer&gt;; rerun" in marked
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == status.FAILED
    assert status.status_of(tmp_path) == status.FAILED
    # A second mark replaces the first banner instead of piling up.
    mark(tmp_path, status.RUNNING, "a run is going on")
    again = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<b>running:</b> a run is going on" in again and "failed:" not in again
    assert again.replace("<p class='warn'><b>running:</b> a run is going on</p>", "") == page


def test_mark_without_a_report_writes_nothing(tmp_path):
    mark(tmp_path, status.FAILED, "x")
    assert list(tmp_path.iterdir()) == []
