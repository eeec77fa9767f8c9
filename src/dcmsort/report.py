"""What happened, at a glance: a self-contained HTML report and a JSON summary.

Reads the plan and the transfer results; decides nothing. Every header value shown is
escaped: tags are untrusted input, in a web page as much as in a path. The JSON summary
is what ``summary_line`` prints at the end of a run and what scripts should read.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("dcmsort.report")

HISTORY = "history.jsonl"  # one summary per run, appended: what changed since the last run
MAX_LISTED = 500  # rows of a detail table in the HTML; the CSVs have all


def summary_line(summary_file: Path) -> str:
    """The one line printed at the end of a run."""
    try:
        s = json.loads(Path(summary_file).read_text())
    except (OSError, ValueError):
        return f"dcmsort: finished; no summary at {summary_file}"
    gone = f", {s['sources_gone']:,} sources gone (copies kept)" if s["sources_gone"] else ""
    return (
        f"dcmsort: {s['files_sorted']:,} files sorted ({s['files_new']:,} new this run), "
        f"{s['duplicates']:,} duplicates, {s['conflicts']:,} conflicts, "
        f"{s['skipped']:,} skipped{gone} · report: {s['report']}"
    )


def summarise(
    plan,
    transfers,
    manifests_meta: list[dict],
    previous: dict | None,
    output_dir: str,
    mode: str,
    report_path: str,
    sources_gone: int = 0,
) -> dict:
    """The run's numbers, from the plan and the transfer results (pandas frames)."""
    sorted_rows = plan[plan["action"] == "sort"]
    status = transfers["status"].value_counts().to_dict() if len(transfers) else {}
    since = (previous or {}).get("generated_at", 0)
    skipped = plan[plan["action"] == "skip"]
    return {
        "generated_at": time.time(),
        "output_dir": output_dir,
        "report": report_path,
        "transfer_mode": mode,
        "previous_transfer_mode": (previous or {}).get("transfer_mode"),
        "input_files": len(plan),
        "patients": int(sorted_rows["destination"].str.split("/").str[0].nunique()),
        "studies": int(sorted_rows["StudyInstanceUID"].nunique()),
        "series": int(sorted_rows["destination"].str.rsplit("/", n=1).str[0].nunique()),
        "files_sorted": len(sorted_rows),
        "bytes_sorted": int(sorted_rows["size"].sum()),
        "files_new": int(status.get("copied", 0) + status.get("linked", 0)),
        "bytes_written": int(transfers["bytes"].sum()) if len(transfers) else 0,
        "files_already_present": int(status.get("present", 0)),
        "duplicates": int((plan["action"] == "duplicate").sum()),
        "conflicts": int(plan["conflict"].sum()),
        "skipped": len(skipped),
        "sources_gone": sources_gone,
        "skipped_by_reason": {str(k): int(v) for k, v in skipped["reason"].value_counts().items()},
        "headers_read": sum(
            int(m.get("headers_read", 0))
            for m in manifests_meta
            if float(m.get("extracted_at", 0)) > since
        ),
        "files_per_modality": {
            str(k): int(v)
            for k, v in sorted_rows["Modality"].fillna("(none)").value_counts().items()
        },
    }


def modality_chart_svg(files_per_modality: dict[str, int]) -> str:
    """A horizontal bar chart of files per modality, as inline SVG (no network, no files)."""
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    labels = list(files_per_modality)[:20][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(labels) + 1))
    ax.barh(labels, [files_per_modality[k] for k in labels], color="#3b6ea8")
    ax.set_xlabel("files sorted")
    ax.set_title("Files per modality")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def _table(frame, caption: str, total: int | None = None) -> str:
    if frame is None or len(frame) == 0:
        return f"<h2>{html.escape(caption)}</h2><p class='none'>None.</p>"
    shown = frame.head(MAX_LISTED)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row)
        + "</tr>"
        for row in shown.itertuples(index=False)
    )
    more = total if total is not None else len(frame)
    note = (
        f"<p>{len(shown)} of {more} rows shown; all are in the CSV files.</p>"
        if more > len(shown)
        else ""
    )
    return f"<h2>{html.escape(caption)}</h2>{note}<table><tr>{head}</tr>{body}</table>"


def render_html(summary: dict, plan, transfers, gone=None) -> str:
    """The report page: totals, chart, patients → series, skipped, duplicates, conflicts."""
    import pandas as pd

    sorted_rows = plan[plan["action"] == "sort"].copy()
    sorted_rows["patient folder"] = sorted_rows["destination"].str.split("/").str[0]
    sorted_rows["series folder"] = sorted_rows["destination"].str.rsplit("/", n=1).str[0]
    per_series = (
        sorted_rows.groupby(["patient folder", "series folder"], dropna=False)
        .agg(files=("relpath", "size"), bytes=("size", "sum"), modality=("Modality", "first"))
        .reset_index()
    )
    per_series["series folder"] = per_series["series folder"].str.split("/", n=1).str[-1]
    new = transfers[transfers["status"].isin(["copied", "linked"])] if len(transfers) else None
    added = (
        new.assign(folder=new["destination"].str.rsplit("/", n=1).str[0])
        .groupby("folder")
        .size()
        .rename("new files")
        .reset_index()
        if new is not None and len(new)
        else None
    )
    skipped = plan.loc[plan["action"] == "skip", ["relpath", "size", "reason"]]
    reasons = pd.DataFrame(list(summary["skipped_by_reason"].items()), columns=["reason", "files"])
    duplicates = plan.loc[plan["action"] == "duplicate", ["relpath", "destination"]]
    conflicts = plan.loc[plan["conflict"], ["relpath", "destination", "SOPInstanceUID"]]
    errors = transfers[transfers["status"] == "error"] if len(transfers) else None
    totals = [
        ("Patients", summary["patients"]),
        ("Studies", summary["studies"]),
        ("Series", summary["series"]),
        ("Files sorted", summary["files_sorted"]),
        ("Size sorted", f"{summary['bytes_sorted'] / 1e6:,.1f} MB"),
        ("New this run", summary["files_new"]),
        ("Duplicates", summary["duplicates"]),
        ("Conflicts", summary["conflicts"]),
        ("Skipped", summary["skipped"]),
        ("Sources gone", summary["sources_gone"]),
        ("Headers read this run", summary["headers_read"]),
    ]
    cards = "".join(
        f"<div class='card'><div class='n'>{html.escape(f'{v:,}' if isinstance(v, int) else v)}"
        f"</div><div>{k}</div></div>"
        for k, v in totals
    )
    chart = (
        modality_chart_svg(summary["files_per_modality"]) if summary["files_per_modality"] else ""
    )
    mode_note = ""
    if summary["previous_transfer_mode"] not in (None, summary["transfer_mode"]):
        mode_note = (
            f"<p class='warn'>transfer_mode changed from "
            f"{html.escape(summary['previous_transfer_mode'])} to "
            f"{html.escape(summary['transfer_mode'])}: files placed earlier stay as "
            "they were placed.</p>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dcmsort report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.cards {{ display: flex; flex-wrap: wrap; gap: .8em; }}
.card {{ border: 1px solid #ccd; border-radius: 6px; padding: .6em 1em; min-width: 8em; }}
.card .n {{ font-size: 1.5em; font-weight: 600; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; font-size: .9em; }}
td, th {{ border: 1px solid #ddd; padding: .25em .6em; text-align: left;
          overflow-wrap: anywhere; max-width: 45em; }}
th {{ background: #f2f4f8; }}
.warn {{ color: #a00; }} .none {{ color: #777; }}
</style></head><body>
<h1>dcmsort report</h1>
<p>Output folder: <code>{html.escape(summary["output_dir"])}</code> · transfer mode:
{html.escape(summary["transfer_mode"])} · generated
{time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["generated_at"]))}</p>
{mode_note}
<div class="cards">{cards}</div>
<div class="chart">{chart}</div>
{_table(reasons, "Skipped files by reason")}
{_table(skipped, "Skipped files")}
{_table(conflicts, "Conflicts: same SOPInstanceUID, different content (all kept)")}
{_table(duplicates, "Exact duplicates (not written again)")}
{_table(errors, "Transfer errors")}
{_table(added, "Added by this run")}
{_table(gone, "Sources gone since they were sorted (their copies are kept)")}
{_table(per_series, "Patients and series")}
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcmsort.report", description=__doc__)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--transfers", type=Path, required=True)
    parser.add_argument("--manifests", type=Path, nargs="*", default=[])
    parser.add_argument("--removed", type=Path, required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--html", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    import pandas as pd
    import pyarrow.parquet as pq

    from dcmsort.fileops import atomic_path

    plan = pd.read_parquet(args.plan)
    transfers = pd.read_parquet(args.transfers)
    meta = [
        {k.decode(): v.decode() for k, v in (pq.read_schema(m).metadata or {}).items()}
        for m in args.manifests
    ]
    history = args.summary.parent / HISTORY
    previous = (
        json.loads(history.read_text().splitlines()[-1])
        if history.exists() and history.read_text().strip()
        else None
    )
    gone = pd.read_csv(args.removed)
    summary = summarise(
        plan, transfers, meta, previous, args.output_dir, args.mode, str(args.html), len(gone)
    )
    with atomic_path(args.html) as tmp:
        tmp.write_text(render_html(summary, plan, transfers, gone), encoding="utf-8")
    with atomic_path(args.summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    with history.open("a") as handle:
        handle.write(json.dumps(summary, ensure_ascii=False) + "\n")
    log.info("%s", summary_line(args.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
