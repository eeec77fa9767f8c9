"""The plan decides names and actions from manifests, the ledger and the output folder.

Real files throughout: inputs are written to a temporary folder (digests read them), the
output folder is real (the plan lists it), and the ledger is written by the real transfer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcmsort import ledger
from dcmsort.fileops import file_digest
from dcmsort.naming import Naming, fold, short_hash
from dcmsort.plan import Disk, make_plan, new_files
from dcmsort.transfer import transfer_plan

SEED = Naming("{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}", "{filename}")
DEFAULTS = {
    "folder": "p1",
    "mtime_ns": 1_000_000_000,
    "dicom": True,
    "skip_reason": None,
    "PatientName": "DOE^JOHN",
    "PatientID": "1",
    "StudyInstanceUID": "1.1",
    "StudyDate": "20240101",
    "SeriesInstanceUID": "1.1.1",
    "SeriesNumber": "1",
    "SeriesDescription": "LOCALIZER",
    "Modality": "MR",
    "SOPInstanceUID": None,
}


class World:
    """An input folder, an output folder and a state folder, driven like a run would."""

    def __init__(self, root: Path, settings: Naming = SEED):
        self.input, self.output, self.state = root / "in", root / "out", root / "state"
        for folder in (self.input, self.output, self.state):
            folder.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.rows: dict[str, dict] = {}

    def add(self, relpath: str, content: bytes = b"", **tags) -> dict:
        """Write an input file (content defaults to one unique to its path)."""
        path = self.input / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content or f"DICOM {relpath}".encode())
        os.utime(path, ns=(tags.get("mtime_ns", 10**9),) * 2)
        info = path.stat()
        row = {**DEFAULTS, **tags, "relpath": relpath, "size": info.st_size}
        row.update(mtime_ns=info.st_mtime_ns, ctime_ns=info.st_ctime_ns, ino=info.st_ino)
        self.rows[relpath] = row
        return row

    def rename(self, relpath: str, new: str) -> None:
        """As ``mv`` does it: the same file (and mtime) under another path."""
        (self.input / new).parent.mkdir(parents=True, exist_ok=True)
        (self.input / relpath).rename(self.input / new)
        moved = {"relpath": new, "folder": new.split("/")[0]}
        moved["ctime_ns"] = (self.input / new).stat().st_ctime_ns  # a rename changes it
        self.rows[new] = {**self.rows.pop(relpath), **moved}

    def touch(self, relpath: str, mtime_ns: int) -> None:
        os.utime(self.input / relpath, ns=(mtime_ns, mtime_ns))
        info = (self.input / relpath).stat()
        self.rows[relpath].update(mtime_ns=mtime_ns, ctime_ns=info.st_ctime_ns)

    def files(self) -> pa.Table:
        return pa.Table.from_pylist(sorted(self.rows.values(), key=lambda r: r["relpath"]))

    def plan(self) -> pa.Table:
        return make_plan(
            self.files(),
            ledger.read(self.state),
            self.settings,
            Disk(self.output),
            lambda relpath: file_digest(self.input / relpath),
        )

    def run(self, mode: str = "copy") -> dict[str, dict]:
        """Plan and transfer (the real one, committing to the ledger); plan rows by path."""
        plan = self.plan()
        pq.write_table(plan, self.state / "plan.parquet")
        results = transfer_plan(
            self.state / "plan.parquet", self.input, self.output, self.state, mode, "size", 2
        )
        done = {"copied", "linked", "relinked", "present", "duplicate"}
        assert set(results["status"].to_pylist()) <= done
        return {r["relpath"]: r for r in plan.to_pylist()}


def destinations(plan: dict[str, dict]) -> dict[str, str]:
    return {relpath: row["destination"] for relpath, row in plan.items()}


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def test_ordinary_files_get_the_seed_layout(world):
    world.add("p1/a/IM1.dcm", SOPInstanceUID="9.1")
    assert destinations(world.run()) == {"p1/a/IM1.dcm": "DOE^JOHN_1/LOCALIZER_1/IM1.dcm"}


def test_two_studies_with_same_series_number_are_kept_apart(world):
    world.add("p1/s1/IM1")
    world.add(
        "p1/s2/IM1",
        StudyInstanceUID="1.2",
        SeriesInstanceUID="1.2.1",
        StudyDate="20250101",
    )
    folders = {d.rsplit("/", 1)[0] for d in destinations(world.run()).values()}
    assert len(folders) == 2 and "DOE^JOHN_1/LOCALIZER_1" in folders


def test_series_may_share_a_folder_when_keep_series_apart_is_off(tmp_path):
    world = World(tmp_path, Naming("{PatientID}/{Modality}", "{filename}", keep_series_apart=False))
    world.add("p1/a", SeriesInstanceUID="1")
    world.add("p1/b", SeriesInstanceUID="2")
    assert set(destinations(world.run()).values()) == {"1/MR/a", "1/MR/b"}


def test_a_placement_never_moves_when_a_colliding_series_arrives_later(world):
    world.add("p1/IM1")
    first = destinations(world.run())
    # Would sort first if both were new: an older study, another series, same folder name.
    world.add("p0/IM1", StudyInstanceUID="0.9", SeriesInstanceUID="0.9.1", StudyDate="19990101")
    second = destinations(world.run())
    assert list(second) == ["p0/IM1"], "only the new file is planned"
    assert first["p1/IM1"] == "DOE^JOHN_1/LOCALIZER_1/IM1"
    assert second["p0/IM1"].startswith("DOE^JOHN_1/LOCALIZER_1_")


def test_two_different_files_with_the_same_name_are_both_kept(world):
    world.add("p1/a/IM1.dcm")
    world.add("p1/b/IM1.dcm")
    assert sorted(destinations(world.run()).values()) == [
        "DOE^JOHN_1/LOCALIZER_1/IM1.dcm",
        "DOE^JOHN_1/LOCALIZER_1/IM1_2.dcm",
    ]


def test_thousands_of_files_with_one_name_get_distinct_names(world):
    for i in range(3000):
        world.add(f"p1/{i:04d}/IM0001.dcm")
    names = list(destinations(dict(enumerate(world.plan().to_pylist()))).values())
    assert len(set(names)) == 3000
    assert "DOE^JOHN_1/LOCALIZER_1/IM0001_3000.dcm" in names


def test_a_name_taken_in_the_output_folder_is_never_reused(world):
    taken = world.output / "DOE^JOHN_1" / "LOCALIZER_1" / "IM1.dcm"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"someone else's file")
    world.add("p1/IM1.dcm")
    assert destinations(world.run())["p1/IM1.dcm"] == "DOE^JOHN_1/LOCALIZER_1/IM1_2.dcm"
    assert taken.read_bytes() == b"someone else's file"


@pytest.mark.parametrize("blocker", ["file", "link"])
def test_a_file_or_link_where_a_folder_must_go_is_never_followed_or_replaced(world, blocker):
    elsewhere = world.input.parent / "elsewhere"
    elsewhere.mkdir()
    blocked = world.output / "DOE^JOHN_1"
    if blocker == "file":
        blocked.write_bytes(b"a file")
    else:
        blocked.symlink_to(elsewhere)
    world.add("p1/IM1.dcm")
    destination = destinations(world.run())["p1/IM1.dcm"]
    assert destination == "DOE^JOHN_1_2/LOCALIZER_1/IM1.dcm"
    assert (world.output / destination).is_file()
    assert list(elsewhere.iterdir()) == []


def test_names_that_differ_only_in_case_never_become_two_destinations(world):
    world.add("p1/IM1.dcm", PatientName="Doe^John", SeriesDescription="t1", SOPInstanceUID="1")
    world.add("p2/IM1.dcm", PatientName="DOE^JOHN", SeriesDescription="T1", SOPInstanceUID="2")
    placed = list(destinations(world.run()).values())
    assert len({fold(d) for d in placed}) == 2
    assert len({fold(d.split("/")[0]) for d in placed}) == 1, "one patient folder"


def test_exact_duplicates_are_written_once_and_conflicts_are_both_kept(world):
    world.add("p2/copy_of_IM1", b"same bytes", SOPInstanceUID="9.1")
    world.add("p1/IM1", b"same bytes", SOPInstanceUID="9.1")
    world.add("p3/other", b"different!", SOPInstanceUID="9.1")
    plan = world.run()
    # The one a person keeps: the shorter name (not copy_of_...), the others point to it.
    assert plan["p1/IM1"]["action"] == "sort"
    assert plan["p2/copy_of_IM1"]["action"] == "duplicate"
    assert plan["p2/copy_of_IM1"]["destination"] == plan["p1/IM1"]["destination"]
    assert plan["p3/other"]["action"] == "sort" and plan["p3/other"]["conflict"]
    assert world.plan().num_rows == 0, "a second plan has nothing new"


def test_a_new_copy_of_an_already_sorted_file_is_a_duplicate(world):
    world.add("p1/IM1", b"content", SOPInstanceUID="9.1")
    world.run()
    world.add("p9/IM1", b"content", SOPInstanceUID="9.1")
    plan = world.run()
    assert plan["p9/IM1"]["action"] == "duplicate"
    assert plan["p9/IM1"]["destination"] == "DOE^JOHN_1/LOCALIZER_1/IM1"


def test_a_touched_file_is_the_same_file_not_a_duplicate(world):
    world.add("p1/IM1", b"content", SOPInstanceUID="9.1")
    first = world.run()
    world.touch("p1/IM1", 5 * 10**9)
    again = world.run()
    assert again["p1/IM1"]["action"] == "present"
    assert again["p1/IM1"]["destination"] == first["p1/IM1"]["destination"]
    assert sorted(p.name for p in (world.output / "DOE^JOHN_1/LOCALIZER_1").iterdir()) == ["IM1"]


def test_a_reservation_whose_file_never_appeared_is_planned_again(world):
    world.add("p/a.dcm", b"same", SOPInstanceUID="7")
    world.add("b.dcm", b"same", SOPInstanceUID="7", folder="")
    planned = world.plan()  # a run killed after planning: nothing transferred
    assert planned.num_rows == 2
    world.touch("p/a.dcm", 7 * 10**9)
    world.touch("b.dcm", 7 * 10**9)
    plan = world.run()
    assert sorted(r["action"] for r in plan.values()) == ["duplicate", "sort"]
    kept = next(r for r in plan.values() if r["action"] == "sort")
    assert (world.output / kept["destination"]).read_bytes() == b"same"


def test_a_copy_made_by_a_run_killed_before_it_committed_is_adopted(world):
    world.add("p1/IM1", b"content")
    destination = world.output / "DOE^JOHN_1/LOCALIZER_1/IM1"
    destination.parent.mkdir(parents=True)
    destination.write_bytes(b"content")  # copied, but the ledger never heard of it
    plan = world.run()
    assert plan["p1/IM1"]["action"] == "present"
    assert plan["p1/IM1"]["destination"] == "DOE^JOHN_1/LOCALIZER_1/IM1"
    assert [p.name for p in destination.parent.iterdir()] == ["IM1"]


def test_only_file_versions_missing_from_the_ledger_are_new(world):
    world.add("p1/IM1")
    world.add("p1/IM2")
    world.run()
    world.add("p1/IM3")
    world.touch("p1/IM2", 9 * 10**9)
    assert sorted(new_files(world.files(), ledger.read(world.state))["relpath"].to_pylist()) == [
        "p1/IM2",
        "p1/IM3",
    ]


def test_files_that_are_not_dicom_are_never_planned(world):
    world.add("p1/notes.txt", dicom=False, skip_reason="not DICOM")
    assert world.plan().num_rows == 0


def test_a_replaced_file_gets_a_new_destination_and_the_old_copy_stays(world):
    world.add("p1/IM1", b"version one", SOPInstanceUID="9.1")
    world.run()
    world.add("p1/IM1", b"version two, longer", SOPInstanceUID="9.1")
    plan = world.run()
    assert plan["p1/IM1"]["destination"] == "DOE^JOHN_1/LOCALIZER_1/IM1_2"
    assert plan["p1/IM1"]["conflict"]
    assert (world.output / "DOE^JOHN_1/LOCALIZER_1/IM1").read_bytes() == b"version one"


def test_a_file_of_the_same_size_but_other_content_on_disk_is_never_adopted(world):
    world.add("p1/IM1", b"my content")
    taken = world.output / "DOE^JOHN_1/LOCALIZER_1/IM1"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"its bytes!")  # same size, another file
    plan = world.run()
    assert plan["p1/IM1"]["action"] == "sort"
    assert plan["p1/IM1"]["destination"] == "DOE^JOHN_1/LOCALIZER_1/IM1_2"
    assert taken.read_bytes() == b"its bytes!"


def test_a_name_the_ledger_holds_is_never_reused_even_when_its_file_was_removed(world):
    world.add("p1/IM1", b"version one")
    world.run()
    (world.output / "DOE^JOHN_1/LOCALIZER_1/IM1").unlink()  # removed by hand
    world.add("p2/IM1", b"another file")
    plan = world.run()
    assert plan["p2/IM1"]["destination"] == "DOE^JOHN_1/LOCALIZER_1/IM1_2"


# --- an input renamed: its placement follows it -----------------------------------------------


@pytest.mark.parametrize(
    ("mode", "action"), [("copy", "present"), ("hardlink", "present"), ("symlink", "relink")]
)
def test_a_renamed_input_keeps_its_destination_and_a_link_is_pointed_at_it(world, mode, action):
    world.add("p1/IM1", b"content", SOPInstanceUID="9.1")
    first = world.run(mode)
    world.rename("p1/IM1", "p2/IM1")
    again = world.run(mode)["p2/IM1"]
    assert (again["action"], again["conflict"]) == (action, False)
    assert again["destination"] == first["p1/IM1"]["destination"]
    assert again["previous_relpath"] == ("p1/IM1" if mode == "symlink" else None)
    placed = world.output / again["destination"]
    assert sorted(p.name for p in placed.parent.iterdir()) == ["IM1"]
    assert placed.read_bytes() == b"content"
    if mode == "symlink":
        assert os.readlink(placed) == str(world.input / "p2/IM1")
        world.rename("p2/IM1", "p3/IM1")  # and again: the link follows the newest path
        assert world.run(mode)["p3/IM1"]["previous_relpath"] == "p2/IM1"
        assert os.readlink(placed) == str(world.input / "p3/IM1")


def test_a_renamed_input_with_other_content_is_sorted_anew_and_its_old_link_left(world):
    world.add("p1/IM1", b"version one", SOPInstanceUID="9.1")
    world.run("symlink")
    (world.input / "p1/IM1").unlink()
    del world.rows["p1/IM1"]
    world.add("p2/IM1", b"version two", SOPInstanceUID="9.1")  # same size, other bytes
    plan = world.run("symlink")["p2/IM1"]
    assert (plan["action"], plan["conflict"]) == ("sort", True)
    assert plan["destination"] == "DOE^JOHN_1/LOCALIZER_1/IM1_2"
    old = world.output / "DOE^JOHN_1/LOCALIZER_1/IM1"
    assert os.readlink(old) == str(world.input / "p1/IM1"), "never re-pointed to other bytes"


def test_a_renamed_input_and_a_copy_of_it_are_one_relink_and_one_duplicate(world):
    world.add("p1/IM1", b"content", SOPInstanceUID="9.1")
    world.run("symlink")
    world.rename("p1/IM1", "p2/IM1")
    world.add("p3/IM1", b"content", SOPInstanceUID="9.1")
    plan = world.run("symlink")
    assert sorted(r["action"] for r in plan.values()) == ["duplicate", "relink"]
    assert {r["destination"] for r in plan.values()} == {"DOE^JOHN_1/LOCALIZER_1/IM1"}


def test_a_link_whose_old_input_is_still_there_is_not_relinked(world):
    world.add("p1/IM1", b"content", SOPInstanceUID="9.1")
    world.run("symlink")
    world.add("p2/IM1", b"content", SOPInstanceUID="9.1")  # a copy: p1/IM1 stays
    assert world.run("symlink")["p2/IM1"]["action"] == "duplicate"
    placed = world.output / "DOE^JOHN_1/LOCALIZER_1/IM1"
    assert os.readlink(placed) == str(world.input / "p1/IM1")


# --- one series in one folder; one patient in one patient folder ---------------------------


def test_a_series_whose_values_differ_only_in_case_stays_in_one_folder(world):
    world.add("a/IM1", PatientName="Doe^Jane", SeriesDescription="SER", SOPInstanceUID="1")
    world.add("b/IM2", PatientName="DOE^JANE", SeriesDescription="SER", SOPInstanceUID="2")
    first = destinations(world.run())
    assert first == {"a/IM1": "Doe^Jane_1/SER_1/IM1", "b/IM2": "Doe^Jane_1/SER_1/IM2"}
    # A later file of the series, spelled another way again, joins it.
    world.add("c/IM3", PatientName="doe^jane", SeriesDescription="ser", SOPInstanceUID="3")
    assert destinations(world.run()) == {"c/IM3": "Doe^Jane_1/SER_1/IM3"}


R1 = {"PatientName": "ROE^ANN", "PatientID": "R1", "StudyInstanceUID": "1.2"}
r1 = {"PatientName": "Roe^Ann", "PatientID": "r1", "StudyInstanceUID": "1.1"}


def test_patient_ids_that_differ_only_in_case_get_a_patient_folder_each(world):
    world.add("a/IM1", SeriesInstanceUID="1.1.1", SOPInstanceUID="1", **r1)
    world.add("b/IM1", SeriesInstanceUID="1.2.1", SOPInstanceUID="2", **R1)
    first = destinations(world.run())
    # Planning order (study, series, file) decides: study 1.1 (r1) first.
    assert first == {
        "a/IM1": "Roe^Ann_r1/LOCALIZER_1/IM1",
        "b/IM1": f"ROE^ANN_R1_{short_hash('R1')}/LOCALIZER_1/IM1",
    }
    # A placed folder keeps its owner: new files of either, in new series, follow.
    world.add("a/IM2", SeriesInstanceUID="1.1.2", SOPInstanceUID="3", **r1)
    world.add("b/IM2", SeriesInstanceUID="1.2.2", SOPInstanceUID="4", **R1)
    later = destinations(world.run())
    assert later["a/IM2"].startswith("Roe^Ann_r1/LOCALIZER_1_")
    assert later["b/IM2"].startswith(f"ROE^ANN_R1_{short_hash('R1')}/LOCALIZER_1_")


def test_two_patient_ids_with_one_series_uid_are_still_two_patient_folders(world):
    world.add("a/IM1", SOPInstanceUID="1", **r1)  # an anonymiser kept the UIDs
    world.add("b/IM1", SOPInstanceUID="2", **R1)
    folders = {d.split("/")[0] for d in destinations(world.run()).values()}
    assert folders == {"Roe^Ann_r1", f"ROE^ANN_R1_{short_hash('R1')}"}


def test_which_patient_keeps_the_plain_name_does_not_depend_on_the_order_of_the_batches(
    world,
):
    world.add("a/IM1", SeriesInstanceUID="1.1.1", SOPInstanceUID="1", **r1)
    world.add("b/IM1", SeriesInstanceUID="1.2.1", SOPInstanceUID="2", **R1)
    world.add("b/IM2", SeriesInstanceUID="1.2.1", SOPInstanceUID="3", **R1)
    files = world.files()

    def plan_of(table: pa.Table) -> dict[str, str]:
        plan = make_plan(
            table, ledger.read(world.state), SEED, Disk(world.output), lambda _relpath: None
        )
        return dict(zip(plan["relpath"].to_pylist(), plan["destination"].to_pylist(), strict=True))

    reversed_files = files.take(pa.array(range(files.num_rows - 1, -1, -1)))
    assert plan_of(files) == plan_of(reversed_files)
    assert plan_of(reversed_files)["a/IM1"] == "Roe^Ann_r1/LOCALIZER_1/IM1"


def test_a_template_without_patient_id_groups_patients_by_what_it_names(tmp_path):
    world = World(tmp_path, Naming("{PatientName}/{SeriesDescription}", "{filename}"))
    world.add("a/IM1", SeriesInstanceUID="1.1.1", SOPInstanceUID="1", **r1)
    world.add("b/IM1", SeriesInstanceUID="1.2.1", SOPInstanceUID="2", **R1)
    folders = {d.split("/")[0] for d in destinations(world.run()).values()}
    assert folders == {"Roe^Ann"}


def forget_patient_ids(state: Path) -> None:
    """The ledger as a version before PatientIDs were kept wrote it."""
    for segment in (state / "ledger").glob("*.parquet"):
        table = pq.read_table(segment)
        pq.write_table(table.drop_columns(["patient_id"]), segment)


def test_an_output_an_earlier_version_merged_keeps_its_placements_and_series(world):
    world.add("a/IM1", SeriesInstanceUID="1.1.1", SOPInstanceUID="1", **r1)
    world.add("b/IM1", SeriesInstanceUID="1.2.1", SOPInstanceUID="2", **{**R1, "PatientID": "r1"})
    first = destinations(world.run())
    forget_patient_ids(world.state)
    world.rows["b/IM1"]["PatientID"] = "R1"  # as it was: the earlier version merged it
    assert ledger.read(world.state)["patient_id"].null_count == 2
    # Nothing placed moves; a new file of R1's series goes to that series' folder.
    world.add("b/IM2", SeriesInstanceUID="1.2.1", SOPInstanceUID="3", **R1)
    later = destinations(world.run())
    assert list(later) == ["b/IM2"]
    assert later["b/IM2"].rsplit("/", 1)[0] == first["b/IM1"].rsplit("/", 1)[0]
