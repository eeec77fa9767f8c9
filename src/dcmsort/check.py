"""Check that every placement the ledger holds is whole, and restore what is not.

A plain run trusts the ledger: it never opens or stats a file it placed earlier. This stage,
run only when asked (``check: true``, ``size`` or ``checksum``), looks at every placement:

- **size**: one ``lstat`` per placement, relative to its open folder (never following a
  link): a copy or hard link must be a regular file of the recorded size; a symbolic link
  must be a link to one of the placement's inputs, and reach a regular file of that size;
- **checksum**: the same, then the content is digested and compared with the digest the
  ledger holds, or, where it holds none, with the digest of the input that still holds the
  placement's content (a placement with neither is checked by size only).

A placement that is missing or differs is **restored** from an input that still holds its
content: an input of one of that destination's ledger rows that still has the size and
mtime the row recorded, or, when the content's digest is known, that size and digest (a
touched input holds the same bytes). With a known digest, the input is digested first. It
is put back by the transfer's own mechanics (``transfer.put``: a temporary name, checked,
then linked into place without replacing anything), in the placement's transfer mode.
Whatever stood at the name first is kept, renamed in its folder to
``<name>.dcmsort-damaged-<n>`` (never replacing another file); a symbolic link to one of
the placement's own inputs is the only thing removed. A placement with no such input is
reported **damaged**, with the reason, and left as it is. Nothing is ever deleted.

Runs before the plan, so that the plan decides against a whole tree (a placement it finds
damaged would otherwise stay a twin of new files forever). Results: one row per placement
that was not whole (``check.csv`` for people, a parquet table for the report).

Imports pyarrow only.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcmsort import archives, inventory, ledger
from dcmsort.fileops import (
    MAX_NAME_BYTES,
    atomic_path,
    digest_of,
    file_digest,
    read_parquet,
    rename_no_replace,
    write_csv,
)
from dcmsort.progress import Progress, peak_rss_mb
from dcmsort.transfer import OutputTree, Row, TransferError, put

log = logging.getLogger("dcmsort.check")

HOW = ("size", "checksum")
RESTORED, DAMAGED = "restored", "damaged"
DANGLING = "the link dangles (its input is gone)"
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
class Source:
    """An input file that a ledger row of a destination names, with the versions (mtime,
    ctime, inode) its rows recorded: each held the destination's content; and the versions
    of it the ledger recorded at other destinations only (``elsewhere``)."""

    relpath: str
    versions: frozenset[tuple[int, int | None, int | None]]
    elsewhere: frozenset[tuple[int, int | None, int | None]] = frozenset()

    def holds(self, info: os.stat_result, exact: bool = False) -> bool:
        """Is the file now one of the versions recorded, as far as a stat can tell without
        a digest? The size (compared by the caller), the mtime and, where the ledger has it
        (not in rows of v0.3), the inode: a replacement renamed over the input with its old
        mtime set back is another file. Not the ctime, to restore from: a chmod, a `mv` out
        and back, or removing a hard link from the output change it and nothing else;
        unless the ledger recorded the file as it is now at another destination (rewritten
        in place with its old mtime set back, and sorted since: other bytes). ``exact``
        (to judge a copy by its input's digest): the ctime too, as every run tells a new
        version. With a recorded digest (verify: checksum, or any file once compared) the
        digest decides instead."""
        now = (info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
        if now in self.elsewhere and now not in self.versions:
            return False
        return any(
            mtime == info.st_mtime_ns
            and ino in (None, info.st_ino)
            and (not exact or ctime in (None, info.st_ctime_ns))
            for mtime, ctime, ino in self.versions
        )


@dataclass(frozen=True, slots=True)
class Placement:
    """What the ledger says is at destination: a file of size bytes, placed by mode, with
    this content digest when one was recorded; for a symbolic link, the paths it may point
    to (its inputs)."""

    destination: str
    size: int
    mode: str
    digest: str | None
    targets: frozenset[str] = field(default=frozenset())


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


def sources_by_destination(committed: pa.Table, destinations: set[str]) -> dict[str, list[Source]]:
    """The inputs the ledger says held each destination's content, most recently committed
    first (columnar: only rows of these destinations become Python values)."""
    if not destinations:
        return {}
    value_set = pa.array(sorted(destinations), pa.string())
    rows = committed.filter(pc.is_in(committed["destination"], value_set=value_set))
    versions: dict[str, dict[str, set[tuple]]] = {}
    names = ("destination", "relpath", "mtime_ns", "ctime_ns", "ino")
    columns = (rows[c].to_pylist() for c in names)
    for destination, relpath, *version in reversed(list(zip(*columns, strict=True))):
        versions.setdefault(destination, {}).setdefault(relpath, set()).add(tuple(version))
    # Every version of these inputs, wherever the ledger placed it (Source.elsewhere).
    relpaths = {relpath for by_relpath in versions.values() for relpath in by_relpath}
    rows = committed.filter(pc.is_in(committed["relpath"], value_set=pa.array(sorted(relpaths))))
    everywhere: dict[str, set[tuple]] = {}
    for relpath, *version in zip(*(rows[c].to_pylist() for c in names[1:]), strict=True):
        everywhere.setdefault(relpath, set()).add(tuple(version))
    return {
        destination: [
            Source(relpath, frozenset(v), frozenset(everywhere[relpath] - v))
            for relpath, v in by_relpath.items()
        ]
        for destination, by_relpath in versions.items()
    }


def link_target(input_dir: Path, relpath: str) -> str:
    """What a symbolic link to an input holds (as the transfer writes it)."""
    return os.path.abspath(inventory.source_path(input_dir, relpath))


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
            return Finding(placement, f"not a symbolic link ({_kind(info.st_mode)})")
        if os.readlink(name, dir_fd=folder_fd) not in placement.targets:
            return Finding(placement, "the link points to another file than its input")
        try:
            info = os.stat(name, dir_fd=folder_fd)  # the input it points to
        except OSError:
            return Finding(placement, DANGLING)
    if not stat.S_ISREG(info.st_mode):
        return Finding(placement, f"not a regular file ({_kind(info.st_mode)})")
    if info.st_size != placement.size:
        return Finding(placement, f"wrong size: {info.st_size:,} of {placement.size:,} bytes")
    if how != "checksum":
        return None
    # A symbolic link is followed to its input (the lstat above saw that it is one).
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
    if stat.S_ISREG(mode):
        return "a file"
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


def live_source(
    sources: list[Source],
    size: int,
    input_dir: Path,
    digest: str | None,
    compute: bool = False,
    link: bool = False,
    hard_link: bool = False,
) -> tuple[Row | None, str]:
    """An input that still holds the content (size bytes, digest when known), as a row for
    ``transfer.put`` naming its version now; else None and why. Without a known digest,
    only a version the ledger recorded counts (``compute``: digest it all the same).
    ``link``: for a symbolic link, which cannot point into an archive: members do not
    count (a copy in its place would be taken for damage by the next check).
    ``hard_link``: for a hard link, whose removal changed its input's ctime."""
    gone = True
    member_digests = archives.MemberDigests(input_dir)
    for source in sources:
        # An archive member: its archive's status, and its own digest (size in it).
        archive, member = archives.split(source.relpath)
        if member and link:
            continue
        path = inventory.source_path(input_dir, archive)
        try:
            info = os.stat(path)
        except OSError:
            continue
        gone = False
        if not stat.S_ISREG(info.st_mode) or (info.st_size != size and not member):
            continue
        # To judge a copy by its input's digest (compute), only the very version counts.
        if digest is None and not source.holds(info, exact=compute and not hard_link):
            continue
        try:
            if member:
                actual = member_digests(source.relpath) if digest or compute else None
            else:
                actual = file_digest(path) if digest or compute else None
        except OSError:
            continue
        if digest is None or actual == digest:
            return Row(source.relpath, size, info.st_mtime_ns, "sort", "", actual), ""
    if gone and link and any(archives.is_member(s.relpath) for s in sources):
        return None, "its content is only in an archive, where no symbolic link can point"
    if gone:
        return None, "its input is gone: nothing to restore it from"
    return None, "its input changed since it was sorted: nothing to restore it from"


def aside_name(name: str, number: int) -> str:
    """The name a file found at a damaged placement is kept under: ``<name>.dcmsort-damaged-
    <n>`` in its folder (visible, and no longer ending in the original extension, so no
    program takes it for the image); a name that would pass 255 bytes keeps a prefix."""
    suffix = f"{ASIDE_SUFFIX}{number}"
    room = MAX_NAME_BYTES - len(suffix)
    encoded = os.fsencode(name)
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


def restore(
    tree: OutputTree, placement: Placement, source: Row, input_dir: Path, how: str
) -> str | None:
    """Put the placement back from source (``live_source``); returns the name what stood
    there was kept under. Raises TransferError or OSError (having moved that back)."""
    folder, _, name = placement.destination.rpartition("/")
    folder_fd = tree.open_folder(folder)  # folders removed by hand are made again
    try:
        aside = None
        try:
            info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if (
                stat.S_ISLNK(info.st_mode)
                and placement.mode == "symlink"
                and (os.readlink(name, dir_fd=folder_fd) in placement.targets)
            ):
                os.unlink(name, dir_fd=folder_fd)  # its own link, dangling: not user data
            else:
                aside = set_aside(folder_fd, name)
        row = Row(
            source.relpath,
            source.size,
            source.mtime_ns,
            "sort",
            placement.destination,
            source.digest,
        )
        verify = "checksum" if source.digest or how == "checksum" else "size"
        try:
            put(folder_fd, row, input_dir, placement.mode, verify)
        except BaseException:
            if aside is not None:
                # Back to its name; if even that fails, it stays under the aside name.
                with contextlib.suppress(OSError):
                    rename_no_replace(aside, name, folder_fd)
            raise
        return aside
    finally:
        os.close(folder_fd)


def resolve(
    finding: Finding, sources: list[Source], tree: OutputTree, input_dir: Path, how: str
) -> dict | None:
    """Restore a finding if an input holds its content: its result row (None: whole)."""
    placement, problem = finding.placement, finding.problem
    link, hard_link = placement.mode == "symlink", placement.mode == "hardlink"
    if problem is None:  # checksum without a recorded digest: compare with its input's
        source, why = live_source(sources, placement.size, input_dir, None, True, link, hard_link)
        if source is None or source.digest == finding.digest:
            return None  # whole; or, with no input of its version left, checked by size
        problem = "content differs from its input"
    else:
        source, why = live_source(
            sources, placement.size, input_dir, placement.digest, link=link, hard_link=hard_link
        )
    row = {
        "destination": placement.destination,
        "mode": placement.mode,
        "problem": problem,
        "outcome": DAMAGED,
        "source": None,
        "kept_as": None,
        "detail": why,
    }
    if source is None:
        # A link whose input is gone, with no other input of its content: the report
        # counts it under "links dangling"; a link holds nothing of its own to damage.
        return None if problem == DANGLING else row
    try:
        aside = restore(tree, placement, source, input_dir, how)
    except (TransferError, OSError) as error:
        detail = str(error) if isinstance(error, TransferError) else error.strerror
        return {**row, "detail": f"could not restore it: {detail}"}
    folder = placement.destination.rpartition("/")[0]
    kept = aside and (f"{folder}/{aside}" if folder else aside)
    return {**row, "outcome": RESTORED, "source": source.relpath, "kept_as": kept, "detail": None}


def check_tree(
    input_dir: Path, output_dir: Path, state_dir: Path, how: str, workers: int
) -> tuple[pa.Table, int]:
    """Check every placement and restore what can be: (result rows, placements checked)."""
    columns = [*ledger.SOURCE_KEY, "status", "destination", "digest", "mode"]
    committed = ledger.read(state_dir, columns)
    wanted = placements(committed)
    links = {p.destination for p in wanted if p.mode == "symlink"}
    if links:  # a link must point to one of its inputs
        sources = sources_by_destination(committed, links)
        wanted = [
            Placement(
                p.destination,
                p.size,
                p.mode,
                p.digest,
                frozenset(link_target(input_dir, s.relpath) for s in sources[p.destination]),
            )
            if p.destination in links
            else p
            for p in wanted
        ]
    tree = OutputTree(output_dir)
    findings: list[Finding] = []
    progress = Progress("check", len(wanted), log)
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
    results = []
    progress = Progress("check: compare and restore", len(findings), log)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for row in pool.map(
            lambda f: resolve(f, sources.get(f.placement.destination, []), tree, input_dir, how),
            findings,
        ):
            progress.advance()
            if row is not None:
                results.append(row)
    tree.close()
    progress.finish()
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
    write_csv(results, args.csv)
    with atomic_path(args.results) as tmp:
        pq.write_table(results, tmp)
    # Earlier runs' result tables (each run's has its own name, so that it runs again).
    for earlier in args.results.parent.glob("*.parquet"):
        if earlier != args.results:
            earlier.unlink(missing_ok=True)
    for row in results.to_pylist()[:50]:
        if row["outcome"] == RESTORED:
            kept = f"; what stood there is kept as {row['kept_as']}" if row["kept_as"] else ""
            log.info(
                "%s: %s; restored from %s%s",
                row["destination"],
                row["problem"],
                row["source"],
                kept,
            )
        else:
            log.error("%s: %s; %s", row["destination"], row["problem"], row["detail"])
    outcomes = results["outcome"].to_pylist()
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
