"""Archives in the input: zip and tar members sorted as files, never unpacked (issue 19)."""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_adversarial import kill_when, tree_files
from test_cli import dcmsort

from conftest import Sorter, assert_every_file_accounted_for, write_dicom
from dcmsort import archives, demo, headers, inventory, ledger, transfer


def _pack_tar(archive: Path, folder: Path, mode: str = "w:gz") -> None:
    with tarfile.open(archive, mode) as tar:
        tar.add(folder, arcname=folder.name)


def _pack_zip(archive: Path, folder: Path, method: int = zipfile.ZIP_DEFLATED) -> None:
    with zipfile.ZipFile(archive, "w", method) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent))


def _sorted_tree(output_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(output_dir)): p.read_bytes()
        for p in output_dir.rglob("*")
        if p.is_file() and ".dcmsort" not in p.relative_to(output_dir).parts
    }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def _skip_reasons(sorter) -> dict[str, str]:
    return {r["relpath"]: r["reason"] for r in sorter.outcomes() if r["action"] == "skip"}


def test_a_folder_of_archives_sorts_exactly_like_the_same_files_unpacked(sorter, tmp_path):
    plain = tmp_path / "plain"
    demo.generate(plain, patients=6, series=2, instances=3)
    folders = sorted(plain.iterdir())
    sorter.input_dir.mkdir(parents=True, exist_ok=True)
    (sorter.input_dir / "ward").mkdir()
    shutil.copytree(folders[0], sorter.input_dir / folders[0].name)
    _pack_zip(sorter.input_dir / "export_2.zip", folders[1])
    _pack_tar(sorter.input_dir / "p3.tar.gz", folders[2], "w:gz")
    _pack_tar(sorter.input_dir / "ward" / "p4.tar.bz2", folders[3], "w:bz2")
    _pack_tar(sorter.input_dir / "p5.tar", folders[4], "w")
    # Recognised by their first bytes, whatever the name says.
    _pack_tar(sorter.input_dir / "p6.download", folders[5], "w:xz")

    sorter.run()
    assert_every_file_accounted_for(sorter)
    unpacked = tmp_path / "unpacked-out"
    sorter.run(input_dir=plain, output_dir=unpacked)
    assert _sorted_tree(sorter.output_dir) == _sorted_tree(unpacked)
    reasons = _skip_reasons(sorter)
    assert any(r.startswith("p3.tar.gz//") and r.endswith("notes.txt") for r in reasons), reasons
    # A member's destination and source are in the ledger like a plain file's.
    placed = ledger.read(sorter.state)["relpath"].to_pylist()
    assert any(r.startswith("ward/p4.tar.bz2//") for r in placed)


def test_a_noop_rerun_opens_no_archive_and_a_changed_one_is_read_again(sorter, tmp_path):
    plain = tmp_path / "plain"
    demo.generate(plain, patients=2, series=1, instances=3, junk=False)
    first, second = sorted(plain.iterdir())
    sorter.input_dir.mkdir(parents=True, exist_ok=True)
    archive = sorter.input_dir / "export.tar.gz"
    _pack_tar(archive, first)
    sorter.run()
    before = sorter.summary()["files_sorted"]
    assert sorter.run(count_opens=True).opened == []
    # Replaced by a bigger archive holding the same files and more.
    bigger = tmp_path / "bigger.tar.gz"
    with tarfile.open(bigger, "w:gz") as tar:
        tar.add(first, arcname=first.name)
        tar.add(second, arcname=second.name)
    os.replace(bigger, archive)
    sorter.run()
    assert_every_file_accounted_for(sorter)
    summary = sorter.summary()
    assert summary["files_sorted"] == 2 * before
    assert summary["files_new"] == before, summary  # the first files are not copied again


def test_archives_of_one_folder_read_by_several_workers_give_the_same_manifest(
    tmp_path, monkeypatch
):
    # Every file a piece of its own (archives of 4 MB and more are, in real use), so the
    # folder's manifest is made of pieces read in other processes and written here.
    monkeypatch.setattr(headers, "PIECE_BYTES", 1)
    plain = tmp_path / "plain"
    demo.generate(plain, patients=4, series=2, instances=2)
    source = tmp_path / "in"
    source.mkdir()
    folders = sorted(p for p in plain.iterdir() if p.is_dir())
    _pack_zip(source / "export_1.zip", folders[0])
    _pack_tar(source / "p2.tar.gz", folders[1])
    _pack_zip(source / "export_3.zip", folders[2])
    shutil.copy(next(p for p in folders[3].rglob("*") if p.is_file()), source / "loose.dcm")
    (source / "truncated.tar.gz").write_bytes((source / "p2.tar.gz").read_bytes()[:300])

    def manifest(workers: int, name: str) -> list[dict]:
        out = tmp_path / name / "batch-0-0.parquet"
        stats = headers.extract_batch(source, 0, 1, [], tmp_path / name / "folders", out, workers)
        assert stats["headers_read"] == 5
        rows = headers.read_parquet(out).to_pylist()
        return sorted(rows, key=lambda r: r["relpath"])

    alone, spread = manifest(1, "one"), manifest(2, "two")
    assert spread == alone
    members = sum(1 for folder in folders[:3] for p in folder.rglob("*") if p.is_file())
    assert len(spread) == members + 2  # and the loose file, and the damaged archive's row
    assert sum(r["dicom"] for r in spread) == sum(r["dicom"] for r in alone) > 0
    # A rerun reads nothing again; a replaced archive alone is read again.
    out = tmp_path / "two" / "batch-0-0.parquet"
    folders_dir = tmp_path / "two" / "folders"
    assert headers.extract_batch(source, 0, 1, [], folders_dir, out, 2)["headers_read"] == 0
    _pack_zip(source / "export_3.zip", folders[3])
    assert headers.extract_batch(source, 0, 1, [], folders_dir, out, 2)["headers_read"] == 1


def test_hostile_member_names_never_steer_a_path_and_every_member_is_accounted_for(
    sorter, tmp_path
):
    dicom = write_dicom(tmp_path / "one.dcm", name="EVIL", pid="6")
    other = write_dicom(tmp_path / "two.dcm", name="EVIL", pid="6", instance=2)
    sorter.input_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sorter.input_dir / "hostile.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name in [
            "../../escape.dcm",
            "/etc/absolute.dcm",
            "a/./../../../up.dcm",
            "CON",
            "x\\..\\y.dcm",
            os.fsdecode(b"\xff\xfe-latin.dcm"),
            "dup.dcm",
        ]:
            _add_member(tar, name, dicom)
        _add_member(tar, "dup.dcm", other)  # the same name again, another file
        _add_member(tar, "link.dcm", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add_member(tar, "hard.dcm", type=tarfile.LNKTYPE, linkname="dup.dcm")
        _add_member(tar, "device", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _add_member(tar, "folder/", type=tarfile.DIRTYPE)
    with zipfile.ZipFile(sorter.input_dir / "hostile.zip", "w") as zf:
        zf.writestr("../../zip-escape.dcm", dicom)
        zf.writestr("sub/../../../../zip-up.dcm", other)
    sorter.run()
    outcomes = assert_every_file_accounted_for(sorter)
    for outside in (tmp_path, tmp_path.parent):
        assert not {"escape.dcm", "up.dcm", "zip-escape.dcm", "zip-up.dcm"} & set(
            os.listdir(outside)
        )
    reasons = _skip_reasons(sorter)
    assert reasons["hostile.tar//link.dcm"] == archives.LINK
    assert reasons["hostile.tar//hard.dcm"] == archives.LINK
    assert reasons["hostile.tar//device"] == archives.SPECIAL
    relpaths = set(outcomes.column("relpath"))
    assert {"hostile.tar//dup.dcm", "hostile.tar//2//dup.dcm"} <= relpaths
    assert "hostile.tar//../../escape.dcm" in relpaths  # the name, kept as text
    assert "hostile.tar//%FF%FE-latin.dcm" in relpaths
    files = tree_files(sorter.output_dir)
    assert all(".." not in Path(f).parts for f in files)


def _bad_crc_zip(path: Path, data: bytes) -> None:
    """A stored zip whose one member's bytes no longer match its CRC."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("IM1.dcm", data)
    raw = bytearray(path.read_bytes())
    at = raw.index(data[-64:])
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def _encrypted_zip(path: Path, data: bytes) -> None:
    """A zip whose member says it is encrypted (zipfile writes no encryption)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("IM1.dcm", data)
    raw = bytearray(path.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.index(signature)
        raw[at + flag_at] |= 0x1
    path.write_bytes(bytes(raw))


def test_damaged_encrypted_and_odd_archives_are_reported_and_the_rest_is_sorted(sorter, tmp_path):
    plain = tmp_path / "plain"
    demo.generate(plain, patients=1, series=2, instances=4, junk=False)
    (patient,) = plain.iterdir()
    whole = tmp_path / "whole.tar.gz"
    _pack_tar(whole, patient)
    sorter.input_dir.mkdir(parents=True, exist_ok=True)
    data = whole.read_bytes()
    (sorter.input_dir / "truncated.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    small = write_dicom(tmp_path / "small.dcm", name="CRC", pid="7")
    _bad_crc_zip(sorter.input_dir / "bad-crc-small.zip", small)
    big = write_dicom(tmp_path / "big.dcm", name="CRC", pid="7", rows=300, instance=2)
    _bad_crc_zip(sorter.input_dir / "bad-crc-big.zip", big)
    _encrypted_zip(sorter.input_dir / "locked.zip", small)
    (sorter.input_dir / "single.dcm.gz").write_bytes(gzip.compress(small))
    zipfile.ZipFile(sorter.input_dir / "empty.zip", "w").close()
    write_dicom(sorter.input_dir / "plain" / "IM1.dcm", name="PLAIN", pid="8")

    sorter.run()
    assert_every_file_accounted_for(sorter)
    reasons = _skip_reasons(sorter)
    assert reasons["truncated.tar.gz"].startswith("damaged archive"), reasons
    assert any(
        r.startswith("truncated.tar.gz//") for r in ledger.read(sorter.state)["relpath"].to_pylist()
    )
    assert reasons["bad-crc-small.zip//IM1.dcm"].startswith("damaged archive member"), reasons
    assert reasons["locked.zip//IM1.dcm"] == archives.ENCRYPTED
    assert reasons["single.dcm.gz"] == archives.NOT_A_TAR
    assert reasons["empty.zip"] == archives.EMPTY
    # A bad CRC is found past the header too: the member is skipped, not a failing copy.
    assert reasons["bad-crc-big.zip//IM1.dcm"].startswith("damaged archive member"), reasons
    assert "plain/IM1.dcm" in ledger.read(sorter.state)["relpath"].to_pylist()


def test_members_are_copied_in_hardlink_mode(sorter, tmp_path):
    plain = tmp_path / "plain"
    demo.generate(plain, patients=1, series=1, instances=2, junk=False)
    (patient,) = plain.iterdir()
    sorter.input_dir.mkdir(parents=True, exist_ok=True)
    _pack_zip(sorter.input_dir / "p.zip", patient)
    write_dicom(sorter.input_dir / "loose" / "IM1.dcm", name="LOOSE", pid="9")
    sorter.run(transfer_mode="hardlink")
    assert_every_file_accounted_for(sorter)
    rows = ledger.read(sorter.state).to_pylist()
    modes = {archives.is_member(r["relpath"]): r["mode"] for r in rows}
    assert modes == {True: "copy", False: "hardlink"}
    assert sorter.summary()["files_from_archives"] == 2
    report = (sorter.state / "report.html").read_text()
    assert "2 files came from archives in the input: they were copied" in report


def test_a_run_killed_while_copying_a_member_is_finished_by_the_next(sorter, tmp_path):
    sorter.input_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(sorter.input_dir / "big.zip", "w", zipfile.ZIP_STORED) as zf:
        for i in range(3):
            path = tmp_path / f"IM{i}.dcm"
            zf.writestr(f"IM{i}.dcm", write_dicom(path, name="BIG", pid="9", rows=5000, instance=i))
    kill_when(
        sorter, lambda: any(n.endswith(".dcmsort-tmp") for n in tree_files(sorter.output_dir))
    )
    temps = [n for n in tree_files(sorter.output_dir) if n.endswith(".dcmsort-tmp")]
    assert temps, "the run was not killed during a copy; retry"
    sorter.run()
    assert_every_file_accounted_for(sorter)
    files = tree_files(sorter.output_dir)
    assert not [n for n in files if n.endswith(".dcmsort-tmp")], files
    assert sorter.summary()["files_sorted"] == 3


@given(st.text(min_size=1, max_size=40))
def test_any_member_name_round_trips_and_only_its_last_component_can_name_a_file(name):
    seen: dict[str, int] = {}
    key = archives.member_key(name, seen)
    relpath = archives.relpath_of("a b/x.zip", key)
    assert archives.split(relpath) == ("a b/x.zip", key)
    assert archives.SEPARATOR not in key.rpartition(archives.SEPARATOR)[2]
    file_name = inventory.file_name(relpath)
    assert "/" not in file_name and file_name not in ("", ".")
    # A second member of the same name is another relpath, with the same file name.
    again = archives.relpath_of("a b/x.zip", archives.member_key(name, seen))
    assert again != relpath and inventory.file_name(again) == file_name


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"PK\x03\x04rest", archives.ZIP),
        (b"PK\x05\x06" + bytes(18), archives.ZIP),
        (b"\x1f\x8b\x08", archives.TAR),
        (b"BZh91AY", archives.TAR),
        (b"\xfd7zXZ\x00", archives.TAR),
        (bytes(257) + b"ustar\x0000", archives.TAR),
        (bytes(128) + b"DICM", None),
        (b"hello", None),
    ],
)
def test_archives_are_recognised_by_their_first_bytes(head, kind):
    assert archives.kind(head) == kind


def test_check_restores_a_damaged_copy_of_a_member_from_its_archive(sorter, tmp_path):
    original = write_dicom(tmp_path / "IM1.dcm", name="DOE^JOHN", pid="1", rows=64)
    sorter.input_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sorter.input_dir / "p.tar.gz", "w:gz") as tar:
        _add_member(tar, "p/IM1.dcm", original)
    sorter.run()
    copy = sorter.output_dir / "DOE^JOHN_1/T1_1/IM1.dcm"
    os.truncate(copy, 1000)
    sorter.run(keys={"check": "true"})
    assert copy.read_bytes() == original
    check = sorter.summary()["check"]
    assert (check["restored"], check["damaged"]) == (1, 0)
    # Same size, one byte changed: only a checksum sees it, against the member's digest.
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF
    copy.write_bytes(bytes(damaged))
    sorter.run(keys={"check": "checksum"})
    assert copy.read_bytes() == original
    assert_every_file_accounted_for(sorter)


member_names = st.lists(
    st.one_of(
        st.text(min_size=1, max_size=30),
        st.lists(st.sampled_from(["..", ".", "", "CON", "a", "A", "x.dcm", "\\", ":"])).map(
            "/".join
        ),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=2, deadline=None, derandomize=True, database=None)
@given(names=member_names)
def test_any_member_names_reach_the_report_and_never_escape_the_output(tmp_path_factory, names):
    root = tmp_path_factory.mktemp("names")
    sorter = Sorter(root / "work", root / "in", root / "out")
    sorter.workdir.mkdir()
    data = write_dicom(root / "IM.dcm", name="ANY", pid="5")
    sorter.input_dir.mkdir()
    with tarfile.open(sorter.input_dir / "names.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for index, name in enumerate(names):
            if name.strip("/"):  # a folder entry otherwise
                # Each another instance: none is a duplicate of another.
                _add_member(tar, name, data.replace(b"IM.dcm", b"I%d.dcm" % index) + bytes(index))
    sorter.run()
    outcomes = assert_every_file_accounted_for(sorter)
    assert all(archives.is_member(r) for r in outcomes.column("relpath"))
    outside = {p.name for p in root.iterdir()}
    assert outside == {"work", "in", "out", "IM.dcm"}, outside


def test_dcmsort_where_answers_for_a_member_and_points_from_the_archive_to_its_members(
    sorter, tmp_path
):
    sorter.input_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(sorter.input_dir / "p.zip", "w") as zf:
        zf.writestr("IM1.dcm", write_dicom(tmp_path / "IM1.dcm", name="DOE^JOHN", pid="1"))
        zf.writestr("notes.txt", b"not DICOM")
    sorter.run()
    archive = sorter.input_dir / "p.zip"
    result = dcmsort(
        "where", sorter.output_dir, f"{archive}//IM1.dcm", f"{archive}//notes.txt", cwd=tmp_path
    )
    out = result.stdout
    assert f"{archive}//IM1.dcm: placed at {sorter.output_dir}/DOE^JOHN_1/T1_1/IM1.dcm" in out
    assert f"{archive}//notes.txt: skipped: not DICOM" in out
    assert result.returncode != 0  # one of them is not in the output
    typed = dcmsort("where", sorter.output_dir, f"{archive}//./IM1.dcm", cwd=tmp_path).stdout
    assert "placed at" in typed, typed
    out = dcmsort("where", sorter.output_dir, archive, cwd=tmp_path).stdout
    assert "an archive: 2 of its members are known here" in out, out


def _zip_patched(path: Path, members: dict[str, bytes], patch) -> None:
    """A zip of members whose bytes patch(bytearray) then changes (a writer's odd output)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    raw = bytearray(path.read_bytes())
    patch(raw)
    path.write_bytes(bytes(raw))


def _headers_of(raw: bytearray, name: bytes):
    """(offset, field offsets) of the local and central headers of member name."""
    for signature, fields in ((b"PK\x03\x04", (8, 26, 30)), (b"PK\x01\x02", (10, 28, 46))):
        at = 0
        while (at := raw.find(signature, at)) >= 0:
            length = struct.unpack_from("<H", raw, at + fields[1])[0]
            if raw[at + fields[2] : at + fields[2] + length] == name:
                yield signature, at
            at += 4


def test_archives_python_cannot_read_all_of_are_reported_and_never_stop_the_run(sorter, tmp_path):
    """Found by breaking it: odd writers' archives once failed every run, hung, or lost a
    member silently."""
    dicom = {
        i: write_dicom(tmp_path / f"{i}.dcm", name="ODD", pid="4", instance=i) for i in range(9)
    }
    src = sorter.input_dir
    src.mkdir(parents=True, exist_ok=True)
    write_dicom(src / "plain" / "IM1.dcm", name="PLAIN", pid="8")

    def deflate64(raw):  # method 9 (Windows Explorer's, for big files)
        for signature, at in _headers_of(raw, b"b.dcm"):
            struct.pack_into("<H", raw, at + (8 if signature == b"PK\x03\x04" else 10), 9)

    _zip_patched(src / "deflate64.zip", {"a.dcm": dicom[0], "b.dcm": dicom[1]}, deflate64)

    def new_version(raw):  # "version needed to extract" 6.4
        raw[raw.find(b"PK\x01\x02") + 6] = 64

    _zip_patched(src / "version.zip", {"a.dcm": dicom[2]}, new_version)

    def size_lie(raw):  # the header claims 1,000 bytes more than the member holds
        for signature, at in _headers_of(raw, b"a.dcm"):
            field = 22 if signature == b"PK\x03\x04" else 24
            struct.pack_into("<I", raw, at + field, len(dicom[3]) + 1000)

    _zip_patched(src / "lie.zip", {"a.dcm": dicom[3], "b.dcm": dicom[4]}, size_lie)
    with zipfile.ZipFile(src / "dir-entry.zip", "w") as zf:  # a name ending in "/", with bytes
        entry = zipfile.ZipInfo("hidden.dcm/")
        entry.external_attr = 0o100644 << 16
        zf.writestr(entry, dicom[5])
    with tarfile.open(src / "odd.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _add_member(tar, "unknown-type.dcm", dicom[6], type=b"Z")  # tar reads it as a file
    huge = io.BytesIO()  # a member that claims 2**62 bytes, then the archive ends
    _add_member(tarfile.open(fileobj=huge, mode="w"), "a.dcm", dicom[7])  # noqa: SIM115
    info = tarfile.TarInfo("claims-2-to-the-62.bin")
    info.size = 2**62
    (src / "huge.tar").write_bytes(
        huge.getvalue() + info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + bytes(1024)
    )
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w:gz") as tar:
        _add_member(tar, "a.dcm", dicom[8])
    (src / "cut.tar.gz").write_bytes(whole.getvalue()[:60])
    nested = io.BytesIO()
    with zipfile.ZipFile(nested, "w") as zf:
        zf.writestr("a.dcm", dicom[0])
    with zipfile.ZipFile(src / "outer.zip", "w") as zf:
        zf.writestr("inner.zip", nested.getvalue())

    sorter.run()  # exits 0: nothing here fails a run
    outcomes = assert_every_file_accounted_for(sorter)
    reasons = _skip_reasons(sorter)
    assert reasons["deflate64.zip//b.dcm"].startswith(archives.UNSUPPORTED), reasons
    assert reasons["version.zip"].startswith("archive in a form Python cannot read"), reasons
    assert reasons["lie.zip//a.dcm"].startswith("damaged archive member"), reasons
    assert any(
        relpath.startswith("huge.tar") and reason.startswith("damaged archive")
        for relpath, reason in reasons.items()
    ), reasons
    assert reasons["cut.tar.gz"] == archives.NOT_A_TAR
    assert reasons["outer.zip//inner.zip"] == archives.NESTED
    sorted_now = {r["relpath"] for r in outcomes if r["action"] != "skip"}
    assert {
        "plain/IM1.dcm",
        "deflate64.zip//a.dcm",
        "lie.zip//b.dcm",
        "dir-entry.zip//hidden.dcm",
        "odd.tar//unknown-type.dcm",
        "huge.tar//a.dcm",
    } <= sorted_now, sorted_now
    # A touched archive is read again; one with an unsupported member still sorts the rest.
    os.utime(src / "deflate64.zip")
    sorter.run()
    assert_every_file_accounted_for(sorter)


def test_a_member_header_longer_than_what_is_read_is_skipped_not_sorted_wrong(sorter, tmp_path):
    import pydicom

    plain = tmp_path / "big.dcm"
    write_dicom(plain, name="DOE^JOHN", pid="6")
    dataset = pydicom.dcmread(plain)
    dataset.add_new(0x00090010, "LO", "ACME")
    dataset.add_new(0x00091001, "OB", bytes(9 * 2**20))  # before PatientName
    dataset.save_as(plain)
    sorter.input_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(sorter.input_dir / "big.zip", "w") as zf:
        zf.write(plain, "big.dcm")
    sorter.run()
    assert _skip_reasons(sorter)["big.zip//big.dcm"] == headers.MEMBER_HEADER_TOO_LONG
    assert not list(sorter.output_dir.glob("UNKNOWN*"))


def test_an_archive_rewritten_while_its_members_are_copied_is_changed_not_damaged(
    tmp_path, monkeypatch
):
    """The transfer reads an archive that someone rewrites meanwhile: what it could not
    copy is "changed during the run" (sorted by the next run), not damage that fails it."""
    rng = random.Random(0)
    data = [rng.randbytes(2 * 2**20) for _ in range(2)]  # incompressible: read as it goes
    input_dir, output_dir = tmp_path / "in", tmp_path / "out"
    input_dir.mkdir()
    archive = input_dir / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i, content in enumerate(data):
            _add_member(tar, f"m{i}.dcm", content)
    info = os.stat(archive)
    rows = [
        transfer.Row(
            f"a.tar.gz//m{i}.dcm",
            len(content),
            info.st_mtime_ns,
            "sort",
            f"P/S/m{i}.dcm",
            None,
            ctime_ns=info.st_ctime_ns,
            ino=info.st_ino,
        )
        for i, content in enumerate(data)
    ]
    listed = archives.members

    def rewritten_after_the_first(handle, kind):
        for number, member in enumerate(listed(handle, kind)):
            yield member
            if number == 0:  # someone writes into the rest of it, in place
                with open(archive, "r+b") as f:
                    f.seek(info.st_size * 3 // 4)
                    f.write(bytes(4096))

    monkeypatch.setattr(archives, "members", rewritten_after_the_first)
    tree = transfer.OutputTree(output_dir)
    outcomes = transfer._place_archive(tree, "a.tar.gz", rows, input_dir, "size", "token")
    tree.close()
    assert [o.status for o in outcomes] == [transfer.COPIED, transfer.CHANGED], [
        (o.status, o.detail) for o in outcomes
    ]
    assert (output_dir / "P/S/m0.dcm").read_bytes() == data[0]
    assert not (output_dir / "P/S/m1.dcm").exists()


def test_a_link_whose_content_is_left_only_in_an_archive_is_not_restored_as_a_copy(
    sorter, tmp_path
):
    """Symlink mode: the loose files are linked, the same files in a zip are duplicates;
    then the loose files go. A check cannot restore a link from an archive: a copy in its
    place was taken for damage by every later check, set aside and restored again."""
    sorter.input_dir.mkdir(parents=True, exist_ok=True)
    data = write_dicom(sorter.input_dir / "loose" / "IM1.dcm", name="DOE^JOHN", pid="1")
    with zipfile.ZipFile(sorter.input_dir / "zz.zip", "w") as zf:
        zf.writestr("IM1.dcm", data)
    sorter.run(transfer_mode="symlink")
    shutil.rmtree(sorter.input_dir / "loose")
    for _ in range(2):
        sorter.run(transfer_mode="symlink", keys={"check": "true"})
        assert sorter.summary()["check"]["restored"] == 0
    assert not [p for p in tree_files(sorter.output_dir) if "dcmsort-damaged" in p]
    assert sorter.summary()["dangling_links"] == 1
