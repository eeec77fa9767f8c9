"""What is in the output folder and what this run did: an HTML page and a JSON summary.

Built from the ledger (what is verifiably in place), the current manifests (what the input
holds) and this run's transfer results, with columnar aggregates: no Python work per
sorted file, no plotting library (the chart is HTML and CSS). Decides nothing.

Every value shown is escaped: header values and file names are untrusted input, in a web
page as much as in a path. While a run is going, and after one failed, the page and the
summary say so at the top (``mark``): a report never reads as the current state when it
is not.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcmsort import archives, dictionary, ledger, naming
from dcmsort.check import DAMAGED, RESTORED, RESULT_SCHEMA, read_results
from dcmsort.fileops import atomic_path, read_parquet, write_csv
from dcmsort.permissions import LOCK_FILE
from dcmsort.plan import PLAN_SCHEMA
from dcmsort.progress import peak_rss_mb
from dcmsort.status import (
    COMPLETE,
    HISTORY,
    STATUS_END,
    STATUS_START,
    append_history,
    last_history,
    summary_line,
)
from dcmsort.transfer import RESULT_SCHEMA as TRANSFER_SCHEMA

log = logging.getLogger("dcmsort.report")

MAX_LISTED = 500  # rows of a detail table in the HTML; the CSV files have all
# The patients section stays a few hundred KB at any number of patients: the first
# patient folders (this run's, then the largest), each with its first series; patients.csv
# and series.csv have all of them.
MAX_PATIENTS_LISTED = 100
MAX_SERIES_LISTED = 2000  # series rows on the page, over all patient folders listed
MAX_SERIES_PER_PATIENT = 50
MAX_REASONS_LISTED = 50  # skip reasons on the page; summary.json counts every one
SKIP_EXAMPLES = 3  # example paths per skip reason
NEW = "new files this run"


# --- the numbers ------------------------------------------------------------------------


def _count_by(column: pa.ChunkedArray, missing: str = "(none)") -> dict[str, int]:
    counts = pc.value_counts(pc.fill_null(column, missing))
    pairs = sorted(
        zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True),
        key=lambda kv: (-kv[1], str(kv[0])),
    )
    return {str(k): int(v) for k, v in pairs}


def _distinct(column: pa.ChunkedArray | pa.Array) -> int:
    return pc.count_distinct(column).as_py() if len(column) else 0


PLACEMENT_COLUMNS = ["destination", "relpath", "size", "sop_uid", "study_uid", "modality", "mode"]
PLACEMENT_COLUMNS += ["patient_id", "series_uid", "committed_at"]
# What the report reads of the ledger (not digests, base folders).
LEDGER_COLUMNS = [*ledger.SOURCE_KEY, "status", "destination", "sop_uid", "study_uid"]
LEDGER_COLUMNS += ["modality", "mode", "patient_id", "series_uid", "committed_at"]


def _where(table: pa.Table, mask: pa.ChunkedArray) -> pa.Table:
    """table.filter(mask), without copying every column when every row is kept."""
    return table if pc.all(mask).as_py() in (True, None) else table.filter(mask)


def patient_folders(paths: pa.ChunkedArray | pa.Array, level: int | None) -> pa.ChunkedArray:
    """The patient folder of each path below output_dir: the path down to the template's
    level with ``{PatientID}`` (``naming.patient_level``), else its first component."""
    depth = (level or 0) + 1
    return pc.replace_substring_regex(paths, rf"^((?:[^/]*/){{{depth - 1}}}[^/]*)/.*$", r"\1")


def parent_folders(paths: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """The folder of each path: a file's series folder."""
    return pc.replace_substring_regex(paths, r"/[^/]*$", "")


def placements(committed: pa.Table) -> pa.Table:
    """One row per destination holding a placed file (the output tree, per the ledger):
    its first placement (a touched input's later rows confirm the same file)."""
    return ledger.first_placements(committed).select(PLACEMENT_COLUMNS)


def conflicted(placed: pa.Table) -> pa.Table:
    """Placements whose SOPInstanceUID is at more than one destination (different content)."""
    with_sop = _where(placed, pc.is_valid(placed["sop_uid"]))
    if with_sop.num_rows == 0:
        return with_sop
    per_sop = with_sop.group_by("sop_uid", use_threads=False).aggregate(
        [("destination", "count_distinct")]
    )
    shared = per_sop.filter(pc.greater(per_sop["destination_count_distinct"], 1))["sop_uid"]
    return with_sop.filter(pc.is_in(with_sop["sop_uid"], value_set=shared))


# The version key of rows written before ctime and inode were recorded (v0.3), the only
# ones that can lack a PatientID too.
_V03_KEY = ["relpath", "size", "mtime_ns"]


def shared_patient_folders(
    placed: pa.Table, committed: pa.Table, files: pa.Table, level: int | None
) -> pa.Table:
    """Patient folders (the template's level with ``{PatientID}``, else the first) whose
    files carry more than one PatientID: a merge the template chose, or one an earlier
    version made. A placement from before the ledger kept PatientIDs counts with the
    PatientID of the current inputs that hold its content, if any."""
    known = pc.is_valid(placed["patient_id"])
    placed = placed.select(["destination", "patient_id"])
    if not pc.all(known).as_py() and "PatientID" in files.column_names:
        legacy = committed.filter(
            pc.is_in(
                committed["destination"], value_set=placed.filter(pc.invert(known))["destination"]
            )
        )
        found = legacy.select([*_V03_KEY, "destination"]).join(
            files.select([*_V03_KEY, "PatientID"]), keys=_V03_KEY, join_type="inner"
        )
        placed = pa.concat_tables(
            [
                placed.filter(known),
                pa.table(
                    {
                        "destination": found["destination"],
                        "patient_id": ledger.patient_ids(found["PatientID"]),
                    }
                ),
            ]
        )
    folders = patient_folders(placed["destination"], level)
    ids = pa.table({"folder": folders, "ids": placed["patient_id"]}).filter(
        pc.is_valid(placed["patient_id"])
    )
    grouped = ids.group_by("folder", use_threads=False).aggregate([("ids", "distinct")])
    shared = grouped.filter(pc.greater(pc.list_value_length(grouped["ids_distinct"]), 1))
    return pa.table(
        {
            "patient folder": shared["folder"],
            "PatientIDs": pa.array(
                [sorted(found) for found in shared["ids_distinct"].to_pylist()],
                pa.list_(pa.string()),
            ),
        }
    ).sort_by("patient folder")


def gone_sources(committed: pa.Table, live_rows: pa.Table, placed: pa.Table) -> pa.Table:
    """Placements no current input file has the content of (their copies stay)."""
    alive = pc.unique(live_rows["destination"]) if live_rows.num_rows else pa.array([], pa.string())
    return placed.filter(pc.invert(pc.is_in(placed["destination"], value_set=alive)))


def summarise(
    files: pa.Table,
    committed: pa.Table,
    transfers: pa.Table,
    manifests_meta: list[dict],
    previous: dict | None,
    output_dir: Path,
    mode: str,
    report_path: str,
    check: tuple[pa.Table, dict] | None = None,
    patient_level: int | None = 0,
    catalog_tags: list[str] = (),
) -> tuple[dict, dict[str, pa.Table]]:
    """The numbers of the summary, and the tables the page lists and the catalogue.
    ``check``: this run's check results and numbers (``check.read_results``), when it
    checked; patient_level is ``naming.patient_level`` of the folder template;
    catalog_tags: the catalogue's header columns besides CATALOG_HEADERS."""
    placed = placements(committed)
    live_rows = ledger.live(committed, files)
    gone = gone_sources(committed, live_rows, placed)
    # A link whose own input is gone dangles even when a duplicate still holds its
    # content: such links are gone placements plus these (few) ones.
    orphaned = gone_sources(
        committed, _where(live_rows, pc.equal(live_rows["status"], ledger.PLACED)), placed
    )
    links = orphaned.filter(pc.equal(orphaned["mode"], "symlink"))
    # Only these are looked at on disk (few): is the copy still there, does a symbolic
    # link still reach its input?
    dangling = {d for d in links["destination"].to_pylist() if not (output_dir / d).exists()}
    missing = sum(
        1
        for destination, mode in zip(
            gone["destination"].to_pylist(), gone["mode"].to_pylist(), strict=True
        )
        if mode != "symlink" and not os.path.lexists(output_dir / destination)
    )
    # Every dangling link is listed with the gone sources, also one whose content a
    # duplicate still holds.
    is_gone = pc.is_in(orphaned["destination"], value_set=gone["destination"])
    is_dangling = pc.is_in(orphaned["destination"], value_set=pa.array(dangling, pa.string()))
    listed = orphaned.filter(pc.or_(is_gone, is_dangling))
    gone_dangling = pc.sum(pc.and_(is_gone, is_dangling)).as_py() or 0
    duplicates = live_rows.filter(pc.equal(live_rows["status"], ledger.DUPLICATE))
    skipped = files.filter(pc.invert(pc.fill_null(files["dicom"], False)))
    status = _count_by(transfers["status"]) if transfers.num_rows else {}
    conflicts = conflicted(placed)
    shared = shared_patient_folders(placed, committed, files, patient_level)
    since = (previous or {}).get("generated_at", 0)
    added = transfers.filter(pc.is_in(transfers["status"], pa.array(["copied", "linked"])))
    patients, series = folder_tables(placed, added["destination"], patient_level)
    summary = {
        "status": COMPLETE,
        "generated_at": time.time(),
        "output_dir": str(output_dir),
        "report": report_path,
        "transfer_mode": mode,
        "previous_transfer_mode": (previous or {}).get("transfer_mode"),
        "input_files": files.num_rows,
        # Patient folders (the template's level with {PatientID}) and series folders.
        "patients": patients.num_rows,
        "studies": _distinct(placed["study_uid"].drop_null()),
        "series": series.num_rows,
        "patients_with_new_files": _count_positive(patients[NEW]),
        "series_with_new_files": _count_positive(series[NEW]),
        "files_sorted": placed.num_rows,
        "bytes_sorted": pc.sum(placed["size"]).as_py() or 0,
        "files_new": status.get("copied", 0) + status.get("linked", 0),
        "bytes_written": pc.sum(transfers["bytes"]).as_py() or 0,
        "files_already_present": status.get("present", 0),
        # Links whose input was renamed, pointed at its new path (same content).
        "files_relinked": status.get("relinked", 0),
        "duplicates": duplicates.num_rows,
        "conflicts": conflicts.num_rows,
        "skipped": skipped.num_rows,
        "sources_gone": gone.num_rows - gone_dangling - missing,
        "dangling_links": len(dangling),
        "gone_and_removed_from_output": missing,
        "changed_during_run": status.get("changed", 0),
        "errors": status.get("error", 0),
        "skipped_by_reason": _count_by(skipped["skip_reason"]),
        "headers_read": sum(
            int(m.get("headers_read", 0))
            for m in manifests_meta
            if float(m.get("extracted_at", 0)) > since
        ),
        "files_per_modality": _count_by(placed["modality"]),
        # Members of archives in the input: always copied, whatever transfer_mode says.
        "files_from_archives": pc.sum(
            pc.match_substring(placed["relpath"], archives.SEPARATOR)
        ).as_py()
        or 0,
        "check": None,
        # Every patient folder holding more than one PatientID (see config/README.md).
        "patient_folders_with_several_ids": [
            {"folder": row["patient folder"], "patient_ids": row["PatientIDs"]}
            for row in shared.to_pylist()
        ],
    }
    checked = check[0] if check else RESULT_SCHEMA.empty_table()
    if check:
        outcomes = _count_by(checked["outcome"])
        summary["check"] = {
            **check[1],
            "restored": outcomes.get(RESTORED, 0),
            "damaged": outcomes.get(DAMAGED, 0),
        }
    unplaced = transfers.filter(pc.is_in(transfers["status"], pa.array(["changed", "error"])))
    tables = {
        "skipped": skipped.select(["relpath", "size", "skip_reason"]),
        "skip_reasons": skip_summary(skipped),
        "conflicts": conflicts.select(["destination", "sop_uid"]).sort_by("sop_uid"),
        "duplicates": duplicates.select(["relpath", "destination"]),
        "unplaced": unplaced.select(["relpath", "destination", "status", "detail"]),
        "gone": listed.select(["relpath", "destination", "mode"]),
        "patients": patients,
        "series": series,
        "check": checked,
        "shared": shared.set_column(1, "PatientIDs", pc.binary_join(shared["PatientIDs"], ", ")),
        "catalog": catalog(committed, live_rows, placed, files, list(catalog_tags), patient_level),
    }
    return summary, tables


def _count_positive(counts: pa.ChunkedArray) -> int:
    return pc.sum(pc.greater(counts, 0)).as_py() or 0


# This run's additions first, then the largest; the name settles ties.
def _this_run_first(folder: str) -> list[tuple[str, str]]:
    return [(NEW, "descending"), ("bytes", "descending"), (folder, "ascending")]


def folder_tables(
    placed: pa.Table, added: pa.ChunkedArray, level: int | None
) -> tuple[pa.Table, pa.Table]:
    """Files and bytes per patient folder and per series folder (placements), and how many
    files this run added to each (added: their destinations). Patient folders with this
    run's files come first, then the largest; series likewise. Columnar: one group_by over
    the placements, the patients from the (far fewer) series rows."""
    per_file = pa.table(
        {
            "series folder": parent_folders(placed["destination"]),
            "size": placed["size"],
            "modality": placed["modality"],
        }
    )
    series = per_file.group_by("series folder", use_threads=False).aggregate(
        [([], "count_all"), ("size", "sum"), ("modality", "first")]
    )
    series = series.rename_columns(["series folder", "files", "bytes", "modality"])
    new = pc.value_counts(parent_folders(added)) if len(added) else None
    new_per_series = pa.table(
        {
            "series folder": new.field("values") if new else pa.array([], pa.string()),
            NEW: new.field("counts") if new else pa.array([], pa.int64()),
        }
    )
    series = series.join(new_per_series, "series folder", join_type="left outer")
    series = series.set_column(
        series.schema.get_field_index(NEW), NEW, pc.fill_null(series[NEW], 0)
    )
    series = series.append_column("patient folder", patient_folders(series["series folder"], level))
    series = series.select(["patient folder", "series folder", "modality", "files", "bytes", NEW])
    patients = series.group_by("patient folder", use_threads=False).aggregate(
        [([], "count_all"), ("files", "sum"), ("bytes", "sum"), (NEW, "sum")]
    )
    patients = patients.rename_columns(["patient folder", "series", "files", "bytes", NEW])
    return (
        patients.sort_by(_this_run_first("patient folder")),
        series.sort_by(_this_run_first("series folder")),
    )


# --- the series catalogue ---------------------------------------------------------------

# Header columns of every catalogue row; catalog_tags adds more.
CATALOG_HEADERS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber"]
CATALOG_HEADERS += ["SeriesDescription"]
# Values the ledger keeps of every placement, also of one whose input is gone.
_LEDGER_HEADERS = {
    "PatientID": "patient_id",
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "Modality": "modality",
}
CATALOG = "catalog.parquet"  # in the state folder (dcmsort.tables reads it)


def input_folders(relpaths: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """The folder of each input path relative to input_dir ("" for a file lying in it)."""
    return pc.replace_substring_regex(relpaths, r"^(?:(.*)/)?[^/]*$", r"\1")


def as_times(seconds: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Seconds since the epoch (a ledger's committed_at) as UTC times, to the millisecond."""
    milliseconds = pc.floor(pc.multiply(seconds, 1000)).cast(pa.int64())
    return milliseconds.cast(pa.timestamp("ms", "UTC"))


def typed_values(table: pa.Table) -> pa.Table:
    """table with each text column of a DICOM date (DA) as dates and of a number (IS, DS)
    as numbers; a value that is not one (header values are untrusted) is null."""
    for index, name in enumerate(table.column_names):
        vr = dictionary.vr_for_keyword(name)
        column = table.column(index)
        if vr not in ("DA", "IS", "DS") or not pa.types.is_string(column.type):
            continue
        text = pc.utf8_trim_whitespace(column)
        if vr == "DA":
            parsed = pc.strptime(text, format="%Y%m%d", unit="s", error_is_null=True)
            typed = parsed.cast(pa.date32())
        else:
            shape = r"^[+-]?\d{1,18}$" if vr == "IS" else r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
            valid = pc.fill_null(pc.match_substring_regex(text, shape), False)
            number = pc.if_else(valid, pc.replace_substring_regex(text, r"^\+", ""), None)
            typed = number.cast(pa.int64() if vr == "IS" else pa.float64())
        table = table.set_column(index, name, typed)
    return table


def catalog(
    committed: pa.Table,
    live: pa.Table,
    placed: pa.Table,
    files: pa.Table,
    tags: list[str],
    level: int | None,
) -> pa.Table:
    """One row per series folder holding placed files: its patient folder, header values
    (CATALOG_HEADERS and tags: those of its first file whose input is current, else those
    the ledger keeps of its first file), files and bytes, when its first and last file
    were added, and the input folders of every input whose content is in it. No input
    file is opened. Columnar, and header values are taken for one file per folder only."""
    headers = list(dict.fromkeys([*CATALOG_HEADERS, *tags]))
    per_placement = pa.table(
        {
            "series folder": parent_folders(placed["destination"]),
            "size": placed["size"],
            "added": placed["committed_at"],
        }
    )
    counts = per_placement.group_by("series folder", use_threads=False).aggregate(
        [([], "count_all"), ("size", "sum"), ("added", "min"), ("added", "max")]
    )
    del per_placement
    series = counts["series folder"]
    # Every ledger row (placed or duplicate) whose destination is in a series folder.
    folders = parent_folders(committed["destination"])
    sources = pa.table(
        {"series folder": folders, "input folder": input_folders(committed["relpath"])}
    )
    sources = sources.group_by("series folder", use_threads=False).aggregate(
        [("input folder", "distinct")]
    )
    # One file per series folder: its first row whose input is current (live: the ledger
    # rows whose input file version is in files), else its first row.
    first = pc.index_in(series, value_set=folders)
    first_live = pc.index_in(series, value_set=parent_folders(live["destination"]))
    representative = live.take(first_live)
    in_manifest = ledger.positions_by_key(representative, files)
    values = {}
    for name in headers:
        value = (
            files[name].take(in_manifest).cast(pa.string())
            if name in files.column_names
            else pa.nulls(len(series), pa.string())
        )
        known = _LEDGER_HEADERS.get(name)
        if known:
            value = pc.coalesce(representative[known], committed[known].take(first), value)
        values[name] = value
    added = {
        name: as_times(counts[f"added_{how}"])
        for name, how in (("first added", "min"), ("last added", "max"))
    }
    inputs = sources["input folder_distinct"].take(
        pc.index_in(series, value_set=sources["series folder"])
    )
    table = pa.table(
        {
            "patient folder": patient_folders(series, level),
            "series folder": series,
            **values,
            "files": counts["count_all"],
            "bytes": counts["size_sum"],
            **added,
            "input folders": _sorted_lists(inputs),
        }
    )
    return typed_values(table).sort_by("series folder")


def _sorted_lists(lists: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Each list sorted (a distinct aggregate keeps no order)."""
    return pa.array([sorted(found) for found in lists.to_pylist()], pa.list_(pa.string()))


def write_catalog(table: pa.Table, parquet: Path, csv: Path) -> None:
    """The catalogue as parquet (typed, input folders as lists) and as CSV (spreadsheet-safe,
    input folders joined by "; ")."""
    with atomic_path(parquet) as tmp:
        pq.write_table(table, tmp)
    index = table.schema.get_field_index("input folders")
    joined = pc.binary_join(table["input folders"], "; ")
    write_csv(table.set_column(index, "input folders", joined), csv)


def skip_summary(skipped: pa.Table) -> pa.Table:
    """Per skip reason (the manifests' and any filter's alike): files, bytes and the first
    few paths (by name) as examples; the most frequent reasons first, at most
    MAX_REASONS_LISTED of them."""
    rows = pa.table(
        {
            "reason": pc.fill_null(skipped["skip_reason"], "(none)"),
            "relpath": skipped["relpath"],
            "size": skipped["size"],
        }
    )
    per_reason = rows.group_by("reason", use_threads=False).aggregate(
        [([], "count_all"), ("size", "sum")]
    )
    per_reason = per_reason.rename_columns(["reason", "files", "bytes"])
    top = per_reason.sort_by([("files", "descending"), ("reason", "ascending")])
    top = top.slice(0, MAX_REASONS_LISTED).sort_by("reason")
    # Sorted by reason, then path: each reason's rows start where the counts before it end.
    listed = rows.filter(pc.is_in(rows["reason"], value_set=top["reason"]))
    paths = listed.sort_by([("reason", "ascending"), ("relpath", "ascending")])["relpath"]
    starts = pc.subtract(pc.cumulative_sum(top["files"]), top["files"]).to_pylist()
    examples = [
        paths.slice(start, min(count, SKIP_EXAMPLES)).to_pylist()
        for start, count in zip(starts, top["files"].to_pylist(), strict=True)
    ]
    top = top.append_column("examples", pa.array(examples, pa.list_(pa.string())))
    return top.sort_by([("files", "descending"), ("reason", "ascending")])


# --- the page ---------------------------------------------------------------------------


def _table(table: pa.Table, caption: str) -> str:
    if table.num_rows == 0:
        return f"<h2>{html.escape(caption)}</h2><p class='none'>None.</p>"
    shown = table.slice(0, MAX_LISTED).to_pylist()
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.column_names)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row.values())
        + "</tr>"
        for row in shown
    )
    note = (
        f"<p>{len(shown):,} of {table.num_rows:,} rows shown; all are in the CSV files.</p>"
        if table.num_rows > len(shown)
        else ""
    )
    return f"<h2>{html.escape(caption)}</h2>{note}<table><tr>{head}</tr>{body}</table>"


def _size(n: int) -> str:
    """Bytes for people: 1 kB is 1,000 bytes, as the totals at the top count them."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} B"


def _link(target: str | None) -> str:
    """A link to a list written beside the page, or the plain name when it was not."""
    name = html.escape(os.path.basename(target or "")) or "(not written)"
    return f"<a href='{html.escape(quote(target))}'>{name}</a>" if target else name


def _cells(values: list[object], tag: str = "td") -> str:
    return "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in values)


def patients_section(patients: pa.Table, series: pa.Table, lists: dict[str, str]) -> str:
    """The first MAX_PATIENTS_LISTED patient folders (this run's first, then the largest),
    each a collapsed block of its series; how many more, and where all of them are
    (lists: the links of ``patients`` and ``series`` CSV files beside the page). Python
    touches only the rows shown."""
    title = "<h2>Patients and series (this run's additions first)</h2>"
    if patients.num_rows == 0:
        return f"{title}<p class='none'>None.</p>"
    shown = patients.slice(0, MAX_PATIENTS_LISTED)
    rank = pc.index_in(series["patient folder"], value_set=shown["patient folder"])
    listed = series.append_column("rank", rank).filter(pc.is_valid(rank))
    listed = listed.sort_by([("rank", "ascending"), *_this_run_first("series folder")])
    by_patient: dict[str, list[dict]] = {}
    for row in listed.slice(0, MAX_SERIES_LISTED).to_pylist():
        rows = by_patient.setdefault(row["patient folder"], [])
        if len(rows) < MAX_SERIES_PER_PATIENT:
            rows.append(row)
    head = _cells(["series folder", "modality", "files", "size", NEW], "th")
    blocks = []
    for patient in shown.to_pylist():
        folder, rows = patient["patient folder"], by_patient.get(patient["patient folder"], [])
        new = patient[NEW]
        line = (
            f"<b>{html.escape(folder)}</b> · {patient['series']:,} series · "
            f"{patient['files']:,} files · {_size(patient['bytes'])}"
            + (f" · <span class='new'>{new:,} new this run</span>" if new else "")
        )
        body = "".join(
            "<tr>"
            + _cells(
                [
                    row["series folder"].removeprefix(f"{folder}/"),
                    row["modality"] or "",
                    f"{row['files']:,}",
                    _size(row["bytes"]),
                    f"{row[NEW]:,}",
                ]
            )
            + "</tr>"
            for row in rows
        )
        more = patient["series"] - len(rows)
        rest = f"<p>{more:,} more series in {_link(lists.get('series'))}.</p>" if more else ""
        blocks.append(
            f"<details><summary>{line}</summary><table><tr>{head}</tr>{body}</table>"
            f"{rest}</details>"
        )
    added = _count_positive(patients[NEW])
    more = patients.num_rows - shown.num_rows
    note = (
        f"<p>{patients.num_rows:,} patient folders, {series.num_rows:,} series folders; "
        f"{added:,} patient folders got files in this run (listed first), then the largest."
        + (
            f" The first {shown.num_rows:,} are shown; {more:,} more patient folders are in "
            f"{_link(lists.get('patients'))}."
            if more
            else ""
        )
        + f" Every patient and series folder with its files and bytes: "
        f"{_link(lists.get('patients'))}, {_link(lists.get('series'))}.</p>"
    )
    return title + note + "".join(blocks)


def skipped_section(reasons: pa.Table, by_reason: dict[str, int]) -> str:
    """Skipped files by reason (the first ones of by_reason, every reason's count): files,
    size and a few example paths per reason."""
    title = "<h2>Skipped files by reason</h2>"
    if reasons.num_rows == 0:
        return f"{title}<p class='none'>None.</p>"
    head = _cells(["reason", "files", "size", "examples"], "th")
    body = "".join(
        "<tr>"
        + _cells([row["reason"], f"{row['files']:,}", _size(row["bytes"])])
        + "<td>"
        + "<br>".join(html.escape(path) for path in row["examples"])
        + "</td></tr>"
        for row in reasons.to_pylist()
    )
    more_reasons = len(by_reason) - reasons.num_rows
    more_files = sum(by_reason.values()) - (pc.sum(reasons["files"]).as_py() or 0)
    more = (
        f"<p>{more_reasons:,} more reasons, of {more_files:,} skipped files, are counted in "
        "summary.json.</p>"
        if more_reasons
        else ""
    )
    return (
        f"{title}<p>Every skipped file, with its reason: skipped.csv.</p>{more}"
        f"<table><tr>{head}</tr>{body}</table>"
    )


def bar_chart(counts: dict[str, int], title: str, limit: int = 20) -> str:
    """A horizontal bar chart in HTML and CSS: labels are escaped text, never markup or
    mathtext, and the page needs no script, image or plotting library."""
    if not counts:
        return ""
    top = max(counts.values())
    rows = "".join(
        f"<div class='bar'><span class='label'>{html.escape(label)}</span>"
        f"<span class='fill' style='width:{max(1, round(60 * n / top))}%'></span>"
        f"<span class='count'>{n:,}</span></div>"
        for label, n in list(counts.items())[:limit]
    )
    return f"<h2>{html.escape(title)}</h2><div class='chart'>{rows}</div>"


def render_html(
    summary: dict, tables: dict[str, pa.Table], lists: dict[str, str] | None = None
) -> str:
    """The report page: totals, chart, what this run did, then everything in place.
    lists: links (relative to the page) of the ``patients`` and ``series`` CSV files."""
    totals = [
        ("Patients", summary["patients"]),
        ("Studies", summary["studies"]),
        ("Series", summary["series"]),
        ("Files sorted", summary["files_sorted"]),
        ("Size sorted", f"{summary['bytes_sorted'] / 1e6:,.1f} MB"),
        ("New this run", summary["files_new"]),
        ("Relinked this run", summary["files_relinked"]),
        ("Duplicates", summary["duplicates"]),
        ("Conflicts", summary["conflicts"]),
        ("Skipped", summary["skipped"]),
        ("Sources gone", summary["sources_gone"]),
        ("Changed during the run", summary["changed_during_run"]),
        ("Headers read this run", summary["headers_read"]),
    ]
    cards = "".join(
        f"<div class='card'><div class='n'>{html.escape(f'{v:,}' if isinstance(v, int) else v)}"
        f"</div><div>{k}</div></div>"
        for k, v in totals
    )
    notes = ""
    if summary["previous_transfer_mode"] not in (None, summary["transfer_mode"]):
        notes += (
            f"<p class='warn'>transfer_mode changed from "
            f"{html.escape(summary['previous_transfer_mode'])} to "
            f"{html.escape(summary['transfer_mode'])}: files placed earlier stay as "
            "they were placed.</p>"
        )
    if summary["files_from_archives"] and summary["transfer_mode"] != "copy":
        notes += (
            f"<p>{summary['files_from_archives']:,} files came from archives in the input: "
            f"they were copied, not {html.escape(summary['transfer_mode'])}ed (no link can "
            "point into an archive).</p>"
        )
    if summary["patient_folders_with_several_ids"]:
        notes += (
            f"<p class='warn'>{len(summary['patient_folders_with_several_ids']):,} patient "
            "folders hold files of more than one PatientID (listed below).</p>"
        )
    if summary["dangling_links"]:
        notes += (
            f"<p class='warn'>{summary['dangling_links']:,} symbolic links point to input "
            "files that are gone: their content is no longer anywhere in the output.</p>"
        )
    check = summary["check"]
    if check:
        notes += (
            f"<p{' class=warn' if check['damaged'] else ''}>This run checked every "
            f"placement ({check['placements']:,}, by {html.escape(check['how'])}): "
            f"{check['restored']:,} restored from their input, {check['damaged']:,} damaged "
            "and not restorable (listed below and in check.csv).</p>"
        )
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["generated_at"]))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dcmsort report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.cards {{ display: flex; flex-wrap: wrap; gap: .8em; }}
.card {{ border: 1px solid #ccd; border-radius: 6px; padding: .6em 1em; min-width: 8em; }}
.card .n {{ font-size: 1.5em; font-weight: 600; }}
.chart {{ max-width: 50em; }}
.bar {{ display: flex; align-items: center; gap: .5em; margin: .15em 0; }}
.bar .label {{ width: 12em; text-align: right; overflow-wrap: anywhere; }}
.bar .fill {{ background: #3b6ea8; height: 1em; display: inline-block; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; font-size: .9em; }}
td, th {{ border: 1px solid #ddd; padding: .25em .6em; text-align: left;
          overflow-wrap: anywhere; max-width: 45em; }}
th {{ background: #f2f4f8; }}
.warn {{ color: #a00; }} .none {{ color: #777; }} .new {{ color: #060; font-weight: 600; }}
details {{ margin: .2em 0; }} summary {{ cursor: pointer; overflow-wrap: anywhere; }}
</style></head><body>
{STATUS_START}{STATUS_END}
<h1>dcmsort report</h1>
<p>Output folder: <code>{html.escape(summary["output_dir"])}</code> · transfer mode:
{html.escape(summary["transfer_mode"])} · generated {generated}</p>
{notes}
<div class="cards">{cards}</div>
{bar_chart(summary["files_per_modality"], "Files per modality")}
{_table(tables["unplaced"], "Not placed by this run (see the reason)")}
{_table(tables["check"], "Check: placements missing or damaged") if check else ""}
{patients_section(tables["patients"], tables["series"], lists or {})}
{skipped_section(tables["skip_reasons"], summary["skipped_by_reason"])}
{_table(tables["conflicts"], "Conflicts: same SOPInstanceUID, different content (all kept)")}
{_table(tables["duplicates"], "Exact duplicates (not written again)")}
{_table(tables["gone"], "Sources gone since they were sorted (their copies are kept)")}
{_table(tables["shared"], "Patient folders holding more than one PatientID")}
</body></html>
"""


def read_manifests(paths: list[Path], headers: list[str] = ()) -> tuple[pa.Table, list[dict]]:
    """Key and skip columns of every manifest and the headers asked for (null where a
    manifest has none), and each manifest's metadata."""
    columns = [*ledger.SOURCE_KEY, "dicom", "skip_reason", "PatientID"]
    columns += [name for name in headers if name not in columns]
    tables, meta = [], []
    for path in paths:
        schema = pq.read_schema(path)
        table = ledger.with_version_columns(
            read_parquet(path, columns=[c for c in columns if c in schema.names])
        )
        for name in columns:
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        for name in headers:  # few distinct values each: a dictionary holds them in little memory
            if name != "PatientID":
                index = table.column_names.index(name)
                table = table.set_column(index, name, pc.dictionary_encode(table[name]))
        tables.append(table.select(columns))
        meta.append({k.decode(): v.decode() for k, v in (schema.metadata or {}).items()})
    if not tables:
        schema = pa.schema(
            [
                *(ledger.SCHEMA.field(name) for name in ledger.SOURCE_KEY),
                ("dicom", pa.bool_()),
                ("skip_reason", pa.string()),
            ]
        )
        return schema.empty_table(), meta
    return pa.concat_tables(tables), meta


def with_excluded(files: pa.Table, paths: list[Path]) -> pa.Table:
    """files with those the filters left out (``plan.leave_out``, one list per partition)
    as skipped, the rule as their reason."""
    lists = [read_parquet(p) for p in paths if p.exists()]
    excluded = pa.concat_tables(lists) if lists else None
    if excluded is None or excluded.num_rows == 0:
        return files
    found = ledger.positions_by_key(files, excluded)
    reason = excluded["reason"].combine_chunks().take(found)
    left_out = pc.is_valid(found)
    return files.set_column(
        files.column_names.index("dicom"), "dicom", pc.and_not(files["dicom"], left_out)
    ).set_column(
        files.column_names.index("skip_reason"),
        "skip_reason",
        pc.if_else(left_out, reason, files["skip_reason"]),
    )


# Plan columns for the next stages, not for people reading plan.csv.
PLAN_INTERNAL = ["ctime_ns", "ino", "committed", "digest", "base_folder", "part_key"]


def _read_since(paths: list[Path], since: float, schema: pa.Schema) -> pa.Table:
    """The rows of the files written after since (the last report), one after another."""
    tables = [schema.empty_table()] + [
        read_parquet(p) for p in paths if p.exists() and p.stat().st_mtime > since
    ]
    return pa.concat_tables(tables, promote_options="default")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcmsort.report", description=__doc__)
    parser.add_argument("--transfers", type=Path, nargs="*", default=[])
    parser.add_argument("--plans", type=Path, nargs="*", default=[])
    parser.add_argument("--plan-csv", type=Path, help="this run's decisions, as CSV")
    parser.add_argument("--skipped", type=Path, help="the files not sorted and why, as CSV")
    parser.add_argument(
        "--excluded", type=Path, nargs="*", default=[], help="the files filters left out"
    )
    parser.add_argument("--manifests", type=Path, nargs="*", default=[])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--naming", required=True, help="Naming settings as JSON")
    parser.add_argument("--html", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--removed", type=Path, required=True)
    parser.add_argument("--patients", type=Path, help="files and bytes per patient folder, CSV")
    parser.add_argument("--series", type=Path, help="files and bytes per series folder, CSV")
    parser.add_argument(
        "--check", type=Path, nargs="*", default=[], help="this run's check results, if any"
    )
    parser.add_argument(
        "--catalog-tags", nargs="*", default=[], help="header columns of the series catalogue"
    )
    parser.add_argument("--catalog", type=Path, help="the series catalogue, parquet")
    parser.add_argument("--catalog-csv", type=Path, help="the series catalogue, CSV")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    files, meta = read_manifests(args.manifests, [*CATALOG_HEADERS, *args.catalog_tags])
    files = with_excluded(files, args.excluded)
    committed = ledger.read(args.state_dir, LEDGER_COLUMNS)
    history = args.state_dir / HISTORY
    previous = last_history(history)
    # This run's work: the partitions whose jobs ran since this run started (the run
    # rewrites its lock first) and since the last report; not those a killed run finished.
    lock = args.state_dir / LOCK_FILE
    started = lock.stat().st_mtime if lock.exists() else 0.0
    since = max((previous or {}).get("generated_at", 0), started)
    transfers = _read_since(args.transfers, since, TRANSFER_SCHEMA)
    if args.plan_csv:
        plans = _read_since(args.plans, since, PLAN_SCHEMA)
        internal = [c for c in PLAN_INTERNAL if c in plans.column_names]
        write_csv(plans.drop_columns(internal), args.plan_csv)
        del plans
    summary, tables = summarise(
        files,
        committed,
        transfers,
        meta,
        previous,
        args.output_dir,
        args.mode,
        str(args.html),
        read_results(args.check[0]) if args.check else None,
        naming.patient_level(json.loads(args.naming)["folder_template"]),
        args.catalog_tags,
    )
    if args.catalog and args.catalog_csv:
        write_catalog(tables["catalog"], args.catalog, args.catalog_csv)
    write_csv(tables["gone"], args.removed)
    if args.skipped:
        write_csv(tables["skipped"].rename_columns(["relpath", "size", "reason"]), args.skipped)
    lists = {}
    for name in ("patients", "series"):
        path = getattr(args, name)
        if path:
            write_csv(tables[name], path)
            lists[name] = os.path.relpath(path, args.html.parent)
    with atomic_path(args.html) as tmp:
        tmp.write_text(render_html(summary, tables, lists), encoding="utf-8")
    with atomic_path(args.summary) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    append_history(history, summary)
    log.info("%s; peak RSS %d MB", summary_line(args.summary), peak_rss_mb())
    return 0


if __name__ == "__main__":
    sys.exit(main())
