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
transfer (``transfer.settle``): the plan's copy ``plan/pending-p<k>of<n>.parquet`` names
what it may have placed.

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

from dcmsort.fileops import atomic_path, read_parquet, with_schema
from dcmsort.routes import Part

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
        # partition.key of the file's patient folder: which partition plans it (null in
        # rows written before partitions).
        ("part_key", pa.int64()),
    ]
)
COLUMNS = SCHEMA.names
# Compacting rewrites every row; past this many segments a reader pays more in file opens.
MAX_SEGMENTS = 32
_NAME = re.compile(r"^(?:(p\d+of\d+)-)?(seg|base)-(\d{10})\.parquet$")


def folder(state_dir: Path) -> Path:
    return Path(state_dir) / "ledger"


Files = tuple[tuple[int, Path] | None, list[tuple[int, Path]]]


def _groups(state_dir: Path) -> dict[str, Files]:
    """Per writer group ("" for files written without a partition, else ``Part.name``):
    (newest base, segments after it), each as (number, path)."""
    found: dict[str, tuple[list, list]] = {}
    try:
        names = os.listdir(folder(state_dir))
    except FileNotFoundError:
        return {}
    for name in names:
        match = _NAME.match(name)
        if match:
            bases, segments = found.setdefault(match[1] or "", ([], []))
            entry = (int(match[3]), folder(state_dir) / name)
            (bases if match[2] == "base" else segments).append(entry)
    groups = {}
    for group, (bases, segments) in found.items():
        base = max(bases) if bases else None
        after = base[0] if base else -1
        groups[group] = (base, sorted(s for s in segments if s[0] > after))
    return groups


def _files(state_dir: Path, part: Part | None = None) -> Files:
    """(newest base, segments after it) of one writer group."""
    return _groups(state_dir).get(part.name if part else "", (None, []))


def current_files(state_dir: Path) -> list[Path]:
    """The files whose rows are the ledger: of each writer group, its newest base and the
    segments after it (what ``read`` reads)."""
    groups = _groups(state_dir)
    return [
        path
        for group in sorted(groups)
        for _, path in ([groups[group][0]] if groups[group][0] else []) + groups[group][1]
    ]


def empty() -> pa.Table:
    return SCHEMA.empty_table()


def part_index(keys: pa.ChunkedArray | pa.Array, count: int) -> pa.ChunkedArray | pa.Array:
    """The partition of each part_key among count (``key % count``; keys are >= 0)."""
    return pc.subtract(keys, pc.multiply(pc.divide(keys, count), count))


def _of_part(table: pa.Table, part: Part) -> pa.Table:
    """The rows of part; rows without a part_key (written before partitions) are kept, as
    a superset of a partition's rows is always safe to plan against."""
    index = part_index(table["part_key"], part.count)
    return table.filter(pc.fill_null(pc.equal(index, part.index), True))


def read(state_dir: Path, columns: list[str] | None = None, part: Part | None = None) -> pa.Table:
    """Committed rows (oldest first within each writer group); unreadable files are skipped
    with a warning. With part: the rows of that partition (its own group's files whole,
    rows of other partitionings filtered by part_key) and rows written without one."""
    columns = columns or COLUMNS
    schema = pa.schema([SCHEMA.field(c) for c in columns])
    tables = []
    for group, (base, segments) in sorted(_groups(state_dir).items()):
        whole = part is None or group in ("", part.name)
        wanted = columns if whole or "part_key" in columns else [*columns, "part_key"]
        for _, path in ([base] if base else []) + segments:
            try:
                table = read_parquet(path, columns=wanted)
            except (OSError, pa.ArrowException) as error:
                log.warning("ledger file %s is unreadable and ignored (%s)", path.name, error)
                continue
            if not whole:
                table = _of_part(
                    with_schema(table, pa.schema([SCHEMA.field(c) for c in wanted])), part
                )
            # A column added since this file was written (ctime_ns, ino, patient_id,
            # part_key) reads as nulls: a ledger of v0.3 stays readable.
            tables.append(with_schema(table, schema))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def with_version_columns(table: pa.Table) -> pa.Table:
    """table with ctime_ns and ino, null where it was written without them (a ledger
    segment, a manifest or a plan of v0.3)."""
    for name in ADDED_IN_V04:
        if name not in table.column_names:
            field = SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table


def _next_number(state_dir: Path, part: Part | None) -> int:
    base, segments = _files(state_dir, part)
    numbers = [n for n, _ in segments] + ([base[0]] if base else [])
    return max(numbers, default=0) + 1


def _prefix(part: Part | None) -> str:
    return f"{part.name}-" if part else ""


def append(state_dir: Path, rows: pa.Table, part: Part | None = None) -> None:
    """Commit rows: one new segment of part's group, atomically. Call only for files
    already in place. Only part's own job writes its group, so names never race."""
    if rows.num_rows == 0:
        return
    number = _next_number(state_dir, part)
    path = folder(state_dir) / f"{_prefix(part)}seg-{number:010d}.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(rows.select(COLUMNS).cast(SCHEMA), tmp)


def compact(state_dir: Path, max_segments: int = MAX_SEGMENTS, part: Part | None = None) -> bool:
    """Fold part's segments into one base when there are more than max_segments. Only the
    group's own writer compacts it, after its last append, so it never races a writer."""
    base, segments = _files(state_dir, part)
    if len(segments) <= max_segments:
        return False
    files = ([base] if base else []) + segments
    table = pa.concat_tables([with_schema(read_parquet(path), SCHEMA) for _, path in files])
    number = segments[-1][0]
    with atomic_path(folder(state_dir) / f"{_prefix(part)}base-{number:010d}.parquet") as tmp:
        pq.write_table(table, tmp)
    for _, path in files:
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


def positions_by_key(table: pa.Table, other: pa.Table) -> pa.Array:
    """For each row of table, the row of other with its file version (SOURCE_KEY), or null."""
    if other.num_rows == 0:
        return pa.nulls(table.num_rows, pa.int32())
    return pc.index_in(_key(table), value_set=pc.unique(_key(other)))


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
