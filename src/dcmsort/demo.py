"""Generate synthetic DICOM dumps: the demo data, the test data and the benchmark data.

``generate`` writes a realistic unsorted dump (patients → studies → series → instances, small
pixel data, nested or flat, with and without ``.dcm``), deterministic for a seed.
``generate_messy`` writes every hard case dcmsort promises to handle and returns, per file,
what must happen to it.

    python -m dcmsort.demo OUT_DIR [--patients 4 --series 3 --instances 8 --rows 64]
    python -m dcmsort.demo OUT_DIR --messy
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dcmsort import inventory

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
SOP_CLASS_OF = {"CT": CT_IMAGE, "MR": MR_IMAGE, "SR": BASIC_TEXT_SR, "RTSTRUCT": RT_STRUCTURE_SET}
SERIES_KINDS = [
    ("MR", "LOCALIZER"),
    ("MR", "T1 MPRAGE"),
    ("MR", "T2 FLAIR"),
    ("MR", "DWI b1000"),
    ("CT", "HEAD WO"),
    ("CT", "CHEST 1.25mm"),
    ("MR", "SWI"),
    ("CT", "ABDOMEN PORTAL"),
]
FAMILY = ["SMITH", "GARCIA", "MÜLLER", "NGUYEN", "ROSSI", "KOWALSKI", "OKAFOR", "TANAKA"]
GIVEN = ["ANNA", "JOHN", "LI", "FATIMA", "PETER", "MARIA", "OMAR", "SARA"]


def uid(seed: object, *parts: object) -> str:
    """A deterministic UID for the given parts (joined with a separator: generate_uid
    concatenates its sources, so (1, 10) and (11, 0) would otherwise collide)."""
    return generate_uid(entropy_srcs=["/".join(map(str, (seed, *parts)))])


@dataclass
class Series:
    patient_name: str
    patient_id: str
    study_uid: str
    study_date: str
    series_uid: str
    series_number: int | None
    description: str | None
    modality: str = "MR"
    charset: str | list[str] = "ISO_IR 192"


def make_instance(
    series: Series,
    number: int,
    sop_uid: str,
    rows: int = 16,
    rng: np.random.Generator | None = None,
) -> Dataset:
    """One instance of a series, with pixel data of rows x rows 16-bit (none for SR/RT)."""
    sop_class = SOP_CLASS_OF.get(series.modality, MR_IMAGE)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = series.charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = series.study_date
    ds.Modality = series.modality
    ds.PatientName = series.patient_name
    ds.PatientID = series.patient_id
    ds.StudyInstanceUID = series.study_uid
    ds.SeriesInstanceUID = series.series_uid
    if series.series_number is not None:
        ds.SeriesNumber = series.series_number
    if series.description is not None:
        ds.SeriesDescription = series.description
    ds.InstanceNumber = number
    if series.modality in ("CT", "MR"):
        rng = rng or np.random.default_rng(number)
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4096, (rows, rows), dtype=np.uint16).tobytes()
    return ds


def write(ds: Dataset, path: Path, preamble: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:  # a bare dataset (no preamble, no file meta), as old scanners write it
        del ds.file_meta
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True)
    return path


def generate(
    out_dir: str | Path,
    patients: int = 4,
    studies: int = 1,
    series: int = 3,
    instances: int = 8,
    rows: int = 16,
    seed: int = 0,
    junk: bool = True,
    first_patient: int = 1,
) -> list[Path]:
    """Write an unsorted dump: ``patient_<n>/`` folders, half nested with ``.dcm`` names,
    half flat without extension, plus a few non-DICOM files when ``junk``."""
    out, rnd, written = Path(out_dir), random.Random(seed), []
    rng = np.random.default_rng(seed)
    for p in range(first_patient, first_patient + patients):
        name = f"{FAMILY[p % len(FAMILY)]}^{GIVEN[(p * 3) % len(GIVEN)]}"
        folder = out / f"patient_{p}"
        for s in range(studies):
            study_uid = uid(seed, p, s)
            date = f"2024{(s % 12) + 1:02d}{(p % 28) + 1:02d}"
            for k in range(series):
                modality, description = SERIES_KINDS[(p + k) % len(SERIES_KINDS)]
                info = Series(
                    name,
                    f"PID{p:05d}",
                    study_uid,
                    date,
                    uid(seed, p, s, k),
                    k + 1,
                    description,
                    modality,
                )
                for i in range(1, instances + 1):
                    ds = make_instance(info, i, uid(seed, p, s, k, i), rows, rng)
                    if p % 2:
                        path = folder / f"study_{s + 1}" / f"series_{k + 1}" / f"IM{i:04d}.dcm"
                    else:
                        path = folder / f"{rnd.getrandbits(48):012X}"
                    written.append(write(ds, path))
        if junk:
            (folder / "Thumbs.db").write_bytes(rnd.randbytes(512))
            (folder / "notes.txt").write_text("scanned on the old console, see ticket 4711\n")
    return written


# --- the messy set -------------------------------------------------------------------------


@dataclass
class Expectation:
    """What must happen to one input file of the messy set."""

    action: str  # "sort", "duplicate" or "skip"
    folder: str | None = None  # exact expected destination folder, when it is known
    reason: str | None = None  # a word the skip reason must contain
    conflict: bool = False
    note: str = ""


def generate_messy(
    out_dir: str | Path, seed: int = 7, byte_names: bool = False
) -> dict[str, Expectation]:
    """Write every hard case of a real dump; returns relpath → Expectation. Relpaths are
    in the manifests' form (``inventory.encode_name``). ``byte_names`` adds file and folder
    names that are not UTF-8 (``IM%FF%FE.dcm``, a Latin-1 folder ``pat_%E9``)."""
    out = Path(out_dir)
    expect: dict[str, Expectation] = {}

    def series(
        key: object,
        name: str,
        pid: str,
        desc: str | None,
        number: int | None,
        study: object = 0,
        charset: str | list[str] = "ISO_IR 192",
        modality: str = "MR",
    ) -> Series:
        return Series(
            name,
            pid,
            uid(seed, "study", pid, study),
            "20240102",
            uid(seed, key),
            number,
            desc,
            modality,
            charset,
        )

    def put(
        rel: str,
        info: Series,
        number: int,
        exp: Expectation,
        preamble: bool = True,
        sop: str | None = None,
    ) -> Path:
        ds = make_instance(info, number, sop or uid(seed, rel, number))
        expect[rel] = exp
        return write(ds, out / rel, preamble)

    # Ordinary: the seed's layout exactly.
    plain = series("plain", "DOE^JOHN", "12345", "T1 MPRAGE", 3)
    # An exact copy of it is below, and sorts first (by path): this one is its duplicate.
    put("p_plain/IM1.dcm", plain, 1, Expectation("sort", "DOE^JOHN_12345/T1 MPRAGE_3"))
    put("p_plain/IM2.dcm", plain, 2, Expectation("sort", "DOE^JOHN_12345/T1 MPRAGE_3"))
    # Hostile values: path traversal, absolute paths, drive letters, control characters.
    evil = series("evil", "../../etc", "/abs/C:\\x", "a/../b", 1)
    put("p_evil/IM1", evil, 1, Expectation("sort", note="traversal stays inside output_dir"))
    ctrl = series("ctrl", "BELL\x07NAME", "NUL", "CON", 2)
    put("p_evil/IM2", ctrl, 1, Expectation("sort", note="reserved names and control characters"))
    long = series("long", "LONG^" + "X" * 60, "L1", "D" * 64, 4)
    with warnings.catch_warnings():  # over-long on purpose: real files break the limits too
        warnings.simplefilter("ignore", UserWarning)
        put("p_evil/IM3", long, 1, Expectation("sort", note="long values"))
    dots = series("dots", "TRAILING. ", "..", "T2* GRE?", 5)
    put("p_evil/IM4", dots, 1, Expectation("sort", note="dots, spaces, wildcards"))
    # Character sets: kept, not transliterated.
    latin = series("latin", "MÜLLER^HANS", "777", "Kopf nativ", 1, charset="ISO_IR 100")
    put("p_charset/latin1.dcm", latin, 1, Expectation("sort", "MÜLLER^HANS_777/Kopf nativ_1"))
    utf8 = series("utf8", "山田^太郎=やまだ^たろう", "888", "頭部", 2)
    put("p_charset/utf8.dcm", utf8, 1, Expectation("sort", "山田^太郎=やまだ^たろう_888/頭部_2"))
    jis = series(
        "jis",
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "889",
        "MR",
        3,
        charset=["", "ISO 2022 IR 87"],
    )
    put(
        "p_charset/jis.dcm",
        jis,
        1,
        Expectation("sort", "Yamada^Tarou=山田^太郎=やまだ^たろう_889/MR_3"),
    )
    korean = series(
        "ks", "Hong^Gildong=洪^吉洞=홍^길동", "890", "CT", 4, charset=["", "ISO 2022 IR 149"]
    )
    put("p_charset/ks.dcm", korean, 1, Expectation("sort", "Hong^Gildong=洪^吉洞=홍^길동_890/CT_4"))
    # Missing and empty tags: the placeholder, never None and never empty.
    bare = series("bare", "", "999", None, None)
    put("p_missing/IM1", bare, 1, Expectation("sort", "UNKNOWN_999/UNKNOWN_UNKNOWN"))
    # One patient spread over two input folders: merged into one patient folder.
    spread = series("spread", "ROE^JANE", "555", "SAG T1", 7)
    put("p_spread_a/IM1.dcm", spread, 1, Expectation("sort", "ROE^JANE_555/SAG T1_7"))
    put("p_spread_b/IM2.dcm", spread, 2, Expectation("sort", "ROE^JANE_555/SAG T1_7"))
    # Two studies, each with series 1 "LOCALIZER": two folders, not one.
    for study in (1, 2):
        loc = series(("loc", study), "ROE^JANE", "555", "LOCALIZER", 1, study=study)
        put(f"p_spread_a/loc{study}/IM1.dcm", loc, 1, Expectation("sort", note="kept apart"))
    # Two different files with the same name in one series: both kept.
    same = series("same", "DOE^JOHN", "12345", "DWI", 8)
    for sub in ("a", "b"):
        put(
            f"p_plain/{sub}/IM9.dcm",
            same,
            1 if sub == "a" else 2,
            Expectation("sort", "DOE^JOHN_12345/DWI_8"),
        )
    # An exact duplicate (another folder, same bytes) and a conflict (same UID, other bytes).
    original = out / "p_plain/IM1.dcm"
    (out / "p_dups").mkdir(parents=True)
    shutil.copyfile(original, out / "p_dups/copy_of_IM1.dcm")
    # Of two identical files the one with the shorter name is written (then the first in
    # path order), the other is reported as its duplicate: IM1.dcm, not copy_of_IM1.dcm.
    expect["p_dups/copy_of_IM1.dcm"] = Expectation("duplicate", "DOE^JOHN_12345/T1 MPRAGE_3")
    sop = uid(seed, "p_plain/IM2.dcm", 2)
    changed = make_instance(plain, 2, sop, rng=np.random.default_rng(99))
    write(changed, out / "p_dups/changed_IM2.dcm")
    expect["p_dups/changed_IM2.dcm"] = Expectation(
        "sort", "DOE^JOHN_12345/T1 MPRAGE_3", conflict=True
    )
    expect["p_plain/IM2.dcm"].conflict = True
    # Valid DICOM without the 128-byte preamble and DICM: sorted.
    put(
        "p_junk/nopreamble",
        series("nopre", "NOPRE^AMBLE", "321", "AX", 1),
        1,
        Expectation("sort", "NOPRE^AMBLE_321/AX_1"),
        preamble=False,
    )
    # Non-image objects: sorted like images (they belong to the study).
    put(
        "p_junk/report_sr",
        series("sr", "DOE^JOHN", "12345", "Report", 900, modality="SR"),
        1,
        Expectation("sort", "DOE^JOHN_12345/Report_900"),
    )
    put(
        "p_junk/rtstruct",
        series("rt", "DOE^JOHN", "12345", None, 901, modality="RTSTRUCT"),
        1,
        Expectation("sort", "DOE^JOHN_12345/UNKNOWN_901"),
    )
    # Junk of every kind: listed with a reason.
    junk = out / "p_junk"
    (junk / "Thumbs.db").write_bytes(random.Random(seed).randbytes(700))
    expect["p_junk/Thumbs.db"] = Expectation("skip", reason="not DICOM")
    (junk / "notes.txt").write_text("patient moved\n")
    expect["p_junk/notes.txt"] = Expectation("skip", reason="not DICOM")
    (junk / "empty.dcm").write_bytes(b"")
    expect["p_junk/empty.dcm"] = Expectation("skip", reason="empty")
    full = original.read_bytes()
    (junk / "truncated_header.dcm").write_bytes(full[:200])
    # Cut inside its file meta group: no transfer syntax, no instance UID, no dataset.
    expect["p_junk/truncated_header.dcm"] = Expectation("skip", reason="truncated")
    # Anonymised: an MR image with pixel data and no SOP, series or study UID in the
    # dataset; the file meta still names the instance. Sorted, with placeholders.
    anon = make_instance(series("anon", "Anon", "", "AX T2", 6), 1, uid(seed, "anon"))
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID"):
        delattr(anon, keyword)
    write(anon, out / "p_anon/IM1.dcm")
    expect["p_anon/IM1.dcm"] = Expectation("sort", "Anon_UNKNOWN/AX T2_6")
    # A Part-10 object that is only a file meta group (no dataset at all): sorted.
    meta_only = Dataset()
    meta_only.file_meta = FileMetaDataset()
    meta_only.file_meta.MediaStorageSOPClassUID = MR_IMAGE
    meta_only.file_meta.MediaStorageSOPInstanceUID = uid(seed, "meta-only")
    meta_only.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta_only.save_as(out / "p_anon/meta_only.dcm", enforce_file_format=True)
    expect["p_anon/meta_only.dcm"] = Expectation("sort", "UNKNOWN_UNKNOWN/UNKNOWN_UNKNOWN")
    # A hashed unsafe file name keeps its extension last.
    put(
        "p_names/IM:0001.dcm",
        series("colon", "NAME^COLON", "601", "AX", 1),
        1,
        Expectation("sort", "NAME^COLON_601/AX_1"),
    )
    # Long names: a 250-byte file name (its temporary name must still fit 255 bytes) and a
    # 240-byte folder name (its manifest's file name must too).
    long_file = "p_names/" + "I" * 246 + ".dcm"
    put(long_file, series("longfile", "LONG^FILE", "602", "AX", 1), 1, Expectation("sort"))
    long_folder = "長" * 80
    put(
        f"{long_folder}/IM1.dcm",
        series("longfolder", "LONG^FOLDER", "603", "AX", 1),
        1,
        Expectation("sort", "LONG^FOLDER_603/AX_1"),
    )
    if byte_names:
        for raw, key in ((b"p_names/IM\xff\xfe.dcm", 1), (b"pat_\xe9/IM1.dcm", 2)):
            info = series(("bytes", key), "BYTE^NAMES", "604", "AX", key)
            rel = inventory.encode_name(os.fsdecode(raw))
            write(make_instance(info, 1, uid(seed, rel)), out / os.fsdecode(raw))
            expect[rel] = Expectation("sort", f"BYTE^NAMES_604/AX_{key}")
    dicomdir = Dataset()
    dicomdir.file_meta = FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.file_meta.MediaStorageSOPInstanceUID = uid(seed, "dicomdir")
    dicomdir.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir.FileSetID = "DEMO"
    dicomdir.save_as(junk / "DICOMDIR", enforce_file_format=True)
    expect["p_junk/DICOMDIR"] = Expectation("skip", reason="DICOMDIR")
    os.symlink("does-not-exist", junk / "broken_link")
    expect["p_junk/broken_link"] = Expectation("skip", reason="broken")
    os.symlink(os.path.join("..", "p_plain"), junk / "linked_folder")
    expect["p_junk/linked_folder"] = Expectation("skip", reason="symbolic link to a folder")
    # A file lying directly in input_dir.
    put(
        "loose.dcm",
        series("loose", "LOOSE^FILE", "4242", "SCOUT", 1),
        1,
        Expectation("sort", "LOOSE^FILE_4242/SCOUT_1"),
    )
    return expect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcmsort.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--studies", type=int, default=1)
    parser.add_argument("--series", type=int, default=3)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--rows", type=int, default=16, help="image size (rows = columns)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-patient", type=int, default=1)
    parser.add_argument("--messy", action="store_true", help="also write the messy cases")
    args = parser.parse_args(argv)
    files = generate(
        args.out_dir,
        args.patients,
        args.studies,
        args.series,
        args.instances,
        args.rows,
        args.seed,
        first_patient=args.first_patient,
    )
    to_sort = len(files)
    if args.messy:
        expected = generate_messy(args.out_dir, byte_names=True).values()
        to_sort += sum(expectation.action != "skip" for expectation in expected)
    # Count what is on disk: generate() also writes junk it does not return.
    total = sum(1 for path in args.out_dir.rglob("*") if path.is_file() or path.is_symlink())
    print(
        f"wrote {total} files under {args.out_dir}: {to_sort} DICOM files to be sorted, "
        f"{total - to_sort} to be skipped (junk, broken or unreadable files, links)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
