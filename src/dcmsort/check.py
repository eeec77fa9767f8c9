"""Check that every placement the ledger holds is whole, and restore what is not.

A plain run trusts the ledger: it never opens or stats a file it placed earlier. This stage,
run only when asked (``check: true``, ``size`` or ``checksum``), looks at every placement:

- **size**: one ``lstat`` per placement, relative to its open folder (never following a
  link): a copy or hard link must be a regular file of the recorded size; a symbolic link
  must be a link whose target is a regular file of that size;
- **checksum**: the same, then the content is digested and compared with the digest the
  ledger holds, or, where it holds none, with the digest of the input that still holds the
  placement's content (a placement with neither is checked by size only).

A placement that is missing or differs is **restored** from an input that still holds its
content: a ledger row of that destination whose input file still has the (size, mtime) it
had when it was committed, and, when a digest is known, still that digest. It is put back
by the transfer's own mechanics (``transfer.put``: a temporary name, checked, then linked
into place without replacing anything), in the placement's transfer mode. Whatever stood at
the name first is kept, renamed in its folder to ``<name>.dcmsort-damaged-<n>`` (never
replacing another file; a symbolic link dcmsort made to one of the placement's inputs is
the only thing removed). A placement with no such input is reported **damaged** with the
reason and left as it is. Nothing is ever deleted.

Results: one row per placement that was not whole (``check.csv`` for people, a parquet
table for the report). Imports pyarrow only.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dcmsort import inventory, ledger
from dcmsort.fileops import (
    MAX_NAME_BYTES,
    atomic_path,
    digest_of,
    file_digest,
    read_parquet,
    rename_no_replace,
)
from dcmsort.progress import Progress, peak_rss_mb
from dcmsort.transfer import OutputTree, Row, TransferError, put

log = logging.getLogger("dcmsort.check")

HOW = ("size", "checksum")
RESTORED, DAMAGED = "restored", "damaged"
MISSING = "missing"
ASIDE_SUFFIX = ".dcmsort-damaged-"
RESULT_SCHEMA = pa.schema(
    [
        ("destination", pa.string()),  # relative to output_dir
        ("mode", pa.string()),  # how it was placed: copy, hardlink, symlink
        ("problem", pa.string()),  # what the check found
        ("outcome", pa.string()),  # RESTORED or DAMAGED
        ("source", pa.string()),  # the input relpath it was restored from
        ("kept_as", pa.string()),  # where the file found at the destination was kept
        ("detail", pa.string()),  # why it could not be restored
    ]
)
# The check's own numbers, in the result table's metadata: the report reads them.
META_CHECKED, META_HOW = b"checked", b"how"
# renameat2(RENAME_NOREPLACE) is missing on some kernels and file systems.
_NO_RENAME_NOREPLACE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


@dataclass(frozen=True, slots=True)
class Placement:
    """What the ledger says is at destination: a file of size bytes, placed by mode, with
    this content digest when one was recorded."""

    destination: str
    size: int
    mode: str
    digest: str | None


@dataclass(slots=True)
class Finding:
    """A placement that is not whole (problem), or whose content is still to be compared
    with its input's (problem None, digest: what is there now)."""

    placement: Placement
    problem: str | None
    digest: str | None = None


def placements(committed: pa.Table) -> list[Placement]:
    """Every placement the ledger holds, once, with the first digest any of its rows
    recorded (every row of a destination names the same content)."""
    placed = ledger.first_placements(committed)
    known = committed.filter(pc.is_valid(committed["digest"]))
    first = pc.index_in(pc.unique(known["destination"]), value_set=known["destination"])
    digests = dict(
        zip(
            known["destination"].take(first).to_pylist(),
            known["digest"].take(first).to_pylist(),
            strict=True,
        )
    )
    return [
        Placement(destination, size, mode or "copy", digests.get(destination))
        for destination, size, mode in zip(
            placed["destination"].to_pylist(),
            placed["size"].to_pylist(),
            placed["mode"].to_pylist(),
            strict=True,
        )
    ]


# --- looking: one stat per placement (and a digest with checksum) --------------------------


def inspect(folder_fd: int, name: str, placement: Placement, how: str) -> Finding | None:
    """What is wrong with one placement, read relative to its open folder; None when it is
    whole. With checksum and no recorded digest, a Finding without problem carries the
    digest of what is there, to be compared with its input's."""
    try:
        info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return Finding(placement, MISSING)
    if placement.mode == "symlink":
        if not stat.S_ISLNK(info.st_mode):
            return Finding(placement, "not a symbolic link")
        try:
            info = os.stat(name, dir_fd=folder_fd)  # the input it points to
        except OSError:
            return Finding(placement, "the link dangles")
    if not stat.S_ISREG(info.st_mode):
        return Finding(placement, f"not a regular file ({_kind(info.st_mode)})")
    if info.st_size != placement.size:
        return Finding(placement, f"wrong size: {info.st_size:,} of {placement.size:,} bytes")
    if how != "checksum":
        return None
    # A symbolic link is followed to its input (the lstat above saw it is one).
    flags = os.O_RDONLY | (0 if placement.mode == "symlink" else os.O_NOFOLLOW)
    try:
        with open(os.open(name, flags, dir_fd=folder_fd), "rb") as handle:
            digest = digest_of(handle)
    except OSError as error:
        return Finding(placement, f"cannot be read ({error.strerror})")
    if placement.digest is None:
        return Finding(placement, None, digest)
    return None if digest == placement.digest else Finding(placement, "content differs")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a special file"


def _folders(items: list[Placement]) -> Iterator[tuple[str, list[Placement]]]:
    by_folder: dict[str, list[Placement]] = {}
    for placement in items:
        by_folder.setdefault(placement.destination.rpartition("/")[0], []).append(placement)
    yield from by_folder.items()


def _inspect_folder(
    tree: OutputTree, folder: str, items: list[Placement], how: str
) -> list[Finding]:
    try:
        folder_fd = tree.open_folder(folder, create=False)
    except FileNotFoundError:
        return [Finding(p, MISSING) for p in items]
    except (OSError, TransferError) as error:
        problem = f"its folder cannot be opened ({getattr(error, 'strerror', None) or error})"
        return [Finding(p, problem) for p in items]
    try:
        found = (inspect(folder_fd, p.destination.rpartition("/")[2], p, how) for p in items)
        return [f for f in found if f is not None]
    finally:
        os.close(folder_fd)


# --- restoring: from an input that still holds the content --------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """A ledger row's input file version: (relpath, size, mtime_ns) when it was committed."""

    relpath: str
    size: int
    mtime_ns: int


def sources_by_destination(committed: pa.Table, destinations: set[str]) -> dict[str, list[Source]]:
    """The input versions the ledger says hold each destination's content, newest first
    (columnar: only rows of these destinations become Python values)."""
    if not destinations:
        return {}
    rows = committed.filter(
        pc.is_in(committed["destination"], value_set=pa.array(sorted(destinations), pa.string()))
    )
    found: dict[str, list[Source]] = {}
    for destination, relpath, size, mtime_ns in reversed(
        list(
            zip(
                *(rows[c].to_pylist() for c in ["destination", *ledger.SOURCE_KEY]),
                strict=True,
            )
        )
    ):
        source = Source(relpath, size, mtime_ns)
        if source not in found.setdefault(destination, []):
            found[destination].append(source)
    return found


def live_source(
    sources: list[Source], input_dir: Path, digest: str | None, compute: bool = False
) -> tuple[Source | None, str | None, str]:
    """The first source whose input file is still the version the ledger recorded (and
    has digest, when one is known): (source, its digest when computed, why none).
    ``compute``: digest the source even when no digest is known."""
    gone = True
    for source in sources:
        path = inventory.source_path(input_dir, source.relpath)
        try:
            info = os.stat(path)
        except OSError:
            continue
        gone = False
        if not stat.S_ISREG(info.st_mode) or (info.st_size, info.st_mtime_ns) != (
            source.size,
            source.mtime_ns,
        ):
            continue
        try:
            actual = file_digest(path) if digest or compute else None
        except OSError:
            continue
        if digest is None or actual == digest:
            return source, actual, ""
    if gone:
        return None, None, "its input is gone: nothing to restore it from"
    return None, None, "its input changed since it was sorted: nothing to restore it from"


def aside_name(name: str, number: int) -> str:
    """The name a file found at a damaged placement is kept under: ``<name>.dcmsort-damaged-
    <n>`` in its folder (visible, and no longer ending in the original extension, so no
    program takes it for the image); a name that would pass 255 bytes keeps a prefix."""
    suffix = f"{ASIDE_SUFFIX}{number}"
    encoded = os.fsencode(name)
    room = MAX_NAME_BYTES - len(suffix)
    if len(encoded) > room:
        name = encoded[:room].decode("utf-8", "ignore")  # cut on a character boundary
    return f"{name}{suffix}"


def set_aside(folder_fd: int, name: str) -> str:
    """Rename what holds name to the first free aside name, never replacing anything."""
    for number in count(1):
        aside = aside_name(name, number)
        try:
            rename_no_replace(name, aside, folder_fd)
            return aside
        except FileExistsError:
            continue
        except OSError as error:
            if error.errno not in _NO_RENAME_NOREPLACE:
                raise
        # Without renameat2: look, then rename (a narrow window, on such systems only).
        try:
            os.stat(aside, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(name, aside, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
            return aside
    raise AssertionError("unreachable")


def _our_link(folder_fd: int, name: str, sources: list[Source], input_dir: Path) -> bool:
    """Is name a symbolic link dcmsort made, to one of the placement's inputs?"""
    try:
        target = os.readlink(name, dir_fd=folder_fd)
    except OSError:
        return False
    return any(
        target == os.path.abspath(inventory.source_path(input_dir, s.relpath)) for s in sources
    )


def restore(
    tree: OutputTree,
    placement: Placement,
    source: Source,
    sources: list[Source],
    input_dir: Path,
    digest: str | None,
    how: str,
) -> str | None:
    """Put the placement back from source (its content is digest, when known); returns the
    aside name of what stood there. Raises TransferError (the aside file is moved back
    first)."""
    folder, _, name = placement.destination.rpartition("/")
    folder_fd = tree.open_folder(folder)  # folders removed by hand are made again
    try:
        aside = None
        try:
            os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if _our_link(folder_fd, name, sources, input_dir):
                os.unlink(name, dir_fd=folder_fd)
            else:
                aside = set_aside(folder_fd, name)
        row = Row(
            source.relpath, source.size, source.mtime_ns, "sort", placement.destination, digest
        )
        verify = "checksum" if digest or how == "checksum" else "size"
        try:
            put(folder_fd, row, input_dir, placement.mode, verify)
        except TransferError:
            if aside is not None:
                try:
                    rename_no_replace(aside, name, folder_fd)
                    aside = None
                except OSError:
                    pass  # reported under its aside name
            raise
        return aside
    finally:
        os.close(folder_fd)


def _resolve(
    finding: Finding, sources: list[Source], tree: OutputTree, input_dir: Path, how: str
) -> dict | None:
    """Restore a finding if an input holds its content; its result row (None: whole)."""
    placement, problem = finding.placement, finding.problem
    if problem is None:  # checksum without a recorded digest: compare with its input
        source, digest, why = live_source(sources, input_dir, None, compute=True)
        if source is None or digest == finding.digest:
            return None  # whole, or (no input holds it any more) checked by size only
        problem = "content differs from its input"
    else:
        source, digest, why = live_source(sources, input_dir, placement.digest)
    row = {
        "destination": placement.destination,
        "mode": placement.mode,
        "problem": problem,
        "outcome": DAMAGED,
        "source": None,
        "kept_as": None,
        "detail": why or None,
    }
    if source is None:
        return row
    try:
        aside = restore(tree, placement, source, sources, input_dir, digest, how)
    except (TransferError, OSError) as error:
        detail = str(error) if isinstance(error, TransferError) else error.strerror
        return {**row, "detail": f"could not restore it: {detail}"}
    folder = placement.destination.rpartition("/")[0]
    kept = f"{folder}/{aside}" if folder and aside else aside
    return {**row, "outcome": RESTORED, "source": source.relpath, "kept_as": kept, "detail": None}


def check_tree(
    input_dir: Path, output_dir: Path, state_dir: Path, how: str, workers: int
) -> tuple[pa.Table, int]:
    """Check every placement and restore what can be: (result rows, placements checked)."""
    columns = [*ledger.SOURCE_KEY, "status", "destination", "digest", "mode"]
    committed = ledger.read(state_dir, columns)
    wanted = placements(committed)
    tree = OutputTree(output_dir)
    progress = Progress("check", len(wanted), log)
    findings: list[Finding] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        tasks = [
            (len(items), pool.submit(_inspect_folder, tree, folder, items, how))
            for folder, items in _folders(wanted)
        ]
        for size, task in tasks:
            findings += task.result()
            progress.advance(size)
    progress.finish()
    sources = sources_by_destination(committed, {f.placement.destination for f in findings})
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = pool.map(
            lambda f: _resolve(f, sources.get(f.placement.destination, []), tree, input_dir, how),
            findings,
        )
        results = [r for r in rows if r is not None]
    results.sort(key=lambda r: r["destination"])
    return pa.Table.from_pylist(results, schema=RESULT_SCHEMA), len(wanted)


def read_results(path: Path) -> tuple[pa.Table, dict]:
    """A check's result rows and its numbers (how, placements checked)."""
    table = read_parquet(path)
    metadata = table.schema.metadata or {}
    return table, {
        "how": metadata.get(META_HOW, b"").decode(),
        "placements": int(metadata.get(META_CHECKED, b"0")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcmsort.check", description=__doc__)
    parser.add_argument("--input-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--how", choices=HOW, default="size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, required=True, help="parquet, for the report")
    parser.add_argument("--csv", type=Path, required=True, help="the same rows, for people")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    results, checked = check_tree(
        args.input_dir, args.output_dir, args.state_dir, args.how, args.threads
    )
    results = results.replace_schema_metadata(
        {META_CHECKED: str(checked).encode(), META_HOW: args.how.encode()}
    )
    with atomic_path(args.csv) as tmp:
        pacsv.write_csv(results, tmp)
    with atomic_path(args.results) as tmp:
        pq.write_table(results, tmp)
    # Earlier runs' result tables (each run's has its own name, so that it runs again).
    for earlier in args.results.parent.glob("*.parquet"):
        if earlier != args.results:
            earlier.unlink(missing_ok=True)
    outcomes = results["outcome"].to_pylist()
    for row in results.to_pylist()[:50]:
        say = log.info if row["outcome"] == RESTORED else log.error
        say(
            "%s: %s; %s",
            row["destination"],
            row["problem"],
            f"restored from {row['source']}"
            + (f", the file found there kept as {row['kept_as']}" if row["kept_as"] else "")
            if row["outcome"] == RESTORED
            else row["detail"],
        )
    log.info(
        "check (%s): %d placements, %d restored, %d damaged, %.2f s, peak RSS %d MB",
        args.how,
        checked,
        outcomes.count(RESTORED),
        outcomes.count(DAMAGED),
        time.perf_counter() - started,
        peak_rss_mb(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
