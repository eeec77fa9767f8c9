import pandas as pd

from dcmsort.naming import Naming
from dcmsort.plan import duplicate_candidates, empty_registry, make_plan, removed_sources

SEED = Naming("{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}", "{filename}")


def files(*rows: dict) -> pd.DataFrame:
    defaults = {
        "folder": "p1",
        "size": 100,
        "mtime_ns": 1,
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
    frame = pd.DataFrame([{**defaults, **r} for r in rows])
    return frame.sort_values("relpath", ignore_index=True)


def destinations(plan: pd.DataFrame) -> dict[str, str]:
    return dict(zip(plan["relpath"], plan["destination"], strict=True))


def test_ordinary_files_get_the_seed_layout():
    plan, _ = make_plan(
        files({"relpath": "p1/a/IM1.dcm", "SOPInstanceUID": "9.1"}), empty_registry(), SEED
    )
    assert destinations(plan) == {"p1/a/IM1.dcm": "DOE^JOHN_1/LOCALIZER_1/IM1.dcm"}


def test_two_studies_with_same_series_number_are_kept_apart():
    plan, _ = make_plan(
        files(
            {"relpath": "p1/s1/IM1", "StudyInstanceUID": "1.1", "SeriesInstanceUID": "1.1.1"},
            {
                "relpath": "p1/s2/IM1",
                "StudyInstanceUID": "1.2",
                "SeriesInstanceUID": "1.2.1",
                "StudyDate": "20250101",
            },
        ),
        empty_registry(),
        SEED,
    )
    folders = {d.rsplit("/", 1)[0] for d in plan["destination"]}
    assert len(folders) == 2 and "DOE^JOHN_1/LOCALIZER_1" in folders


def test_series_may_share_a_folder_when_keep_series_apart_is_off():
    grouping = Naming("{PatientID}/{Modality}", "{filename}", keep_series_apart=False)
    plan, _ = make_plan(
        files(
            {"relpath": "p1/a", "SeriesInstanceUID": "1"},
            {"relpath": "p1/b", "SeriesInstanceUID": "2"},
        ),
        empty_registry(),
        grouping,
    )
    assert set(plan["destination"]) == {"1/MR/a", "1/MR/b"}


def test_a_placement_never_moves_when_a_colliding_series_arrives_later():
    later = {
        "relpath": "p0/IM1",
        "StudyInstanceUID": "0.9",
        "SeriesInstanceUID": "0.9.1",
        "StudyDate": "19990101",
    }  # would sort first if both were new
    first, registry = make_plan(files({"relpath": "p1/IM1"}), empty_registry(), SEED)
    second, _ = make_plan(files({"relpath": "p1/IM1"}, later), registry, SEED)
    assert destinations(second)["p1/IM1"] == destinations(first)["p1/IM1"]
    assert destinations(second)["p0/IM1"].startswith("DOE^JOHN_1/LOCALIZER_1_")


def test_two_different_files_with_the_same_name_are_both_kept():
    plan, _ = make_plan(
        files({"relpath": "p1/a/IM1.dcm"}, {"relpath": "p1/b/IM1.dcm"}), empty_registry(), SEED
    )
    assert sorted(plan["destination"]) == [
        "DOE^JOHN_1/LOCALIZER_1/IM1.dcm",
        "DOE^JOHN_1/LOCALIZER_1/IM1_2.dcm",
    ]


def test_a_name_taken_in_the_output_folder_is_never_reused():
    taken = {"DOE^JOHN_1/LOCALIZER_1/IM1.dcm"}
    plan, _ = make_plan(
        files({"relpath": "p1/IM1.dcm"}), empty_registry(), SEED, occupied=taken.__contains__
    )
    assert destinations(plan)["p1/IM1.dcm"] == "DOE^JOHN_1/LOCALIZER_1/IM1_2.dcm"


def test_exact_duplicates_are_written_once_and_conflicts_are_both_kept():
    table = files(
        {"relpath": "p1/IM1", "SOPInstanceUID": "9.1"},
        {"relpath": "p2/copy", "SOPInstanceUID": "9.1"},
        {"relpath": "p3/other", "SOPInstanceUID": "9.1"},
    )
    sources, _ = duplicate_candidates(table, empty_registry())
    assert sorted(sources) == ["p1/IM1", "p2/copy", "p3/other"]
    digests = {"p1/IM1": "aaa", "p2/copy": "aaa", "p3/other": "bbb"}
    plan, registry = make_plan(table, empty_registry(), SEED, digests)
    by_path = plan.set_index("relpath")
    assert by_path.loc["p2/copy", "action"] == "duplicate"
    assert by_path.loc["p2/copy", "destination"] == by_path.loc["p1/IM1", "destination"]
    assert by_path.loc["p3/other", "action"] == "sort"
    assert by_path.loc["p3/other", "conflict"] and by_path.loc["p1/IM1", "conflict"]
    assert not by_path.loc["p2/copy", "conflict"]
    again, _ = make_plan(table, registry, SEED)  # no digests needed: decisions are kept
    assert destinations(again) == destinations(plan)
    assert list(again["action"]) == list(plan["action"])


def test_a_new_copy_of_an_already_sorted_file_is_a_duplicate():
    _, registry = make_plan(
        files({"relpath": "p1/IM1", "SOPInstanceUID": "9.1"}), empty_registry(), SEED
    )
    table = files(
        {"relpath": "p1/IM1", "SOPInstanceUID": "9.1"},
        {"relpath": "p9/IM1", "SOPInstanceUID": "9.1"},
    )
    sources, dests = duplicate_candidates(table, registry)
    assert sources == ["p9/IM1"] and dests == ["DOE^JOHN_1/LOCALIZER_1/IM1"]
    plan, _ = make_plan(
        table, registry, SEED, {"p9/IM1": "same", "DOE^JOHN_1/LOCALIZER_1/IM1": "same"}
    )
    assert plan.set_index("relpath").loc["p9/IM1", "action"] == "duplicate"


def test_files_that_are_not_dicom_are_skipped_with_their_reason():
    plan, registry = make_plan(
        files({"relpath": "p1/notes.txt", "dicom": False, "skip_reason": "not DICOM"}),
        empty_registry(),
        SEED,
    )
    assert plan.loc[0, "action"] == "skip" and plan.loc[0, "reason"] == "not DICOM"
    assert plan.loc[0, "destination"] is None and len(registry) == 0


def test_a_removed_source_is_reported_and_its_placement_kept():
    _, registry = make_plan(
        files({"relpath": "p1/IM1"}, {"relpath": "p1/IM2"}), empty_registry(), SEED
    )
    remaining = files({"relpath": "p1/IM2"})
    assert list(removed_sources(remaining, registry)["relpath"]) == ["p1/IM1"]
    plan, registry = make_plan(remaining, registry, SEED)
    assert len(registry) == 2 and len(plan) == 1


def test_a_replaced_file_gets_a_new_destination_and_the_old_copy_stays():
    _, registry = make_plan(files({"relpath": "p1/IM1", "size": 100}), empty_registry(), SEED)
    plan, registry = make_plan(files({"relpath": "p1/IM1", "size": 200}), registry, SEED)
    assert destinations(plan)["p1/IM1"] == "DOE^JOHN_1/LOCALIZER_1/IM1_2"
    assert len(registry) == 2
