"""The header scanner gives pydicom's values, or steps aside for pydicom.

Oracle: for every file, what ``read_header`` records must equal what pydicom alone reads.
The scanner must also really be used for the usual file (else it is dead weight)."""

from __future__ import annotations

import os
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
