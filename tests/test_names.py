"""Any name, any file: names that are not UTF-8 or very long, DICOM without UIDs,
file-meta keywords in templates, true skip reasons (issue 11). End to end through the real
snakemake, plus the pure pieces."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assert_every_file_accounted_for, tree_snapshot, write_dicom
from dcmsort import demo, headers, inventory, ledger, naming, partition
from dcmsort.fileops import MAX_NAME_BYTES, TEMP_SUFFIX, temp_name_for, temp_path_for


def write_instance(path: str | bytes, name: str = "DOE^JOHN", number: int = 1) -> bytes:
    """A small DICOM file at path (str or bytes); returns its content."""
    info = demo.Series(name, "7", "1.2.3", "20240101", "1.2.3.9", 1, "AX")
    tmp = Path(f"/tmp/dcmsort-names-{os.getpid()}-{number}.dcm")
    demo.write(demo.make_instance(info, number, f"1.2.3.{number}.1"), tmp)
    content = tmp.read_bytes()
    tmp.unlink()
    raw = os.fsencode(path)
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    with open(raw, "wb") as handle:
        handle.write(content)
    return content


def all_inputs(root: Path) -> set[str]:
    """Every file or link below root, as manifest relpaths (encode_name form)."""
    found = set()
    for top, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            rel = os.path.relpath(os.path.join(top, name), root)
            found.add(inventory.encode_name(rel))
    return found


def assert_accounted_for(sorter) -> dict:
    """The central invariant (conftest), plus portable names. Returns rows by relpath."""
    result = assert_every_file_accounted_for(sorter)
    for destination in [d for d in result.column("destination") if d is not None]:
        assert all(naming.is_safe_component(part) for part in destination.split("/"))
    return result.by_relpath()


# --- item 4: names that are not UTF-8 ------------------------------------------------------


def test_names_that_are_not_utf8_are_sorted_and_reported_by_names_that_round_trip(sorter):
    root = os.fsencode(sorter.input_dir)
    one = write_instance(root + b"/p/IM\xff\xfe.dcm", number=1)
    two = write_instance(root + b"/pat_\xe9/sub\xe9/IM1.dcm", number=2)
    write_instance(root + b"/p/100%.dcm", number=3)
    before = tree_snapshot(sorter.input_dir)
    sorter.run()
    assert tree_snapshot(sorter.input_dir) == before
    rows = assert_accounted_for(sorter)
    assert set(rows) == {"p/IM%FF%FE.dcm", "pat_%E9/sub%E9/IM1.dcm", "p/100%25.dcm"}
    assert os.fsencode(inventory.decode_name("p/IM%FF%FE.dcm")) == b"p/IM\xff\xfe.dcm"
    destination = rows["p/IM%FF%FE.dcm"]["destination"]
    assert destination.startswith("DOE^JOHN_7/AX_1/IM__~") and destination.endswith(".dcm")
    assert (sorter.output_dir / destination).read_bytes() == one
    assert (sorter.output_dir / rows["pat_%E9/sub%E9/IM1.dcm"]["destination"]).read_bytes() == two
    assert rows["p/100%25.dcm"]["destination"] == "DOE^JOHN_7/AX_1/100%.dcm"
    manifests = sorted((sorter.state / "manifests" / "folders").iterdir())
    assert {pq.read_schema(m).metadata[b"folder"].decode() for m in manifests} == {"p", "pat_%E9"}
    again = sorter.run()
    assert "Nothing to be done" in again.output


# --- items 5 and 6: long folder and file names ---------------------------------------------


def test_long_folder_and_file_names_are_sorted(sorter):
    japanese = "山" * 41  # 123 bytes; quoted for a file name it would be 369
    ascii_folder = "F" * 240
    long_file = "I" * 246 + ".dcm"  # 250 bytes: '.<name>.dcmsort-tmp' would be 263
    write_instance(sorter.input_dir / japanese / "IM1.dcm", number=1)
    write_instance(sorter.input_dir / ascii_folder / "IM1.dcm", number=2)
    write_instance(sorter.input_dir / "p" / long_file, number=3)
    sorter.run()
    rows = assert_accounted_for(sorter)
    assert rows[f"p/{long_file}"]["destination"] == f"DOE^JOHN_7/AX_1/{long_file}"
    assert all(r["action"] == "sort" for r in rows.values())
    manifests = list((sorter.state / "manifests" / "folders").iterdir())
    assert len(manifests) == 3
    assert all(len(os.fsencode(m.name)) <= 150 for m in manifests)
    assert not list(sorter.output_dir.rglob(f"*{TEMP_SUFFIX}"))


def test_the_manifest_of_a_removed_long_folder_is_removed(tmp_path):
    source = tmp_path / "in"
    write_instance(source / ("F" * 240) / "IM1.dcm", number=1)
    write_instance(source / "short" / "IM1.dcm", number=2)
    manifests = tmp_path / "manifests"
    headers.extract_batch(source, 0, 1, [], manifests, tmp_path / "b.parquet")
    assert len(list(manifests.iterdir())) == 2
    (source / ("F" * 240) / "IM1.dcm").unlink()
    (source / ("F" * 240)).rmdir()
    headers.extract_batch(source, 0, 1, [], manifests, tmp_path / "b.parquet")
    assert [p.name for p in manifests.iterdir()] == ["short.parquet"]


@pytest.mark.parametrize("length", [1, 200, 230, 242, 243, 250, 255])
@pytest.mark.parametrize("char", ["x", "é", "山"])
@pytest.mark.parametrize("token", ["", "0123456789ab"])
def test_temporary_names_fit_255_bytes_stay_hidden_fixed_and_recognisable(length, char, token):
    name = (char * length).encode()[:255].decode("utf-8", "ignore")
    tmp = temp_name_for(name, token)
    assert len(os.fsencode(tmp)) <= MAX_NAME_BYTES
    assert tmp.startswith(".") and tmp.endswith(f".{token}{TEMP_SUFFIX}" if token else TEMP_SUFFIX)
    assert tmp == temp_name_for(name, token)
    assert temp_name_for(name[:-1] + "z", token) != tmp
    assert temp_name_for(name, "ba9876543210") != tmp
    assert temp_path_for(Path("/out/folder") / name) == Path("/out/folder") / temp_name_for(name)


def test_ordinary_temporary_names_are_unchanged():
    assert temp_path_for(Path("/o/IM1.dcm")).name == f".IM1.dcm{TEMP_SUFFIX}"
    assert temp_name_for("IM1.dcm", "0a1b") == f".IM1.dcm.0a1b{TEMP_SUFFIX}"


# --- item 7: file-meta keywords in templates -----------------------------------------------


def test_file_meta_keywords_in_templates_are_read_from_the_file_meta(sorter):
    write_instance(sorter.input_dir / "p" / "IM1.dcm", number=1)
    sorter.run(
        folder_template="{MediaStorageSOPClassUID}/{TransferSyntaxUID}",
        file_template="{MediaStorageSOPInstanceUID}.dcm",
    )
    rows = assert_accounted_for(sorter)
    assert rows["p/IM1.dcm"]["destination"] == (
        f"{demo.MR_IMAGE}/1.2.840.10008.1.2.1/1.2.3.1.1.dcm"
    )
    manifest = pq.read_schema(next((sorter.state / "manifests").glob("batch-*.parquet")))
    assert manifest.names.count("TransferSyntaxUID") == 1


def test_manifest_schema_has_each_file_meta_keyword_once():
    names = headers.manifest_schema([*headers.MANIFEST_TAGS, "TransferSyntaxUID"]).names
    assert names.count("TransferSyntaxUID") == 1
    assert "MediaStorageSOPClassUID" in names


# --- item 9: DICOM without UIDs; what is not DICOM ----------------------------------------


def test_dicom_without_uids_is_sorted_and_junk_is_skipped_with_true_reasons(sorter):
    expected = {
        k: v for k, v in demo.generate_messy(sorter.input_dir).items() if k.startswith("p_anon")
    }
    junk = sorter.input_dir / "p_junk"
    for name in list(junk.iterdir()) if junk.exists() else []:
        name.unlink()
    assert set(expected) == {"p_anon/IM1.dcm", "p_anon/meta_only.dcm"}
    (sorter.input_dir / "zeros.img").write_bytes(bytes(2_000_000))
    sorter.run()
    rows = assert_accounted_for(sorter)
    assert rows["p_anon/IM1.dcm"]["action"] == "sort"
    assert rows["p_anon/IM1.dcm"]["destination"].startswith("Anon_UNKNOWN/AX T2_6/")
    assert rows["p_anon/IM1.dcm"]["SOPInstanceUID"] == demo.uid(7, "anon")
    assert rows["p_anon/meta_only.dcm"]["destination"].startswith("UNKNOWN_UNKNOWN/")
    assert rows["zeros.img"]["reason"] == headers.NOT_DICOM


def test_zero_filled_and_large_junk_is_decided_from_the_first_bytes(tmp_path):
    zeros = tmp_path / "zeros"
    with open(zeros, "wb") as handle:
        handle.truncate(200_000_000)  # sparse: 200 MB of zeros, no disk used
    started = time.process_time()
    assert headers.read_header(str(zeros), headers.MANIFEST_TAGS)["skip_reason"] == (
        headers.NOT_DICOM
    )
    # A plausible first element followed by junk: the forced read is bounded.
    plausible = tmp_path / "plausible"
    with open(plausible, "wb") as handle:
        handle.write(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")
        handle.truncate(200_000_000)
    assert headers.read_header(str(plausible), headers.MANIFEST_TAGS)["skip_reason"]
    assert time.process_time() - started < 30  # unbounded, the second took minutes


def test_a_header_longer_than_the_first_chunk_is_read_whole(tmp_path):
    info = demo.Series("LONG^HEADER", "1", "1.2.3", "20240101", "1.2.3.4", 1, "AX")
    ds = demo.make_instance(info, 1, "1.2.3.4.5")
    ds.ImageComments = "x" * (headers.CHUNK_BYTES * 2)
    ds.SeriesDescription = "AFTER THE CHUNK"  # (0008,103E) sorts before (0020,4000)...
    ds.add_new(0x00291010, "OB", b"\0" * (headers.CHUNK_BYTES * 2))  # ...so push it far
    ds.add_new(0x00400254, "LO", "PERFORMED")  # PerformedProcedureStepDescription, late
    path = demo.write(ds, tmp_path / "long.dcm")
    row = headers.read_header(
        str(path), [*headers.MANIFEST_TAGS, "PerformedProcedureStepDescription"]
    )
    assert row["skip_reason"] is None
    assert row["PerformedProcedureStepDescription"] == "PERFORMED"
    bare = demo.write(ds, tmp_path / "bare", preamble=False)
    row = headers.read_header(
        str(bare), [*headers.MANIFEST_TAGS, "PerformedProcedureStepDescription"]
    )
    assert row["skip_reason"] is None and row["PerformedProcedureStepDescription"] == "PERFORMED"


# --- smaller: skip reasons that say what happened -----------------------------------------


def test_link_loops_and_too_long_paths_are_reported_as_what_they_are(sorter):
    write_instance(sorter.input_dir / "p" / "IM1.dcm", number=1)
    os.symlink("loop", sorter.input_dir / "p" / "loop")
    # Nested folders whose full path exceeds PATH_MAX (4,096 bytes): made relative to a
    # folder descriptor, as no single path could name them.
    deep = os.open(sorter.input_dir, os.O_RDONLY)
    try:
        for level in range(18):
            name = f"{level:02d}" + "d" * 240
            os.mkdir(name, dir_fd=deep)
            parent, deep = deep, os.open(name, os.O_RDONLY, dir_fd=deep)
            os.close(parent)
        os.close(os.open("IM1.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=deep))
    finally:
        os.close(deep)
    sorter.run()
    plan = sorter.outcomes()
    by_relpath = plan.by_relpath()
    assert by_relpath["p/IM1.dcm"]["action"] == "sort"
    assert by_relpath["p/loop"]["reason"] == headers.SKIP_REASONS[inventory.SYMLINK_LOOP]
    too_long = [r for r in plan if "longer than the system allows" in (r["reason"] or "")]
    assert len(too_long) == 1 and too_long[0]["relpath"].startswith("00ddd")
    assert "could not be listed" in too_long[0]["reason"]


def test_walk_reports_a_file_whose_full_path_is_too_long(tmp_path):
    # A folder path just under PATH_MAX plus a long file name: the folder lists, the file
    # cannot be stat'ed by its path.
    deep = os.open(tmp_path, os.O_RDONLY)
    depth = (4095 - len(os.fsencode(tmp_path)) - 4) // 251  # the folder fits, the file not
    try:
        os.mkdir("top", dir_fd=deep)
        parent, deep = deep, os.open("top", os.O_RDONLY, dir_fd=deep)
        os.close(parent)
        for level in range(depth):
            name = f"{level:02d}" + "d" * 248
            os.mkdir(name, dir_fd=deep)
            parent, deep = deep, os.open(name, os.O_RDONLY, dir_fd=deep)
            os.close(parent)
        os.close(os.open("f" * 250, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=deep))
    finally:
        os.close(deep)
    kinds = {e.kind for e in inventory.walk_folder(tmp_path, "top")}
    assert kinds == {inventory.PATH_TOO_LONG}


# --- the messy set, with names that are not UTF-8 -------------------------------------------


def test_messy_set_with_byte_names_every_expectation_holds(sorter):
    expected = demo.generate_messy(sorter.input_dir, byte_names=True)
    sorter.run()
    rows = assert_accounted_for(sorter)
    for relpath, expect in expected.items():
        row = rows[relpath]
        assert row["action"] == expect.action, (relpath, row)
        if expect.folder:
            assert row["destination"].rsplit("/", 1)[0] == expect.folder, relpath
        if expect.reason:
            assert expect.reason in row["reason"], (relpath, row["reason"])
        assert bool(row["conflict"]) == expect.conflict, relpath
    assert rows["p_names/IM:0001.dcm"]["destination"].endswith("/IM_0001~fe9150.dcm")


# --- issues 21 and 24: names one file system sees as one; one patient per patient folder ---


def windows_name(path: str) -> str:
    """How NTFS and SMB compare a name: upper-cased one code point at a time (a dotless i
    is I), nothing normalised."""
    return "".join(c.upper() if len(c.upper()) == 1 else c for c in path)


def test_names_windows_sees_as_one_are_kept_apart_by_a_suffix(sorter):
    folder = sorter.input_dir / "p"
    one = write_dicom(folder / "\u0131x.dcm", desc="T1")  # dotless i
    two = write_dicom(folder / "IX.dcm", desc="T1")
    write_dicom(folder / "a.dcm", desc="T\u0131")  # two series: T + dotless i, and TI
    write_dicom(folder / "b.dcm", desc="TI")
    sorter.run()
    rows = assert_accounted_for(sorter)
    placed = [row["destination"] for row in rows.values()]
    assert len({windows_name(d) for d in placed}) == 4, placed
    assert len({windows_name(d.rsplit("/", 1)[0]) for d in placed}) == 3, "three series folders"
    names = {rows[f"p/{n}"]["destination"].rsplit("/", 1)[1] for n in ("\u0131x.dcm", "IX.dcm")}
    assert names in ({"\u0131x.dcm", "IX_2.dcm"}, {"\u0131x_2.dcm", "IX.dcm"})
    by_name = {r["destination"]: r["relpath"] for r in rows.values()}
    assert (sorter.output_dir / rows["p/IX.dcm"]["destination"]).read_bytes() == two
    assert (sorter.output_dir / rows["p/\u0131x.dcm"]["destination"]).read_bytes() == one
    assert len(by_name) == 4


def test_one_series_whose_patient_name_differs_in_case_stays_in_one_folder(sorter):
    write_dicom(sorter.input_dir / "a" / "IM1.dcm", "Doe^Jane", "1", "SER", instance=1)
    write_dicom(sorter.input_dir / "b" / "IM2.dcm", "DOE^JANE", "1", "SER", instance=2)
    sorter.run()
    rows = assert_accounted_for(sorter)
    folders = {row["destination"].rsplit("/", 1)[0] for row in rows.values()}
    assert len(folders) == 1, folders
    assert folders <= {"Doe^Jane_1/SER_1", "DOE^JANE_1/SER_1"}
    # A later file of the series, spelled another way again, joins it.
    write_dicom(sorter.input_dir / "c" / "IM3.dcm", "doe^jane", "1", "SER", instance=3)
    sorter.run()
    later = assert_accounted_for(sorter)
    assert {row["destination"].rsplit("/", 1)[0] for row in later.values()} == folders


def test_two_patients_whose_ids_differ_only_in_case_are_never_one_patient_folder(sorter):
    ann = write_dicom(sorter.input_dir / "a" / "IM1.dcm", "Roe^Ann", "r1", "SER")
    other = write_dicom(sorter.input_dir / "b" / "IM1.dcm", "ROE^ANN", "R1", "SER")
    sorter.run()
    rows = assert_accounted_for(sorter)
    patients = {r: rows[r]["destination"].split("/")[0] for r in ("a/IM1.dcm", "b/IM1.dcm")}
    assert len({windows_name(p).lower() for p in patients.values()}) == 2, patients
    assert (sorter.output_dir / rows["a/IM1.dcm"]["destination"]).read_bytes() == ann
    assert (sorter.output_dir / rows["b/IM1.dcm"]["destination"]).read_bytes() == other
    assert sorter.summary()["patient_folders_with_several_ids"] == []
    # Stable: new files of each patient go to that patient's folder.
    write_dicom(sorter.input_dir / "a" / "IM2.dcm", "Roe^Ann", "r1", "SER", instance=2)
    write_dicom(sorter.input_dir / "b" / "IM2.dcm", "ROE^ANN", "R1", "SER", instance=2)
    sorter.run()
    later = assert_accounted_for(sorter)
    for patient in ("a", "b"):
        assert (
            later[f"{patient}/IM2.dcm"]["destination"].split("/")[0]
            == patients[f"{patient}/IM1.dcm"]
        )


def test_a_template_without_patient_id_groups_by_name_and_the_report_says_so(sorter):
    write_dicom(sorter.input_dir / "a" / "IM1.dcm", "Roe^Ann", "r1", "SER")
    write_dicom(sorter.input_dir / "b" / "IM1.dcm", "ROE^ANN", "R1", "SER")
    sorter.run(folder_template='"{PatientName}/{SeriesDescription}"')
    rows = assert_accounted_for(sorter)
    folders = {row["destination"].split("/")[0] for row in rows.values()}
    assert len(folders) == 1 and folders <= {"Roe^Ann", "ROE^ANN"}
    assert sorter.summary()["patient_folders_with_several_ids"] == [
        {"folder": folders.pop(), "patient_ids": ["R1", "r1"]}
    ]
    page = (sorter.state / "report.html").read_text()
    assert "Patient folders holding more than one PatientID" in page


def test_an_output_an_earlier_version_merged_keeps_its_files_and_the_report_flags_it(sorter):
    write_dicom(sorter.input_dir / "a" / "IM1.dcm", "Roe^Ann", "r1", "SER")
    sorter.run()
    # What an earlier version did with ROE^ANN, R1: a series folder in Roe^Ann_r1/, and a
    # ledger without PatientIDs.
    source = sorter.input_dir / "b" / "IM1.dcm"
    write_dicom(source, "ROE^ANN", "R1", "SER")
    series_uid = demo.uid("series", "R1", "SER")
    merged = f"Roe^Ann_r1/SER_1_{naming.short_hash(series_uid)}/IM1.dcm"
    (sorter.output_dir / merged).parent.mkdir()
    shutil.copy2(source, sorter.output_dir / merged)
    info = source.stat()
    row = {
        "relpath": "b/IM1.dcm",
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "status": ledger.PLACED,
        "destination": merged,
        "mode": "copy",
        "base_folder": "ROE^ANN_R1/SER_1",
        "series_uid": series_uid,
        "committed_at": 0.0,
    }
    ledger.append(sorter.state, pa.Table.from_pylist([row], schema=ledger.SCHEMA))
    for segment in ledger.folder(sorter.state).glob("*.parquet"):
        table = pq.read_table(segment)
        if "patient_id" in table.column_names:
            pq.write_table(table.drop_columns(["patient_id"]), segment)
    sorter.run()
    rows = assert_accounted_for(sorter)
    assert rows["b/IM1.dcm"]["destination"] == merged, "a placement never moves"
    assert sorter.summary()["patient_folders_with_several_ids"] == [
        {"folder": "Roe^Ann_r1", "patient_ids": ["R1", "r1"]}
    ]
    # R1's series goes on in its folder.
    write_dicom(sorter.input_dir / "b" / "IM2.dcm", "ROE^ANN", "R1", "SER", instance=2)
    sorter.run()
    later = assert_accounted_for(sorter)
    assert later["b/IM2.dcm"]["destination"] == merged.replace("IM1", "IM2")


# --- issue 20: fallback chains in templates -------------------------------------------------

FALLBACK_TEMPLATE = (
    '{PatientName|PatientID}_{PatientID}/{SeriesDescription|ProtocolName|"no description"}'
    "_{SeriesNumber|AcquisitionNumber:03d}"
)


def test_a_fallback_chain_names_folders_by_the_first_tag_with_a_value(sorter, tmp_path):
    put = sorter.input_dir / "p"
    write_dicom(put / "described.dcm", desc="T1", number=3, tags={"ProtocolName": "P"})
    # SeriesDescription missing, or empty: the protocol names the series.
    write_dicom(put / "missing.dcm", desc=None, number=4, tags={"ProtocolName": "ax t2"})
    write_dicom(put / "empty.dcm", desc="", number=5, tags={"ProtocolName": "dwi"})
    # Neither: the literal text; no SeriesNumber: the AcquisitionNumber, formatted.
    write_dicom(
        put / "bare.dcm",
        desc=None,
        tags={"SeriesNumber": None, "AcquisitionNumber": "7", "ProtocolName": ""},
    )
    # No PatientName: the PatientID names the patient; nothing at all: the placeholder.
    write_dicom(sorter.input_dir / "q" / "anon.dcm", name="", pid="42", desc="T1")
    write_dicom(
        sorter.input_dir / "q" / "nothing.dcm",
        name="",
        pid="43",
        desc=None,
        tags={"SeriesNumber": None},
    )
    config = tmp_path / "fallbacks.yaml"
    config.write_text(f"folder_template: '{FALLBACK_TEMPLATE}'\n")
    sorter.run("--configfile", str(config))
    rows = assert_accounted_for(sorter)
    folders = {relpath: row["destination"].rsplit("/", 1)[0] for relpath, row in rows.items()}
    assert folders == {
        "p/described.dcm": "DOE^JOHN_1/T1_003",
        "p/missing.dcm": "DOE^JOHN_1/ax t2_004",
        "p/empty.dcm": "DOE^JOHN_1/dwi_005",
        "p/bare.dcm": "DOE^JOHN_1/no description_007",
        "q/anon.dcm": "42_42/T1_001",
        "q/nothing.dcm": "43_43/no description_UNKNOWN",
    }


def test_a_chain_of_empty_tags_ends_with_the_placeholder(sorter):
    write_dicom(sorter.input_dir / "p" / "IM1.dcm", desc=None, tags={"ProtocolName": ""})
    sorter.run(folder_template="{PatientID}/{SeriesDescription|ProtocolName}", placeholder="NONE")
    rows = assert_accounted_for(sorter)
    assert rows["p/IM1.dcm"]["destination"] == "1/NONE/IM1.dcm"


def test_two_patients_named_by_a_fallback_never_share_a_patient_folder(sorter):
    # Same name, two IDs; and two without a name whose IDs differ only in case.
    write_dicom(sorter.input_dir / "a" / "IM1.dcm", "ROE^ANN", "r1", "SER")
    write_dicom(sorter.input_dir / "b" / "IM1.dcm", "ROE^ANN", "r2", "SER")
    write_dicom(sorter.input_dir / "c" / "IM1.dcm", "", "x9", "SER")
    write_dicom(sorter.input_dir / "d" / "IM1.dcm", "", "X9", "SER")
    sorter.run(folder_template="{PatientName|PatientID}/{SeriesDescription}", partitions=2)
    rows = assert_accounted_for(sorter)
    patients = {relpath: row["destination"].split("/")[0] for relpath, row in rows.items()}
    assert len({naming.fold(p) for p in patients.values()}) == 4, patients
    assert patients["a/IM1.dcm"] == "ROE^ANN" or patients["b/IM1.dcm"] == "ROE^ANN"
    assert sorter.summary()["patient_folders_with_several_ids"] == []


def test_a_patient_folder_suffixed_in_one_partition_is_never_shared_from_another(sorter):
    # DOE/2 gets DOE_<hash of "2"> beside DOE/1; a later patient whose ID *is* that name
    # renders to it, but its top-level folder is hashed to the other partition, whose
    # ledger does not know the folder: it must not move in with patient 2.
    template = "{PatientName|PatientID}/{SeriesDescription}"
    suffixed = f"DOE_{naming.short_hash('2')}"
    parts = [partition.key(name) % 2 for name in ("DOE", suffixed)]
    assert parts[0] != parts[1], "the two names must fall into different partitions"
    write_dicom(sorter.input_dir / "a" / "IM1.dcm", "DOE", "1", "SER")
    write_dicom(sorter.input_dir / "b" / "IM1.dcm", "DOE", "2", "SER")
    sorter.run(folder_template=template, partitions=2)
    write_dicom(sorter.input_dir / "d" / "IM1.dcm", "", suffixed, "SER")
    sorter.run(folder_template=template, partitions=2)
    rows = assert_accounted_for(sorter)
    patients = {relpath: row["destination"].split("/")[0] for relpath, row in rows.items()}
    assert patients["b/IM1.dcm"] == suffixed
    assert len({naming.fold(p) for p in patients.values()}) == 3, patients
    assert sorter.summary()["patient_folders_with_several_ids"] == []


def test_one_run_that_suffixes_into_another_partitions_name_is_honest_then_settles(sorter):
    # The same three patients in one run: two plan jobs claim the name at once. The run
    # may fail (nothing is overwritten); the rerun must keep the two IDs apart.
    template = "{PatientName|PatientID}/{SeriesDescription}"
    suffixed = f"DOE_{naming.short_hash('2')}"
    write_dicom(sorter.input_dir / "a" / "IM1.dcm", "DOE", "1", "SER")
    write_dicom(sorter.input_dir / "b" / "IM1.dcm", "DOE", "2", "SER")
    write_dicom(sorter.input_dir / "d" / "IM1.dcm", "", suffixed, "SER")
    first = sorter.run(folder_template=template, partitions=2, check=False)
    if first.returncode != 0:
        sorter.run(folder_template=template, partitions=2)
    rows = assert_accounted_for(sorter)
    patients = {relpath: row["destination"].split("/")[0] for relpath, row in rows.items()}
    assert len({naming.fold(p) for p in patients.values()}) == 3, patients
    assert sorter.summary()["patient_folders_with_several_ids"] == []


def test_a_series_folder_suffixed_in_one_partition_is_never_shared_from_another(sorter):
    # keep_series_apart with the series folder at the top level: the second T1 series gets
    # T1_<hash of its UID>; a later series described so renders to it from a partition
    # whose ledger does not know the folder, and must not move in.
    suffixed = f"T1_{naming.short_hash('1.2.3.2')}"
    parts = [partition.key(name) % 4 for name in ("T1", suffixed)]
    assert parts[0] != parts[1], "the two names must fall into different partitions"
    for folder, pid, uid in (("a", "1", "1.2.3.1"), ("b", "2", "1.2.3.2")):
        write_dicom(
            sorter.input_dir / folder / "IM1.dcm",
            "X",
            pid,
            "T1",
            tags={"SeriesInstanceUID": uid},
        )
    sorter.run(folder_template="{SeriesDescription}", partitions=4)
    write_dicom(
        sorter.input_dir / "c" / "IM1.dcm",
        "X",
        "3",
        suffixed,
        tags={"SeriesInstanceUID": "1.2.3.3"},
    )
    sorter.run(folder_template="{SeriesDescription}", partitions=4)
    rows = assert_accounted_for(sorter)
    folders = {relpath: row["destination"].split("/")[0] for relpath, row in rows.items()}
    assert folders["b/IM1.dcm"] == suffixed
    assert len({naming.fold(f) for f in folders.values()}) == 3, folders
