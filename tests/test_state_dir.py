"""End to end: where the state may live, and which output it describes."""

import json
import os

from conftest import Run, assert_every_file_accounted_for, tree_snapshot, write_dicom
from dcmsort import demo


def assert_refused(result: Run, message: str) -> None:
    """A run refused at start: non-zero, one `dcmsort: error:` line holding message."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("dcmsort: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output


def test_a_state_dir_inside_the_sorted_tree_is_refused_and_no_sorted_file_is_replaced(sorter):
    # Sorted files named as state files are, which a state in their folder would replace.
    for name in ("report.html", "summary.json", "transfers.parquet"):
        write_dicom(sorter.input_dir / "scans" / name, name="ROE^JANE", pid="2", desc="SER")
    sorter.run()
    series = sorter.output_dir / "ROE^JANE_2" / "SER_1"
    assert (series / "report.html").is_file()
    before = tree_snapshot(sorter.output_dir)
    for state in (series, sorter.output_dir / "ROE^JANE_2", sorter.output_dir):
        result = sorter.run(check=False, state_dir=state)
        assert_refused(result, f"state_dir {state} is inside output_dir {sorter.output_dir}")
    assert tree_snapshot(sorter.output_dir) == before
    assert_every_file_accounted_for(sorter)


def test_one_state_dir_for_a_second_output_is_refused_and_that_output_is_not_created(
    sorter, tmp_path
):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=2, junk=False)
    state, other = tmp_path / "state", tmp_path / "B"
    sorter.run(state_dir=state)
    expected = f"state_dir {state} holds the state of output_dir {sorter.output_dir}, not {other}"
    assert_refused(sorter.run(check=False, state_dir=state, output_dir=other), expected)
    assert not other.exists()
    # A state of v0.3 has no record of its output: its last report names it.
    layout = json.loads((state / "layout.json").read_text())
    del layout["output_dir"]
    (state / "layout.json").write_text(json.dumps(layout))
    assert_refused(sorter.run(check=False, state_dir=state, output_dir=other), expected)
    assert not other.exists()
    # The same folder, spelled another way or reached through a link, is the same output.
    (tmp_path / "link").symlink_to(sorter.output_dir)
    for spelled in (f"../{sorter.output_dir.name}/.", tmp_path / "link"):
        again = sorter.run(state_dir=state, output_dir=spelled)
        assert "dcmsort: nothing new; last run: 2 files sorted" in again.stderr


def test_an_output_moved_with_its_state_inside_is_sorted_into_as_before(sorter, tmp_path):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=2, junk=False)
    sorter.run()
    for moved, record in ((tmp_path / "Moved", True), (tmp_path / "Moved_again", False)):
        if not record:  # as a state of v0.3 left it: its summary names the old place
            layout = json.loads((sorter.state / "layout.json").read_text())
            layout.pop("output_dir", None)
            (sorter.state / "layout.json").write_text(json.dumps(layout))
        sorter.output_dir.rename(moved)
        sorter.output_dir = moved
        write_dicom(sorter.input_dir / "late" / f"{moved.name}.dcm", pid="late")
        result = sorter.run()
        assert "new this run" in result.stderr
        assert_every_file_accounted_for(sorter)
    assert sorter.summary()["output_dir"] == str(moved)


def test_a_link_at_the_state_folder_inside_the_output_is_refused(sorter, tmp_path):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sorter.output_dir.mkdir()
    (sorter.output_dir / ".dcmsort").symlink_to(elsewhere)
    result = sorter.run(check=False)
    assert_refused(result, f"is reached through the symbolic link {sorter.state} inside")
    assert os.listdir(elsewhere) == [] and os.listdir(sorter.output_dir) == [".dcmsort"]


def test_an_empty_state_dir_is_the_default_state_folder(sorter):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1, junk=False)
    sorter.run(state_dir='""')  # as the shell passes --config 'state_dir=""'
    assert (sorter.state / "report.html").is_file()


def test_a_state_dir_holding_other_files_is_refused_and_they_are_kept(sorter, tmp_path):
    demo.generate(sorter.input_dir, patients=1, series=1, instances=1)
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "report.html").write_text("the user's own report")
    result = sorter.run(check=False, state_dir=folder)
    assert_refused(result, f"state_dir {folder} holds 'report.html' and no dcmsort state")
    assert os.listdir(folder) == ["report.html"]
    assert (folder / "report.html").read_text() == "the user's own report"
    assert not sorter.output_dir.exists()
