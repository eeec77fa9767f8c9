"""Carry out the plan: put each file at its destination, atomically, never overwriting.

Decides nothing about names. For every ``sort`` row of the plan it writes the destination
under a temporary name in the same folder and renames it into place, or finds it already
there (same size and mtime for a copy, the same inode for a hard link, the same target for a
symbolic link) and leaves it alone without opening either file. A destination that holds a
different file is never overwritten: the row is reported as an error.

Imports pyarrow only (no pandas).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcmsort import permissions
from dcmsort.fileops import atomic_path, copy_file, file_digest

log = logging.getLogger("dcmsort.transfer")

MODES = ("copy", "hardlink", "symlink")
VERIFY = ("size", "checksum")
COPIED, LINKED, PRESENT, ERROR = "copied", "linked", "present", "error"
RESULT_SCHEMA = pa.schema(
    [
        ("relpath", pa.string()),
        ("destination", pa.string()),
        ("status", pa.string()),
        ("bytes", pa.int64()),
        ("detail", pa.string()),
    ]
)


class TransferError(Exception):
    """A file could not be put at its destination; the message says why and what to do."""


def destination_state(source: Path, destination: Path, source_stat: os.stat_result) -> bool | None:
    """None if destination does not exist; True if it already holds source, in any
    transfer mode; False if it holds something else. One lstat, no file opened."""
    try:
        dest_stat = os.lstat(destination)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(dest_stat.st_mode):
        return os.readlink(destination) == str(source.absolute())
    return stat.S_ISREG(dest_stat.st_mode) and (
        (dest_stat.st_ino, dest_stat.st_dev) == (source_stat.st_ino, source_stat.st_dev)
        or (dest_stat.st_size, dest_stat.st_mtime_ns)
        == (source_stat.st_size, source_stat.st_mtime_ns)
    )


def _make_folder(folder: Path, made: set[Path]) -> None:
    """Create a destination folder (and parents) no more open than the folder it is made
    in; a setgid (group-shared) output stays group-shared all the way down."""
    if folder not in made:
        permissions.make_folders(folder)
        made.add(folder)


def put(
    source: Path, destination: Path, mode: str, verify: str = "size", made: set[Path] | None = None
) -> str:
    """Put source at destination; returns COPIED, LINKED or PRESENT, raises TransferError.

    A copy is written under a temporary name in the destination folder and renamed into
    place; a link is made in one call, which is atomic and fails rather than replace
    anything. ``made`` remembers folders already created, to save a call per file.
    """
    made = set() if made is None else made
    try:
        source_stat = os.stat(source)
    except OSError as error:
        raise TransferError(
            f"source unreadable ({error.strerror}); it changed since the plan: rerun"
        ) from error
    occupied = TransferError(
        "destination already holds a different file, which is never overwritten; "
        "move that file away and rerun"
    )
    try:
        if mode != "copy":
            _make_folder(destination.parent, made)
            try:
                if mode == "hardlink":
                    os.link(source, destination)
                else:
                    os.symlink(source.absolute(), destination)
            except FileExistsError:
                if destination_state(source, destination, source_stat):
                    return PRESENT
                raise occupied from None
            return LINKED
        state = destination_state(source, destination, source_stat)
        if state is not None:
            if state:
                return PRESENT
            raise occupied
        _make_folder(destination.parent, made)
        with atomic_path(destination, make_parent=False) as tmp:
            size = copy_file(source, tmp, source_stat)
            if size != source_stat.st_size:
                raise TransferError(f"copy has {size} bytes, source {source_stat.st_size}")
            if verify == "checksum" and file_digest(tmp) != file_digest(source):
                raise TransferError("copy differs from source (checksum); check the disk")
    except OSError as error:
        hint = (
            " (hard links need input and output on one file system: use transfer_mode: copy)"
            if mode == "hardlink" and error.errno == errno.EXDEV
            else ""
        )
        raise TransferError(f"{error.strerror or error}{hint}") from error
    return COPIED


def transfer_plan(
    plan: Path, input_dir: Path, output_dir: Path, mode: str, verify: str, workers: int
) -> pa.Table:
    """Carry out every ``sort`` row of the plan; one result row per file."""
    table = pq.read_table(plan, columns=["relpath", "size", "action", "destination"])
    table = table.filter(pc.equal(table["action"], "sort"))
    relpaths = table["relpath"].to_pylist()
    destinations = table["destination"].to_pylist()
    sizes = table["size"].to_pylist()
    started, done = time.monotonic(), 0

    made: set[Path] = set()

    def one(i: int) -> tuple[str, int, str | None]:
        try:
            status = put(input_dir / relpaths[i], output_dir / destinations[i], mode, verify, made)
        except TransferError as error:
            return ERROR, 0, str(error)
        return status, (sizes[i] if status == COPIED else 0), None

    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        last_report = started
        for result in pool.map(one, range(len(relpaths)), chunksize=64):
            results.append(result)
            done += 1
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                log.info("%d of %d files done", done, len(relpaths))
    return pa.table(
        {
            "relpath": relpaths,
            "destination": destinations,
            "status": [r[0] for r in results],
            "bytes": [r[1] for r in results],
            "detail": [r[2] for r in results],
        },
        schema=RESULT_SCHEMA,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcmsort.transfer", description=__doc__)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--input-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--mode", choices=MODES, default="copy")
    parser.add_argument("--verify", choices=VERIFY, default="size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    # Copying waits on the disk, not the CPU: two threads per core keep it busy.
    results = transfer_plan(
        args.plan, args.input_dir, args.output_dir, args.mode, args.verify, 2 * args.threads
    )
    with atomic_path(args.results) as tmp:
        pq.write_table(results, tmp)
    statuses = results["status"].to_pylist()
    errors = [r for r in results.to_pylist() if r["status"] == ERROR]
    log.info(
        "transfer (%s): %d copied, %d linked, %d already present, %d errors, %.1f MB, %.2f s",
        args.mode,
        statuses.count(COPIED),
        statuses.count(LINKED),
        statuses.count(PRESENT),
        len(errors),
        sum(results["bytes"].to_pylist()) / 1e6,
        time.perf_counter() - started,
    )
    for row in errors[:50]:
        log.error("could not place %s at %s: %s", row["relpath"], row["destination"], row["detail"])
    if errors:
        log.error(
            "%d files were not placed (inputs untouched); fix the cause above and rerun",
            len(errors),
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
