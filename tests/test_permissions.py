"""Permissions of what dcmsort writes: the mode rules, and the calls that apply them."""

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import Sorter, assert_every_file_accounted_for, tree_snapshot, write_dicom
from dcmsort import demo, permissions
from dcmsort.fileops import atomic_path, temp_path_for
from dcmsort.permissions import (
    copy_mode,
    folder_mode,
    new_output_mode,
    run_umask,
    state_file_mode,
)
from dcmsort.settings import acquire_run_lock
from dcmsort.transfer import OutputTree, Row, put

SETGID = stat.S_ISGID
modes = st.integers(0, 0o777)
folder_modes = st.builds(lambda m, g: m | 0o700 | (SETGID if g else 0), modes, st.booleans())


@pytest.mark.parametrize(
    ("parent", "umask", "expected"),
    [
        (0o700, 0o022, 0o700),  # a private output stays private all the way down
        (0o755, 0o022, 0o755),  # an ordinary output: as mkdir would
        (0o755, 0o077, 0o700),  # the umask still narrows
        (0o750, 0o002, 0o750),  # never more open than the parent
        (SETGID | 0o770, 0o022, SETGID | 0o770),  # group-shared stays group-shared
        (SETGID | 0o770, 0o077, SETGID | 0o770),  # ... whatever the member's umask
        (SETGID | 0o750, 0o022, SETGID | 0o750),  # a read-only share stays read-only
        (SETGID | 0o775, 0o022, SETGID | 0o775),  # others as the umask and the parent say
        (SETGID | 0o775, 0o027, SETGID | 0o770),
    ],
)
def test_a_created_folder_takes_its_parents_mode_narrowed_by_the_umask(parent, umask, expected):
    assert folder_mode(parent, umask) == expected


@given(parent=folder_modes, umask=modes)
def test_a_created_folder_is_never_more_open_than_its_parent_for_others(parent, umask):
    mode = folder_mode(parent, umask)
    assert mode & 0o007 & ~parent == 0
    assert mode & 0o070 & ~parent == 0
    assert mode & 0o700 == 0o700  # the owner can always go on writing
    assert bool(mode & SETGID) == bool(parent & SETGID)
    if not parent & SETGID:
        assert mode & 0o077 & umask == 0


@given(output=st.builds(lambda m, g: m | (SETGID if g else 0), modes, st.booleans()), umask=modes)
def test_folders_below_folders_dcmsort_made_get_the_same_mode_at_every_depth(output, umask):
    # The transfer gives every folder it makes the mode of one made in output_dir, without
    # reading the mode of the folder it is made in (another thread may still be setting it).
    once = folder_mode(output, umask)
    assert folder_mode(once, umask) == once


@pytest.mark.parametrize(
    ("folder", "umask", "expected"),
    [
        (0o700, 0o022, 0o600),
        (0o755, 0o022, 0o644),
        (SETGID | 0o770, 0o022, 0o660),  # the next member of the group can lock, append
        (SETGID | 0o770, 0o027, 0o660),
        (0o777, 0o077, 0o600),
    ],
)
def test_a_state_file_is_its_folders_mode_without_execute_bits(folder, umask, expected):
    assert state_file_mode(folder, umask) == expected


@given(folder=folder_modes, umask=modes)
def test_a_state_file_is_never_more_open_than_its_folder(folder, umask):
    mode = state_file_mode(folder, umask)
    assert mode & 0o111 == 0
    assert mode & 0o077 & ~folder == 0


@pytest.mark.parametrize(
    ("source", "umask", "expected"),
    [
        (0o600, 0o022, 0o600),  # as cp: a private file stays private
        (0o640, 0o022, 0o640),
        (0o644, 0o077, 0o600),
        (0o100755, 0o022, 0o755),  # the file type bits are not permissions
        (0o4755, 0o022, 0o755),  # nor setuid
    ],
)
def test_a_copy_gets_the_source_mode_masked_by_the_umask(source, umask, expected):
    assert copy_mode(source, umask) == expected


@given(source=modes, umask=modes, output=folder_modes)
def test_a_copy_is_never_wider_than_its_source_nor_its_output(source, umask, output):
    mode = copy_mode(source, run_umask(umask, output))
    assert mode & ~source == 0
    assert mode & 0o077 & ~output == 0


@pytest.mark.parametrize(
    ("umask", "output", "expected"),
    [
        (0o022, 0o700, 0o077),
        (0o022, 0o755, 0o022),  # an ordinary output: the user's umask as it is
        (0o002, SETGID | 0o770, 0o007),
        (0o077, 0o755, 0o077),  # never widened
    ],
)
def test_the_run_umask_only_narrows_to_the_output(umask, output, expected):
    assert run_umask(umask, output) == expected


def test_a_missing_output_is_no_more_open_than_input_nor_its_parent():
    assert new_output_mode(0o700, 0o755, 0o022) == 0o700
    assert new_output_mode(0o755, 0o750, 0o022) == 0o750
    assert new_output_mode(0o755, 0o755, 0o022) == 0o755
    assert new_output_mode(0o750, SETGID | 0o770, 0o022) == SETGID | 0o750


@pytest.fixture
def umask_022():
    previous = permissions.set_umask(0o022)
    yield
    permissions.set_umask(previous)


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_umask_is_read_without_changing_it(umask_022):
    assert permissions.current_umask() == 0o022
    assert permissions._read_umask() == 0o022
    assert os.umask(0o022) == 0o022


@pytest.mark.parametrize("parent", [0o700, 0o750, SETGID | 0o770])
def test_made_folders_take_their_parents_mode_at_every_level(tmp_path, umask_022, parent):
    root = tmp_path / "out"
    root.mkdir()
    os.chmod(root, parent)
    permissions.make_folders(root / "a" / "b" / "c")
    for folder in (root / "a", root / "a" / "b", root / "a" / "b" / "c"):
        assert mode_of(folder) == parent, oct(mode_of(folder))


def test_an_existing_folder_is_never_chmodded(tmp_path, umask_022):
    root = tmp_path / "out"
    (root / "open").mkdir(parents=True)
    os.chmod(root, 0o700)
    os.chmod(root / "open", 0o777)
    permissions.make_folders(root / "open")
    permissions.make_folders(root / "open" / "new")
    assert mode_of(root / "open") == 0o777
    assert mode_of(root / "open" / "new") == 0o755  # its parent's, narrowed by the umask


def test_the_transfer_makes_folders_with_the_output_folders_mode_in_any_folder(tmp_path, umask_022):
    # Never more open than output_dir, and never derived from a folder's current mode.
    output = tmp_path / "out"
    (output / "open").mkdir(parents=True)
    os.chmod(output, 0o750)
    os.chmod(output / "open", 0o777)
    fd = OutputTree(output).open_folder("open/new/deeper")
    os.close(fd)
    assert mode_of(output / "open") == 0o777  # not made by dcmsort: left as it is
    assert mode_of(output / "open" / "new") == mode_of(output / "open/new/deeper") == 0o750


def test_a_file_where_a_folder_should_be_is_an_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        permissions.make_folders(tmp_path / "f")


def copy_into(source: Path, folder: Path) -> Path:
    """Copy source into folder through the transfer (the only code that copies)."""
    info = source.stat()
    row = Row(source.name, info.st_size, info.st_mtime_ns, "sort", source.name, None)
    fd = OutputTree(folder).open_folder("")
    try:
        assert put(fd, row, source.parent, "copy", "size")[0] == "copied"
    finally:
        os.close(fd)
    return folder / source.name


@pytest.mark.parametrize("source_mode", [0o600, 0o640, 0o444])
def test_the_transfer_copies_with_the_source_mode_masked_by_the_umask(
    tmp_path, umask_022, source_mode
):
    source = tmp_path / "IM1"
    source.write_bytes(b"DICOM" * 10)
    os.chmod(source, source_mode)
    assert mode_of(copy_into(source, tmp_path / "out")) == source_mode
    os.umask(0o077)
    permissions.current_umask.cache_clear()
    assert mode_of(copy_into(source, tmp_path / "out2")) == source_mode & 0o700


def test_a_file_at_a_temporary_name_lends_its_mode_to_no_copy(tmp_path, umask_022):
    source = tmp_path / "IM1"
    source.write_bytes(b"DICOM" * 10)
    os.chmod(source, 0o600)
    target = tmp_path / "out" / "IM1"
    target.parent.mkdir()
    stale = temp_path_for(target)
    stale.write_bytes(b"half")
    os.chmod(stale, 0o666)
    assert mode_of(copy_into(source, target.parent)) == 0o600
    assert stale.read_bytes() == b"half"  # not ours (no token): never touched


def test_state_folders_made_by_atomic_writes_take_the_parents_mode(tmp_path, umask_022):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, SETGID | 0o770)
    with atomic_path(state / "manifests" / "folders" / "p.parquet") as tmp:
        tmp.write_bytes(b"x")
    assert mode_of(state / "manifests") == SETGID | 0o770
    assert mode_of(state / "manifests" / "folders") == SETGID | 0o770


def test_the_run_lock_of_a_shared_output_can_be_opened_by_the_group(tmp_path, umask_022):
    output = tmp_path / "Classified"
    output.mkdir()
    os.chmod(output, SETGID | 0o770)
    acquire_run_lock(output / ".dcmsort")
    assert mode_of(output / ".dcmsort") == SETGID | 0o770
    assert mode_of(output / ".dcmsort" / "run.lock") == 0o660


def test_prepare_run_folders_makes_a_private_output_for_a_private_input(tmp_path, umask_022):
    os.chmod(tmp_path, 0o755)
    input_dir = tmp_path / "in"
    input_dir.mkdir(mode=0o700)
    output, state = tmp_path / "new" / "Classified", tmp_path / "new" / "Classified" / ".s"
    permissions.prepare_run_folders(input_dir, output, state, ("logs/extract",))
    assert mode_of(tmp_path / "new") == 0o755  # a parent: as mkdir -p would
    assert mode_of(output) == 0o700
    assert mode_of(state) == mode_of(state / "logs") == mode_of(state / "logs" / "extract")
    assert mode_of(state) == 0o700
    assert mode_of(input_dir) == 0o700


def test_prepare_run_folders_leaves_an_existing_output_as_it_is(tmp_path, umask_022):
    input_dir, output = tmp_path / "in", tmp_path / "out"
    input_dir.mkdir(mode=0o700)
    output.mkdir()
    os.chmod(output, 0o777)
    permissions.prepare_run_folders(input_dir, output, output / ".dcmsort")
    assert mode_of(output) == 0o777
    assert mode_of(output / ".dcmsort") == 0o755


def test_narrow_umask_narrows_to_an_existing_output(tmp_path, umask_022):
    output = tmp_path / "out"
    output.mkdir(mode=0o700)
    assert permissions.narrow_umask(output, tmp_path) == 0o077
    assert permissions.current_umask() == 0o077


# End to end: the real snakemake, as a user with the usual umask 022 on a shared machine.

PRIVATE, SHARED = 0o700, SETGID | 0o770


@pytest.mark.parametrize(
    ("transfer_mode", "output_mode"),
    [("copy", PRIVATE), ("copy", SHARED), ("hardlink", SHARED), ("symlink", PRIVATE)],
)
def test_nothing_dcmsort_writes_is_more_open_than_the_input_or_the_output(
    sorter, transfer_mode, output_mode
):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=2, junk=False)
    inputs = sorted(p for p in sorter.input_dir.rglob("*") if p.is_file())
    for index, path in enumerate(inputs):
        os.chmod(path, (0o600, 0o640)[index % 2])
    for folder in [sorter.input_dir, *(p for p in sorter.input_dir.rglob("*") if p.is_dir())]:
        os.chmod(folder, 0o700)
    sorter.output_dir.mkdir()
    os.chmod(sorter.output_dir, output_mode)
    before = tree_snapshot(sorter.input_dir)
    input_mode = mode_of(sorter.input_dir)

    sorter.run(umask=0o022, transfer_mode=transfer_mode)

    assert tree_snapshot(sorter.input_dir) == before
    assert mode_of(sorter.input_dir) == input_mode
    assert mode_of(sorter.output_dir) == output_mode  # never changed
    plan = assert_every_file_accounted_for(sorter)
    # A private output: only the owner, all the way down. A shared one: the group, never
    # others; folders keep setgid and group rwx so the next member of the group can add.
    state_limit = 0o600 if output_mode == PRIVATE else 0o660
    run_umask_ = run_umask(0o022, output_mode)
    created = [p for p in sorter.output_dir.rglob("*") if not p.is_symlink()]
    assert {p.name for p in created} >= {".dcmsort", "logs", "extract", "run.lock"}
    for path in created:
        mode = mode_of(path)
        if path.is_dir():
            assert mode == output_mode, (path, oct(mode))
        elif sorter.state in path.parents:
            assert mode & ~state_limit == 0 and mode & 0o600 == 0o600, (path, oct(mode))
    for name in ("run.lock", "history.jsonl"):  # opened in place by the next run
        assert mode_of(sorter.state / name) == state_limit
    for row in plan.where(action="sort"):
        source, placed = sorter.input_dir / row["relpath"], sorter.output_dir / row["destination"]
        if transfer_mode == "copy":
            assert mode_of(placed) == copy_mode(mode_of(source), run_umask_), row["destination"]
        elif transfer_mode == "hardlink":
            assert os.stat(placed).st_ino == os.stat(source).st_ino
        else:
            assert os.readlink(placed) == str(source)
    assert {mode_of(sorter.input_dir / r) for r in plan.column("relpath")} == {0o600, 0o640}


def full_mode(path: Path) -> int:
    """Permission bits and setgid, as ``ls -l`` shows them."""
    return os.lstat(path).st_mode & (SETGID | 0o777)


@pytest.mark.parametrize("output_mode", [0o755, SHARED], ids=["0755", "2770"])
def test_folders_made_by_many_threads_at_once_all_get_the_output_folders_mode(sorter, output_mode):
    # README "Group access for a lab": "Folders are 2770 whatever a member's umask" (issue
    # 24: 2-8 % of folders came out 2700 or 0700 when threads made series folders in a
    # patient folder whose own mode another thread had not set yet). Many patients with
    # many one-file series, so that threads meet in the same patient folder; a fresh output
    # each round, since whether the threads meet depends on timing.
    for patient in range(40):
        for series in range(8):
            write_dicom(
                sorter.input_dir / f"p{patient}" / f"{series}.dcm",
                name=f"PAT^{patient}",
                pid=str(patient),
                desc=f"S{series}",
                number=series + 1,
            )
    wrong = {}
    for round_ in range(3):
        output = sorter.output_dir.with_name(f"Classified{round_}")
        output.mkdir()
        os.chmod(output, output_mode)
        Sorter(sorter.workdir, sorter.input_dir, output).run(umask=0o022, cores=8)
        folders = [p for p in output.rglob("*") if p.is_dir()]
        assert len(folders) > 40 * 9
        wrong.update({p: oct(full_mode(p)) for p in folders if full_mode(p) != output_mode})
    assert not wrong, f"{len(wrong)} folders with another mode: {sorted(wrong.items())[:5]}"
