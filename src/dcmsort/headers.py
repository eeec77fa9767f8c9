"""Read DICOM headers into manifests: is this file DICOM, and what are its tags.

The extract job (``python -m dcmsort.headers``) handles one batch of input folders. For each
folder it writes one parquet manifest, one row per file, and it reads a header only when the
file is new or changed: rows of unchanged files (same path, size, mtime, ctime and inode) are
taken from the folder's previous manifest. Then it writes the batch manifest the plan stage reads.

Imports pyarrow, and pydicom only once a file needs it: the scanner reads the usual file
without it. No pandas: this is the job that runs many times.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcmsort import archives, dictionary, inventory, ledger, permissions, scanner
from dcmsort.dictionary import MANIFEST_TAGS
from dcmsort.fileops import atomic_path, read_parquet
from dcmsort.progress import Progress, peak_rss_mb

if TYPE_CHECKING:
    import pydicom

log = logging.getLogger("dcmsort.headers")


@cache
def _pydicom():
    """pydicom, imported when a file first needs it (~0.26 s)."""
    import pydicom
    from pydicom import config

    # Values are recorded as text, never trusted: validating them on read only costs time
    # and fills logs with warnings about the very files this tool exists to cope with.
    config.settings.reading_validation_mode = config.IGNORE
    return pydicom


FILE_META_TAGS = ["TransferSyntaxUID", "MediaStorageSOPClassUID"]
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# A stored instance carries one of these with a UID-shaped value. The check matters most
# without a DICM preamble, where pydicom can be forced to parse anything.
_IDENTIFYING_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID")

SKIP_REASONS = {
    inventory.BROKEN_SYMLINK: "broken symbolic link (its target does not exist)",
    inventory.DIRECTORY_SYMLINK: "symbolic link to a folder (not followed, so that no loop "
    "or outside folder is walked); sort its target separately",
    inventory.SPECIAL: "not a regular file (device, socket or pipe)",
    inventory.UNREADABLE_DIRECTORY: "folder could not be listed (permission denied or I/O "
    "error); its files are not sorted",
    inventory.SYMLINK_LOOP: "symbolic link loop (the link leads back to itself)",
    inventory.PATH_TOO_LONG: "path longer than the system allows (4,096 bytes); it cannot be "
    "opened: move it higher up",
    inventory.DIRECTORY_PATH_TOO_LONG: "folder path longer than the system allows (4,096 "
    "bytes): its files could not be listed; move it higher up",
    inventory.UNREADABLE: "unreadable: its status could not be read",
}


def _text(value: object) -> str | None:
    if value is None:
        return None
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    text = str(value)
    return text if text.strip() else None


@cache
def _tags(keywords: tuple[str, ...]) -> tuple[list[tuple[str, int, str]], list[str]]:
    """(dataset keyword, tag, VR) triples and the file-meta keywords (group 0002) apart:
    a template may ask for either, and file-meta keywords are read from the file meta."""
    dataset, meta = [], []
    for keyword in dict.fromkeys(keywords):
        tag = dictionary.tag_for_keyword(keyword)
        if tag >> 16 == 0x0002:
            meta.append(keyword)
        else:
            dataset.append((keyword, tag, dictionary.vr_for_keyword(keyword)))
    return dataset, meta


class _MetaTags(dict):
    def __missing__(self, keyword: str) -> tuple[int, str]:
        self[keyword] = (dictionary.tag_for_keyword(keyword), dictionary.vr_for_keyword(keyword))
        return self[keyword]


_META_TAG = _MetaTags()


def split_keywords(keywords: list[str]) -> tuple[list[str], list[str]]:
    """(dataset keywords, file-meta keywords) of the manifest: FILE_META_TAGS always, and
    each keyword once, so a template using ``{TransferSyntaxUID}`` adds no second column."""
    dataset, meta = _tags(tuple(keywords))
    return [k for k, _, _ in dataset], list(dict.fromkeys(FILE_META_TAGS + meta))


_UID_CHARACTERS = frozenset("0123456789.")


def _looks_like_uid(value: str | None) -> bool:
    return bool(value) and len(value) <= 64 and _UID_CHARACTERS.issuperset(value)


# Values of these VRs are ASCII by definition: decoded here from the raw bytes, exactly as
# pydicom would print them, without building pydicom's value objects (most of a header
# read's cost after parsing). Text VRs take the same path when their bytes are plain ASCII
# (no escape sequence), which every DICOM character set reads the same way.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI"})
_NUMBER_VRS = frozenset({"IS", "DS"})
_SPLIT_TEXT_VRS = frozenset({"LO", "SH", "PN", "UC"})
_TEXT_VRS = frozenset({"LT", "ST", "UT"})


def _fast_text(raw: bytes, vr: str, codec: str | None = None) -> str | None:
    """The value as pydicom would print it, or None when pydicom must decode it. ``codec``:
    the single-byte or UTF-8 character set that text values are in, when known."""
    if b"\x1b" in raw:
        return None
    if raw.isascii():
        text = raw.decode("ascii")
    elif codec is not None and (vr in _SPLIT_TEXT_VRS or vr in _TEXT_VRS):
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            return None  # pydicom decodes with replacement characters (and warns)
    else:
        return None
    # Each VR as pydicom's converters (pydicom.values) strip it, values joined by "\\".
    if vr == "UI":  # a UID strips both ends of each value
        return "\\".join(v.strip() for v in text.rstrip(" \x00").split("\\"))
    if vr == "AE":  # leading and trailing spaces are not significant
        return "\\".join(v.strip() for v in text.split("\\"))
    if vr in _ASCII_VRS:
        return text.rstrip(" \x00")
    if vr in _NUMBER_VRS:
        return "\\".join(v.strip(" \x00") for v in text.rstrip(" \x00").split("\\"))
    if vr == "PN" or vr in _TEXT_VRS:  # a person name keeps each component as written
        return text.rstrip("\x00 ")
    if vr in _SPLIT_TEXT_VRS:
        return "\\".join(v.rstrip("\x00 ") for v in text.split("\\"))
    return None


def _value(dataset: pydicom.Dataset, tag: int, vr: str) -> str | None:
    element = dataset.get_item(tag)
    if element is None:
        return None
    raw = element.value
    if isinstance(raw, bytes) and element.VR in (vr, None):
        text = _fast_text(raw, vr)
        if text is not None:
            return text if text.strip() else None
    return _text(dataset[tag].value)


# A header is parsed from the first bytes of the file, read in one call (no seek per
# element); a longer header needs more. Without a DICM preamble pydicom is forced to parse
# whatever it is given, so what such a read may consume is bounded.
CHUNK_BYTES = 64 * 1024
MAX_FORCED_BYTES = 4 * 1024 * 1024
# The first element of a dataset without preamble: the group of a file meta (0002) or of
# the usual first groups (0008 identifying, 0010 patient, 0018, 0020), little or big endian.
_FIRST_GROUPS = frozenset(
    g.to_bytes(2, order)
    for g in (0x0002, 0x0008, 0x0010, 0x0018, 0x0020)
    for order in ("little", "big")
)
NOT_DICOM = "not DICOM (no DICM preamble and no DICOM identifiers)"
MEMBER_HEADER_TOO_LONG = (
    "a DICOM header longer than the first 8 MiB of an archive member, which is all that is "
    "read of one: unpack the archive and sort the file"
)


def _could_be_dicom(head: bytes, preamble: bool) -> bool:
    """Decide from the first bytes: a DICM preamble, or a first element of a usual group."""
    return preamble or (len(head) >= 8 and head[:2] in _FIRST_GROUPS)


def _parse(data: bytes, tags: list[str], force: bool, whole: bool) -> pydicom.Dataset | None:
    """The dataset parsed from data, or None if its header goes on past data (``whole``:
    data is the entire file, so whatever is parsed is all there is)."""
    buffer = io.BytesIO(data)
    try:
        dataset = _pydicom().dcmread(
            buffer, stop_before_pixels=True, specific_tags=tags, force=force
        )
    except Exception:
        if whole:
            raise
        return None  # most likely cut in the middle of an element
    return dataset if whole or buffer.tell() < len(data) else None


class NotARegularFile(OSError):
    """The path is no longer a regular file (a FIFO, a device) though the walk saw one."""


def _open_input(path: str) -> int:
    """A descriptor of an input file, read only. Non-blocking: the walk that found the
    file as a regular one may be long past (the Snakefile's, before the job was even
    scheduled), and a FIFO put in its place meanwhile would otherwise block this open until
    some writer came, forever; on a regular file the flag changes nothing."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


TRUNCATED_META = "damaged DICOM: the file ends inside its file meta information (truncated)"


def _has_preamble(path: str) -> bool:
    try:
        with open(_open_input(path), "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _damaged(preamble: bool, error: Exception) -> str:
    """The skip reason of a file pydicom could not parse: damaged DICOM when it has a DICM
    preamble, else not DICOM (pydicom was only guessing)."""
    if not preamble:
        return NOT_DICOM
    return f"damaged DICOM header: {type(error).__name__}: {error}"


def _meta_state(meta: object, size: int) -> str:
    """'complete', 'truncated' (the file ends inside the file meta group) or 'missing'."""
    length = meta.get("FileMetaInformationGroupLength") if meta else None
    if isinstance(length, int) and 144 + length > size:  # preamble, DICM, its own 12 bytes
        return "truncated"
    return "complete" if meta and meta.get("TransferSyntaxUID") else "missing"


def _read(path: str, keywords: list[str]) -> tuple[pydicom.Dataset | None, bool, int]:
    """(dataset or None if the first bytes rule DICOM out, preamble?, size)."""
    with open(_open_input(path), "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(path)
        return _read_from(handle, info.st_size, keywords)


class HeaderTooLong(Exception):
    """The header goes on past the bytes of an archive member that were read."""


def _read_from(
    handle: BinaryIO, size: int, keywords: list[str], whole_file: bool = True
) -> tuple[pydicom.Dataset | None, bool, int]:
    """_read of a file already open at its start (seekable), size bytes long; whole_file:
    the handle holds all of them (else only its first bytes: an archive member's)."""
    if size == 0:
        return None, False, 0
    data = handle.read(CHUNK_BYTES)
    preamble = data[128:132] == b"DICM"
    if not _could_be_dicom(data, preamble):
        return None, False, size
    if preamble:
        dataset = _parse(data, keywords, False, len(data) >= size)
        if dataset is None:  # a long header: parse it from the file
            if not whole_file:
                raise HeaderTooLong(MEMBER_HEADER_TOO_LONG)
            handle.seek(0)
            dataset = _pydicom().dcmread(handle, stop_before_pixels=True, specific_tags=keywords)
        return dataset, True, size
    # Forced reads of junk make pydicom warn about what it guesses; the skip reason
    # says what matters, so the job log is not flooded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = _parse(data, keywords, True, len(data) >= size)
        if dataset is None:
            data += handle.read(MAX_FORCED_BYTES - len(data))
            dataset = _parse(data, keywords, True, True)
    return dataset, False, size


@cache
def _scan_plan(keywords: tuple[str, ...]) -> scanner.Wanted | None:
    """What the scanner looks for, or None when a keyword's VR is one it leaves to pydicom
    (only values ``_fast_text`` prints as pydicom does are scanned)."""
    dataset_tags, meta_keywords = _tags(keywords)
    meta = dict.fromkeys(FILE_META_TAGS + meta_keywords + ["MediaStorageSOPInstanceUID"])
    dataset = {tag: (keyword, vr) for keyword, tag, vr in dataset_tags}
    dataset[_CHARACTER_SET_TAG] = (_CHARACTER_SET, "CS")
    meta_tags = {_META_TAG[k][0]: (k, _META_TAG[k][1]) for k in meta}
    if any(vr not in _SCANNED_VRS for _, vr in [*dataset.values(), *meta_tags.values()]):
        return None
    return scanner.Wanted(dataset, meta_tags)


_SCANNED_VRS = _ASCII_VRS | _NUMBER_VRS | _SPLIT_TEXT_VRS | _TEXT_VRS
_CHARACTER_SET, _CHARACTER_SET_TAG = "SpecificCharacterSet", 0x00080005
# Character sets decoded here without escape sequences, as pydicom names their codecs.
_CODECS = {b"ISO_IR 100": "latin_1", b"ISO_IR 192": "UTF8"}
# Most headers end well within this; a longer one is read again up to CHUNK_BYTES.
FIRST_READ_BYTES = 16 * 1024


def _scanned_header(path: str, keywords: list[str]) -> dict[str, str | None] | None:
    """read_header's result for the usual sortable file, from the scanner; None for
    anything else (then pydicom reads it, and decides any skip reason)."""
    wanted = _scan_plan(tuple(keywords))
    if wanted is None:
        return None
    try:
        fd = _open_input(path)
    except OSError:
        return None
    try:
        return _scanned(lambda count: os.read(fd, count), wanted, keywords)
    except OSError:
        return None
    finally:
        os.close(fd)


def _scanned(
    read: Callable[[int], bytes], wanted: scanner.Wanted, keywords: list[str]
) -> dict[str, str | None] | None:
    """_scanned_header of what read (count -> bytes, fewer only at the end) gives."""
    data = read(FIRST_READ_BYTES)
    try:
        found = scanner.scan(data, wanted, len(data) < FIRST_READ_BYTES)
    except scanner.NeedMore:
        data += read(CHUNK_BYTES - len(data))
        try:
            found = scanner.scan(data, wanted, len(data) < CHUNK_BYTES)
        except scanner.NeedMore:
            return None
    if found is None:
        return None
    values, meta = found
    character_set = (values.get(_CHARACTER_SET) or b"").rstrip(b" \x00")
    if b"\x00" in character_set:
        return None  # pydicom refuses it ("embedded null character")
    codec = _CODECS.get(character_set)
    result: dict[str, str | None] = {}
    for raw, (keyword, vr) in [
        *((values.get(k), (k, vr)) for k, vr in wanted.dataset.values()),
        *((meta.get(k), (k, vr)) for k, vr in wanted.meta.values()),
    ]:
        if raw is None:
            result[keyword] = None
            continue
        text = _fast_text(raw, vr, codec)
        if text is None:
            return None
        result[keyword] = text if text.strip() else None
    if _CHARACTER_SET not in keywords:
        del result[_CHARACTER_SET]
    instance_in_meta = result.pop("MediaStorageSOPInstanceUID")
    if "MediaStorageSOPInstanceUID" in keywords:
        result["MediaStorageSOPInstanceUID"] = instance_in_meta
    if "SOPInstanceUID" in result and not result["SOPInstanceUID"]:
        # Part 10 repeats the instance UID in the file meta; anonymisers keep it.
        result["SOPInstanceUID"] = instance_in_meta
    if DICOMDIR_SOP_CLASS in (result.get("MediaStorageSOPClassUID"), result.get("SOPClassUID")):
        return None
    if not any(_looks_like_uid(result.get(k)) for k in _IDENTIFYING_UIDS):
        return None
    return {**result, "skip_reason": None}


def read_header(path: str, keywords: list[str]) -> dict[str, str | None]:
    """The requested tags of one file (file-meta keywords from its file meta), plus
    ``skip_reason`` (None when it is sortable DICOM).

    Reads only the header, from the first CHUNK_BYTES when they hold it. Sortable: a file
    with a DICM preamble and a complete file meta group (UIDs or not: anonymisers strip
    them), or any file carrying a SOP, series or study UID. Never raises for a bad file:
    the reason goes into the result instead.
    """
    return _scanned_header(path, keywords) or _header_by_pydicom(path, keywords)


def member_header(data: bytes, size: int, keywords: list[str]) -> dict[str, str | None]:
    """read_header of an archive member of size bytes, from data: its first bytes, all of
    them up to archives.HEAD_BYTES (a header longer than that is not read: damaged)."""
    wanted = _scan_plan(tuple(keywords))
    if wanted is not None:
        found = _scanned(io.BytesIO(data).read, wanted, keywords)
        if found is not None:
            return found
    return _pydicom_header(
        lambda tags: _read_from(io.BytesIO(data), size, tags, len(data) >= size),
        lambda: data[128:132] == b"DICM",
        keywords,
    )


def _header_by_pydicom(path: str, keywords: list[str]) -> dict[str, str | None]:
    return _pydicom_header(lambda tags: _read(path, tags), lambda: _has_preamble(path), keywords)


def _pydicom_header(
    read: Callable[[list[str]], tuple], preamble_of: Callable[[], bool], keywords: list[str]
) -> dict[str, str | None]:
    """read_header by pydicom; read: _read of the file for these keywords; preamble_of:
    whether the file has a DICM preamble (asked only when pydicom failed)."""
    dataset_tags, meta_keywords = _tags(tuple(keywords))
    wanted = [keyword for keyword, _, _ in dataset_tags]
    result: dict[str, str | None] = dict.fromkeys(wanted + FILE_META_TAGS + meta_keywords)
    instance_from_meta = False
    try:
        dataset, preamble, size = read(wanted)
        if size == 0:
            return {**result, "skip_reason": "empty file (0 bytes)"}
        if dataset is None:
            return {**result, "skip_reason": NOT_DICOM}
        for keyword, tag, vr in dataset_tags:
            result[keyword] = _value(dataset, tag, vr)
        meta = getattr(dataset, "file_meta", None)
        if meta:
            for keyword in dict.fromkeys(FILE_META_TAGS + meta_keywords):
                result[keyword] = _value(meta, *_META_TAG[keyword])
            if "SOPInstanceUID" in result and not result["SOPInstanceUID"]:
                # Part 10 repeats the instance UID in the file meta; anonymisers keep it.
                result["SOPInstanceUID"] = _value(meta, *_META_TAG["MediaStorageSOPInstanceUID"])
                instance_from_meta = True
    except HeaderTooLong as error:
        return {**result, "skip_reason": str(error)}
    except NotARegularFile:  # replaced since the walk: by a FIFO, a link to a device
        return {**result, "skip_reason": SKIP_REASONS[inventory.SPECIAL]}
    except PermissionError:
        return {**result, "skip_reason": "unreadable: permission denied"}
    except OSError as error:
        if error.errno is not None:  # the system's error; pydicom raises bare OSErrors
            return {**result, "skip_reason": f"unreadable: {error.strerror or error}"}
        return {**result, "skip_reason": _damaged(preamble_of(), error)}
    except Exception as error:  # pydicom raises many types on damaged data
        return {**result, "skip_reason": _damaged(preamble_of(), error)}
    if DICOMDIR_SOP_CLASS in (result.get("MediaStorageSOPClassUID"), result.get("SOPClassUID")):
        return {**result, "skip_reason": "DICOMDIR (an index of a DICOM medium, not an image)"}
    own_uids = [k for k in _IDENTIFYING_UIDS if not (k == "SOPInstanceUID" and instance_from_meta)]
    if (
        preamble
        and _meta_state(meta, size) == "truncated"
        and not any(_looks_like_uid(result.get(k)) for k in own_uids)
    ):
        # Nothing after the file meta: an instance UID from it may be cut short too.
        return {**result, "skip_reason": TRUNCATED_META}
    if any(_looks_like_uid(result.get(k)) for k in _IDENTIFYING_UIDS):
        return {**result, "skip_reason": None}
    if not preamble:
        return {**result, "skip_reason": NOT_DICOM}
    state = _meta_state(meta, size)
    if state == "complete":
        return {**result, "skip_reason": None}
    if state == "truncated":
        reason = TRUNCATED_META
    elif meta:
        reason = (
            "damaged DICOM: file meta information without a transfer syntax, and no SOP, "
            "series or study UID"
        )
    else:
        reason = "damaged DICOM: a DICM preamble, but no file meta information and no UIDs"
    return {**result, "skip_reason": reason}


def manifest_schema(keywords: list[str]) -> pa.Schema:
    fields = [
        pa.field("folder", pa.string()),
        pa.field("relpath", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("ctime_ns", pa.int64()),
        pa.field("ino", pa.uint64()),
        pa.field("dicom", pa.bool_()),
        pa.field("skip_reason", pa.string()),
    ]
    dataset, meta = split_keywords(keywords)
    fields += [pa.field(k, pa.string()) for k in dataset + meta]
    return pa.schema(fields)


def _previous_manifest(
    manifest: Path, fingerprint: str, schema: pa.Schema
) -> tuple[pa.Table | None, dict[tuple[str, int, int, int, int], dict]]:
    """One read of a folder's last manifest: the whole table if nothing in the folder
    changed, else its rows by file version (inventory.Entry.version) to reuse for unchanged
    files. Either only if it has every column now needed (a template may ask for a new
    keyword; a v0.3 manifest has no ctime or inode, so its files are read again)."""
    try:
        previous = read_parquet(manifest)
    except (OSError, pa.ArrowException):
        return None, {}
    if not set(schema.names).issubset(previous.column_names):
        return None, {}
    if (previous.schema.metadata or {}).get(b"fingerprint") == fingerprint.encode():
        return previous.select(schema.names).cast(schema), {}
    return None, _reusable(previous.to_pylist())


def _reusable(rows: list[dict]) -> dict[tuple, dict | list[dict]]:
    """Earlier manifest rows by file version (inventory.Entry.version), and the rows of each
    archive's members by the archive's version without its size (``_members_key``)."""
    reusable: dict[tuple, dict | list[dict]] = {}
    for r in rows:
        relpath = r["relpath"]
        if archives.is_member(relpath):
            key = _members_key(archives.split(relpath)[0], r["mtime_ns"], r["ctime_ns"], r["ino"])
            reusable.setdefault(key, []).append(r)
        else:
            reusable[(relpath, r["size"], r["mtime_ns"], r["ctime_ns"], r["ino"])] = r
    return reusable


def _members_key(archive: str, mtime_ns: int, ctime_ns: int, ino: int) -> tuple[str, int, int, int]:
    """Where _reusable keeps the member rows of an archive: its relpath and version without
    its size (each member's row holds the member's own size)."""
    return (archive, mtime_ns, ctime_ns, ino)


def _members_key_of(entry: inventory.Entry) -> tuple[str, int, int, int]:
    """_members_key of the file an entry is (if it is an archive)."""
    return _members_key(entry.relpath, entry.mtime_ns, entry.ctime_ns, entry.ino)


FINGERPRINTS = "folder_fingerprints"  # batch manifest metadata: folder -> fingerprint


def _earlier_versions(path: Path, batch: int) -> list[Path]:
    """The batch's earlier manifests or logs beside path (``batch-<n>-<fingerprint>.*``),
    newest first: its name changes whenever the batch's files do."""
    siblings = path.parent.glob(f"batch-{batch}-*{path.suffix}")
    return sorted((p for p in siblings if p != path), key=lambda p: p.stat().st_mtime, reverse=True)


def _previous_batch(output: Path, batch: int, schema: pa.Schema) -> tuple[pa.Table, dict[str, str]]:
    """The batch's last manifest and the fingerprint of each folder it holds: a rerun takes
    the rows of unchanged folders from it in one read, instead of one read per folder
    (1,000 folder manifests took seconds). Empty if there is none, it is unreadable or it
    lacks a column now needed (a template may ask for a new keyword)."""
    earlier_files = _earlier_versions(output, batch)
    if not earlier_files:
        return schema.empty_table(), {}
    try:
        earlier = read_parquet(earlier_files[0])
        fingerprints = json.loads((earlier.schema.metadata or {}).get(FINGERPRINTS.encode(), b"{}"))
    except (OSError, ValueError, pa.ArrowException):
        return schema.empty_table(), {}
    if not set(schema.names).issubset(earlier.column_names):
        return schema.empty_table(), {}
    return earlier.select(schema.names).cast(schema), fingerprints


@dataclass(frozen=True)
class _FolderReader:
    """Reads one changed folder's new headers and writes its manifest: a task for a worker.
    A whole folder per task, so each manifest is written where its rows are made (the
    parent only gathers tables); headers are cheap enough (the scanner) that a big folder
    read by one worker still keeps pace. Not so an archive, whose members are read in full
    (``_member_header``): a folder that holds big files is read as pieces (``_pieces``),
    each returning its headers, and its manifest is written by the parent."""

    input_dir: Path
    keywords: tuple[str, ...]
    schema: pa.Schema
    manifests: Path

    def __call__(self, task: tuple) -> tuple[str, pa.Table | None, dict, int]:
        """(folder, its table, {}, files read) of a whole folder's task (folder, entries,
        fingerprint, reusable); (folder, None, headers by relpath, files read) of a piece's
        task (folder, relpaths)."""
        keywords = list(self.keywords)
        if len(task) == 2:
            folder, paths = task
            headers = {r: _file_or_archive(self.input_dir, r, keywords) for r in paths}
            return folder, None, headers, len(paths)
        folder, entries, fingerprint, reusable = task
        paths = _to_read(entries, reusable)
        headers = {r: _file_or_archive(self.input_dir, r, keywords) for r in paths}
        table = _write_folder_manifest(
            folder, entries, fingerprint, reusable, headers, self.schema, self.manifests
        )
        return folder, table, {}, len(paths)


# A file to read at least this big is read as a task of its own: it is an archive, likely,
# read to its end, and the archives of one folder (a folder of exports) would otherwise
# all be read by one worker (measured: 40 zips of 30 MB in one folder, issue 19).
PIECE_BYTES = 4 * 1024 * 1024


def _pieces(entries: list[inventory.Entry], reusable: dict) -> list[list[str]]:
    """The files of a folder to read, as tasks: each of PIECE_BYTES or more alone (first:
    the long tasks), the others together."""
    sizes = {e.relpath: e.size for e in entries}
    paths = _to_read(entries, reusable)
    small = [r for r in paths if sizes[r] < PIECE_BYTES]
    return [[r] for r in paths if sizes[r] >= PIECE_BYTES] + ([small] if small else [])


def _file_or_archive(input_dir: Path, relpath: str, keywords: list[str]) -> dict | list:
    """read_header of one input file; for an archive, the rows of its members instead
    (``read_archive``)."""
    path = inventory.source_path(input_dir, relpath)
    header = read_header(path, keywords)
    if header["skip_reason"] == NOT_DICOM:  # the one reason an archive is given
        members = read_archive(path, relpath, keywords)
        if members is not None:
            return members
    return header


def read_archive(path: str, relpath: str, keywords: list[str]) -> list[dict] | None:
    """The manifest rows (relpath, size and header; no file version) of an archive's
    members, or None if the file at path is no archive. An archive that holds no file, or
    could not be read to its end, has a row of its own too, saying so: a rerun reads it
    again only once it changed (docs/design.md "Archives")."""
    try:
        handle, _ = archives.open_input(path)
    except OSError:
        return None
    rows = []
    with handle:
        archive_kind = archives.kind(handle.read(512))
        if archive_kind is None:
            return None
        handle.seek(0)
        try:
            for member in archives.members(handle, archive_kind):
                member_relpath = archives.relpath_of(relpath, member.key)
                if member.open is None:
                    header = {"skip_reason": member.skip_reason}
                else:
                    header = _member_header(member, keywords)
                rows.append({"relpath": member_relpath, "size": member.size, **header})
        except archives.READ_ERRORS as error:
            rows.append({"relpath": relpath, "skip_reason": archives.archive_reason(error)})
    if not rows:
        rows.append({"relpath": relpath, "skip_reason": archives.EMPTY})
    return rows


def _member_header(member: archives.Member, keywords: list[str]) -> dict[str, str | None]:
    """read_header of one member: from its first CHUNK_BYTES, or up to archives.HEAD_BYTES
    when those did not make it sortable. The rest is read too, and dropped: zipfile checks
    a member's CRC at its end, so a damaged member is skipped here with its reason, not
    found only by a transfer that then fails on every run (a tar stream is read through
    anyway, to reach the next member)."""
    try:
        with member.open() as stream:
            data = archives.read_exactly(stream, min(member.size, CHUNK_BYTES))
            header = member_header(data, member.size, keywords)
            if header["skip_reason"] and len(data) < min(member.size, archives.HEAD_BYTES):
                data += archives.read_exactly(stream, archives.HEAD_BYTES - len(data))
                header = member_header(data, member.size, keywords)
            while stream.read(archives.COPY_BYTES):
                pass
        if header["skip_reason"] == NOT_DICOM and archives.kind(data[:512]):
            return {"skip_reason": archives.NESTED}
    except NotImplementedError as error:  # a zip compression method Python lacks
        return {"skip_reason": f"{archives.UNSUPPORTED}: {error}"}
    except archives.READ_ERRORS as error:
        return {"skip_reason": archives.member_reason(error)}
    return header


@contextmanager
def _folder_reader(reader: _FolderReader, workers: int) -> Iterator[Callable]:
    """A function mapping folder tasks to their results as they finish: in a pool of
    processes when workers > 1 (parsing is CPU-bound and holds the GIL). The pool is forked
    once per job, and forked workers inherit the imports: no start-up cost per worker."""
    if workers <= 1:
        yield lambda tasks: map(reader, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield lambda tasks: pool.imap_unordered(reader, tasks)


def _remove_manifests_of_removed_folders(
    manifests: Path, folders: set[str], batch: int, batches: int
) -> None:
    """A folder gone from the input takes its manifest with it (its sorted copies stay)."""
    for path in manifests.glob("*.parquet"):
        folder = inventory.folder_of_manifest(path.name)
        if folder is None:  # a shortened name: the folder is in the manifest's metadata
            try:
                metadata = pq.read_schema(path).metadata or {}
            except (OSError, pa.ArrowException):
                metadata = {}
            if b"folder" not in metadata:
                path.unlink()  # unreadable or foreign: rewritten if its folder still exists
                continue
            folder = metadata[b"folder"].decode()
        if inventory.batch_of(folder, batches) == batch and folder not in folders:
            path.unlink()


# Rows per parquet row group of a batch manifest: a reader decodes one group at a time, so
# smaller groups lower the plan's peak memory (measured: 100 -> 82 MB at 100,000 rows).
ROW_GROUP = 16_384


def _to_read(entries: list[inventory.Entry], reusable: dict) -> list[str]:
    """Files of a folder whose header must be read: new, or changed since the last read."""
    return [
        e.relpath
        for e in entries
        if e.kind == inventory.FILE
        and e.version not in reusable
        and _members_key_of(e) not in reusable
    ]


def _reuse_after_linking(changed: Iterable[tuple[list, str, dict]], state_dir: Path) -> None:
    """Add to each folder's reusable rows the files whose one change since their header was
    read is a hard link dcmsort made to them: linking changes an input's ctime (its link
    count), and the transfer commits a new link's input as it is after linking. A file
    whose earlier row differs from it in ctime alone, and whose current version the ledger
    holds as hard-linked, is that file as it was read: hardlink mode reads no header twice.
    The ledger is read once, and only when such a file exists."""
    candidates: dict[tuple, tuple[dict, dict]] = {}  # version -> (reusable, earlier row)
    for entries, _, reusable in changed:
        if not reusable:
            continue
        by_inode = {
            (r["relpath"], r["size"], r["mtime_ns"], r["ino"]): r
            for r in reusable.values()
            if isinstance(r, dict)  # not an archive's members: those are never linked
        }
        for entry in entries:
            if entry.kind == inventory.FILE and entry.version not in reusable:
                row = by_inode.get((entry.relpath, entry.size, entry.mtime_ns, entry.ino))
                if row is not None:
                    candidates[entry.version] = (reusable, row)
    if not candidates:
        return
    committed = ledger.read(state_dir, [*ledger.SOURCE_KEY, "mode"])
    linked = committed.filter(pc.equal(committed["mode"], "hardlink"))
    versions = pa.table(
        {name: [v[i] for v in candidates] for i, name in enumerate(ledger.SOURCE_KEY)}
    )
    held = ledger.rows_by_key(versions, linked, keep="found")
    for version in zip(*(held[name].to_pylist() for name in ledger.SOURCE_KEY), strict=True):
        reusable, row = candidates[version]
        reusable[version] = {**row, "ctime_ns": version[3]}


def _write_folder_manifest(
    folder: str,
    entries: list[inventory.Entry],
    fingerprint: str,
    reusable: dict,
    headers: dict[str, dict],
    schema: pa.Schema,
    manifests: Path,
) -> pa.Table:
    """One folder's manifest: read headers for new files, earlier rows for the others."""
    rows = []
    for entry in entries:
        if entry.relpath in headers:
            found = headers[entry.relpath]
        elif entry.kind == inventory.FILE:
            rows += reusable.get(_members_key_of(entry), [])  # an archive's members
            if entry.version in reusable:
                rows.append(reusable[entry.version])
            continue
        else:
            found = {"skip_reason": SKIP_REASONS[entry.kind]}
        # An archive's members (read_archive) have a relpath and size of their own.
        for header in found if isinstance(found, list) else [found]:
            rows.append(
                {
                    "folder": folder,
                    "relpath": entry.relpath,
                    "size": entry.size,
                    "mtime_ns": entry.mtime_ns,
                    "ctime_ns": entry.ctime_ns,
                    "ino": entry.ino,
                    **header,
                    "dicom": header["skip_reason"] is None,
                }
            )
    table = pa.Table.from_pylist(
        rows, schema=schema.with_metadata({"fingerprint": fingerprint, "folder": folder})
    )
    with atomic_path(manifests / inventory.manifest_name(folder)) as tmp:
        pq.write_table(table, tmp)
    return table


def extract_batch(
    input_dir: Path,
    batch: int,
    batches: int,
    keywords: list[str],
    manifests: Path,
    output: Path,
    workers: int = 1,
    log_file: Path | None = None,
    state_dir: Path | None = None,
    walks: dict[str, list[inventory.Entry]] | None = None,
) -> dict[str, int]:
    """Update the manifest of every folder in one batch, reading only new or changed files,
    and write the batch manifest (all its folders' rows) for the plan stage. Earlier
    versions of the batch manifest (and of ``log_file``) are removed. ``state_dir``: where
    the ledger is, which tells which inputs changed only by a hard link dcmsort made.
    ``walks``: the batch's folders as the Snakefile walked them (inventory.load_walk), else
    they are walked here."""
    keywords = list(dict.fromkeys(MANIFEST_TAGS + keywords))
    schema = manifest_schema(keywords)
    if walks is None:
        folders = [
            f for f in inventory.list_folders(input_dir) if inventory.batch_of(f, batches) == batch
        ]
        walks = inventory.walk_folders(input_dir, folders)
    folders = sorted(walks)
    permissions.make_folders(manifests)  # the state folder's mode (group shares)
    _remove_manifests_of_removed_folders(manifests, set(folders), batch, batches)
    current: dict[str, pa.Table] = {}
    changed: dict[str, tuple[list[inventory.Entry], str, dict]] = {}
    fingerprints: dict[str, str] = {}
    earlier, earlier_fingerprints = _previous_batch(output, batch, schema)
    for folder in folders:
        entries = walks[folder]
        fingerprint = fingerprints[folder] = inventory.fingerprint(entries)
        if earlier_fingerprints.get(folder) == fingerprint:
            continue  # its rows are in the last batch manifest: one read for all of them
        manifest = manifests / inventory.manifest_name(folder)
        table, reusable = (
            _previous_manifest(manifest, fingerprint, schema) if manifest.exists() else (None, {})
        )
        if table is not None:
            current[folder] = table
            continue
        changed[folder] = (entries, fingerprint, reusable)
    if state_dir is not None:
        _reuse_after_linking(changed.values(), state_dir)
    to_read = sum(len(_to_read(entries, reusable)) for entries, _, reusable in changed.values())
    stage = "extract" if batches == 1 else f"extract batch {batch}"  # jobs side by side
    progress = Progress(stage, to_read, log)
    reader = _FolderReader(input_dir, tuple(keywords), schema, manifests)
    pieces: dict[str, list] = {}  # folder read in pieces -> [pieces left, headers so far]
    tasks: list[tuple] = []
    for folder, (entries, fingerprint, reusable) in changed.items():
        folder_pieces = _pieces(entries, reusable) if workers > 1 else []
        if len(folder_pieces) > 1:
            pieces[folder] = [len(folder_pieces), {}]
            tasks[:0] = [(folder, piece) for piece in folder_pieces]  # the long ones first
        else:
            tasks.append((folder, entries, fingerprint, reusable))
    with _folder_reader(reader, workers) as read_folders:
        for folder, table, headers, read in read_folders(tasks):
            progress.advance(read)
            if table is None:
                waiting = pieces[folder]
                waiting[0] -= 1
                waiting[1].update(headers)
                if waiting[0]:
                    continue
                entries, fingerprint, reusable = changed[folder]
                table = _write_folder_manifest(
                    folder, entries, fingerprint, reusable, waiting[1], schema, manifests
                )
            current[folder] = table
    progress.finish()
    unchanged = [f for f in folders if f not in current]
    tables = [current[f].replace_schema_metadata(None) for f in folders if f in current]
    if unchanged:
        tables.append(earlier.filter(pc.is_in(earlier["folder"], value_set=pa.array(unchanged))))
    combined = pa.concat_tables(tables) if tables else schema.empty_table()
    stats = {
        "folders": len(folders),
        "folders_changed": len(changed),
        "files": combined.num_rows,
        "headers_read": to_read,
        # The sum of no rows is null: a folder the user emptied has none.
        "not_sortable": combined.num_rows - (pc.sum(combined["dicom"]).as_py() or 0),
    }
    combined = combined.replace_schema_metadata(
        {
            "extracted_at": str(time.time()),
            **{k: str(v) for k, v in stats.items()},
            FINGERPRINTS: json.dumps(fingerprints, ensure_ascii=False),
        }
    )
    with atomic_path(output) as tmp:
        pq.write_table(combined, tmp, row_group_size=ROW_GROUP)
    for stale in _earlier_versions(output, batch):  # replaced by the one just written
        stale.unlink(missing_ok=True)
    walk = inventory.walk_path(output)  # read; and those of runs killed before their read
    for stale in walk.parent.glob(f"batch-{batch}-*{walk.suffix}"):
        stale.unlink(missing_ok=True)
    if log_file is not None:
        for stale in _earlier_versions(log_file, batch):
            stale.unlink(missing_ok=True)
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
    parser.add_argument("--workers", type=int, default=1, help="processes reading headers")
    parser.add_argument("--log", type=Path, help="this job's log (earlier ones are removed)")
    parser.add_argument("--state-dir", type=Path, help="the state folder (holds the ledger)")
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
        args.workers,
        args.log,
        args.state_dir,
        # Only the walk its manifest is named after (batch-<n>-<fingerprint>.parquet).
        inventory.load_walk(inventory.walk_path(args.output), args.output.stem.rpartition("-")[2]),
    )
    log.info(
        "batch %d: %d folders (%d changed), %d files, %d headers read, %d not sortable, "
        "%d workers, %.2f s, peak RSS %d MB",
        args.batch,
        stats["folders"],
        stats["folders_changed"],
        stats["files"],
        stats["headers_read"],
        stats["not_sortable"],
        args.workers,
        time.perf_counter() - started,
        peak_rss_mb(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
