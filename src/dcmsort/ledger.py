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
  and removing what it replaces changes nothing.

A run killed between placing a file and committing it is settled by the next plan or
transfer (``transfer.settle``): the plan's copy ``pending.parquet`` names what it may have
placed.

A file that cannot be read (a damaged disk, a partial copy of the state folder) is ignored
with a warning, never fatal: its placements are on disk and the next plan finds them there
(by content) instead of copying them again.

Imports pyarrow only.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcmsort.fileops import atomic_path, read_parquet

log = logging.getLogger("dcmsort.ledger")

PLACED, DUPLICATE = "placed", "duplicate"
# The input file version, all from one stat (inventory.Entry): any change a stat can see.
SOURCE_KEY = ["relpath", "size", "mtime_ns", "ctime_ns", "ino"]
# Written by v0.3 and earlier without them: read as null, and a row with null never equals
# a current file (whose ctime may have changed since): it is found again by content.
ADDED_IN_V04 = ("ctime_ns", "ino")
SCHEMA = pa.schema(
    [
        # The input file version: path relative to input_dir, size, mtime, ctime and inode
        # number from stat. For a hard link, ctime as it was after linking (the new link
        # changed it).
        ("relpath", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("ctime_ns", pa.int64()),
        ("ino", pa.uint64()),
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
        # The input's PatientID, trimmed of padding spaces ("" when it has none): a patient
        # folder holds one patient. Null in rows written before this column existed.
        ("patient_id", pa.string()),
    ]
)
COLUMNS = SCHEMA.names
# Compacting rewrites every row; past this many segments a reader pays more in file opens.
MAX_SEGMENTS = 32
_NAME = re.compile(r"^(seg|base)-(\d{10})\.parquet$")


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
            table = read_parquet(path, columns=columns)
        except (OSError, pa.ArrowException) as error:
            log.warning("ledger file %s is unreadable and ignored (%s)", path.name, error)
            continue
        # A column added since this file was written (ctime_ns, ino, patient_id) reads as
        # nulls: a ledger of v0.3 stays readable.
        for name in columns:
            if name not in table.column_names:
                field = SCHEMA.field(name)
                table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        tables.append(table.select(columns).cast(pa.schema([SCHEMA.field(c) for c in columns])))
    if not tables:
        return pa.schema([SCHEMA.field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)


def with_version_columns(table: pa.Table) -> pa.Table:
    """table with ctime_ns and ino, null where it was written without them (a ledger
    segment, a manifest or a plan of v0.3)."""
    for name in ADDED_IN_V04:
        if name not in table.column_names:
            field = SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table


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


def _key(table: pa.Table) -> pa.ChunkedArray:
    """SOURCE_KEY as one string: NUL cannot occur in a path, so it is unambiguous. A
    missing ctime or inode (a v0.3 row) is the empty text, which no stat gives: such a row
    equals only another v0.3 row of the same (relpath, size, mtime), as it did in v0.3."""
    table = with_version_columns(table)
    return pc.binary_join_element_wise(
        *(
            table[name]
            if name == "relpath"
            else pc.fill_null(pc.cast(table[name], pa.string()), "")
            for name in SOURCE_KEY
        ),
        "\0",
    )


def rows_by_key(table: pa.Table, other: pa.Table, keep: str) -> pa.Table:
    """Rows of table whose file version (SOURCE_KEY) is ``"found"`` in other, or
    ``"missing"`` from it. Columnar (one hash set of other's keys), so a rerun pays no
    Python per known file, and far less memory than a hash join."""
    if other.num_rows == 0 or table.num_rows == 0:
        return table if keep == "missing" else table.slice(0, 0)
    found = pc.is_in(_key(table), value_set=_key(other))
    return table.filter(found if keep == "found" else pc.invert(found))


def patient_ids(values: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """PatientID values as a patient folder compares them: exactly, after the trimming of
    padding spaces the standard allows (LO), and "" for none (absent and empty are one)."""
    return pc.fill_null(pc.utf8_trim(values.cast(pa.string()), " "), "")


def live(ledger: pa.Table, files: pa.Table) -> pa.Table:
    """Rows whose input file version is still in the input (files: SOURCE_KEY columns)."""
    return rows_by_key(ledger, files, keep="found")


def first_placements(committed: pa.Table) -> pa.Table:
    """One row per destination holding a placed file (the output tree, per the ledger):
    its first placement (a touched input's later rows confirm the same file)."""
    is_placed = pc.equal(committed["status"], PLACED)
    # Not filtered when every row is kept (a filter copies every column).
    placed = committed if pc.all(is_placed).as_py() in (True, None) else committed.filter(is_placed)
    destinations = placed["destination"]
    # The row of each destination's first occurrence: one hash table, no group_by (which
    # holds every column's aggregation state: ~2 KB per row at 100,000 rows).
    first = pc.index_in(pc.unique(destinations), value_set=destinations)
    return placed.take(first)


def placed_destinations(ledger: pa.Table) -> pa.Array:
    """Every destination holding a placed file (each once)."""
    placed = ledger.filter(pc.equal(ledger["status"], PLACED))
    return pc.unique(placed["destination"])


def main(argv: list[str] | None = None) -> int:
    """Print every placement as CSV: where each input file version went."""
    import argparse
    import sys

    import pyarrow.csv as pacsv

    parser = argparse.ArgumentParser(
        prog="python -m dcmsort.ledger",
        description="Print the ledger (every placement confirmed on disk) as CSV.",
    )
    parser.add_argument("state_dir", type=Path, help="output_dir/.dcmsort, or your state_dir")
    args = parser.parse_args(argv)
    columns = [*SOURCE_KEY, "status", "destination", "digest", "mode", "committed_at"]
    try:
        pacsv.write_csv(read(args.state_dir, columns), sys.stdout.buffer)
    except BrokenPipeError:  # `| head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
