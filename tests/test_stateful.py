"""State across runs, tested as a model: a user's world (add, duplicate, touch, replace,
rename, delete) and runs that finish, stop after planning, are killed half way through the
transfer or fail, in any order. After every run that finishes, the promise holds: every
input's content is in the output (or the input is skipped with a reason), no content is
written twice, the ledger and the summary say what the tree shows, inputs are untouched.

Real DICOM files (the project's generator, tiny images) in a temporary folder; the stages
are called in-process (extract, plan, transfer, report), as the Snakemake rules call them.
A story hypothesis shrinks to is kept below as a plain regression test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from conftest import outcomes
from dcmsort import headers, ledger, plan, report, transfer
from dcmsort.demo import Series, make_instance, uid
from dcmsort.fileops import TEMP_SUFFIX, temp_path_for
from dcmsort.naming import FILE_FIELDS, Naming, fold

NAMING = Naming("{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}", "{filename}")
KEYWORDS = sorted(NAMING.fields - FILE_FIELDS.keys())
# The third is another patient whose ID differs from the second's only in case: on a
# case-insensitive file system both patient folders would be one name.
PATIENTS = [("DOE^JOHN", "1"), ("ROE^JANE", "r2"), ("Roe^Jane", "R2")]
DESCRIPTIONS = ["T1", "T2"]
# Few folders and names, so that names collide and patients spread over folders often.
FOLDERS = ["p1", "p2", "p1/sub", ""]  # "" is a file lying directly in input_dir
NAMES = ["IM1.dcm", "IM2.dcm", "IM1", "copy_of_IM1.dcm"]


@dataclass(frozen=True)
class Spec:
    """What a DICOM file is made of: equal specs give byte-identical files; the same
    (patient, series, instance) with another variant or size is the same SOPInstanceUID
    with different bytes."""

    patient: int
    series: int
    instance: int
    variant: int = 0
    rows: int = 4

    @property
    def sop(self) -> str:
        return uid("sop", self.patient, self.series, self.instance)


@cache
def dicom_bytes(spec: Spec) -> bytes:
    name, patient_id = PATIENTS[spec.patient]
    series = Series(
        name,
        patient_id,
        uid("study", spec.patient),
        "20240101",
        uid("series", spec.patient, spec.series),
        spec.series + 1,
        DESCRIPTIONS[spec.series],
    )
    rng = np.random.default_rng(spec.variant)
    ds = make_instance(series, spec.instance + 1, spec.sop, rows=spec.rows, rng=rng)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Killed(BaseException):
    """SIGKILL, as far as the code under test can tell: nothing after it runs."""


@contextmanager
def killed_at_commit(keep: set[str]) -> Iterator[None]:
    """The process dies while it commits: rows of other inputs than ``keep`` never
    reach the ledger, though their files are in place."""
    real_append = ledger.append

    def append(state_dir: Path, rows: pa.Table) -> None:
        mask = [relpath in keep for relpath in rows["relpath"].to_pylist()]
        real_append(state_dir, rows.filter(pa.array(mask, pa.bool_())))
        if not all(mask):
            raise Killed

    ledger.append = append
    try:
        yield
    except Killed:
        pass
    finally:
        ledger.append = real_append


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class World:
    """An input folder a user changes and an output folder dcmsort sorts into, with the
    truth about both kept beside them (what each input holds, what someone else put in
    the output), and runs driven stage by stage as the rules would drive them."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.input, self.output = self.root / "in", self.root / "out"
        self.state = self.output / ".dcmsort"
        self.input.mkdir(parents=True)
        self.inputs: dict[str, bytes] = {}  # relpath -> content
        self.mtimes: dict[str, int] = {}
        self.sop_of: dict[str, str] = {}  # content digest -> SOPInstanceUID
        self.patient_of: dict[str, str] = {}  # content digest -> PatientID
        self.foreign: dict[str, bytes] = {}  # output path -> what someone else put there
        self.temps: set[str] = set()  # half-written temporary files a killed run left
        self.clock = 1_700_000_000 * 10**9
        # The plan file describes the input as it is now: Snakemake would not plan again.
        self.plan_is_current = False

    # --- the user's world -----------------------------------------------------------

    def _tick(self) -> int:
        self.clock += 10**9
        return self.clock

    def _set_mtime(self, relpath: str, mtime_ns: int) -> None:
        os.utime(self.input / relpath, ns=(mtime_ns, mtime_ns))
        self.mtimes[relpath] = mtime_ns

    def write(self, relpath: str, data: bytes, sop: str | None = None) -> None:
        path = self.input / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.inputs[relpath] = data
        if sop:
            self.sop_of[digest(data)] = sop
        self._set_mtime(relpath, self._tick())
        self.plan_is_current = False

    def add(self, relpath: str, spec: Spec) -> None:
        self.patient_of[digest(dicom_bytes(spec))] = PATIENTS[spec.patient][1]
        self.write(relpath, dicom_bytes(spec), spec.sop)

    def touch(self, relpath: str) -> None:
        self._set_mtime(relpath, self._tick())
        self.plan_is_current = False

    def rename(self, relpath: str, new: str) -> None:
        (self.input / new).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.input / relpath, self.input / new)  # keeps the mtime
        self.inputs[new], self.mtimes[new] = self.inputs.pop(relpath), self.mtimes.pop(relpath)
        self.plan_is_current = False

    def delete(self, relpath: str) -> None:
        (self.input / relpath).unlink()
        del self.inputs[relpath], self.mtimes[relpath]
        self.plan_is_current = False

    # --- the stages ------------------------------------------------------------------

    @property
    def plan_file(self) -> Path:
        return self.state / "plan.parquet"

    @property
    def manifest(self) -> Path:
        return self.state / "manifests" / "batch-0.parquet"

    def extract(self) -> None:
        headers.extract_batch(
            self.input, 0, 1, KEYWORDS, self.state / "manifests" / "folders", self.manifest
        )

    def plan(self) -> None:
        """Extract and plan, unless the plan on disk is current (Snakemake's rule)."""
        self.extract()
        if self.plan_is_current and self.plan_file.exists():
            return
        assert (
            plan.main(
                [
                    *("--manifests", str(self.manifest)),
                    *("--input-dir", str(self.input), "--output-dir", str(self.output)),
                    *("--state-dir", str(self.state)),
                    *("--naming", json.dumps(asdict(NAMING))),
                    *("--plan", str(self.plan_file)),
                    *("--plan-csv", str(self.state / "plan.csv")),
                    *("--skipped", str(self.state / "skipped.csv")),
                ]
            )
            == 0
        )
        self.plan_is_current = True

    def transfer(self) -> int:
        return transfer.main(
            [
                *("--plan", str(self.plan_file), "--input-dir", str(self.input)),
                *("--output-dir", str(self.output), "--state-dir", str(self.state)),
                *("--mode", "copy", "--verify", "size", "--threads", "1"),
                *("--results", str(self.state / "transfers.parquet")),
            ]
        )

    def report(self) -> dict:
        assert (
            report.main(
                [
                    *("--transfers", str(self.state / "transfers.parquet")),
                    *("--manifests", str(self.manifest)),
                    *("--state-dir", str(self.state), "--output-dir", str(self.output)),
                    *("--mode", "copy", "--html", str(self.state / "report.html")),
                    *("--summary", str(self.state / "summary.json")),
                    *("--removed", str(self.state / "removed_sources.csv")),
                    *("--naming", json.dumps(asdict(NAMING))),
                ]
            )
            == 0
        )
        return json.loads((self.state / "summary.json").read_text())

    def pending(self) -> list[dict]:
        """Rows of the plan on disk the ledger does not hold yet, in plan order."""
        committed = ledger.read(self.state, ledger.SOURCE_KEY)
        return transfer.pending_rows(pq.read_table(self.plan_file), committed).to_pylist()

    # --- runs ------------------------------------------------------------------------

    def run(self) -> None:
        """A run to the end: it must succeed, and the promise must hold."""
        self.plan()
        assert self.transfer() == 0, "a run with nothing in its way failed"
        self.check(self.report())

    def run_until_plan(self, keep_plan: bool) -> None:
        """A run killed after planning (the plan file left, or not yet renamed into place)."""
        self.plan()
        if not keep_plan:
            self.plan_file.unlink()

    def run_killed_in_transfer(self, committed: int, copied: int, temp: bool) -> None:
        """A transfer SIGKILLed half way: it got through the next ``committed + copied``
        pending rows (files in place), but only the first ``committed`` reached the ledger;
        one more file half-written under its temporary name. The plan stays; no report."""
        self.plan()
        rows = self.pending()
        keep = {r["relpath"] for r in rows[:committed]}
        reached = {r["relpath"] for r in rows[: committed + copied]}
        table = pq.read_table(self.plan_file)
        mask = pa.array([r in reached for r in table["relpath"].to_pylist()], pa.bool_())
        with killed_at_commit(keep):
            # The rows the killed transfer got to, through the real transfer.
            transfer.transfer_plan(
                self._plan_of(table.filter(mask)),
                self.input,
                self.output,
                self.state,
                "copy",
                "size",
                1,
            )
        sorts = [r for r in rows if r["action"] == plan.SORT and r["relpath"] not in reached]
        if temp and sorts:
            destination = self.output / sorts[0]["destination"]
            destination.parent.mkdir(parents=True, exist_ok=True)
            data = (self.input / sorts[0]["relpath"]).read_bytes()
            temp_path_for(destination).write_bytes(data[: len(data) // 2])
            self.temps.add(str(temp_path_for(destination).relative_to(self.output)))

    def _plan_of(self, table: pa.Table) -> Path:
        path = self.root / "partial-plan.parquet"
        pq.write_table(table, path)
        return path

    def run_with_foreign_file(self, pick: int, same_bytes: bool) -> None:
        """Someone else puts a file at a planned destination before the transfer gets
        there: a different file fails the run (never overwritten); the same bytes are
        taken as the placement."""
        self.plan()
        sorts = [r for r in self.pending() if r["action"] == plan.SORT]
        if sorts:
            row = sorts[pick % len(sorts)]
            destination = self.output / row["destination"]
            if not destination.exists():
                data = self.inputs[row["relpath"]] if same_bytes else b"someone else's %d" % pick
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(data)
                self.foreign[row["destination"]] = data
        if self.transfer() != 0:
            assert not self.plan_file.exists(), "a failed transfer leaves its plan behind"
            self.plan_is_current = False
            return
        self.check(self.report())

    def run_with_change_during_transfer(self, pick: int, how: str) -> None:
        """An input changes between planning and transfer (a file still being written):
        the run finishes, and that file is left for the next run."""
        self.plan()
        relpath = sorted(self.inputs)[pick % len(self.inputs)]
        if how == "touch":
            self.touch(relpath)
        elif how == "append":
            data = self.inputs[relpath]
            self.patient_of[digest(data + b"\0\0")] = self.patient_of.get(digest(data), "")
            self.write(relpath, data + b"\0\0", self.sop_of.get(digest(data)))
        else:
            self.delete(relpath)
        assert self.transfer() == 0
        results = pq.read_table(self.state / "transfers.parquet").to_pylist()
        # Left for the next run: the changed file, and the duplicates of it.
        changed = {r["relpath"] for r in results if r["status"] == transfer.CHANGED}
        self.check(self.report(), changed=changed | {relpath})

    # --- the promise -----------------------------------------------------------------

    def tree(self) -> dict[str, bytes]:
        """Every file in the output but the state folder."""
        found = {}
        for top, dirs, names in os.walk(self.output):
            if Path(top) == self.output and ".dcmsort" in dirs:
                dirs.remove(".dcmsort")
            for name in names:
                path = Path(top) / name
                found[str(path.relative_to(self.output))] = path.read_bytes()
        return found

    def check(self, summary: dict, changed: frozenset[str] | set[str] = frozenset()) -> None:
        # Inputs are never modified, moved or deleted.
        on_disk = {str(p.relative_to(self.input)): p for p in self.input.rglob("*") if p.is_file()}
        assert set(on_disk) == set(self.inputs)
        for relpath, path in on_disk.items():
            assert path.read_bytes() == self.inputs[relpath], f"input modified: {relpath}"
            assert path.stat().st_mtime_ns == self.mtimes[relpath], f"input touched: {relpath}"

        # Every input: its content at its destination, or skipped with a reason.
        result = outcomes(self.input, self.output, self.state)
        by_path = result.by_relpath()  # asserts that no file has two outcomes
        for relpath, data in self.inputs.items():
            if relpath in changed:
                continue  # changed while the run went on: the next run sorts it
            row = by_path.get(relpath)
            assert row is not None, f"lost: {relpath} is neither sorted nor skipped"
            if row["action"] == "skip":
                assert row["reason"], relpath
            else:
                destination = self.output / row["destination"]
                assert destination.is_file(), f"{relpath}: nothing at {row['destination']}"
                assert destination.read_bytes() == data, f"{relpath}: other bytes at dest."

        # The ledger names only what is there; the tree holds only what the ledger names
        # (or someone else's files); no content is written twice; no temporary file left.
        tree = self.tree()
        committed = ledger.read(self.state)
        for destination in set(committed["destination"].to_pylist()):
            assert destination in tree, f"the ledger names a missing file: {destination}"
        placed = set(report.placements(committed)["destination"].to_pylist())
        # A killed run's temporary file stays until its destination is written again.
        leftovers = {p for p in tree if p.endswith(TEMP_SUFFIX)} - self.temps
        assert not leftovers, f"temporary files left: {sorted(leftovers)}"
        tree = {p: data for p, data in tree.items() if not p.endswith(TEMP_SUFFIX)}
        ours = {p: tree[p] for p in tree if p not in self.foreign or p in placed}
        assert set(ours) == placed, (
            f"in the tree, not in the ledger: {sorted(set(ours) - placed)}; "
            f"in the ledger, not in the tree: {sorted(placed - set(ours))}"
        )
        for path, data in self.foreign.items():
            assert tree.get(path) == data, f"someone else's file changed: {path}"
        # No two names are one name on any target file system; a patient folder holds one
        # PatientID.
        assert len({fold(p) for p in tree}) == len(tree), "two names one file system merges"
        patients: dict[str, set[str]] = {}
        for path, data in ours.items():
            if digest(data) in self.patient_of:
                patients.setdefault(fold(path.split("/")[0]), set()).add(
                    self.patient_of[digest(data)]
                )
        assert all(len(ids) == 1 for ids in patients.values()), f"merged: {patients}"
        assert summary["patient_folders_with_several_ids"] == []
        twice = [d for d, n in Counter(map(digest, ours.values())).items() if n > 1]
        assert not twice, "the same content written twice: " + ", ".join(
            sorted(p for p, data in ours.items() if digest(data) in twice)
        )

        # The summary counts what the tree shows.
        assert summary["status"] == "complete"
        assert summary["files_sorted"] == len(placed) == len(ours)
        sops = Counter(self.sop_of[digest(data)] for data in ours.values())
        assert summary["conflicts"] == sum(
            1 for data in ours.values() if sops[self.sop_of[digest(data)]] > 1
        )
        if not changed:
            actions = Counter(result.column("action"))
            assert summary["input_files"] == len(self.inputs)
            assert summary["duplicates"] == actions["duplicate"]
            assert summary["skipped"] == actions["skip"]
            current = {digest(data) for data in self.inputs.values()}
            gone = [p for p, data in ours.items() if digest(data) not in current]
            assert summary["sources_gone"] == len(gone), f"gone: {sorted(gone)}"


# --- the machine ----------------------------------------------------------------------

specs = st.builds(
    Spec,
    patient=st.integers(0, 2),
    series=st.integers(0, 1),
    instance=st.integers(0, 2),
    variant=st.integers(0, 1),
    rows=st.sampled_from([4, 6]),
)
paths = st.builds(
    lambda folder, name: f"{folder}/{name}" if folder else name,
    st.sampled_from(FOLDERS),
    st.sampled_from(NAMES),
)
picks = st.integers(0, 31)


class Sorting(RuleBasedStateMachine):
    """Rules: what a user's world does to the input, and runs of every kind."""

    @initialize(files=st.lists(st.tuples(paths, specs), min_size=1, max_size=4))
    def make_world(self, files: list[tuple[str, Spec]]) -> None:
        """A world with a few files already (steps are too few to spend them adding)."""
        self.tmp = tempfile.mkdtemp(prefix="dcmsort-stateful-")
        self.world = World(Path(self.tmp))
        for relpath, spec in files:
            self.add_dicom(relpath, spec)

    def teardown(self) -> None:
        if hasattr(self, "tmp"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _pick(self, pick: int) -> str:
        return sorted(self.world.inputs)[pick % len(self.world.inputs)]

    def _free(self, relpath: str) -> bool:
        return relpath not in self.world.inputs

    has_inputs = precondition(lambda self: bool(self.world.inputs))

    @rule(relpath=paths, spec=specs)
    def add_dicom(self, relpath: str, spec: Spec) -> None:
        if self._free(relpath):
            self.world.add(relpath, spec)

    @rule(relpath=paths)
    def add_junk(self, relpath: str) -> None:
        if self._free(relpath):
            self.world.write(relpath, f"not DICOM: {relpath}".encode())

    @has_inputs
    @rule(pick=picks, relpath=paths)
    def add_exact_duplicate(self, pick: int, relpath: str) -> None:
        if self._free(relpath):
            source = self._pick(pick)
            data = self.world.inputs[source]
            self.world.write(relpath, data, self.world.sop_of.get(digest(data)))

    @has_inputs
    @rule(pick=picks)
    def touch(self, pick: int) -> None:
        self.world.touch(self._pick(pick))

    @has_inputs
    @rule(pick=picks, spec=specs)
    def replace_content(self, pick: int, spec: Spec) -> None:
        self.world.add(self._pick(pick), spec)

    @has_inputs
    @rule(pick=picks, relpath=paths)
    def rename(self, pick: int, relpath: str) -> None:
        if self._free(relpath):
            self.world.rename(self._pick(pick), relpath)

    @has_inputs
    @rule(pick=picks)
    def delete(self, pick: int) -> None:
        self.world.delete(self._pick(pick))

    @rule()
    def run(self) -> None:
        self.world.run()

    @rule(keep_plan=st.booleans())
    def run_killed_after_planning(self, keep_plan: bool) -> None:
        self.world.run_until_plan(keep_plan)

    @rule(committed=st.integers(0, 4), copied=st.integers(0, 2), temp=st.booleans())
    def run_killed_in_transfer(self, committed: int, copied: int, temp: bool) -> None:
        self.world.run_killed_in_transfer(committed, copied, temp)

    @rule(pick=picks, same_bytes=st.booleans())
    def run_with_someone_elses_file_in_the_way(self, pick: int, same_bytes: bool) -> None:
        self.world.run_with_foreign_file(pick, same_bytes)

    @has_inputs
    @rule(pick=picks, how=st.sampled_from(["touch", "append", "delete"]))
    def run_while_an_input_changes(self, pick: int, how: str) -> None:
        self.world.run_with_change_during_transfer(pick, how)


Sorting.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_state_across_runs = Sorting.TestCase


# --- stories the machine found, kept as plain tests ------------------------------------


A = Spec(patient=0, series=0, instance=0)


def test_a_folder_emptied_by_the_user_is_sorted_without_error(tmp_path):
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.delete("p1/IM1.dcm")  # p1/ stays, empty
    world.run()


def test_a_duplicate_whose_twin_vanishes_during_the_run_is_left_for_the_next_run(tmp_path):
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.write("p2/IM1.dcm", dicom_bytes(A), A.sop)
    world.run_with_change_during_transfer(0, "delete")  # p1/IM1.dcm, the one to be copied
    world.run()


def test_a_copy_made_by_a_killed_run_is_committed_even_if_its_input_is_then_deleted(
    tmp_path,
):
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.run_killed_in_transfer(committed=0, copied=1, temp=False)  # placed, not committed
    world.delete("p1/IM1.dcm")
    world.run()  # the copy is in the tree: the ledger and the summary must say so


def test_a_rerun_of_a_killed_transfer_commits_a_duplicate_of_a_file_it_committed(tmp_path):
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.add("p1/IM2.dcm", A)  # the same bytes: a duplicate of IM1.dcm
    # Killed after committing IM1.dcm, before its duplicate: the same plan runs again.
    world.run_killed_in_transfer(committed=1, copied=0, temp=False)
    world.run()


def test_a_rerun_of_a_killed_transfer_commits_a_duplicate_of_a_file_it_placed(tmp_path):
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.add("p1/IM2.dcm", A)
    world.run_killed_in_transfer(committed=0, copied=1, temp=False)  # IM1.dcm in place
    world.run()
