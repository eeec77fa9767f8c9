"""The Snakefile's walk reaches the extract job through a file (state/walks): what the job
takes from it must be the walk its manifest is named after, and an input changed after the
walk must never hang a job or fill the disk."""

from __future__ import annotations

import contextlib
import marshal
import os
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_dicom
from dcmsort import fileops, headers, inventory


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


def _unblock_after(fifo: Path, seconds: float) -> threading.Thread:
    """Open fifo for writing after a while: a reader blocked in open() is released (so a
    test of a hang fails instead of hanging)."""

    def release() -> None:
        time.sleep(seconds)
        for _ in range(60):  # every open of it, for a minute
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            time.sleep(0.5)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def test_a_file_replaced_by_a_fifo_after_the_walk_does_not_hang_the_extract(tmp_path):
    # The extract job takes its files from the Snakefile's walk: a file that is a FIFO by
    # the time its header is read is opened as one (a blocking open, before this fix).
    source = _two_folders(tmp_path)
    walks = inventory.walk_folders(source, inventory.list_folders(source))
    fifo = source / "a" / "1.dcm"
    fifo.unlink()
    os.mkfifo(fifo)
    _unblock_after(fifo, 5)
    started = time.monotonic()
    headers.extract_batch(
        source, 0, 1, [], tmp_path / "folders", tmp_path / "b.parquet", walks=walks
    )
    assert time.monotonic() - started < 4, "the extract blocked on a FIFO"
    rows = {r["relpath"]: r for r in pq.read_table(tmp_path / "b.parquet").to_pylist()}
    assert rows["a/1.dcm"]["skip_reason"], "a FIFO is not sortable"
    assert rows["b/1.dcm"]["skip_reason"] is None


def test_the_digest_of_an_input_replaced_by_a_fifo_or_a_device_is_an_error_not_a_hang(tmp_path):
    # The plan hashes inputs (duplicates, conflicts) long after the Snakefile's walk.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _unblock_after(fifo, 5)
    device = tmp_path / "zero"
    device.symlink_to("/dev/zero")
    started = time.monotonic()
    for path in (fifo, device):
        with pytest.raises(OSError):
            fileops.file_digest(path)
    assert time.monotonic() - started < 4
    regular = tmp_path / "f"
    regular.write_bytes(b"x" * 3_000_000)
    with open(regular, "rb") as handle:
        assert fileops.file_digest(regular) == fileops.digest_of(handle)
