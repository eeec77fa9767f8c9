"""The Snakefile's walk reaches the extract job through a file (state/walks): what the job
takes from it must be the walk its manifest is named after, and an input changed after the
walk must never hang a job or fill the disk."""

from __future__ import annotations

import marshal
from pathlib import Path

import pyarrow.parquet as pq

from conftest import write_dicom
from dcmsort import headers, inventory


def _two_folders(tmp_path: Path) -> Path:
    source = tmp_path / "in"
    write_dicom(source / "a" / "1.dcm", pid="1")
    write_dicom(source / "b" / "1.dcm", pid="2")
    return source


def test_a_walk_that_is_not_the_one_the_manifest_is_named_after_is_not_used(tmp_path):
    # A walk file whose content is not the walk behind its name (foreign, left over,
    # damaged into another valid marshal) would name the manifest after one input and
    # fill it with another: the files it leaves out are then never sorted nor listed,
    # since every later run finds that manifest current.
    source = _two_folders(tmp_path)
    walks = inventory.walk_folders(source, inventory.list_folders(source))
    fingerprint = inventory.batch_fingerprint(walks)
    state = tmp_path / "state"
    output = state / "manifests" / f"batch-0-{fingerprint}.parquet"
    walk = inventory.walk_path(output)
    walk.parent.mkdir(parents=True)
    walk.write_bytes(inventory.dump_walk({"a": walks["a"]}))  # folder b left out
    folders = state / "manifests" / "folders"
    headers.main(
        [
            *("--input-dir", str(source), "--batch", "0", "--batches", "1"),
            *("--manifests", str(folders), "--output", str(output)),
        ]
    )
    assert sorted(pq.read_table(output)["relpath"].to_pylist()) == ["a/1.dcm", "b/1.dcm"]
    assert not walk.exists()


def test_a_damaged_walk_is_walked_again_not_a_failed_job(tmp_path):
    source = _two_folders(tmp_path)
    walks = inventory.walk_folders(source, inventory.list_folders(source))
    path = tmp_path / "batch-0-x.marshal"
    for damaged in (b"\x00", b"[\x00\x00\x00\x00", inventory.dump_walk(walks)[:-3]):
        path.write_bytes(damaged)
        assert inventory.load_walk(path) is None
    path.write_bytes(marshal.dumps([1, 2]))  # a valid marshal of something else
    assert inventory.load_walk(path) is None
    path.write_bytes(marshal.dumps({"a": [("a/1.dcm", 1)]}))  # rows of another layout
    assert inventory.load_walk(path) is None
