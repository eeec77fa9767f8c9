"""The ledger: what is verifiably in the output folder, and which input put it there.

A row is written only after its file is in place and checked (the commit order of git,
restic and rsync: the bytes first, then the record that points to them). A planned
destination is a reservation, never a row here; a reservation whose file never appeared
is planned again by the next run.

Storage: ``state_dir/ledger/`` holds parquet files, each written whole under a temporary
name and renamed into place, so an append is atomic on every file system (no SQLite or
DuckDB locking, which NFS and Lustre do not honour):

- ``seg-<n>.parquet``: one append (a transfer commits every few seconds);
- ``base-<n>.parquet``: every row of segments ``<= n``, written by ``compact``; a reader
  takes the newest base and only the segments after it, so a crash between writing a base
  and removing what it replaces changes nothing;
- ``intent.parquet``: the rows a transfer is about to put in place, written before it
  writes any file and removed once it has committed them. A run killed between placing a
  file and committing it leaves the intent behind, and the next plan or transfer commits
  the files it finds in place (``recover``), whether or not their input is still there.

A file that cannot be read (a damaged disk, a partial copy of the state folder) is ignored
with a warning, never fatal: its placements are on disk and the next plan finds them there
(by content) instead of copying them again.

Imports pyarrow only.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcmsort.fileops import atomic_path, file_digest

log = logging.getLogger("dcmsort.ledger")

PLACED, DUPLICATE = "placed", "duplicate"
SOURCE_KEY = ["relpath", "size", "mtime_ns"]
SCHEMA = pa.schema(
    [
        # The input file version: path relative to input_dir, size and mtime from stat.
        ("relpath", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        # PLACED: its content is at destination (written, linked or found there).
        # DUPLICATE: its content equals the file at destination, placed from another input.
        ("status", pa.string()),
        ("destination", pa.string()),
        # Content digest (fileops.file_digest) when one was computed; null otherwise.
        ("digest", pa.string()),
        ("mode", pa.string()),  # copy, hardlink, symlink
        # What later naming decisions need: the rendered folder template and the series.
        ("base_folder", pa.string()),
        ("series_uid", pa.string()),
        ("sop_uid", pa.string()),
        ("study_uid", pa.string()),
        ("modality", pa.string()),
        ("committed_at", pa.float64()),
    ]
)
COLUMNS = SCHEMA.names
# Compacting rewrites every row; past this many segments a reader pays more in file opens.
MAX_SEGMENTS = 32
_NAME = re.compile(r"^(seg|base)-(\d{10})\.parquet$")
INTENT = "intent.parquet"


def folder(state_dir: Path) -> Path:
    return Path(state_dir) / "ledger"


def _files(state_dir: Path) -> tuple[tuple[int, Path] | None, list[tuple[int, Path]]]:
    """(newest base, segments after it), each as (number, path)."""
    bases, segments = [], []
    try:
        names = os.listdir(folder(state_dir))
    except FileNotFoundError:
        return None, []
    for name in names:
        match = _NAME.match(name)
        if match:
            entry = (int(match[2]), folder(state_dir) / name)
            (bases if match[1] == "base" else segments).append(entry)
    base = max(bases) if bases else None
    after = base[0] if base else -1
    return base, sorted(s for s in segments if s[0] > after)


def empty() -> pa.Table:
    return SCHEMA.empty_table()


def read(state_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """Every committed row (oldest first); unreadable files are skipped with a warning."""
    columns = columns or COLUMNS
    base, segments = _files(state_dir)
    tables = []
    for _, path in ([base] if base else []) + segments:
        try:
            table = pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as error:
            log.warning("ledger file %s is unreadable and ignored (%s)", path.name, error)
            continue
        tables.append(table.cast(pa.schema([SCHEMA.field(c) for c in columns])))
    if not tables:
        return pa.schema([SCHEMA.field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)


def _next_number(state_dir: Path) -> int:
    base, segments = _files(state_dir)
    numbers = [n for n, _ in segments] + ([base[0]] if base else [])
    return max(numbers, default=0) + 1


def append(state_dir: Path, rows: pa.Table) -> None:
    """Commit rows: one new segment, atomically. Call only for files already in place."""
    if rows.num_rows == 0:
        return
    path = folder(state_dir) / f"seg-{_next_number(state_dir):010d}.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(rows.select(COLUMNS).cast(SCHEMA), tmp)


def compact(state_dir: Path, max_segments: int = MAX_SEGMENTS) -> bool:
    """Fold the segments into one base when there are more than max_segments."""
    base, segments = _files(state_dir)
    if len(segments) <= max_segments:
        return False
    table = read(state_dir)
    number = segments[-1][0]
    with atomic_path(folder(state_dir) / f"base-{number:010d}.parquet") as tmp:
        pq.write_table(table, tmp)
    for _, path in ([base] if base else []) + segments:
        path.unlink(missing_ok=True)
    return True


def rows_by_key(table: pa.Table, other: pa.Table, keep: str) -> pa.Table:
    """Rows of table whose (relpath, size, mtime_ns) is ``"found"`` in other, or
    ``"missing"`` from it. Columnar: only the key columns and a row number go through the
    join, so a rerun pays no Python per known file."""
    if other.num_rows == 0 or table.num_rows == 0:
        return table if keep == "missing" else table.slice(0, 0)
    keys = table.select(SOURCE_KEY).append_column(
        "_row", pa.array(range(table.num_rows), pa.int64())
    )
    how = "left semi" if keep == "found" else "left anti"
    matched = keys.join(other.select(SOURCE_KEY), keys=SOURCE_KEY, join_type=how, use_threads=False)
    rows = matched["_row"]
    return table.take(pc.take(rows, pc.sort_indices(rows)))  # in the table's own order


def live(ledger: pa.Table, files: pa.Table) -> pa.Table:
    """Rows whose input file version is still in the input (files: SOURCE_KEY columns)."""
    return rows_by_key(ledger, files, keep="found")


def placed_destinations(ledger: pa.Table) -> pa.Array:
    """Every destination holding a placed file (each once)."""
    placed = ledger.filter(pc.equal(ledger["status"], PLACED))
    return pc.unique(placed["destination"])


def intend(state_dir: Path, rows: pa.Table) -> None:
    """Before a transfer writes anything: the plan rows it is about to put in place (with a
    ``mode`` column), so that what a killed run placed can still be committed."""
    if rows.num_rows:
        with atomic_path(folder(state_dir) / INTENT) as tmp:
            pq.write_table(rows, tmp)


def forget_intent(state_dir: Path) -> None:
    """After a transfer committed everything it placed."""
    (folder(state_dir) / INTENT).unlink(missing_ok=True)


def recover(state_dir: Path, output_dir: Path) -> int:
    """Commit what a killed transfer put in place but never committed: rows of its intent
    the ledger lacks whose destination holds a regular file of the planned size and either
    the planned digest or the input's mtime (a copy gets it only once it is complete and
    checked, a hard link shares it). Such a file stays in the output whatever happens to
    its input since, so it is a placement: without this row it would be a file nothing
    accounts for, and a later copy of the same content would be written again."""
    path = folder(state_dir) / INTENT
    try:
        intent = pq.read_table(path)
    except FileNotFoundError:
        return 0
    except (OSError, pa.ArrowException) as error:
        log.warning("transfer intent %s is unreadable and ignored (%s)", path.name, error)
        path.unlink(missing_ok=True)
        return 0
    rows = []
    for row in rows_by_key(intent, read(state_dir, SOURCE_KEY), keep="missing").to_pylist():
        destination = Path(output_dir) / row["destination"]
        try:
            info = os.lstat(destination)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_size != row["size"]:
            continue
        digest = file_digest(destination)
        if digest != row["digest"] and info.st_mtime_ns != row["mtime_ns"]:
            continue
        rows.append(
            {
                **{key: row[key] for key in SOURCE_KEY},
                "status": PLACED,
                "destination": row["destination"],
                "digest": digest,
                "mode": row["mode"],
                "base_folder": row["base_folder"],
                "series_uid": row["SeriesInstanceUID"],
                "sop_uid": row["SOPInstanceUID"],
                "study_uid": row["StudyInstanceUID"],
                "modality": row["Modality"],
                "committed_at": time.time(),
            }
        )
    append(state_dir, pa.Table.from_pylist(rows, schema=SCHEMA))
    path.unlink()
    if rows:
        log.info("committed %d files a killed transfer had put in place", len(rows))
    return len(rows)
