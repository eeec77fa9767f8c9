"""The series catalogue and dcmsort.tables, on a sorted demo: the README's questions
("Ask the sorted archive") run here as written, so they cannot rot."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import Sorter
from dcmsort import demo

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Ask the sorted archive"


def readme_examples() -> list[str]:
    """The python code blocks of the README's section HEADING, in order."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(HEADING) :]
    section = section[: section.index("\n## ", len(HEADING))]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def sorted_demo(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("demo")
    (root / "work").mkdir()
    sorter = Sorter(root / "work", root / "Unclassified", root / "Classified")
    demo.generate(sorter.input_dir, patients=3, studies=2, series=2, instances=3)
    sorter.run()
    return sorter


def test_catalogue_counts_the_files_of_each_series_folder(sorted_demo) -> None:
    catalogue = pq.read_table(sorted_demo.state / "catalog.parquet").to_pylist()
    on_disk = {
        folder.relative_to(sorted_demo.output_dir).as_posix(): len(list(folder.iterdir()))
        for folder in sorted_demo.output_dir.glob("*/*")
        if folder.is_dir() and not folder.parent.name.startswith(".")
    }
    assert {row["series folder"]: row["files"] for row in catalogue} == on_disk
    assert all(row["Modality"] in ("MR", "CT") and row["StudyDate"] for row in catalogue)
    assert (sorted_demo.state / "catalog.csv").read_text().count("\n") == len(catalogue) + 1


def test_catalogue_names_the_input_folders_each_series_came_from(sorted_demo) -> None:
    catalogue = pq.read_table(sorted_demo.state / "catalog.parquet").to_pylist()
    row = next(r for r in catalogue if r["series folder"] == "GARCIA^FATIMA_PID00001/T1 MPRAGE_1")
    assert row["input folders"] == ["patient_1/study_1/series_1"]
    assert row["PatientID"] == "PID00001" and row["SeriesNumber"] == 1
    assert row["first added"] <= row["last added"]


def test_readme_questions_answer_on_a_sorted_demo(sorted_demo) -> None:
    pytest.importorskip("pandas")
    examples = readme_examples()
    assert len(examples) == 6  # the opening and the five questions
    names: dict = {"OUT": str(sorted_demo.output_dir)}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for code in examples:
            exec(compile(code, str(README), "exec"), names)
    assert names["t1"]["PatientID"].nunique() > 0
    assert len(names["few"]) == len(names["t"].series())  # the demo's series have 3 images
    assert names["per_month"].sum() > 0
    assert sorted(names["inputs"]["relpath"]) == [
        f"patient_1/study_1/series_1/IM000{i}.dcm" for i in (1, 2, 3)
    ]
    assert list(names["went"]["destination"]) == ["GARCIA^FATIMA_PID00001/T1 MPRAGE_1/IM0001.dcm"]


def test_tables_have_real_dtypes_and_push_filters_down(sorted_demo) -> None:
    pd = pytest.importorskip("pandas")
    import dcmsort

    t = dcmsort.tables(sorted_demo.output_dir)
    series = t.series()
    assert pd.api.types.is_datetime64_any_dtype(series["StudyDate"])
    assert pd.api.types.is_integer_dtype(series["files"])
    ct = t.series(columns=["Modality"], filters=[("Modality", "==", "CT")])
    assert list(ct.columns) == ["Modality"] and set(ct["Modality"]) == {"CT"}
    skipped = {relpath.rsplit("/", 1)[-1] for relpath in t.skipped()["relpath"]}
    assert skipped == {"Thumbs.db", "notes.txt"}
    headers = t.headers(columns=["relpath", "SeriesNumber"], filters=[("dicom", "==", True)])
    assert pd.api.types.is_integer_dtype(headers["SeriesNumber"])
    assert len(headers) == series["files"].sum()


def test_importing_dcmsort_imports_neither_pandas_nor_pyarrow() -> None:
    import subprocess
    import sys

    code = "import sys, dcmsort; print('pandas' in sys.modules, 'pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
