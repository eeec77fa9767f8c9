"""Carry out the plan, then commit to the ledger what is verifiably in place.

Decides nothing about names. For each plan row not yet in the ledger:

- ``sort``: write the file under a temporary name in its destination folder, check it
  (size; a source that changed while it was copied is not placed; the digest too with
  ``verify: checksum``), and link it to its name, which fails rather than replace anything;
  a hard or symbolic link is made in one call, which also never replaces. The temporary
  name carries the plan's token (``temp_token``) and is created exclusively: whatever
  stands at it is never opened or removed, and a killed run's leftovers are removed only
  by their token;
- ``present``: check that the destination holds a file of the right size (the plan
  compared digests);
- ``relink``: the input of a symbolic link dcmsort made was renamed (same content, by
  digest): a new link at a temporary name takes the old one's place in one atomic swap,
  only while that place holds exactly the link to the input's previous path;
- ``duplicate``: commit once its destination is committed.

Folders are opened one component at a time with ``O_NOFOLLOW`` and everything is created
relative to an open folder, so a link or a file in the output tree is never followed, even
one that appears while the run goes on. A destination that turns out to hold a different
file is never overwritten: the row is an error, the plan is removed so the next run plans
that file again, and the run fails.

Commits go to the ledger every few seconds (``ledger.append``), after the files they name
are in place: a run killed at any point leaves at most uncommitted copies, which the next
run recognises by content.

Imports pyarrow only (no pandas).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import secrets
import stat
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcmsort import archives, inventory, ledger, permissions
from dcmsort.fileops import (
    DIGEST,
    atomic_path,
    copy_range,
    exchange,
    read_parquet,
    remove_other_versions,
    rename_no_replace,
    temp_name_for,
)
from dcmsort.progress import Progress, peak_rss_mb
from dcmsort.routes import Part, parse_part

log = logging.getLogger("dcmsort.transfer")

MODES = ("copy", "hardlink", "symlink")
VERIFY = ("size", "checksum")
# Outcomes of one row.
COPIED, LINKED, RELINKED, PRESENT, DUPLICATE, CHANGED, ERROR = (
    "copied",
    "linked",
    "relinked",
    "present",
    "duplicate",
    "changed",
    "error",
)
COMMITTED = {COPIED, LINKED, RELINKED, PRESENT, DUPLICATE}
RESULT_SCHEMA = pa.schema(
    [
        ("relpath", pa.string()),
        ("destination", pa.string()),
        ("status", pa.string()),
        ("bytes", pa.int64()),
        ("detail", pa.string()),
    ]
)
COMMIT_EVERY_S = 2.0
# A copy of the plan kept until its transfer has finished: after a killed transfer, the
# next plan settles it first (Snakemake removes plan.parquet before the plan job runs).
PENDING = "pending.parquet"
# Where a plan keeps the token that names its transfer's temporary files (temp_token).
TEMP_TOKEN = b"dcmsort.temp_token"


def pending_file(state_dir: Path, part: Part | None = None) -> Path:
    """The copy of a plan that tells the next run what its killed transfer may have left
    (one per partition)."""
    return state_dir / "plan" / f"pending-{part.name}.parquet" if part else state_dir / PENDING


_NOT_A_FOLDER = {errno.ELOOP, errno.ENOTDIR, errno.EMLINK}
# Link-based no-replace rename is refused by file systems without hard links.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}


class TransferError(Exception):
    """A file could not be put at its destination; the message says why and what to do."""


class SourceChanged(TransferError):
    """The input file is not the version the plan decided on (it changed since)."""


def _digest_fd(fd: int) -> str:
    digest = hashlib.new(DIGEST)
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()[:32]


def _digest_at(folder_fd: int, name: str) -> str | None:
    """Digest of a regular file in an open folder, not following a link."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder_fd)
    except OSError:
        return None
    try:
        return _digest_fd(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Row:
    """One plan row to carry out (``index``: its position in the plan table). ctime_ns and
    ino are None in a plan written by v0.3."""

    relpath: str
    size: int
    mtime_ns: int
    action: str
    destination: str
    digest: str | None
    previous_relpath: str | None = None  # relink: the input path the link points to now
    ctime_ns: int | None = None
    ino: int | None = None
    index: int = -1


def with_temp_token(plan: pa.Table) -> pa.Table:
    """The plan, carrying a new random token that every temporary file its transfer makes
    has in its name (``fileops.temp_name_for``). The plan and its copy
    ``plan/pending-p<k>of<n>.parquet`` are written before any such file exists, so a file
    with the token of a pending plan is one a killed transfer made: ``settle`` removes
    those, and only those. Nothing else is ever removed, whoever's it is (a user's file at
    ``.<name>.dcmsort-tmp``, a leftover of a plan without a token)."""
    metadata = {**(plan.schema.metadata or {}), TEMP_TOKEN: secrets.token_hex(6).encode()}
    return plan.replace_schema_metadata(metadata)


def temp_token(plan: pa.Table) -> str | None:
    """The token of a plan's temporary files (with_temp_token); None for a plan without."""
    token = (plan.schema.metadata or {}).get(TEMP_TOKEN)
    return token.decode() if token else None


# For a plan without a token (written by hand or by an older version): one of this
# process's own. Nothing records it, so what a killed run leaves with it stays (hidden).
_UNRECORDED_TOKEN = secrets.token_hex(6)


def plan_rows(plan: pa.Table) -> list[Row]:
    """The rows of a plan table to carry out, each knowing its position in the table."""
    plan = ledger.with_version_columns(plan)
    fields = ["relpath", "size", "mtime_ns", "action", "destination", "digest"]
    fields += ["previous_relpath", "ctime_ns", "ino"]  # absent from older plans
    columns = [
        plan[f].to_pylist() if f in plan.column_names else [None] * plan.num_rows for f in fields
    ]
    return [Row(*values, index=i) for i, values in enumerate(zip(*columns, strict=True))]


class OutputTree:
    """Folders of output_dir, opened and created one component at a time, never through a
    link: ``O_NOFOLLOW`` makes a link (or a file) where a folder should be an error. A
    folder created here gets ``permissions.folder_mode`` of output_dir, worked out once:
    never of the folder it is made in, whose mode another thread may not have set yet
    (a thread that finds a folder made goes on at once). Made ``0700``, then given its
    mode through its own descriptor, so it is never more open, even for a moment."""

    def __init__(self, root: Path):
        self.root = Path(root)
        permissions.make_folders(self.root)
        # folder_mode of a folder_mode is itself: every level below gets the same mode.
        self.folder_mode = permissions.folder_mode(
            os.stat(self.root).st_mode, permissions.current_umask()
        )

        # Held for the tree's life: every folder is opened from it, not from the path again.
        self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self.root_fd)

    def open_folder(
        self, folder: str, create: bool = True, at: tuple[int, str] | None = None
    ) -> int:
        """A new descriptor of folder (relative to output_dir). at: an open folder
        (descriptor, path) that folder lies in, to start from instead of output_dir: one
        open per component below it (on a shared file system each is a round trip)."""
        start_fd, rest = self.root_fd, folder
        if at is not None:
            start_fd, start = at
            rest = folder[len(start) :].lstrip("/") if start else folder
        fd = start_fd
        try:
            for component in rest.split("/") if rest else []:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                try:
                    child = os.open(component, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(component, permissions.OWNER_DIR, dir_fd=fd)
                        created = True
                    except FileExistsError:  # made by another thread meanwhile
                        created = False
                    child = os.open(component, flags, dir_fd=fd)
                    if created:
                        os.fchmod(child, self.folder_mode)
                if fd != start_fd:
                    os.close(fd)
                fd = child
        except OSError as error:
            if fd != start_fd:
                os.close(fd)
            if error.errno in _NOT_A_FOLDER:
                raise TransferError(
                    f"a link or a file stands where folder {folder!r} must be; it is never "
                    "followed or replaced: rerun, and the plan chooses another folder name"
                ) from error
            raise
        return os.dup(fd) if fd == start_fd else fd

    def holds(self, destination: str) -> bool:
        """Is there something at destination, reached without following any link?"""
        folder, _, name = destination.rpartition("/")
        try:
            fd = self.open_folder(folder, create=False)
        except (OSError, TransferError):
            return False
        try:
            os.stat(name, dir_fd=fd, follow_symlinks=False)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


def _existing_is_same(folder_fd: int, name: str, source: str, digest: str | None) -> bool:
    """Does the existing destination hold the source's content (or link to it)?"""
    try:
        info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        return os.readlink(name, dir_fd=folder_fd) == os.path.abspath(source)
    if not stat.S_ISREG(info.st_mode):
        return False
    try:
        source_info = os.stat(source)
    except OSError:
        return False
    if (info.st_ino, info.st_dev) == (source_info.st_ino, source_info.st_dev):
        return True
    if info.st_size != source_info.st_size or not stat.S_ISREG(source_info.st_mode):
        return False  # a FIFO or a device (a link to /dev/zero) is no content to compare
    with open(os.open(source, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
        wanted = digest or _digest_fd(handle.fileno())
    return _digest_at(folder_fd, name) == wanted


def _check_version(info: os.stat_result, row: Row) -> None:
    """The input is still the version the plan decided on: the same size, mtime, ctime and
    inode (what a plan of v0.3 does not know is not compared). Once per copied file: one
    tuple comparison in the usual case (a generator over the fields cost ~1 µs a call)."""
    seen = (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
    planned = (row.size, row.mtime_ns, row.ctime_ns, row.ino)
    if seen == planned:
        return
    if archives.is_member(row.relpath):  # info is its archive's: of another size
        seen, planned = seen[1:], planned[1:]
    if any(now != then for now, then in zip(seen, planned, strict=True) if then is not None):
        raise SourceChanged(
            "the input changed after its header was read; it is sorted by the next run"
        )


def _version_digest(source: str, row: Row) -> str:
    """The digest of the row's input version (SourceChanged if the input is another
    version, or changes while it is read). Non-blocking: a FIFO in its place blocks
    nothing (its version differs)."""
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
    try:
        _check_version(os.fstat(fd), row)
        digest = _digest_fd(fd)
        _check_version(os.fstat(fd), row)
    finally:
        os.close(fd)
    return digest


def _copy(
    folder_fd: int, name: str, source: str, row: Row, verify: str, token: str
) -> tuple[str, str | None]:
    """Copy to a temporary name, check, then link to name (never replacing).

    One fstat of the input, after its bytes were copied: a change at any time since its
    header was read (before the copy or during it) has changed its ctime, so one check
    there is as strong as one before and one after, for one metadata call fewer (on
    Lustre/NFS each is a round trip). The copy is made ``0600`` and given its mode from
    that same fstat, so it is never more open than the input, even for a moment. The input
    is opened non-blocking: one replaced by a FIFO since it was planned would otherwise
    block the open until some writer came (the check after the copy then finds it
    changed)."""
    fd_in = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
    try:
        tmp, fd_out = _create_temp(folder_fd, name, token)
        digest = row.digest
        try:
            try:
                # What the kernel says it wrote to this new, empty file (no fstat of it:
                # its size is kept by that same write path, so it could say no more).
                written = copy_range(fd_in, fd_out, row.size)
                after = os.fstat(fd_in)
                _check_version(after, row)  # changed since its header was read
                if written != after.st_size:
                    raise TransferError(
                        f"short copy: {written} of {after.st_size} bytes written "
                        "(disk full?); nothing was placed"
                    )
                if verify == "checksum":
                    digest = _digest_fd(fd_in)
                _finish_copy(fd_out, after, digest if verify == "checksum" else None, "its source")
            finally:
                os.close(fd_out)  # raises a write error a network file system reports late
            placed = _link_into_place(folder_fd, tmp, name, source, digest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=folder_fd)
            raise
    finally:
        os.close(fd_in)
    return (COPIED if placed else PRESENT), digest


def _finish_copy(fd_out: int, after: os.stat_result, checksum: str | None, of: str) -> None:
    """Give a temporary copy its mode and times from its source's status (after, taken
    once its bytes were read), once its own digest is checksum (when given: verify
    checksum) of what was read from the source (``of``, named in the error)."""
    if checksum is not None and _digest_fd(fd_out) != checksum:
        raise TransferError(
            f"the copy differs from {of} (checksum); nothing was placed: check the disk"
        )
    os.fchmod(fd_out, permissions.copy_mode(after.st_mode, permissions.current_umask()))
    os.utime(fd_out, ns=(after.st_atime_ns, after.st_mtime_ns))


def _create_temp(folder_fd: int, name: str, token: str) -> tuple[str, int]:
    """(the temporary name of name, a new descriptor of it, read-write and 0600)."""
    tmp = temp_name_for(name, token)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW  # read back by checksum
    try:
        return tmp, os.open(tmp, flags, permissions.OWNER_FILE, dir_fd=folder_fd)
    except FileExistsError:
        # Not this plan's killed transfer's (settle removed those): never touched.
        raise TransferError(
            f"something stands at the temporary name {tmp!r}, which is never opened or "
            "removed; nothing was placed: rerun, and the next plan uses another name"
        ) from None


def _copy_member(
    folder_fd: int,
    name: str,
    stream: BinaryIO,
    archive_fd: int,
    row: Row,
    verify: str,
    token: str,
) -> tuple[str, str | None]:
    """_copy of an archive member from its stream: the same temporary name, checks and
    no-replace rename. The archive's version is checked after the member's bytes were
    read (one fstat of the open archive); zipfile checks each member's CRC at its end."""
    tmp, fd_out = _create_temp(folder_fd, name, token)
    digest = hashlib.new(DIGEST) if verify == "checksum" else None
    try:
        try:
            written = 0
            try:
                while chunk := stream.read(archives.COPY_BYTES):
                    if digest is not None:
                        digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd_out, view) :]
                    written += len(chunk)
            except archives.READ_ERRORS as error:
                if isinstance(error, OSError) and error.errno is not None:
                    raise  # the system's (a full disk), not the archive's
                _check_version(os.fstat(archive_fd), row)  # rewritten meanwhile: changed
                raise TransferError(archives.member_reason(error)) from error
            after = os.fstat(archive_fd)
            _check_version(after, row)  # the archive changed since its member was read
            if written != row.size:
                raise TransferError(
                    f"short copy: {written} of {row.size} bytes of the member written; "
                    "nothing was placed"
                )
            hexdigest = digest.hexdigest()[:32] if digest is not None else row.digest
            _finish_copy(fd_out, after, hexdigest if digest is not None else None, "the member")
        finally:
            os.close(fd_out)
        placed = _link_into_place(folder_fd, tmp, name, None, hexdigest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder_fd)
        raise
    return (COPIED if placed else PRESENT), hexdigest


def _put_member(
    folder_fd: int, stream: BinaryIO, archive_fd: int, row: Row, verify: str, token: str
) -> tuple[str, str | None]:
    """put, for an archive member (always copied: no link can point into an archive)."""
    name = row.destination.rpartition("/")[2]
    try:
        if row.action == "present" and row.digest and _digest_at(folder_fd, name) == row.digest:
            _check_version(os.fstat(archive_fd), row)
            return PRESENT, row.digest
        return _copy_member(folder_fd, name, stream, archive_fd, row, verify, token)
    except TransferError:
        raise
    except OSError as error:
        raise TransferError(error.strerror or str(error)) from error


def _place_archive(
    tree: OutputTree, archive: str, rows: list[Row], input_dir: Path, verify: str, token: str
) -> list[Outcome]:
    """Place the planned members of one archive, read once in stored order (a tar stream
    can only be read forwards), each destination folder opened once."""
    by_key = {archives.split(row.relpath)[1]: row for row in rows}
    outcomes: list[Outcome] = []
    folders: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        try:
            reading = archives.reading(inventory.source_path(input_dir, archive))
            handle, info, members = stack.enter_context(reading)
        except FileNotFoundError:
            return [Outcome(r, CHANGED, detail=_ARCHIVE_GONE) for r in rows]
        except (OSError, archives.ArchiveError) as error:
            return [Outcome(r, CHANGED, detail=f"{_ARCHIVE_CHANGED}: {error}") for r in rows]
        stack.callback(lambda: [os.close(fd) for fd in folders.values()])
        try:
            _check_version(info, rows[0])
            for key, row in list(by_key.items()):
                # Its content known to be in place already: no need to read the archive.
                if row.action != "present" or not row.digest:
                    continue
                folder, _, name = row.destination.rpartition("/")
                try:
                    if folder not in folders:
                        folders[folder] = tree.open_folder(folder)
                except (TransferError, OSError):
                    continue  # said when its member comes
                if _digest_at(folders[folder], name) == row.digest:
                    outcomes.append(Outcome(row, PRESENT, row.digest, mode="copy"))
                    del by_key[key]
            for member in members if by_key else ():
                row = by_key.pop(member.key, None)
                if row is None or member.open is None:
                    continue
                try:
                    folder = row.destination.rpartition("/")[0]
                    if folder not in folders:
                        folders[folder] = tree.open_folder(folder)
                    with member.open() as stream:
                        status, digest = _put_member(
                            folders[folder], stream, handle.fileno(), row, verify, token
                        )
                    outcomes.append(Outcome(row, status, digest, mode="copy"))
                except SourceChanged as error:
                    outcomes.append(Outcome(row, CHANGED, detail=str(error)))
                except (TransferError, OSError, NotImplementedError) as error:
                    outcomes.append(Outcome(row, ERROR, detail=str(error)))
                if not by_key:
                    break
        except SourceChanged as error:
            outcomes += [Outcome(r, CHANGED, detail=str(error)) for r in by_key.values()]
            by_key = {}
        except archives.READ_ERRORS as error:
            left = list(by_key.values())
            by_key = {}
            try:  # rewritten while it was read: changed, not damaged
                _check_version(os.fstat(handle.fileno()), rows[0])
            except SourceChanged as changed:
                outcomes += [Outcome(r, CHANGED, detail=str(changed)) for r in left]
            else:
                outcomes += _unplaced(left, TransferError(archives.archive_reason(error)))
    outcomes += [Outcome(r, CHANGED, detail=_MEMBER_GONE) for r in by_key.values()]
    return outcomes


_ARCHIVE_GONE = "the archive is gone since it was read"
_ARCHIVE_CHANGED = "the archive changed since it was read"
_MEMBER_GONE = "the member is no longer in its archive"


def _put_archived(
    folder_fd: int, row: Row, input_dir: Path, verify: str, token: str
) -> tuple[str, str | None]:
    """put of one archive member on its own (check restores one from its archive)."""
    archive, key = archives.split(row.relpath)
    try:
        with archives.reading(inventory.source_path(input_dir, archive)) as (handle, _, members):
            for member in members:
                if member.key == key and member.open is not None:
                    with member.open() as stream:
                        return _put_member(folder_fd, stream, handle.fileno(), row, verify, token)
    except FileNotFoundError as error:
        raise SourceChanged(_ARCHIVE_GONE) from error
    except archives.READ_ERRORS as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise
        raise SourceChanged(f"{_ARCHIVE_CHANGED}: {archives.archive_reason(error)}") from error
    raise SourceChanged(_MEMBER_GONE)


def _link_into_place(
    folder_fd: int, tmp: str, name: str, source: str | None, digest: str | None
) -> bool:
    """Give the checked temporary file its name, never replacing what holds the name:
    renameat2(RENAME_NOREPLACE) in one call, else a hard link (which also never replaces),
    else (a file system with neither) check, then rename. Returns False when the name
    already held this content (nothing was placed); raises when it held another file. The
    temporary name is gone when it returns (the caller removes it when it raises)."""

    def rename() -> None:
        rename_no_replace(tmp, name, folder_fd)

    def link() -> None:
        os.link(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd, follow_symlinks=False)

    no_replace = (
        (rename, {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}),
        (link, _NO_HARD_LINKS),
    )
    for attempt, unsupported in no_replace:
        try:
            attempt()
        except FileExistsError:
            return _taken_by_twin(folder_fd, tmp, name, source, digest)
        except OSError as error:
            if error.errno not in unsupported:
                raise
        else:
            if attempt is link:  # a hard link leaves the temporary name
                os.unlink(tmp, dir_fd=folder_fd)
            return True
    # Neither: check, then rename (a narrow window, on such file systems only).
    try:
        os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        return True
    return _taken_by_twin(folder_fd, tmp, name, source, digest)


def _taken_by_twin(
    folder_fd: int, tmp: str, name: str, source: str | None, digest: str | None
) -> bool:
    """The name is held: by this content (False: nothing to place, the temporary file is
    removed), else never replaced. source None: an archive member's (no file to compare
    with: the temporary copy is)."""
    if source is None:
        same = _digest_at(folder_fd, name) == (digest or _digest_at(folder_fd, tmp))
    else:
        same = _existing_is_same(folder_fd, name, source, digest)
    if not same:
        raise _occupied() from None
    os.unlink(tmp, dir_fd=folder_fd)
    return False


def _occupied() -> TransferError:
    return TransferError(
        "the destination already holds a different file, which is never overwritten; "
        "rerun, and the plan chooses another name"
    )


def _linked_ctime(folder_fd: int, name: str, row: Row) -> int | None:
    """The input's ctime once name is a hard link to it: linking changed it (the link
    count is part of the inode). The ledger records the version as it is now, or the next
    run would see every linked input as a new version and hash it. None when name is not
    (or no longer) the row's version: then the next run finds it by content."""
    try:
        info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except OSError:
        return None
    same = stat.S_ISREG(info.st_mode) and (info.st_size, info.st_mtime_ns) == (
        row.size,
        row.mtime_ns,
    )
    return info.st_ctime_ns if same and info.st_ino == row.ino else None


def _link(
    folder_fd: int, name: str, source: str, row: Row, mode: str
) -> tuple[str, str | None, int | None]:
    """(status, the digest if known, the input's ctime after a new hard link changed it,
    else None)."""
    info = os.stat(source)
    try:
        _check_version(info, row)
    except SourceChanged:
        if mode == "hardlink" and _linked_ctime(folder_fd, name, row) == info.st_ctime_ns:
            # linked by an earlier attempt at this row
            return PRESENT, row.digest, info.st_ctime_ns
        raise
    digest = row.digest
    if mode == "symlink" and digest is None:
        # A link holds no content of its own: once its input is renamed it dangles, and
        # only this digest lets the next plan find the content at the new path (relink).
        digest = _version_digest(source, row)
    try:
        if mode == "hardlink":
            os.link(source, name, dst_dir_fd=folder_fd)
            return LINKED, digest, _linked_ctime(folder_fd, name, row)
        os.symlink(os.path.abspath(source), name, dir_fd=folder_fd)
    except FileExistsError:
        if _existing_is_same(folder_fd, name, source, digest):
            return PRESENT, digest, None
        raise _occupied() from None
    return LINKED, digest, None


def _is_link(folder_fd: int, row: Row) -> bool:
    """Is the row's destination a symbolic link (not following it)?"""
    name = row.destination.rpartition("/")[2]
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _link_target(folder_fd: int, name: str) -> str | None:
    """Where the symbolic link name points, or None (not a link, or nothing there)."""
    try:
        return os.readlink(name, dir_fd=folder_fd)
    except OSError:
        return None


def _relink(folder_fd: int, name: str, source: str, previous: str, row: Row, token: str) -> str:
    """Point dcmsort's link at name to source instead of previous (the input's old path:
    the plan found the same content, by digest, at the new one). Only that exact link is
    replaced, never a file or a link to anywhere else: a new link at the temporary name
    is swapped with it in one atomic call (what comes out is checked, and swapped back if
    it was not ours), so name is never missing and never anything else's."""
    _check_version(os.stat(source), row)
    target, ours = os.path.abspath(source), os.path.abspath(previous)
    held = _link_target(folder_fd, name)
    if held == target:  # re-pointed by a run killed before it committed
        return PRESENT
    if held != ours:
        if _existing_is_same(folder_fd, name, source, row.digest):
            return PRESENT  # a file with this content took the link's place
        raise _not_our_link()
    # The plan's temporary name: one a killed transfer of this plan left was removed by
    # settle; anything else there is someone else's (FileExistsError: not placed).
    tmp = temp_name_for(name, token)
    os.symlink(target, tmp, dir_fd=folder_fd)
    try:
        exchange(tmp, name, folder_fd)
    except OSError as error:
        if error.errno not in {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}:
            os.unlink(tmp, dir_fd=folder_fd)
            raise
        # No atomic swap here: check, then rename over (a narrow window, on such file
        # systems only).
        if _link_target(folder_fd, name) != ours:
            os.unlink(tmp, dir_fd=folder_fd)
            raise _not_our_link() from None
        os.rename(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        return RELINKED
    if _link_target(folder_fd, tmp) != ours:  # replaced since it was looked at
        exchange(tmp, name, folder_fd)  # put back (what fails here is left at tmp)
        os.unlink(tmp, dir_fd=folder_fd)
        raise _not_our_link()
    os.unlink(tmp, dir_fd=folder_fd)  # the link to the old path
    return RELINKED


def _not_our_link() -> TransferError:
    return TransferError(
        "the destination is no longer the link dcmsort made to the input's earlier path, "
        "and is never replaced; move it away and rerun"
    )


def put(
    folder_fd: int,
    row: Row,
    input_dir: Path,
    mode: str,
    verify: str,
    token: str = _UNRECORDED_TOKEN,
) -> tuple[str, str | None, int | None]:
    """Put one row's file in place; returns (status, digest if known, the input's ctime
    when placing it changed it: a new hard link's, else None). token: the plan's, for the
    temporary name of a copy (temp_token)."""
    if archives.is_member(row.relpath):
        return *_put_archived(folder_fd, row, input_dir, verify, token), None
    name = row.destination.rpartition("/")[2]
    source = inventory.source_path(input_dir, row.relpath)
    try:
        if row.action == "present":
            # The planned version is still the input (one stat), or the run would say the
            # content of an input rewritten since the plan is in the output.
            _check_version(os.stat(source), row)
            if _existing_is_same(folder_fd, name, source, row.digest):
                return PRESENT, row.digest, None
        if row.action == "relink":
            previous = inventory.source_path(input_dir, row.previous_relpath)
            return _relink(folder_fd, name, source, previous, row, token), row.digest, None
        if mode == "copy":
            return *_copy(folder_fd, name, source, row, verify, token), None
        return _link(folder_fd, name, source, row, mode)
    except FileNotFoundError as error:
        if error.filename in (source, None):
            raise SourceChanged("the input is gone since its header was read") from error
        raise TransferError(error.strerror) from error
    except OSError as error:
        hint = (
            " (hard links need input and output on one file system: use transfer_mode: copy)"
            if mode == "hardlink" and error.errno == errno.EXDEV
            else ""
        )
        raise TransferError(f"{error.strerror or error}{hint}") from error


def _by_archive(rows: list[Row]) -> tuple[list[Row], dict[str, list[Row]]]:
    """(the rows of plain files, the rows of archive members by archive)."""
    plain: list[Row] = []
    members: dict[str, list[Row]] = {}
    for row in rows:
        if archives.is_member(row.relpath):
            members.setdefault(archives.split(row.relpath)[0], []).append(row)
        else:
            plain.append(row)
    return plain, members


def _folder_rows(rows: list[Row]) -> Iterator[tuple[str, list[Row]]]:
    by_folder: dict[str, list[Row]] = {}
    for row in rows:
        by_folder.setdefault(row.destination.rpartition("/")[0], []).append(row)
    yield from by_folder.items()


def _sibling_folders(rows: list[Row]) -> Iterator[tuple[str, list[tuple[str, list[Row]]]]]:
    """The rows by folder, the folders by their parent (a patient's series folders): the
    parent is opened once for all of them. Folders right below output_dir are each their
    own group, so that the work still spreads over threads."""
    by_parent: dict[str, list[tuple[str, list[Row]]]] = {}
    for folder, folder_rows in _folder_rows(rows):
        parent = folder.rpartition("/")[0]
        by_parent.setdefault(parent or folder, []).append((folder, folder_rows))
    yield from by_parent.items()


@dataclass(slots=True)
class Outcome:
    row: Row
    status: str
    digest: str | None = None
    detail: str | None = None
    mode: str | None = None  # how it was placed, when not this run's transfer_mode
    ctime_ns: int | None = None  # the input's ctime, when placing it changed it (hard link)


def _unplaced(rows: list[Row], error: TransferError | OSError) -> list[Outcome]:
    """The outcome of rows whose folder could not be opened or made."""
    detail = str(error) if isinstance(error, TransferError) else error.strerror
    return [Outcome(row, ERROR, detail=detail) for row in rows]


def _place_folders(
    tree: OutputTree,
    parent: str,
    folders: list[tuple[str, list[Row]]],
    input_dir: Path,
    mode: str,
    verify: str,
    token: str,
) -> list[Outcome]:
    """Place the rows of sibling folders (``_sibling_folders``), their parent opened once."""
    try:
        parent_fd = tree.open_folder(parent)
    except (TransferError, OSError) as error:
        return _unplaced([row for _, rows in folders for row in rows], error)
    try:
        return [
            outcome
            for folder, rows in folders
            for outcome in _place_folder(
                tree, folder, rows, (parent_fd, parent), input_dir, mode, verify, token
            )
        ]
    finally:
        os.close(parent_fd)


def _place_folder(
    tree: OutputTree,
    folder: str,
    rows: list[Row],
    at: tuple[int, str],
    input_dir: Path,
    mode: str,
    verify: str,
    token: str,
) -> list[Outcome]:
    try:
        folder_fd = tree.open_folder(folder, at=at)
    except (TransferError, OSError) as error:
        return _unplaced(rows, error)
    outcomes = []
    try:
        for row in rows:
            try:
                status, digest, ctime_ns = put(folder_fd, row, input_dir, mode, verify, token)
                # A relinked destination stays a link, whatever this run's mode.
                how = "symlink" if row.action == "relink" else None
                if status == PRESENT and mode == "symlink" and not _is_link(folder_fd, row):
                    # A file with the content was there already (someone else's, or a
                    # copy of an earlier run): it is the placement, as a file. Recorded as
                    # a link, a check would take it for damage and set it aside.
                    how = "copy"
                outcomes.append(Outcome(row, status, digest, mode=how, ctime_ns=ctime_ns))
            except SourceChanged as error:
                outcomes.append(Outcome(row, CHANGED, detail=str(error)))
            except TransferError as error:
                outcomes.append(Outcome(row, ERROR, detail=str(error)))
    finally:
        os.close(folder_fd)
    return outcomes


def _ledger_rows(outcomes: list[Outcome], plan: pa.Table, mode: str) -> pa.Table:
    """The ledger rows of the committed outcomes: what the plan knew of each file (taken
    columnar from the plan table) and what the transfer found. A new hard link changed its
    input's ctime: its placement is committed for both versions, the planned one (a rerun
    of this plan sees it done) and the one the input is now (the next plan sees nothing
    new)."""
    done = [o for o in outcomes if o.status in COMMITTED]
    relinked = [o for o in done if o.ctime_ns is not None]
    rows = _rows(done, plan, mode)
    if not relinked:
        return rows
    now = _rows(relinked, plan, mode)
    ctimes = pa.array([o.ctime_ns for o in relinked], pa.int64())
    return pa.concat_tables(
        [rows, now.set_column(now.schema.get_field_index("ctime_ns"), "ctime_ns", ctimes)]
    )


def _rows(done: list[Outcome], plan: pa.Table, mode: str) -> pa.Table:
    planned = plan.take(pa.array([o.row.index for o in done], pa.int64()))
    return pa.table(
        {
            "relpath": planned["relpath"],
            "size": planned["size"],
            "mtime_ns": planned["mtime_ns"],
            "ctime_ns": planned["ctime_ns"],
            "ino": planned["ino"],
            # A restored copy belongs to the placement it restores: this input is its twin.
            "status": [
                ledger.DUPLICATE
                if o.status == DUPLICATE or o.row.action == "restore"
                else ledger.PLACED
                for o in done
            ],
            "destination": planned["destination"],
            "digest": [o.digest for o in done],
            "mode": [o.mode or mode for o in done],
            "base_folder": planned["base_folder"],
            "series_uid": planned["SeriesInstanceUID"],
            "sop_uid": planned["SOPInstanceUID"],
            "study_uid": planned["StudyInstanceUID"],
            "modality": planned["Modality"],
            "committed_at": [time.time()] * len(done),
            "patient_id": ledger.patient_ids(planned["PatientID"]),
            "part_key": planned["part_key"]
            if "part_key" in planned.column_names
            else pa.nulls(len(done), pa.int64()),
        },
        schema=ledger.SCHEMA,
    )


def settle(
    plan_file: Path,
    input_dir: Path,
    output_dir: Path,
    state_dir: Path,
    mode: str,
    part: Part | None = None,
) -> int:
    """Commit what a killed transfer of this plan had put in place, and remove the
    temporary files it left (those with the plan's token: no other file is ours to
    remove). A file reaches its name only after it was checked, so a pending row's
    destination holding a file with its input version's size and mtime (or a link to its
    input) is that row's placement. Run before a plan replaces this one (the inputs may
    have been renamed meanwhile: nobody would adopt those copies) and before a transfer
    retries it. Returns how many rows it committed."""
    try:
        table = read_parquet(plan_file)
    except FileNotFoundError:
        return 0
    plan = pending_rows(table, ledger.read(state_dir, ledger.SOURCE_KEY, part))
    rows = plan_rows(plan)
    token = temp_token(table)
    return len(_settle(plan, rows, input_dir, output_dir, state_dir, mode, token, part))


def _settle(
    plan: pa.Table,
    rows: list[Row],
    input_dir: Path,
    output_dir: Path,
    state_dir: Path,
    mode: str,
    token: str | None,
    part: Part | None = None,
) -> list[Outcome]:
    """settle, for the pending rows of a plan already read (token: the plan's; part: the
    partition whose ledger group it commits to); returns what it committed."""
    if plan.num_rows == 0 or not output_dir.is_dir():
        return []
    tree = OutputTree(output_dir)
    found: list[Outcome] = []
    placed: set[str] = set()
    tops = set(os.listdir(tree.root_fd))  # a folder not made yet holds nothing to settle
    for folder, folder_rows in _folder_rows([r for r in rows if r.action != "duplicate"]):
        if folder.partition("/")[0] not in tops:
            continue
        try:
            fd = tree.open_folder(folder, create=False)
        except (OSError, TransferError):
            continue
        try:
            # One listing per folder, not a call per row: on a shared file system each
            # stat or unlink is a round trip, and most rows have nothing in place yet.
            try:
                names = set(os.listdir(fd))
            except OSError:
                continue
            for row in folder_rows:
                name = row.destination.rpartition("/")[2]
                # A name with the token was made by a transfer of this plan.
                if token and (temp := temp_name_for(name, token)) in names:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp, dir_fd=fd)
                if name not in names:
                    continue
                source = inventory.source_path(input_dir, row.relpath)
                how = _holds_version(fd, name, row, source)
                if how:
                    digest = row.digest
                    if how == "symlink" and digest is None:  # what a later relink needs
                        with contextlib.suppress(OSError, SourceChanged):
                            digest = _version_digest(source, row)
                    ctime_ns = _linked_ctime(fd, name, row) if how == "hardlink" else None
                    found.append(Outcome(row, PRESENT, digest, mode=how, ctime_ns=ctime_ns))
                    placed.add(row.destination)
        finally:
            os.close(fd)
    tree.close()
    # Duplicates of what was just settled (of anything else: the transfer decides).
    found += [
        Outcome(row, DUPLICATE, row.digest)
        for row in rows
        if row.action == "duplicate" and row.destination in placed
    ]
    ledger.append(state_dir, _ledger_rows(found, plan, mode), part)
    return found


def _holds_version(folder_fd: int, name: str, row: Row, source: str) -> str | None:
    """How name holds the row's input version: "symlink" (a link to it), "copy" (a file
    with its size and mtime; a hard link is one too), or None."""
    try:
        info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except OSError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "symlink" if os.readlink(name, dir_fd=folder_fd) == os.path.abspath(source) else None
    same = stat.S_ISREG(info.st_mode) and (info.st_size, info.st_mtime_ns) == (
        row.size,
        row.mtime_ns,
    )
    return ("hardlink" if info.st_nlink > 1 else "copy") if same else None


def _input_is_planned_version(
    input_dir: Path, row: Row, linked_inodes: set
) -> tuple[bool, int | None]:
    """Is a duplicate's input still the version the plan hashed? One stat: one rewritten
    since (its mtime set back or not) must not be committed as a copy of its twin. A ctime
    changed by a hard link this run made to the same inode is not a change: then its ctime
    now comes along, to be committed too (else the next lookup of the input, at its
    current version, would not find it)."""
    try:
        info = os.stat(inventory.source_path(input_dir, archives.split(row.relpath)[0]))
        relinked = info.st_ino in linked_inodes and info.st_ctime_ns != row.ctime_ns
        _check_version(info, dataclasses.replace(row, ctime_ns=None) if relinked else row)
    except (OSError, SourceChanged):
        return False, None
    return True, info.st_ctime_ns if relinked else None


def pending_rows(plan: pa.Table, committed: pa.Table) -> pa.Table:
    """Plan rows whose file version the ledger does not hold yet (a rerun of a killed
    transfer skips what it already committed), in one chunk: each commit takes its rows
    from this table, and taking from a chunked table joins its chunks on every call. A
    plan of v0.3 gets null ctime and inode columns."""
    pending = ledger.rows_by_key(plan, committed, keep="missing")
    return ledger.with_version_columns(pending).combine_chunks()


def transfer_plan(
    plan_file: Path,
    input_dir: Path,
    output_dir: Path,
    state_dir: Path,
    mode: str,
    verify: str,
    workers: int,
    part: Part | None = None,
) -> pa.Table:
    """Carry out every pending plan row and commit what is in place; one result per row.
    With part, the rows are one partition's, committed to its own ledger group."""
    table = read_parquet(plan_file)
    token = temp_token(table)
    plan = pending_rows(table, ledger.read(state_dir, ledger.SOURCE_KEY, part))
    rows = plan_rows(plan)
    # After a killed transfer of this plan, or a row whose file is in place already (an
    # input rewritten with its own bytes, its mtime set back): what it commits is no longer
    # pending, and is reported as present.
    settled = _settle(plan, rows, input_dir, output_dir, state_dir, mode, token, part)
    if settled:
        plan = pending_rows(plan, ledger.read(state_dir, ledger.SOURCE_KEY, part))
        rows = plan_rows(plan)
    committed_before = plan["committed"].to_pylist()
    placing = [r for r in rows if r.action != "duplicate"]
    temp = token or _UNRECORDED_TOKEN  # the token of this transfer's temporary names
    tree = OutputTree(output_dir)
    progress = Progress(
        f"transfer {part.name}" if part and part.count > 1 else "transfer", len(rows), log
    )
    outcomes: list[Outcome] = list(settled)
    uncommitted: list[Outcome] = []
    last_commit = time.monotonic()

    def commit() -> None:
        nonlocal uncommitted, last_commit
        ledger.append(state_dir, _ledger_rows(uncommitted, plan, mode), part)
        uncommitted, last_commit = [], time.monotonic()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        plain, members = _by_archive(placing)
        tasks = [
            pool.submit(_place_folders, tree, parent, folders, input_dir, mode, verify, temp)
            for parent, folders in _sibling_folders(plain)
        ] + [
            pool.submit(_place_archive, tree, archive, archive_rows, input_dir, verify, temp)
            for archive, archive_rows in members.items()
        ]
        for task in tasks:
            done = task.result()
            outcomes += done
            uncommitted += done
            progress.advance(len(done))
            if time.monotonic() - last_commit > COMMIT_EVERY_S:
                commit()
    commit()

    # A duplicate is committed only against a committed destination that is still there.
    placed_now = {o.row.destination for o in outcomes if o.status in COMMITTED}
    # A twin whose input changed while the run went on is not a failure (nor its copies).
    changed_now = {o.row.destination for o in outcomes if o.status == CHANGED}
    # A destination this run failed to confirm (a relink or a present row) holds no
    # content for its duplicates, whatever the ledger said before.
    unplaced_now = {o.row.destination for o in outcomes if o.status not in COMMITTED}
    # A twin committed after the plan was made (by an earlier, killed attempt at this plan,
    # or settled from it) is committed too: ask the ledger, once, if needed.
    committed_since: set[str] | None = None

    def committed(row: Row) -> bool:
        nonlocal committed_since
        if committed_before[row.index] or row.destination in placed_now:
            return True
        if committed_since is None:
            placed = ledger.read(state_dir, ["status", "destination"], part)
            committed_since = set(ledger.placed_destinations(placed).to_pylist())
        return row.destination in committed_since

    # Inputs this run hard-linked: linking changed their ctime (an input hard-linked twice
    # in the input folder shares it with its duplicate).
    linked_inodes = {o.row.ino for o in outcomes if o.ctime_ns is not None}
    duplicates = []
    for row in rows:
        if row.action != "duplicate":
            continue
        if committed(row) and row.destination not in unplaced_now and tree.holds(row.destination):
            planned, relinked_ctime = _input_is_planned_version(input_dir, row, linked_inodes)
            if planned:
                # Committed also at the ctime this run's link gave it, as the link itself.
                duplicates.append(Outcome(row, DUPLICATE, row.digest, ctime_ns=relinked_ctime))
            else:
                duplicates.append(
                    Outcome(
                        row,
                        CHANGED,
                        detail="the input changed after it was planned; it is sorted by the "
                        "next run",
                    )
                )
        elif row.destination in changed_now:
            duplicates.append(
                Outcome(
                    row,
                    CHANGED,
                    detail="its identical twin changed after its header was read; it is "
                    "sorted by the next run",
                )
            )
        else:
            duplicates.append(
                Outcome(
                    row,
                    ERROR,
                    detail="its identical twin could not be placed; it is planned again "
                    "by the next run",
                )
            )
    progress.advance(len(duplicates))
    outcomes += duplicates
    uncommitted += duplicates
    commit()
    tree.close()
    progress.finish()
    pending_file(state_dir, part).unlink(missing_ok=True)  # all committed or reported
    ledger.compact(state_dir, part=part)
    return pa.table(
        {
            "relpath": [o.row.relpath for o in outcomes],
            "destination": [o.row.destination for o in outcomes],
            "status": [o.status for o in outcomes],
            "bytes": [o.row.size if o.status == COPIED else 0 for o in outcomes],
            "detail": [o.detail for o in outcomes],
        },
        schema=RESULT_SCHEMA,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcmsort.transfer", description=__doc__)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--input-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--mode", choices=MODES, default="copy")
    parser.add_argument("--verify", choices=VERIFY, default="size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--partition", help="p<index>of<count>: the partition of this plan")
    parser.add_argument("--log", type=Path, help="this job's log (earlier ones are removed)")
    args = parser.parse_args(argv)
    part = parse_part(args.partition) if args.partition else None
    if part:
        remove_other_versions(args.results, part.name)
        if args.log:
            remove_other_versions(args.log, part.name)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    # One thread per core: the work is the kernel's (creating and linking files), and more
    # threads only contend for its locks and the GIL (measured: 4 threads on 2 cores used
    # ~40 % more CPU than 2, for no less time).
    results = transfer_plan(
        args.plan,
        args.input_dir,
        args.output_dir,
        args.state_dir,
        args.mode,
        args.verify,
        args.threads,
        part,
    )
    with atomic_path(args.results) as tmp:
        pq.write_table(results, tmp)
    statuses = results["status"].to_pylist()
    log.info(
        "transfer (%s): %d copied, %d linked, %d relinked, %d already present, "
        "%d duplicates, %d changed since read, %d errors, %.1f MB, %.2f s, peak RSS %d MB",
        args.mode,
        statuses.count(COPIED),
        statuses.count(LINKED),
        statuses.count(RELINKED),
        statuses.count(PRESENT),
        statuses.count(DUPLICATE),
        statuses.count(CHANGED),
        statuses.count(ERROR),
        (pc.sum(results["bytes"]).as_py() or 0) / 1e6,
        time.perf_counter() - started,
        peak_rss_mb(),
    )
    errors = results.filter(pc.equal(results["status"], ERROR)).to_pylist()
    for row in errors[:50]:
        log.error("could not place %s at %s: %s", row["relpath"], row["destination"], row["detail"])
    if errors:
        # The next run must plan these files again (another name, a fixed disk), not retry
        # this plan: without it, Snakemake would rerun only this job.
        args.plan.unlink(missing_ok=True)
        log.error(
            "%d files were not placed (inputs untouched, everything else committed); fix "
            "the cause above and rerun",
            len(errors),
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
