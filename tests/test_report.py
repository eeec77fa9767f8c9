import zipfile

import pandas as pd

from dcmsort import demo
from dcmsort.report import render_html, summarise, summary_line


def test_report_numbers_equal_the_plan(sorter):
    demo.generate_messy(sorter.input_dir)
    sorter.run()
    plan, summary = sorter.plan(), sorter.summary()
    placed = plan[plan["action"] == "sort"]
    assert summary["files_sorted"] == len(placed) == summary["files_new"]
    assert summary["skipped"] == (plan["action"] == "skip").sum()
    assert summary["duplicates"] == (plan["action"] == "duplicate").sum()
    assert summary["conflicts"] == plan["conflict"].sum()
    assert summary["patients"] == placed["destination"].str.split("/").str[0].nunique()
    assert summary["bytes_sorted"] == placed["size"].sum()
    assert sum(summary["skipped_by_reason"].values()) == summary["skipped"]
    page = (sorter.state / "report.html").read_text()
    assert f"<div class='n'>{summary['files_sorted']:,}</div><div>Files sorted</div>" in page
    assert "<svg" in page and "Files per modality" in page
    # Self-contained: nothing is fetched when the page opens (namespace URIs are not fetches).
    for loader in ('src="http', "src='http", 'href="http', "<link", "<script", "@import"):
        assert loader not in page


def test_header_values_are_escaped_in_the_html():
    plan = pd.DataFrame(
        {
            "relpath": ["p/<img src=x onerror=alert(1)>"],
            "size": [10],
            "action": ["sort"],
            "destination": ["<script>alert(1)</script>_1/S_1/f"],
            "reason": [None],
            "conflict": [False],
            "StudyInstanceUID": ["1"],
            "Modality": ["<b>MR</b>"],
            "SOPInstanceUID": ["1.2"],
        }
    )
    transfers = pd.DataFrame(
        {
            "relpath": plan["relpath"],
            "destination": plan["destination"],
            "status": ["copied"],
            "bytes": [10],
            "detail": [None],
        }
    )
    summary = summarise(plan, transfers, [], None, "/out", "copy", "/out/r.html")
    page = render_html(summary, plan, transfers)
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>MR" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


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
    (tmp_path / "s.json").write_text(pd.Series(summary).to_json())
    assert summary_line(tmp_path / "s.json") == (
        "dcmsort: 1,234 files sorted (56 new this run), 3 duplicates, 1 conflicts, "
        "7 skipped · report: /out/.dcmsort/report.html"
    )


def test_snakemakes_own_report_includes_the_dcmsort_report(sorter, tmp_path):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=2)
    sorter.run()
    bundle = tmp_path / "report.zip"
    sorter.run("--report", str(bundle))
    with zipfile.ZipFile(bundle) as archive:
        embedded = [n for n in archive.namelist() if n.endswith("/report.html") and "/data/" in n]
        assert embedded and b"dcmsort report" in archive.read(embedded[0])
