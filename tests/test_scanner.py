"""The header scanner gives pydicom's values, or steps aside for pydicom.

Oracle: for every file, what ``read_header`` records must equal what pydicom alone reads.
The scanner must also really be used for the usual file (else it is dead weight)."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from conftest import write_dicom
from dcmsort import demo, headers

TAGS = [*headers.MANIFEST_TAGS, "AccessionNumber", "BodyPartExamined"]


def _same_as_pydicom(path: str | Path, keywords: list[str] = TAGS) -> bool:
    """Whether the scanner read the file; asserts it read what pydicom reads."""
    scanned = headers._scanned_header(str(path), keywords)
    if scanned is not None:
        assert scanned == headers._header_by_pydicom(str(path), keywords), path
    assert headers.read_header(str(path), keywords) == headers._header_by_pydicom(
        str(path), keywords
    )
    return scanned is not None


def test_every_pydicom_test_file_reads_as_pydicom_reads_it():
    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    scanned = sum(_same_as_pydicom(f) for f in files)
    assert len(files) > 150 and scanned > 60  # the usual files really take the fast path


def test_every_file_of_the_messy_demo_reads_as_pydicom_reads_it(tmp_path):
    demo.generate_messy(tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    scanned = sum(_same_as_pydicom(p) for p in files)
    assert scanned > len(files) // 2


@pytest.mark.parametrize(
    ("charset", "name"),
    [("ISO_IR 100", "MÜLLER^JÖRG"), ("ISO_IR 192", "山田^太郎"), (None, "DOE^JOHN")],
)
def test_names_in_latin1_and_utf8_are_scanned_and_decoded(tmp_path, charset, name):
    path = tmp_path / "f.dcm"
    write_dicom(path, name="X")
    ds = pydicom.dcmread(path)
    if charset:
        ds.SpecificCharacterSet = charset
    else:
        del ds.SpecificCharacterSet
    ds.PatientName = name
    ds.save_as(path, enforce_file_format=True)
    assert _same_as_pydicom(path)
    assert headers.read_header(str(path), TAGS)["PatientName"] == name


def test_single_byte_sets_other_than_latin1_are_left_to_pydicom(tmp_path):
    """ISO_IR 144 (Cyrillic) "аИ" is the bytes D0 B8, which are also valid UTF-8 ("и")."""
    path = tmp_path / "f.dcm"
    write_dicom(path)
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet = "ISO_IR 144"
    ds.PatientName = "аИ^аИ"
    ds.save_as(path, enforce_file_format=True)
    assert not _same_as_pydicom(path)
    assert headers.read_header(str(path), TAGS)["PatientName"] == "аИ^аИ"


def test_iso2022_names_are_left_to_pydicom(tmp_path):
    path = tmp_path / "f.dcm"
    write_dicom(path)
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎"
    ds.save_as(path, enforce_file_format=True)
    assert not _same_as_pydicom(path)  # escape sequences: pydicom decodes them


def _with_sequences(path: Path, depth: int, undefined: bool, undefined_items: bool) -> None:
    """A file whose header has nested sequences before the patient tags."""
    write_dicom(path, name="SEQ^PATIENT", desc="WITH SEQUENCES")
    ds = pydicom.dcmread(path)
    inner = Dataset()
    inner.CodeValue = "123"
    for _ in range(depth):
        outer = Dataset()
        outer.CodeMeaning = "nested"
        outer.ConceptNameCodeSequence = Sequence([inner, inner])
        inner = outer
    ds.ProcedureCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([])  # empty sequence
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined
    for item in (i for e in ds.iterall() if e.VR == "SQ" for i in e.value):
        item.is_undefined_length_sequence_item = undefined_items
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    ("undefined", "undefined_items"), [(True, True), (True, False), (False, False)]
)
def test_sequences_of_either_length_encoding_are_skipped(tmp_path, undefined, undefined_items):
    path = tmp_path / "f.dcm"
    _with_sequences(path, 3, undefined, undefined_items)
    assert _same_as_pydicom(path)
    assert headers.read_header(str(path), TAGS)["PatientName"] == "SEQ^PATIENT"


@pytest.mark.parametrize(
    ("name", "scanned"),
    [("MR_small_implicit.dcm", True), ("MR_small_bigendian.dcm", False), ("image_dfl.dcm", False)],
)
def test_implicit_vr_is_scanned_big_endian_and_deflated_are_left_to_pydicom(name, scanned):
    assert _same_as_pydicom(get_testdata_file(name)) is scanned


def test_a_header_longer_than_the_first_read_is_read_on(tmp_path):
    path = tmp_path / "f.dcm"
    write_dicom(path, name="LONG^HEADER")
    ds = pydicom.dcmread(path)
    ds.ImageComments = "x" * (headers.FIRST_READ_BYTES + 5000)  # (0020,4000): past the tags
    ds.StudyDescription = "y" * 60
    ds.add_new(0x00091010, "OB", b"\0" * (headers.FIRST_READ_BYTES * 2))  # before them
    ds.save_as(path, enforce_file_format=True)
    assert _same_as_pydicom(path)
    assert headers.read_header(str(path), TAGS)["PatientName"] == "LONG^HEADER"


def test_a_truncated_header_gets_pydicoms_reason(tmp_path):
    data = write_dicom(tmp_path / "whole.dcm")
    for cut in (140, 300, 600):
        (tmp_path / f"cut{cut}").write_bytes(data[:cut])
        assert not _same_as_pydicom(tmp_path / f"cut{cut}")


def test_a_value_whose_vr_is_not_the_dictionarys_is_left_to_pydicom(tmp_path):
    path = tmp_path / "f.dcm"
    write_dicom(path)
    ds = pydicom.dcmread(path)
    ds.add_new(0x00200011, "LO", "5")  # SeriesNumber is IS in the dictionary
    ds.save_as(path, enforce_file_format=True)
    assert not _same_as_pydicom(path)


# --- hand-made headers: what a damaged or unusual file holds, byte for byte -------------

_LONG_VRS = {b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC"}
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def _element(tag: int, vr: bytes, value: bytes | str, explicit: bool = True) -> bytes:
    value = value if isinstance(value, bytes) else value.encode("latin-1")
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    group, element = tag >> 16, tag & 0xFFFF
    if not explicit:
        return struct.pack("<HHL", group, element, len(value)) + value
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _part10(elements: list, syntax: str = EXPLICIT, sop: bytes | str = "1.2.3.4.5") -> bytes:
    meta = b"".join(
        _element(*e)
        for e in [
            (0x00020001, b"OB", b"\0\1"),
            (0x00020002, b"UI", "1.2.840.10008.5.1.4.1.1.4"),
            (0x00020003, b"UI", sop),
            (0x00020010, b"UI", syntax),
        ]
    )
    head = b"\0" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<L", len(meta)))
    explicit = syntax != IMPLICIT
    return head + meta + b"".join(_element(t, vr, v, explicit) for t, vr, v in elements)


STANDARD = [
    (0x00080016, b"UI", "1.2.840.10008.5.1.4.1.1.4"),
    (0x00080018, b"UI", "1.2.3.4.5"),
    (0x00080060, b"CS", "MR"),
    (0x0008103E, b"LO", "T1"),
    (0x00100010, b"PN", "DOE^JOHN"),
    (0x00100020, b"LO", "12345"),
    (0x0020000D, b"UI", "1.2.3.4.6"),
    (0x0020000E, b"UI", "1.2.3.4.7"),
    (0x00200011, b"IS", "3"),
    (0x00200013, b"IS", "1"),
    (0x00280010, b"US", b"\x04\x00"),
    (0x7FE00010, b"OW", b"\0" * 32),
]


def _pydicom_value(path: Path, keyword: str) -> str | None:
    """What pydicom itself makes of a value, printed as the manifests record it."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    element = ds.file_meta.get(keyword) if keyword in ds.file_meta else ds.get(keyword)
    value = headers._text(element) if element is not None else None
    return value if value and value.strip() else None


def _write(tmp_path: Path, data: bytes, name: str = "f") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_an_element_out_of_order_anywhere_before_the_pixels_leaves_the_file_to_pydicom(tmp_path):
    early = _write(tmp_path, _part10([*STANDARD[:2], (0x00290010, b"LO", "CSA"), *STANDARD[2:]]))
    late = _write(
        tmp_path,
        _part10(
            [*STANDARD[:-1], (0x00290010, b"LO", "X"), (0x00200011, b"IS", "99"), STANDARD[-1]]
        ),
        "late",
    )
    for path in (early, late):
        assert not _same_as_pydicom(path)
    assert headers.read_header(str(early), TAGS)["PatientName"] == "DOE^JOHN"
    assert headers.read_header(str(late), TAGS)["SeriesNumber"] == "99"  # pydicom's: the last


def test_a_dataset_written_otherwise_than_its_transfer_syntax_says_is_read_as_pydicom_reads_it(
    tmp_path,
):
    # Implicit VR by its syntax, but the first element's length is two capital letters
    # ("XA": 16,728 bytes, which hold an explicit-VR name): pydicom reads on as explicit VR.
    length = 0x4158
    hidden = _element(0x00100010, b"PN", "EVIL^HIDDEN")
    first = struct.pack("<HHL", 0x0008, 0x0001, length) + hidden.ljust(length, b"\0")
    path = _write(
        tmp_path,
        _part10([], IMPLICIT)
        + first
        + b"".join(_element(t, vr, v, False) for t, vr, v in STANDARD),
    )
    assert not _same_as_pydicom(path)


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
def test_person_names_and_uids_are_stripped_as_pydicom_strips_them(tmp_path, charset):
    name = "MÜLLER \\X" if charset else "MULLER \\X"
    encoded = name.encode("utf-8" if charset == "ISO_IR 192" else "latin-1")
    elements = [(0x00080005, b"CS", charset)] if charset else []
    elements += [e for e in STANDARD if e[0] not in (0x00100010, 0x0020000E)]
    elements += [(0x00100010, b"PN", encoded), (0x0020000E, b"UI", " 1.2.3.4.7")]
    path = _write(tmp_path, _part10(sorted(elements), sop=" 1.2.3.4.5"))
    header = headers.read_header(str(path), TAGS)
    assert header["PatientName"] == _pydicom_value(path, "PatientName") == name
    assert header["SeriesInstanceUID"] == _pydicom_value(path, "SeriesInstanceUID") == "1.2.3.4.7"
    _same_as_pydicom(path)


def test_a_character_set_with_a_null_byte_gets_pydicoms_reason(tmp_path):
    path = _write(tmp_path, _part10(sorted([*STANDARD, (0x00080005, b"CS", b"ISO_IR\x00100")])))
    assert not _same_as_pydicom(path)
    assert headers.read_header(str(path), TAGS)["skip_reason"].startswith("damaged DICOM header")


def test_damaged_files_with_a_preamble_are_called_damaged_not_unreadable_or_not_dicom(tmp_path):
    whole = _part10(STANDARD)
    pixels = whole.index(b"\xe0\x7f\x10\x00")
    cut = _write(tmp_path, whole[: pixels + 6], "cut")  # inside the pixel data's header
    # A sequence of undefined length that never ends: pydicom raises a bare OSError.
    endless = _write(
        tmp_path,
        _part10(STANDARD[:4])
        + struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF),
        "endless",
    )
    for path in (cut, endless):
        reason = headers.read_header(str(path), TAGS)["skip_reason"] or ""
        if reason:
            assert reason.startswith("damaged DICOM"), (path.name, reason)
        assert not reason.startswith(("unreadable", "not DICOM")), (path.name, reason)


def test_a_file_cut_inside_its_file_meta_is_truncated_whatever_uid_survives(tmp_path):
    whole = _part10(STANDARD)
    meta_end = whole.index(b"\x08\x00\x16\x00")
    for cut in range(140, meta_end):
        path = _write(tmp_path, whole[:cut], f"cut{cut}")
        header = headers.read_header(str(path), TAGS)
        assert header["skip_reason"] is not None, cut
        assert header["skip_reason"].startswith("damaged DICOM"), (cut, header["skip_reason"])


def test_random_damage_never_crashes_and_never_makes_the_scanner_differ(tmp_path):
    original = bytearray(_part10(STANDARD))
    rng = random.Random(20261125)
    for i in range(400):
        data = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(132, len(data))] = rng.randrange(256)
        path = _write(tmp_path, bytes(data), f"flip{i}")
        _same_as_pydicom(path)
