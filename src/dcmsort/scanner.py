"""The few header values dcmsort needs, read without pydicom in the common case.

pydicom builds a Python object for every element it reads; the plan needs about fifteen
values. For the usual file - a DICM preamble, a file meta group, a little-endian dataset in
explicit or implicit VR, text in ASCII, Latin-1 or UTF-8 - ``scan`` walks the elements up to
the pixel data with ``struct``, keeping the raw bytes of the values it needs and skipping
the others without decoding them. It returns None for anything else (big endian,
deflated, a VR unlike the dictionary's, elements out of order or repeated, a sequence it
cannot walk, a header longer than the bytes given, damage before the pixel data): the
caller then reads the file with pydicom, so every value is the one pydicom gives.
tests/test_scanner.py compares the two on pydicom's own test files, generated ones and
hand-made damaged ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_TAG_LENGTH = struct.Struct("<HHL")  # group, element, 32-bit length (implicit VR, items)
_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length (explicit VR)
_LONG_LENGTH = struct.Struct("<L")
# Explicit-VR elements with these VRs have 2 reserved bytes and a 32-bit length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_IMPLICIT_LITTLE = "1.2.840.10008.1.2"
# Big endian and deflated datasets are left to pydicom.
_NOT_SCANNED = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
_MAX_DEPTH = 8  # nested sequences walked; deeper is left to pydicom


class NeedMore(Exception):
    """The header goes on past the bytes given."""


class _Unsupported(Exception):
    """Something only pydicom should decide."""


@dataclass(frozen=True)
class Wanted:
    """Tags to read: dataset tags with their dictionary VR, file meta tags apart."""

    dataset: dict[int, tuple[str, str]]  # tag -> (keyword, VR)
    meta: dict[int, tuple[str, str]]


def _element(data: bytes, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at pos."""
    if len(data) < pos + 8:
        raise NeedMore
    if not explicit:
        group, element, length = _TAG_LENGTH.unpack_from(data, pos)
        return group << 16 | element, None, length, pos + 8
    group, element, vr, length = _SHORT.unpack_from(data, pos)
    if group == 0xFFFE:  # items and delimiters have no VR in any encoding
        group, element, length = _TAG_LENGTH.unpack_from(data, pos)
        return group << 16 | element, None, length, pos + 8
    if vr in _SHORT_VRS:
        return group << 16 | element, vr, length, pos + 8
    if vr in _LONG_VRS:
        if len(data) < pos + 12:
            raise NeedMore
        return group << 16 | element, vr, _LONG_LENGTH.unpack_from(data, pos + 8)[0], pos + 12
    raise _Unsupported


def _skip_sequence(data: bytes, pos: int, explicit: bool, depth: int) -> int:
    """The offset after an undefined-length sequence whose items start at pos."""
    if depth > _MAX_DEPTH:
        raise _Unsupported
    while True:
        tag, _, length, pos = _element(data, pos, False)  # item tags carry no VR
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unsupported
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements, up to the item end
            tag, vr, length, value = _element(data, pos, explicit)
            if tag == _ITEM_END:
                pos = value
                break
            if length == _UNDEFINED:
                if vr not in (b"SQ", None):
                    raise _Unsupported  # e.g. UN holding implicit VR: pydicom's to read
                pos = _skip_sequence(data, value, explicit, depth + 1)
            else:
                pos = value + length


def scan(data: bytes, wanted: Wanted, whole: bool) -> tuple[dict, dict] | None:
    """({keyword: raw value}, {file meta keyword: raw value}) of the wanted tags present in
    data, each value's bytes as stored; None when pydicom must read this file. ``whole``:
    data is the entire file. Raises NeedMore when the header goes on past data."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    try:
        meta, pos = _scan_meta(data, 132, wanted)
        syntax = meta.get("TransferSyntaxUID", b"").rstrip(b" \x00")
        if not syntax or syntax.decode("ascii", "replace") in _NOT_SCANNED:
            return None
        explicit = syntax != _IMPLICIT_LITTLE.encode()
        if len(data) < pos + 6:
            raise NeedMore
        letters = data[pos + 4 : pos + 6]
        if explicit != (letters.isalpha() and letters.isupper()):
            # pydicom reads the dataset as explicit VR when its first element has two
            # upper-case letters where a VR would be, whatever the transfer syntax says
            return None
        return _scan_dataset(data, pos, explicit, wanted, whole), meta
    except _Unsupported:
        return None
    except NeedMore:
        if whole:
            return None  # the file ends inside an element: pydicom says how it is damaged
        raise


def _scan_meta(data: bytes, pos: int, wanted: Wanted) -> tuple[dict, int]:
    """The wanted file meta values (always explicit VR little endian) and where it ends."""
    meta = {}
    while True:
        if len(data) < pos + 8:
            raise NeedMore
        if data[pos : pos + 2] != b"\x02\x00":
            return meta, pos
        tag, vr, length, value = _element(data, pos, True)
        if length == _UNDEFINED:
            raise _Unsupported
        if len(data) < value + length:
            raise NeedMore
        if tag in wanted.meta:
            if vr.decode() != wanted.meta[tag][1]:
                raise _Unsupported
            meta[wanted.meta[tag][0]] = data[value : value + length]
        pos = value + length


def _scan_dataset(data: bytes, pos: int, explicit: bool, wanted: Wanted, whole: bool) -> dict:
    """The wanted values, walking every element up to the pixel data (or the end of the
    file): pydicom reads that far, so an element out of order or repeated anywhere before
    it leaves the file to pydicom, whose rules then decide."""
    values = {}
    previous = -1
    while True:
        if whole and pos == len(data):
            return values  # the dataset ends with the file
        tag, vr, length, value = _element(data, pos, explicit)
        if tag <= previous:
            raise _Unsupported  # out of order or repeated: pydicom's rules decide
        if tag == _PIXEL_DATA:
            return values
        previous = tag
        if length == _UNDEFINED:
            if vr not in (b"SQ", None) or tag in wanted.dataset:
                raise _Unsupported
            pos = _skip_sequence(data, value, explicit, 1)
            continue
        pos = value + length
        if pos > len(data):
            raise NeedMore
        if tag in wanted.dataset:
            if vr is not None and vr.decode() != wanted.dataset[tag][1]:
                raise _Unsupported
            values[wanted.dataset[tag][0]] = data[value:pos]
