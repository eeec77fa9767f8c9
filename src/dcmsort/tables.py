"""Everything dcmsort knows about a sorted output, as pandas DataFrames: ``dcmsort.tables``.

    import dcmsort
    t = dcmsort.tables("/data/Classified")      # or tables(out, state_dir=...)
    t.series()          # the series catalogue: one row per series folder
    t.placements()      # the ledger: every input file version and where its content is
    t.skipped()         # every input file not sorted, with its reason
    t.headers()         # the manifests: one row per input file with its header values

Each takes ``columns=`` (read only those) and ``filters=`` (a ``pyarrow.compute``
expression, or pyarrow's list form ``[("Modality", "==", "CT")]``), both pushed down to
the parquet files, so a question about one patient reads little of a million-file
archive. Values are typed: dates as dates, numbers as numbers, text and lists
Arrow-backed (a fraction of the memory of Python objects).

For people and notebooks only: no job imports this module, and pandas is imported on
the first call that returns a DataFrame (``import dcmsort`` stays light).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from dcmsort import ledger, routes
from dcmsort.report import CATALOG, as_times, typed_values
from dcmsort.settings import STATE_FOLDER

if TYPE_CHECKING:
    import pandas

Filters = pc.Expression | list | None
# An input file version, as the ledger, the manifests and the filters' lists key it.
SOURCE_SCHEMA = pa.schema([ledger.SCHEMA.field(name) for name in ledger.SOURCE_KEY])


def _expression(filters: Filters) -> pc.Expression | None:
    if filters is None or isinstance(filters, pc.Expression):
        return filters
    return pq.filters_to_expression(filters)


def _pandas_type(arrow_type: pa.DataType) -> object:
    """The pandas dtype of an Arrow column: Arrow-backed text and lists, nullable
    integers and booleans; None keeps pyarrow's choice (dates and times as datetime64)."""
    import pandas as pd

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return pd.ArrowDtype(pa.string())
    if pa.types.is_list(arrow_type):
        return pd.ArrowDtype(arrow_type)
    if pa.types.is_integer(arrow_type):
        return pd.ArrowDtype(arrow_type)
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    return None


def to_pandas(table: pa.Table) -> pandas.DataFrame:
    """table as a DataFrame with the dtypes of ``_pandas_type``."""
    return table.to_pandas(types_mapper=_pandas_type, date_as_object=False)


class Tables:
    """The tables of one output folder's state (``output_dir/.dcmsort`` or state_dir)."""

    def __init__(self, output_dir: str | Path, state_dir: str | Path | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir else Path(output_dir) / STATE_FOLDER
        if not (self.state_dir / "layout.json").is_file():
            raise FileNotFoundError(f"no dcmsort state in {self.state_dir}; sort into it first")

    def _read(self, dataset: ds.Dataset, columns: list[str] | None, filters: Filters) -> pa.Table:
        return dataset.to_table(columns=columns, filter=_expression(filters))

    def _manifests(self) -> ds.Dataset:
        """The current manifest of each extract batch (the newest by its number)."""
        newest: dict[str, Path] = {}
        for path in (self.state_dir / "manifests").glob("batch-*-*.parquet"):
            batch = path.name.split("-")[1]
            if batch not in newest or path.stat().st_mtime > newest[batch].stat().st_mtime:
                newest[batch] = path
        files = sorted(newest.values())
        # A manifest of v0.3 has no ctime_ns and ino: read as null.
        schemas = [pq.read_schema(path).remove_metadata() for path in files]
        schema = pa.unify_schemas([*schemas, SOURCE_SCHEMA])
        return ds.dataset([str(p) for p in files], schema=schema, format="parquet")

    def series(self, columns: list[str] | None = None, filters: Filters = None) -> pandas.DataFrame:
        """The series catalogue (catalog.parquet, written by each run's report): one row per
        series folder."""
        dataset = ds.dataset(self.state_dir / CATALOG, format="parquet")
        return to_pandas(self._read(dataset, columns, filters))

    def placements(
        self, columns: list[str] | None = None, filters: Filters = None
    ) -> pandas.DataFrame:
        """Every ledger row: an input file version (relpath, size, mtime_ns, ctime_ns, ino),
        ``status`` (placed: its content is at destination; duplicate: identical to the file
        there), ``destination`` below output_dir, mode, UIDs, modality, PatientID and
        ``committed_at`` (a time)."""
        files = [str(path) for path in ledger.current_files(self.state_dir)]
        dataset = ds.dataset(files, schema=ledger.SCHEMA, format="parquet")
        table = self._read(dataset, columns, filters)
        if "committed_at" in table.column_names:
            index = table.column_names.index("committed_at")
            table = table.set_column(index, "committed_at", as_times(table["committed_at"]))
        return to_pandas(table)

    def headers(
        self, columns: list[str] | None = None, filters: Filters = None
    ) -> pandas.DataFrame:
        """The manifests: one row per current input file (skipped ones too, ``dicom``
        false), with the header values the extract read; dates and numbers are typed after
        reading, so filters compare the stored text: ``[("StudyDate", ">=", "20240101")]``."""
        return to_pandas(typed_values(self._read(self._manifests(), columns, filters)))

    def skipped(
        self, columns: list[str] | None = None, filters: Filters = None
    ) -> pandas.DataFrame:
        """Every current input file not sorted: its version and ``reason`` (not DICOM,
        damaged, or the filter rule that left it out), as skipped.csv. filters apply to
        these columns."""
        schema = SOURCE_SCHEMA.append(pa.field("reason", pa.string()))
        not_dicom = self._manifests().to_table(
            columns={
                **{name: pc.field(name) for name in ledger.SOURCE_KEY},
                "reason": pc.field("skip_reason"),
            },
            filter=pc.invert(pc.field("dicom")),
        )
        lists = [not_dicom.cast(schema)]
        try:
            jobs = routes.jobs(routes.current(self.state_dir))
        except FileNotFoundError:
            jobs = []
        for _, job in jobs:
            path = self.state_dir / "excluded" / f"{job}.parquet"
            if path.exists():
                lists.append(pq.read_table(path).select(schema.names).cast(schema))
        # Few rows: the filters apply in memory, after the pushed-down "not DICOM".
        table = ds.dataset(pa.concat_tables(lists)).to_table(
            columns=columns, filter=_expression(filters)
        )
        return to_pandas(table)


def open_tables(output_dir: str | Path, state_dir: str | Path | None = None) -> Tables:
    """The tables of the output folder output_dir (state in output_dir/.dcmsort, or in
    state_dir when the runs set one)."""
    return Tables(output_dir, state_dir)


class _CallableModule(types.ModuleType):
    """``dcmsort.tables(OUT)`` and ``import dcmsort.tables`` both work: importing a
    submodule sets it as the package's attribute, so the function and the module are one."""

    def __call__(self, output_dir: str | Path, state_dir: str | Path | None = None) -> Tables:
        return open_tables(output_dir, state_dir)


sys.modules[__name__].__class__ = _CallableModule
