"""Archives in the input folder, read member by member and never unpacked.

An input file whose first bytes are those of a zip or a tar archive (plain, or gzip, bzip2
or xz compressed; the name does not matter) is read with the standard library's zipfile
and tarfile: the extract job reads each member's first bytes for its header, the transfer
streams each planned member's bytes into its destination's temporary file. Nothing is
written anywhere but the output tree, and memory stays bounded by HEAD_BYTES and one copy
buffer per worker, whatever the archive's size. Archives inside archives are not opened:
such a member is skipped as one (NESTED).

A member is named wherever a relpath goes (manifests, plans, the ledger, the report) as
``<archive relpath>//<member path>``. No path of a file on disk holds "//", so the first
one separates the two. The member path is the member's name with its empty and "."
components dropped, each component in ``inventory.encode_name`` form: a name such as
``../../etc/x`` or ``/abs`` stays text in the relpath, and only its last component can
ever reach a destination (as ``{filename}``, made safe like any input name). A name
repeated within one archive (tar allows it) is ``<archive>//<n>//<member path>`` for its
n-th occurrence. A member's version is its archive's (mtime, ctime, inode) with its own
size: an archive rewritten in any way is a new version of every member.

Imports only the standard library.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from dcmsort import inventory
from dcmsort.fileops import DIGEST

SEPARATOR = "//"
# What extract reads of a member for its header, at most (a file's header is read up to
# headers.MAX_FORCED_BYTES; a member cannot be read again from its start in a tar stream).
HEAD_BYTES = 8 * 1024 * 1024
# How much of a file the transfer and the extract read at a time from a member.
COPY_BYTES = 1 << 20

ZIP, TAR = "zip", "tar"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a first member; an empty archive's end record
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz
_TAR_MAGIC = b"ustar"  # at offset 257 of a POSIX or GNU tar header
# What reading a damaged archive raises, besides OSError (bzip2's errors are OSErrors) and
# EOFError.
_DAMAGED = (
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    ValueError,  # and UnicodeDecodeError: a zip's names that are not the UTF-8 they claim
    NotImplementedError,  # a zip version or compression method Python lacks
)

NOT_A_TAR = (
    "compressed, but no tar archive could be read from it (a single compressed file, which "
    "is not read, or a damaged one): unpack it and sort the result"
)
NESTED = "archive inside an archive (not opened: unpack the outer one and sort the result)"
ENCRYPTED = "encrypted member of a zip archive (dcmsort reads no passwords): unpack it yourself"
LINK = "link inside an archive (never followed; its target, if in the archive, is sorted)"
SPECIAL = "not a regular file (device, socket or pipe entry inside an archive)"
EMPTY = "archive that holds no file"
UNSUPPORTED = "member compressed with a method Python cannot read: unpack it yourself"


class ArchiveError(Exception):
    """The archive could not be read (on); the message is the skip reason."""


def kind(head: bytes) -> str | None:
    """ZIP or TAR from a file's first 512 bytes (or all of it), else None."""
    if head[:4] in _ZIP_MAGIC:
        return ZIP
    if head[257:262] == _TAR_MAGIC or head.startswith(_COMPRESSED_MAGIC):
        return TAR
    return None


def is_member(relpath: str) -> bool:
    return SEPARATOR in relpath


def split(relpath: str) -> tuple[str, str]:
    """(archive relpath, member key) of a member's relpath."""
    archive, _, key = relpath.partition(SEPARATOR)
    return archive, key


def relpath_of(archive_relpath: str, key: str) -> str:
    return f"{archive_relpath}{SEPARATOR}{key}"


def member_key(name: str, seen: dict[str, int]) -> str:
    """The key of a member called name (seen: the keys of the archive's earlier members,
    counted; updated)."""
    parts = [inventory.encode_name(p) for p in name.split("/") if p not in ("", ".")]
    path = "/".join(parts) or "-"
    count = seen[path] = seen.get(path, 0) + 1
    return path if count == 1 else f"{count}{SEPARATOR}{path}"


def typed_key(text: str) -> str:
    """A member key as a user may type it (``./a//b``, ``2//a/b``): member_key's form."""
    occurrence, separator, rest = text.partition(SEPARATOR)
    if separator and occurrence.isdigit():
        return f"{occurrence}{SEPARATOR}{member_key(rest, {})}"
    return member_key(text, {})


@dataclass(frozen=True, slots=True)
class Member:
    key: str
    size: int
    skip_reason: str | None  # why it is not a file to sort (a link, encrypted), else None
    open: Callable[[], BinaryIO] | None  # its bytes (read them before the next member)


def damage(error: BaseException) -> str:
    """What is wrong with an archive (or a member) reading it raised error for."""
    if isinstance(error, EOFError):
        return "it ends early (truncated)"
    return f"{type(error).__name__}: {error}"


def archive_reason(error: BaseException) -> str:
    """The skip reason of an archive that could not be read (on)."""
    if isinstance(error, ArchiveError):
        return str(error)
    if isinstance(error, NotImplementedError):
        return f"archive in a form Python cannot read ({error}): unpack it with another tool"
    if isinstance(error, UnicodeDecodeError):
        return (
            "zip archive whose member names are not the UTF-8 it says they are: Python "
            "cannot list it; unpack it with another tool"
        )
    return f"damaged archive: {damage(error)}; what it holds after this point is not sorted"


class _Exact:
    """A member's bytes, exactly its size of them. Reading on where the archive ends early
    (truncated, or a header claiming more than it holds) raises EOFError instead of
    ending quietly: a tar reader would otherwise skip the claimed size block by block past
    the end, for as long as the claim says (2**62 bytes: forever). Closing it closes
    nothing: what is left is drained by the tar member iteration."""

    def __init__(self, inner: BinaryIO, size: int):
        self.inner, self.left = inner, size

    def read(self, count: int = -1) -> bytes:
        count = self.left if count is None or count < 0 else min(count, self.left)
        if count == 0:
            return b""
        data = self.inner.read(count)
        if not data:
            raise EOFError("the archive ends inside this member")
        self.left -= len(data)
        return data

    def drain(self) -> None:
        while self.read(COPY_BYTES):
            pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Exact:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def member_reason(error: BaseException) -> str:
    return f"damaged archive member: {damage(error)}"


def members(handle: BinaryIO, archive_kind: str) -> Iterator[Member]:
    """Every member of an archive open at its start, in stored order; folders are left
    out. Raises ArchiveError (or what _DAMAGED lists, OSError, EOFError) where it cannot
    be read on."""
    seen: dict[str, int] = {}
    if archive_kind == ZIP:
        yield from _zip_members(handle, seen)
    else:
        yield from _tar_members(handle, seen)


def _zip_members(handle: BinaryIO, seen: dict[str, int]) -> Iterator[Member]:
    archive = zipfile.ZipFile(handle)
    for info in archive.infolist():
        if info.is_dir() and info.file_size == 0:  # a name ending in "/" may hold bytes
            continue
        key = member_key(info.filename, seen)
        mode = info.external_attr >> 16 if info.create_system == 3 else 0  # made on Unix
        if stat.S_ISLNK(mode):
            yield Member(key, info.file_size, LINK, None)
        elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # writers may leave the type out
            yield Member(key, info.file_size, SPECIAL, None)
        elif info.flag_bits & 0x1:
            yield Member(key, info.file_size, ENCRYPTED, None)
        else:
            yield Member(
                key, info.file_size, None, lambda i=info: _Exact(archive.open(i), i.file_size)
            )


def _tar_members(handle: BinaryIO, seen: dict[str, int]) -> Iterator[Member]:
    try:
        archive = tarfile.open(fileobj=handle, mode="r|*")  # noqa: SIM115 (a stream: no close needed)
    except tarfile.ReadError as error:
        if handle.seek(0) == 0 and handle.read(6).startswith(_COMPRESSED_MAGIC):
            raise ArchiveError(NOT_A_TAR) from error
        raise
    for info in archive:
        if info.isdir():
            continue
        key = member_key(info.name, seen)
        if info.issym() or info.islnk():
            yield Member(key, info.size, LINK, None)
        elif info.isreg() or info.type not in tarfile.SUPPORTED_TYPES:  # as tar reads those
            stream = _Exact(archive.extractfile(info), info.size)
            yield Member(key, info.size, None, lambda stream=stream: stream)
            stream.drain()  # what its reader left (see _Exact)
        else:
            yield Member(key, info.size, SPECIAL, None)


def open_input(path: str) -> tuple[BinaryIO, os.stat_result]:
    """An archive opened for reading, non-blocking (see headers._open_input), and its
    status; OSError if it is no longer a regular file."""
    handle = open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")  # noqa: SIM115
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode):
        handle.close()
        raise OSError(f"{path}: no longer a regular file")
    return handle, info


@contextmanager
def reading(path: str) -> Iterator[tuple[BinaryIO, os.stat_result, Iterator[Member]]]:
    """(the open archive, its status, its members) of the archive at path; ArchiveError if
    it is no archive (any more), OSError if it cannot be opened."""
    handle, info = open_input(path)
    with handle:
        archive_kind = kind(handle.read(512))
        if archive_kind is None:
            raise ArchiveError("no longer an archive")
        handle.seek(0)
        yield handle, info, members(handle, archive_kind)


def read_exactly(stream: BinaryIO, count: int) -> bytes:
    """Up to count bytes of stream (fewer only at its end)."""
    chunks, left = [], count
    while left > 0 and (chunk := stream.read(min(left, COPY_BYTES))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def digests(path: str) -> dict[str, str]:
    """The content digest of every regular member of the archive at path, in one pass
    (a tar stream can only be read from its start: one digest per member read would read
    the archive once per member). Raises OSError or what reading a damaged archive raises."""
    found: dict[str, str] = {}
    with reading(path) as (_, _, listed):
        for member in listed:
            if member.open is None:
                continue
            digest = hashlib.new(DIGEST)
            try:
                with member.open() as stream:
                    while chunk := stream.read(COPY_BYTES):
                        digest.update(chunk)
            except NotImplementedError:  # its compression: extract skipped it
                continue
            found[member.key] = digest.hexdigest()[:32]
    return found


class MemberDigests:
    """Digests of archive members by relpath, each archive read once (then kept)."""

    def __init__(self, input_dir: str | os.PathLike):
        self.input_dir = input_dir
        self._by_archive: dict[str, dict[str, str]] = {}

    def __call__(self, relpath: str) -> str | None:
        archive, key = split(relpath)
        if archive not in self._by_archive:
            try:
                self._by_archive[archive] = digests(inventory.source_path(self.input_dir, archive))
            except (OSError, EOFError, ArchiveError, *_DAMAGED):
                self._by_archive[archive] = {}
        return self._by_archive[archive].get(key)


READ_ERRORS = (OSError, EOFError, ArchiveError, *_DAMAGED)
