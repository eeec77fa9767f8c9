"""File operations shared by the stages: atomic writes and content digests."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dcmsort import permissions

TEMP_SUFFIX = ".dcmsort-tmp"


MAX_NAME_BYTES = 255  # ext4, XFS, APFS, NTFS (in UTF-16 units), Lustre


def temp_name_for(name: str, token: str = "") -> str:
    """The temporary name used while writing the file called name: hidden, in the same
    folder (so the final rename stays on one file system), ``.<name>.<token>.dcmsort-tmp``.
    The transfer's token is its plan's (``transfer.temp_token``), recorded before any such
    file exists: it is how the cleanup after a killed run tells its own files from anyone
    else's. State files (``atomic_path``, in dcmsort's own folder) have none: their fixed
    name is replaced by the next write. A name too long for that keeps a prefix and a hash
    of the whole name instead, so it stays within 255 bytes."""
    suffix = f".{token}{TEMP_SUFFIX}" if token else TEMP_SUFFIX
    temp = f".{name}{suffix}"
    if len(os.fsencode(temp)) <= MAX_NAME_BYTES:
        return temp
    digest = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    room = MAX_NAME_BYTES - len(os.fsencode(digest + suffix))
    # Cut on a character boundary; undecodable bytes of the name are kept as they are.
    prefix = os.fsencode(name)[: room - 1].decode("utf-8", "ignore")
    shortened = f".{prefix}{digest}{suffix}"
    while len(os.fsencode(shortened)) > MAX_NAME_BYTES:  # 'ignore' only ever shortens
        prefix = prefix[:-1]
        shortened = f".{prefix}{digest}{suffix}"
    return shortened


def temp_path_for(path: Path) -> Path:
    """The temporary path used while writing path (``temp_name_for``, in its folder)."""
    return path.with_name(temp_name_for(path.name))


@contextmanager
def atomic_path(path: str | Path, make_parent: bool = True, writer: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to path, on failure
    removed. ``make_parent=False`` when the caller already made the folder. ``writer``:
    names the temporary file when jobs side by side may write path at once (each its own,
    or one job's rename finds the other's temporary file gone). The file's mode comes from
    the umask, which the run narrows to output_dir (permissions); missing folders get their
    parent's mode (permissions.make_folders)."""
    path = Path(path)
    if make_parent:
        permissions.make_folders(path.parent)
    tmp = path.with_name(temp_name_for(path.name, writer))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_other_versions(path: Path, prefix: str) -> None:
    """Remove the files beside path named ``<prefix>-*<suffix>``, except path: the earlier
    versions of a job's output or log, whose names carry a fingerprint."""
    for other in Path(path).parent.glob(f"{prefix}-*{Path(path).suffix}"):
        if other != Path(path):
            other.unlink(missing_ok=True)


DIGEST = "blake2b"  # content identity: (size, digest), never (size, mtime)


def file_digest(path: str | Path) -> str:
    """Content digest used to tell exact duplicates from conflicts and to verify copies.

    OSError for anything but a regular file: an input replaced since the walk by a FIFO
    would block the open until some writer came, a link to a device (/dev/zero) would be
    read forever. Opened non-blocking and checked with one fstat (as ``open()`` made one
    anyway), then read with plain reads."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        digest = hashlib.new(DIGEST)
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()[:32]


def digest_of(handle: BinaryIO) -> str:
    """``file_digest`` of a file already open for reading (from its current position)."""
    return hashlib.file_digest(handle, DIGEST).hexdigest()[:32]


# copy_file_range is refused across some file systems and by some (older) kernels.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


def copy_range(fd_in: int, fd_out: int, size: int) -> int:
    """Copy size bytes from the start of fd_in to the start of the empty fd_out, in the
    kernel where it can (copy_file_range: no bytes through user space, reflinks where the
    file system has them). Returns how many bytes were written: fewer than size when the
    input ended early (it shrank); a full disk raises."""
    try:
        left = size
        while left > 0:
            copied = os.copy_file_range(fd_in, fd_out, left)
            if copied == 0:
                break
            left -= copied
        return size - left
    except OSError as error:
        if error.errno not in _NO_COPY_RANGE:
            raise
        # From the start, and never more than size bytes: an input that is no longer a
        # regular file (replaced by a FIFO or a link to /dev/zero since it was planned) is
        # refused by copy_file_range and may never end; the version check after the copy
        # then tells it changed.
        with contextlib.suppress(OSError):  # a pipe or a device has no position
            os.lseek(fd_in, 0, os.SEEK_SET)
        os.ftruncate(fd_out, 0)
        os.lseek(fd_out, 0, os.SEEK_SET)
        written = 0
        while written < size:
            try:
                chunk = os.read(fd_in, min(1 << 20, size - written))
            except BlockingIOError:  # a FIFO opened non-blocking, nothing in it
                break
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd_out, view) :]
            written += len(chunk)
        return written


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_libc = None


def rename_no_replace(name: str, new_name: str, dir_fd: int) -> None:
    """Rename name to new_name in one folder, failing with FileExistsError rather than
    replace anything: renameat2(RENAME_NOREPLACE), one atomic call. Raises OSError(ENOSYS
    or EINVAL) where the kernel, C library or file system lacks it (callers fall back)."""
    _renameat2(name, new_name, dir_fd, _RENAME_NOREPLACE)


def exchange(name: str, other: str, dir_fd: int) -> None:
    """Swap what two names in one folder hold, atomically: renameat2(RENAME_EXCHANGE).
    Nothing is removed, so what comes out can be looked at and swapped back. Raises
    OSError(ENOSYS, EINVAL or EOPNOTSUPP) where it is not supported (callers fall back)."""
    _renameat2(name, other, dir_fd, _RENAME_EXCHANGE)


def _renameat2(name: str, new_name: str, dir_fd: int, flags: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(_libc, "renameat2"):
            _libc = False
    if _libc is False:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    result = _libc.renameat2(dir_fd, os.fsencode(name), dir_fd, os.fsencode(new_name), flags)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), new_name)


def with_schema(table, schema):
    """table with exactly schema's columns, cast; a column the table lacks is all null
    (a file written by an earlier version, or a manifest without an optional tag)."""
    import pyarrow as pa

    return pa.table(
        {
            f.name: table[f.name].cast(f.type)
            if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type)
            for f in schema
        },
        schema=schema,
    )


def read_parquet(path: str | Path, columns: list[str] | None = None):
    """A parquet file as a pyarrow Table. Through ParquetFile, not ``pq.read_table``, whose
    dataset layer costs ~0.6 s of imports in every job that calls it (measured here)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        return parquet.read(columns=columns)


# A spreadsheet runs a cell that starts with = + - @ (or a tab or CR before one) as a
# formula: such text cells get a ' in front, and so does text that starts with ' itself,
# so that dropping one leading ' always gives the value back (from_spreadsheet_safe).
_FORMULA_START = r"^[=+\-@\t\r']"


def spreadsheet_safe(table):
    """table with every text cell a spreadsheet would read as a formula quoted (a leading
    '). Header values and file names are untrusted. Columnar; a column without such a cell
    is not copied."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for index, field in enumerate(table.schema):
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        column = table.column(index)
        risky = pc.match_substring_regex(column, _FORMULA_START)
        if pc.any(risky).as_py():
            quoted = pc.binary_join_element_wise("'", column, "")
            table = table.set_column(index, field, pc.if_else(risky, quoted, column))
    return table


def from_spreadsheet_safe(text: str) -> str:
    """A text cell of dcmsort's CSV files as the value it stands for."""
    return text[1:] if text.startswith("'") else text


def write_csv(table, path: str | Path) -> None:
    """table as CSV at path, atomically, safe to open in a spreadsheet."""
    import pyarrow.csv as pacsv

    with atomic_path(path) as tmp:
        pacsv.write_csv(spreadsheet_safe(table), tmp)
