import os
import shutil

import pyarrow.parquet as pq
import pytest
from pydicom.data import get_testdata_file

from dcmsort import demo, headers

TAGS = headers.MANIFEST_TAGS


def test_reads_the_tags_of_a_real_dicom_file():
    row = headers.read_header(get_testdata_file("CT_small.dcm"), TAGS)
    assert row["skip_reason"] is None
    assert row["Modality"] == "CT" and row["PatientName"] == "CompressedSamples^CT1"


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # JIS, escape sequences
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),  # KS X 1001
        ("ISO_IR 100", "MÜLLER^HANS"),  # Latin-1
        ("ISO_IR 192", "山田^太郎"),  # UTF-8
    ],
)
def test_decodes_names_through_the_specific_character_set(tmp_path, charset, name):
    info = demo.Series(name, "1", "1.2.3", "20240101", "1.2.3.4", 1, "AX", charset=charset)
    path = demo.write(demo.make_instance(info, 1, "1.2.3.4.5"), tmp_path / "f.dcm")
    if charset != "ISO_IR 192":  # really stored in that charset, not in UTF-8
        assert name.encode("utf-8") not in path.read_bytes()
    row = headers.read_header(str(path), TAGS)
    assert row["skip_reason"] is None and row["PatientName"] == name


def test_dicom_without_preamble_is_sortable(tmp_path):
    info = demo.Series("A^B", "1", "1.2.3", "20240101", "1.2.3.4", 1, "AX")
    path = demo.write(demo.make_instance(info, 1, "1.2.3.4.5"), tmp_path / "bare", preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert headers.read_header(str(path), TAGS)["skip_reason"] is None


def test_junk_empty_and_dicomdir_files_get_a_reason(tmp_path):
    (tmp_path / "Thumbs.db").write_bytes(os.urandom(600))
    (tmp_path / "empty").write_bytes(b"")
    reasons = {
        name: headers.read_header(str(tmp_path / name), TAGS)["skip_reason"]
        for name in ["Thumbs.db", "empty"]
    }
    reasons["DICOMDIR"] = headers.read_header(get_testdata_file("DICOMDIR"), TAGS)["skip_reason"]
    assert "not DICOM" in reasons["Thumbs.db"]
    assert "empty" in reasons["empty"]
    assert "DICOMDIR" in reasons["DICOMDIR"]


def test_a_rerun_reads_only_new_and_changed_files(tmp_path):
    source = tmp_path / "in"
    demo.generate(source, patients=1, series=2, instances=3, junk=False)
    manifests = tmp_path / "manifests"
    out = tmp_path / "batch.parquet"
    first = headers.extract_batch(source, 0, 1, [], manifests, out)
    assert first["headers_read"] == 6
    assert headers.extract_batch(source, 0, 1, [], manifests, out)["headers_read"] == 0
    changed = next(p for p in source.rglob("*") if p.is_file())
    os.utime(changed, ns=(1, 10**18))
    demo.generate(source, patients=1, series=1, instances=1, junk=False, first_patient=5)
    again = headers.extract_batch(source, 0, 1, [], manifests, out)
    assert again["headers_read"] == 2
    assert pq.read_table(out).num_rows == 7


def test_the_manifest_of_a_removed_folder_is_removed(tmp_path):
    source = tmp_path / "in"
    demo.generate(source, patients=2, series=1, instances=1, junk=False)
    manifests = tmp_path / "manifests"
    headers.extract_batch(source, 0, 1, [], manifests, tmp_path / "b.parquet")
    assert len(list(manifests.iterdir())) == 2
    shutil.rmtree(source / "patient_2")
    headers.extract_batch(source, 0, 1, [], manifests, tmp_path / "b.parquet")
    assert [p.name for p in manifests.iterdir()] == ["patient_1.parquet"]
