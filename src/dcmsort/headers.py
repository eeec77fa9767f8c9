"""Read DICOM headers into manifests: is this file DICOM, and what are its tags.

The extract job (``python -m dcmsort.headers``) handles one batch of input folders. For each
folder it writes one parquet manifest, one row per file, and it reads a header only when the
file is new or changed: rows of unchanged files (same path, size and mtime) are taken from the
folder's previous manifest. Then it writes the batch manifest the plan stage reads.

Imports pydicom and pyarrow only (no pandas): this is the job that runs many times.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from dcmsort import inventory
from dcmsort.fileops import atomic_path

log = logging.getLogger("dcmsort.headers")

# Tags every manifest has; templates may add more keywords.
MANIFEST_TAGS = [
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "Modality",
]
FILE_META_TAGS = ["TransferSyntaxUID", "MediaStorageSOPClassUID"]
FILE_COLUMNS = ["folder", "relpath", "size", "mtime_ns", "dicom", "skip_reason"]
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# A stored instance carries one of these with a UID-shaped value. The check matters most
# without a DICM preamble, where pydicom can be forced to parse anything.
_IDENTIFYING_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID")

SKIP_REASONS = {
    inventory.BROKEN_SYMLINK: "broken symbolic link (its target does not exist)",
    inventory.DIRECTORY_SYMLINK: "symbolic link to a folder (not followed, so that no loop "
    "or outside folder is walked); sort its target separately",
    inventory.SPECIAL: "not a regular file (device, socket or pipe)",
    inventory.UNREADABLE_DIRECTORY: "folder could not be listed (permissions?)",
}


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    text = str(value)
    return text if text.strip() else None


def _looks_like_uid(value: str | None) -> bool:
    return bool(value) and len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


def read_header(path: str, keywords: list[str]) -> dict[str, str | None]:
    """The requested tags of one file, plus ``skip_reason`` (None when it is sortable DICOM).

    Reads only the header (``stop_before_pixels``, ``specific_tags``). Never raises for a
    bad file: the reason goes into the result instead.
    """
    result: dict[str, str | None] = dict.fromkeys(keywords + FILE_META_TAGS)
    try:
        if os.path.getsize(path) == 0:
            return {**result, "skip_reason": "empty file (0 bytes)"}
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=keywords)
            preamble = True
        except InvalidDicomError:
            dataset = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=keywords, force=True
            )
            preamble = False
        for keyword in keywords:
            result[keyword] = _text(dataset.get(keyword))
        meta = dataset.file_meta if hasattr(dataset, "file_meta") else {}
        for keyword in FILE_META_TAGS:
            result[keyword] = _text(meta.get(keyword)) if meta else None
    except PermissionError:
        return {**result, "skip_reason": "unreadable: permission denied"}
    except OSError as error:
        return {**result, "skip_reason": f"unreadable: {error.strerror or error}"}
    except Exception as error:  # pydicom raises many types on damaged data
        return {**result, "skip_reason": f"damaged DICOM header: {type(error).__name__}: {error}"}
    if result.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
        return {**result, "skip_reason": "DICOMDIR (an index of a DICOM medium, not an image)"}
    if not any(_looks_like_uid(result.get(k)) for k in _IDENTIFYING_UIDS):
        reason = (
            "DICOM without SOP, series or study UID (truncated, or not a stored instance "
            "such as a worklist query)"
            if preamble
            else "not DICOM (no DICM preamble and no DICOM identifiers)"
        )
        return {**result, "skip_reason": reason}
    return {**result, "skip_reason": None}


def manifest_schema(keywords: list[str]) -> pa.Schema:
    fields = [
        pa.field("folder", pa.string()),
        pa.field("relpath", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("dicom", pa.bool_()),
        pa.field("skip_reason", pa.string()),
    ]
    fields += [pa.field(k, pa.string()) for k in keywords + FILE_META_TAGS]
    return pa.schema(fields)


def _previous_rows(manifest: Path, keywords: list[str]) -> dict[tuple[str, int, int], dict]:
    """Rows of a folder's last manifest, by (relpath, size, mtime), if it has every tag."""
    try:
        table = pq.read_table(manifest)
    except (OSError, pa.ArrowException):
        return {}
    if not set(keywords).issubset(table.column_names):
        return {}
    return {(r["relpath"], r["size"], r["mtime_ns"]): r for r in table.to_pylist()}


def extract_folder(
    input_dir: Path, folder: str, keywords: list[str], manifest: Path
) -> tuple[pa.Table, int]:
    """Bring one folder's manifest up to date; returns it and how many headers were read."""
    entries = inventory.walk_folder(input_dir, folder)
    fingerprint = inventory.fingerprint(entries)
    schema = manifest_schema(keywords).with_metadata({"fingerprint": fingerprint})
    if manifest.exists():
        try:
            previous = pq.read_table(manifest)
            same = (previous.schema.metadata or {}).get(b"fingerprint") == fingerprint.encode()
            if same and set(keywords).issubset(previous.column_names):
                return previous.select(schema.names).cast(schema), 0
        except (OSError, pa.ArrowException):
            pass
    reusable = _previous_rows(manifest, keywords) if manifest.exists() else {}
    rows, headers_read = [], 0
    for entry in entries:
        key = (entry.relpath, entry.size, entry.mtime_ns)
        if entry.kind == inventory.FILE and key in reusable:
            rows.append(reusable[key])
            continue
        row = {
            "folder": folder,
            "relpath": entry.relpath,
            "size": entry.size,
            "mtime_ns": entry.mtime_ns,
        }
        if entry.kind == inventory.FILE:
            header = read_header(str(input_dir / entry.relpath), keywords)
            headers_read += 1
        else:
            header = {"skip_reason": SKIP_REASONS[entry.kind]}
        row.update(header)
        row["dicom"] = header["skip_reason"] is None
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(manifest) as tmp:
        pq.write_table(table, tmp)
    return table, headers_read


def extract_batch(
    input_dir: Path, batch: int, batches: int, keywords: list[str], manifests: Path, output: Path
) -> dict[str, int]:
    """Update the manifests of every folder in one batch and write the batch manifest."""
    keywords = list(dict.fromkeys(MANIFEST_TAGS + keywords))
    folders = [
        f for f in inventory.list_folders(input_dir) if inventory.batch_of(f, batches) == batch
    ]
    manifests.mkdir(parents=True, exist_ok=True)
    tables, stats = [], {"folders": len(folders), "files": 0, "headers_read": 0, "not_sortable": 0}
    for folder in folders:
        table, headers_read = extract_folder(
            input_dir, folder, keywords, manifests / inventory.manifest_name(folder)
        )
        tables.append(table)
        stats["files"] += table.num_rows
        stats["headers_read"] += headers_read
        stats["not_sortable"] += table.num_rows - sum(table.column("dicom").to_pylist())
        log.info(
            "%s: %d files, %d headers read",
            folder or "(files in input_dir)",
            table.num_rows,
            headers_read,
        )
    schema = manifest_schema(keywords)
    combined = (
        pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
        if tables
        else schema.empty_table()
    )
    combined = combined.replace_schema_metadata(
        {"extracted_at": str(time.time()), **{k: str(v) for k, v in stats.items()}}
    )
    with atomic_path(output) as tmp:
        pq.write_table(combined, tmp)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcmsort.headers", description=__doc__)
    parser.add_argument("--input-dir", type=Path, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--keywords", default="", help="extra DICOM keywords, comma-separated")
    parser.add_argument(
        "--manifests", type=Path, required=True, help="folder of per-folder manifests"
    )
    parser.add_argument("--output", type=Path, required=True, help="the batch manifest")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    stats = extract_batch(
        args.input_dir,
        args.batch,
        args.batches,
        [k for k in args.keywords.split(",") if k],
        args.manifests,
        args.output,
    )
    log.info(
        "batch %d: %d folders, %d files, %d headers read, %d not sortable, %.2f s",
        args.batch,
        stats["folders"],
        stats["files"],
        stats["headers_read"],
        stats["not_sortable"],
        time.perf_counter() - started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
