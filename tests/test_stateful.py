"""State across runs, tested as a model: a user's world (add, duplicate, touch, replace,
replace keeping the size and the old mtime, rename, delete, files of someone else's in the
output, a sorted copy truncated by hand) and runs that finish, check the tree, stop after
planning, are killed half way through the transfer or fail, in any order. After every run
that finishes, the promise holds: every input's content is in the output (or the input is
skipped with a reason), no content is written twice, the ledger and the summary say what
the tree shows, inputs are untouched; after a run with check, also every copy truncated by
hand is whole again, or reported damaged when no input holds its bytes any more. After
every step, whatever run it was: files of someone else's in the output are never removed
or changed.

Real DICOM files (the project's generator, tiny images) in a temporary folder; the stages
are called in-process (extract, plan, transfer, report), as the Snakemake rules call them.
A story hypothesis shrinks to is kept below as a plain regression test.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from conftest import outcomes
from dcmsort import (
    archives,
    check,
    headers,
    inventory,
    ledger,
    partition,
    plan,
    report,
    routes,
    transfer,
)
from dcmsort.demo import Series, make_instance, uid
from dcmsort.fileops import TEMP_SUFFIX, temp_name_for, temp_path_for
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
# With 4 partitions the patients' folders fall into different ones (partition.key).
PARTITIONS = 4
# With more partitions the partition stage runs before every plan here: its routes file
# needs no real digest.
ROUTES = routes.ROUTES.format(inputs="0" * 16)


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

    def append(state_dir: Path, rows: pa.Table, part: routes.Part | None = None) -> None:
        mask = [relpath in keep for relpath in rows["relpath"].to_pylist()]
        real_append(state_dir, rows.filter(pa.array(mask, pa.bool_())), part)
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


def read(path: Path) -> bytes | None:
    """What a path in the output holds: a file's bytes, where a link points, or None."""
    if path.is_symlink():
        return b"link to " + os.fsencode(os.readlink(path))
    return path.read_bytes() if path.exists() else None


class World:
    """An input folder a user changes and an output folder dcmsort sorts into, with the
    truth about both kept beside them (what each input holds, what someone else put in
    the output), and runs driven stage by stage as the rules would drive them."""

    def __init__(self, root: Path, mode: str = "copy", partitions: int = 1):
        self.root = Path(root)
        self.mode = mode  # transfer_mode of every run
        self.partitions = partitions
        self.input, self.output = self.root / "in", self.root / "out"
        self.state = self.output / ".dcmsort"
        self.input.mkdir(parents=True)
        self.inputs: dict[str, bytes] = {}  # relpath -> content
        self.mtimes: dict[str, int] = {}
        # (relpath, mtime) -> content of every input version ever: what a link was made to.
        self.versions: dict[tuple[str, int], bytes] = {}
        self.sop_of: dict[str, str] = {}  # content digest -> SOPInstanceUID
        self.spec_of: dict[str, Spec] = {}  # content digest -> what it is made of
        self.patient_of: dict[str, str] = {}  # content digest -> PatientID
        self.foreign: dict[str, bytes] = {}  # output path -> what someone else put there
        self.elsewhere: dict[Path, bytes] = {}  # files outside both, which their links name
        self.temps: set[str] = set()  # half-written temporary files a killed run left
        # Sorted copies truncated by hand that no check has restored: destination ->
        # (the content the ledger says is there, what is there). A plain run trusts the
        # ledger and does not look; a run with check restores them or reports them.
        self.damaged: dict[str, tuple[bytes, bytes]] = {}
        self.ever_damaged: set[str] = set()
        self.kept_aside: dict[str, bytes] = {}  # output path -> the damaged file kept there
        self.clock = 1_700_000_000 * 10**9

    # --- the user's world -----------------------------------------------------------

    def _tick(self) -> int:
        self.clock += 10**9
        return self.clock

    def _set_mtime(self, relpath: str, mtime_ns: int) -> None:
        os.utime(self.input / relpath, ns=(mtime_ns, mtime_ns))
        self.mtimes[relpath] = mtime_ns
        self.versions[(relpath, mtime_ns)] = self.inputs[relpath]

    def write(self, relpath: str, data: bytes, sop: str | None = None) -> None:
        path = self.input / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.inputs[relpath] = data
        if sop:
            self.sop_of[digest(data)] = sop
        self._set_mtime(relpath, self._tick())

    def add(self, relpath: str, spec: Spec) -> None:
        self.spec_of[digest(dicom_bytes(spec))] = spec
        self.patient_of[digest(dicom_bytes(spec))] = PATIENTS[spec.patient][1]
        self.write(relpath, dicom_bytes(spec), spec.sop)

    def replace_keeping_mtime(self, relpath: str, spec: Spec, in_place: bool) -> None:
        """Other bytes of the same size, with the old mtime set back (``cp -p``,
        ``rsync -t``, an unzip with stored times): written in place or renamed over it.
        Only the fingerprint (what the rules see) tells the next run to plan again."""
        old = self.inputs[relpath]
        current = self.spec_of.get(digest(old))
        if current is None:  # not DICOM: other text of the same length
            new, sop = old.swapcase(), None
        else:
            same_size = [spec, Spec(**{**asdict(current), "variant": 1 - current.variant})]
            spec = next(s for s in same_size if len(dicom_bytes(s)) == len(old))
            new, sop = dicom_bytes(spec), spec.sop
            self.spec_of[digest(new)] = spec
            self.patient_of[digest(new)] = PATIENTS[spec.patient][1]
        if new == old:
            return
        path = self.input / relpath
        if in_place:
            path.write_bytes(new)
        else:
            temporary = path.with_name(path.name + ".part")
            temporary.write_bytes(new)
            os.replace(temporary, path)
        os.utime(path, ns=(self.mtimes[relpath], self.mtimes[relpath]))
        self.inputs[relpath] = new
        if sop:
            self.sop_of[digest(new)] = sop

    def touch(self, relpath: str) -> None:
        self._set_mtime(relpath, self._tick())

    def rename(self, relpath: str, new: str) -> None:
        (self.input / new).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.input / relpath, self.input / new)  # keeps the mtime
        self.inputs[new], self.mtimes[new] = self.inputs.pop(relpath), self.mtimes.pop(relpath)
        self.versions[(new, self.mtimes[new])] = self.inputs[new]

    def rename_folder(self, folder: str, new: str) -> None:
        """``mv folder new``: every file below it moves, keeping its mtime."""
        if os.path.lexists(self.input / new):
            return
        (self.input / new).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.input / folder, self.input / new)
        for relpath in [r for r in self.inputs if r.startswith(f"{folder}/")]:
            moved = new + relpath[len(folder) :]
            self.inputs[moved], self.mtimes[moved] = (
                self.inputs.pop(relpath),
                self.mtimes.pop(relpath),
            )
            self.versions[(moved, self.mtimes[moved])] = self.inputs[moved]

    def delete(self, relpath: str) -> None:
        (self.input / relpath).unlink()
        del self.inputs[relpath], self.mtimes[relpath]

    def pack(self, relpaths: list[str], archive: str, tar: bool) -> None:
        """The user packs some input files into one archive (members named by their
        relpaths) in the input and deletes them (an export that arrives packed)."""
        buffer = io.BytesIO()
        if tar:
            with tarfile.open(fileobj=buffer, mode="w") as packed:
                for relpath in relpaths:
                    info = tarfile.TarInfo(relpath)
                    info.size = len(self.inputs[relpath])
                    packed.addfile(info, io.BytesIO(self.inputs[relpath]))
        else:
            with zipfile.ZipFile(buffer, "w") as packed:
                for relpath in relpaths:
                    packed.writestr(relpath, self.inputs[relpath])
        for relpath in relpaths:
            self.delete(relpath)
        self.write(archive, buffer.getvalue())

    def contents(self) -> dict[str, bytes]:
        """What the input holds by relpath: each file's content, an archive's members'
        (``archive//member``) instead of its own (one level: an archive in an archive is a
        member like any other)."""
        found = {}
        for relpath, data in self.inputs.items():
            kind = archives.kind(data[:512])
            if kind is None:
                found[relpath] = data
                continue
            for member in archives.members(io.BytesIO(data), kind):
                if member.open is not None:
                    with member.open() as stream:
                        found[archives.relpath_of(relpath, member.key)] = stream.read()
        return found

    def truncate_copy(self, pick: int) -> None:
        """Someone truncates a sorted copy in the output to half its size."""
        placed = sorted(report.placements(ledger.read(self.state))["destination"].to_pylist())
        whole = [
            d
            for d in placed
            if d not in self.damaged
            and d not in self.foreign
            and not (self.output / d).is_symlink()  # behind a link is the input itself
            and (self.output / d).is_file()
            and (self.output / d).stat().st_size > 1
        ]
        if whole:
            destination = whole[pick % len(whole)]
            data = (self.output / destination).read_bytes()
            os.truncate(self.output / destination, len(data) // 2)
            self.damaged[destination] = (data, data[: len(data) // 2])
            self.ever_damaged.add(destination)

    # --- the stages ------------------------------------------------------------------

    @property
    def manifest(self) -> Path:
        return self.state / "manifests" / "batch-0.parquet"

    def jobs(self) -> list[tuple[routes.Part, str]]:
        return routes.jobs(routes.current(self.state))

    def plan_files(self) -> list[Path]:
        return [self.state / "plan" / f"{job}.parquet" for _, job in self.jobs()]

    def results_files(self) -> list[Path]:
        return [self.state / "transfers" / f"{job}.parquet" for _, job in self.jobs()]

    def extract(self) -> None:
        headers.extract_batch(
            self.input, 0, 1, KEYWORDS, self.state / "manifests" / "folders", self.manifest
        )

    def plan(self) -> None:
        """Extract, partition, and plan each partition whose plan (named by the
        fingerprint of its files) is missing: what the rules do. With one partition the
        plan job partitions the manifest itself, its files named by what it read (the
        manifest's name, from the walk's fingerprint), and there is no partition job."""
        self.extract()
        if self.partitions == 1:
            walks = inventory.walk_folders(self.input, inventory.list_folders(self.input))
            key = routes.digest([inventory.batch_fingerprint(walks)])
            plan_file = self.state / "plan" / f"p0of1-{key}.parquet"
            if not plan_file.exists():
                assert (
                    plan.main(
                        [
                            *("--manifests", str(self.manifest)),
                            *("--routes", str(self.state / routes.ROUTES.format(inputs=key))),
                            *("--partition", "p0of1", "--mode", self.mode),
                            *("--input-dir", str(self.input), "--output-dir", str(self.output)),
                            *("--state-dir", str(self.state)),
                            *("--naming", json.dumps(asdict(NAMING))),
                            *("--plan", str(plan_file)),
                        ]
                    )
                    == 0
                )
            return
        assert (
            partition.main(
                [
                    *("--manifests", str(self.manifest)),
                    *("--input-dir", str(self.input), "--output-dir", str(self.output)),
                    *("--state-dir", str(self.state)),
                    *("--naming", json.dumps(asdict(NAMING))),
                    *("--partitions", str(self.partitions), "--mode", self.mode),
                    *("--routes", str(self.state / ROUTES)),
                ]
            )
            == 0
        )
        for part, job in self.jobs():
            plan_file = self.state / "plan" / f"{job}.parquet"
            if plan_file.exists():
                continue
            assert (
                plan.main(
                    [
                        *("--manifests", str(self.state / routes.PARTS / f"{job}.parquet")),
                        *("--partition", part.name, "--mode", self.mode),
                        *("--input-dir", str(self.input), "--output-dir", str(self.output)),
                        *("--state-dir", str(self.state)),
                        *("--naming", json.dumps(asdict(NAMING))),
                        *("--plan", str(plan_file)),
                    ]
                )
                == 0
            )

    def transfer(self) -> int:
        """Each partition's transfer whose results are missing; a failed one leaves none."""
        failed = 0
        for (part, _), plan_file, results in zip(
            self.jobs(), self.plan_files(), self.results_files(), strict=True
        ):
            if results.exists():
                continue
            code = transfer.main(
                [
                    *("--plan", str(plan_file), "--input-dir", str(self.input)),
                    *("--partition", part.name),
                    *("--output-dir", str(self.output), "--state-dir", str(self.state)),
                    *("--mode", self.mode, "--verify", "size", "--threads", "1"),
                    *("--results", str(results)),
                ]
            )
            if code:
                results.unlink(missing_ok=True)  # Snakemake removes a failed job's output
                failed = code
        return failed

    def report(self, checked: Path | None = None) -> dict:
        assert (
            report.main(
                [
                    *(("--check", str(checked)) if checked else ()),
                    *("--transfers", *map(str, self.results_files())),
                    *("--plans", *map(str, self.plan_files())),
                    *("--plan-csv", str(self.state / "plan.csv")),
                    *("--skipped", str(self.state / "skipped.csv")),
                    *("--manifests", str(self.manifest)),
                    *("--state-dir", str(self.state), "--output-dir", str(self.output)),
                    *("--mode", self.mode, "--html", str(self.state / "report.html")),
                    *("--summary", str(self.state / "summary.json")),
                    *("--removed", str(self.state / "removed_sources.csv")),
                    *("--naming", json.dumps(asdict(NAMING))),
                ]
            )
            == 0
        )
        return json.loads((self.state / "summary.json").read_text())

    def pending(self) -> list[dict]:
        """Rows of the plans on disk the ledger does not hold yet, in plan order."""
        committed = ledger.read(self.state, ledger.SOURCE_KEY)
        return [
            row
            for plan_file in self.plan_files()
            for row in transfer.pending_rows(pq.read_table(plan_file), committed).to_pylist()
        ]

    # --- runs ------------------------------------------------------------------------

    def run(self) -> None:
        """A run to the end: it must succeed, and the promise must hold."""
        self.plan()
        if not self.transferred():
            return
        self.check(self.report())

    def transferred(self) -> bool:
        """The transfer succeeds, unless a copy damaged by hand is in its way: a new file
        whose twin it is (by a recorded digest) is never written over it, and the run fails
        until a check restores it (or for good, when no input holds its bytes any more)."""
        if self.transfer() == 0:
            return True
        assert self.damaged, "a run with nothing in its way failed"
        assert not all(p.exists() for p in self.plan_files()), "a failed plan is kept"
        return False

    def run_with_check(self, how: str) -> None:
        """A run with check: every truncated copy is restored from an input that still
        holds its bytes (the damaged file kept beside it) or reported damaged; then the
        run goes on as any run, and the promise holds."""
        results = self.state / "check" / "run.parquet"
        # Symlink mode: a link whose input is gone is re-pointed to a duplicate the ledger
        # names that still holds its bytes (a row: restored), else left as a dangling link.
        dangling = {
            str(path.relative_to(self.output)): path.readlink()
            for path in self.output.rglob("*")
            if self.mode == "symlink" and path.is_symlink() and not path.exists()
        }
        # A link whose input path holds another file now shows other bytes: of another size,
        # every check finds it; of the same size, a checksum check may (when it knows the
        # digest of what the link was made to show).
        other_size, other_bytes = set(), set()
        if self.mode == "symlink":
            for destination, content in self.linked_contents(ledger.read(self.state)).items():
                path = self.output / destination
                if path.is_symlink() and path.exists() and path.read_bytes() != content:
                    same_size = len(path.read_bytes()) == len(content)
                    (other_bytes if same_size else other_size).add(destination)
        assert (
            check.main(
                [
                    *("--input-dir", str(self.input), "--output-dir", str(self.output)),
                    *("--state-dir", str(self.state), "--how", how, "--threads", "2"),
                    *("--results", str(results), "--csv", str(self.state / "check.csv")),
                ]
            )
            == 0
        )
        rows = {r["destination"]: r for r in pq.read_table(results).to_pylist()}
        # The input versions the ledger says held each destination's content.
        versions = {
            (r["destination"], r["relpath"], r["mtime_ns"])
            for r in ledger.read(self.state, ["destination", *ledger.SOURCE_KEY]).to_pylist()
        }
        assert other_size <= set(rows), "a link showing other bytes was not found"
        assert set(rows) - set(dangling) - other_size - other_bytes == set(self.damaged), (
            "the check found other damage than the truth"
        )
        for destination, row in rows.items():
            if destination in dangling and destination not in self.damaged:
                assert row["outcome"] == check.RESTORED, row
                linked = self.output / destination
                assert linked.readlink() != dangling[destination]
                assert linked.read_bytes() == self.inputs[row["source"]], row
                continue
            if destination in other_size | other_bytes:
                # Re-pointed to an input that holds its bytes, or left and reported.
                assert row["outcome"] in (check.RESTORED, check.DAMAGED) and row["problem"], row
                continue
            if row["outcome"] == check.RESTORED:
                content, damaged = self.damaged.pop(destination)
                assert (self.output / destination).read_bytes() == content
                self.kept_aside[row["kept_as"]] = damaged
            else:
                # Nothing holds its bytes any more: it stays, as it is.
                assert row["outcome"] == check.DAMAGED and row["detail"]
                content = self.damaged[destination][0]
                holders = [
                    relpath
                    for relpath, data in self.inputs.items()
                    if data == content and (destination, relpath, self.mtimes[relpath]) in versions
                ]
                assert not holders, f"{destination} not restored, though {holders} hold it"
                assert (self.output / destination).read_bytes() == self.damaged[destination][1]
        self.plan()
        if not self.transferred():
            return
        summary = self.report(results)
        misdirected_left = [
            d
            for d, r in rows.items()
            if d in other_size | other_bytes and r["outcome"] == check.DAMAGED
        ]
        assert summary["check"]["damaged"] == len(self.damaged) + len(misdirected_left)
        self.check(summary)

    def run_until_plan(self, keep_plan: bool) -> None:
        """A run killed after planning (the plan file left, or not yet renamed into place)."""
        self.plan()
        if not keep_plan:
            for plan_file in self.plan_files():
                plan_file.unlink()

    def run_killed_in_transfer(self, committed: int, copied: int, temp: bool) -> None:
        """A transfer SIGKILLed half way: it got through the next ``committed + copied``
        pending rows (files in place), but only the first ``committed`` reached the ledger;
        one more file half-written under its temporary name. The plan stays; no report."""
        self.plan()
        rows = self.pending()
        keep = {r["relpath"] for r in rows[:committed]}
        reached = {r["relpath"] for r in rows[: committed + copied]}
        token_of = {}  # relpath -> the token of its partition's plan (temporary names)
        for (part, _), plan_file in zip(self.jobs(), self.plan_files(), strict=True):
            table = pq.read_table(plan_file)
            token_of |= dict.fromkeys(table["relpath"].to_pylist(), transfer.temp_token(table))
            mask = pa.array([r in reached for r in table["relpath"].to_pylist()], pa.bool_())
            # Each partition's job: killed if it reached a row it could not commit. Killed,
            # it never reaches its last step, which removes the pending plan.
            pending = transfer.pending_file(self.state, part)
            kept = pending.read_bytes() if pending.exists() else None
            with killed_at_commit(keep):
                # The rows the killed transfer got to, through the real transfer.
                transfer.transfer_plan(
                    self._plan_of(table.filter(mask)),
                    self.input,
                    self.output,
                    self.state,
                    self.mode,
                    "size",
                    1,
                    part,
                )
            if kept is not None:
                pending.write_bytes(kept)
        sorts = [r for r in rows if r["action"] == plan.SORT and r["relpath"] not in reached]
        if temp and sorts:
            destination = self.output / sorts[0]["destination"]
            destination.parent.mkdir(parents=True, exist_ok=True)
            data = self.contents()[sorts[0]["relpath"]]
            # The temporary name the killed transfer of its partition gave it.
            token = token_of[sorts[0]["relpath"]]
            temp = destination.with_name(temp_name_for(destination.name, token))
            temp.write_bytes(data[: len(data) // 2])
            self.temps.add(str(temp.relative_to(self.output)))

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
                data = (
                    self.contents()[row["relpath"]] if same_bytes else b"someone else's %d" % pick
                )
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(data)
                self.foreign[row["destination"]] = data
        if self.transfer() != 0:
            assert not all(p.exists() for p in self.plan_files()), "a failed plan is kept"
            return
        self.check(self.report())

    def put_foreign_file_at_temp_name(self, pick: int, link: bool) -> None:
        """Someone else puts a file, or a link to a file elsewhere, at the name that
        temporary files of dcmsort used to have (``.<name>.dcmsort-tmp``) beside a
        destination the plan chose: it is theirs, whatever runs come next."""
        self.plan()
        sorts = [r for r in self.pending() if r["action"] == plan.SORT]
        if not sorts:
            return
        path = temp_path_for(self.output / sorts[pick % len(sorts)]["destination"])
        if os.path.lexists(path):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data = b"someone else's %d" % pick
        if link:
            target = self.root / f"elsewhere-{pick}"
            target.write_bytes(data)
            self.elsewhere[target] = data
            path.symlink_to(target)
        else:
            path.write_bytes(data)
        self.foreign[str(path.relative_to(self.output))] = read(path)

    def check_foreign(self) -> None:
        """Files of someone else's in the output (and what their links name) are as they
        were put there."""
        for path, data in self.foreign.items():
            assert read(self.output / path) == data, f"someone else's file changed: {path}"
        for target, data in self.elsewhere.items():
            assert target.read_bytes() == data, f"a file outside the output changed: {target}"

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
        if not self.transferred():
            return
        results = [r for f in self.results_files() for r in pq.read_table(f).to_pylist()]
        # Left for the next run: the changed file, and the duplicates of it.
        changed = {r["relpath"] for r in results if r["status"] == transfer.CHANGED}
        self.check(self.report(), changed=changed | {relpath})

    # --- the promise -----------------------------------------------------------------

    def tree(self) -> dict[str, bytes | None]:
        """Every file in the output but the state folder (None: a link that dangles)."""
        found = {}
        for top, dirs, names in os.walk(self.output):
            if Path(top) == self.output and ".dcmsort" in dirs:
                dirs.remove(".dcmsort")
            for name in names:
                path = Path(top) / name
                found[str(path.relative_to(self.output))] = (
                    path.read_bytes() if path.exists() else None
                )
        return found

    def linked_contents(self, committed: pa.Table) -> dict[str, bytes]:
        """What each link was made to show: the input version of its first placement (a
        link shows whatever is at its path now, or nothing)."""
        contents: dict[str, bytes] = {}
        for row in committed.filter(pc.equal(committed["status"], ledger.PLACED)).to_pylist():
            if row["destination"] not in contents:
                version = (row["relpath"], row["mtime_ns"])
                contents[row["destination"]] = self.versions[version]
        return contents

    def check(self, summary: dict, changed: frozenset[str] | set[str] = frozenset()) -> None:
        # Inputs are never modified, moved or deleted.
        on_disk = {str(p.relative_to(self.input)): p for p in self.input.rglob("*") if p.is_file()}
        assert set(on_disk) == set(self.inputs)
        for relpath, path in on_disk.items():
            assert path.read_bytes() == self.inputs[relpath], f"input modified: {relpath}"
            assert path.stat().st_mtime_ns == self.mtimes[relpath], f"input touched: {relpath}"

        # Every input: its content at its destination, or skipped with a reason; in symlink
        # mode, or its link dangles and is reported (listed with the gone sources).
        reported = {r["destination"] for r in csv_rows(self.state / "removed_sources.csv")}
        result = outcomes(self.input, self.output, self.state)
        by_path = result.by_relpath()  # asserts that no file has two outcomes
        contents = self.contents()
        placements = ledger.read(self.state, ["relpath", "status", "destination"]).to_pylist()
        linked_from = {
            r["destination"]: r["relpath"] for r in placements if r["status"] == ledger.PLACED
        }
        for relpath, data in contents.items():
            if relpath in changed or archives.split(relpath)[0] in changed:
                continue  # changed while the run went on: the next run sorts it
            row = by_path.get(relpath)
            assert row is not None, f"lost: {relpath} is neither sorted nor skipped"
            if row["action"] == "skip":
                assert row["reason"], relpath
            elif row["destination"] in self.damaged:
                continue  # damaged by hand: only a check looks
            else:
                destination = self.output / row["destination"]
                if self.mode == "symlink" and not destination.exists():
                    if linked_from.get(row["destination"]) in changed:
                        # The link's own input went while the run went on (after the
                        # extract the report reads): the next run reports it.
                        continue
                    assert row["destination"] in reported, f"{relpath}: dangles, unreported"
                    continue
                assert destination.is_file(), f"{relpath}: nothing at {row['destination']}"
                assert destination.read_bytes() == data, f"{relpath}: other bytes at dest."

        # The ledger names only what is there; the tree holds only what the ledger names
        # (or someone else's files); no content is written twice; no temporary file left.
        tree = self.tree()
        committed = ledger.read(self.state)
        for destination in set(committed["destination"].to_pylist()):
            assert destination in tree, f"the ledger names a missing file: {destination}"
        placed = set(report.placements(committed)["destination"].to_pylist())
        self.check_foreign()
        # A killed run's temporary file may stay (when no pending plan names it any more).
        leftovers = {p for p in tree if p.endswith(TEMP_SUFFIX)} - self.temps - set(self.foreign)
        assert not leftovers, f"temporary files left: {sorted(leftovers)}"
        tree = {p: data for p, data in tree.items() if not p.endswith(TEMP_SUFFIX)}
        for path, data in self.kept_aside.items():
            assert tree.pop(path, None) == data, f"a damaged file kept aside changed: {path}"
        ours = {p: tree[p] for p in tree if p not in self.foreign or p in placed}
        dangling = {p for p, data in ours.items() if data is None}
        if not changed:  # the report saw the input before it changed
            assert summary["dangling_links"] == len(dangling), f"dangling: {sorted(dangling)}"
        if self.mode == "symlink":  # a link holds no content: what it was made to show
            ours = {p: self.linked_contents(committed)[p] for p in ours}
        assert set(ours) == placed, (
            f"in the tree, not in the ledger: {sorted(set(ours) - placed)}; "
            f"in the ledger, not in the tree: {sorted(placed - set(ours))}"
        )
        for path, (_, damaged) in self.damaged.items():
            assert ours[path] == damaged, f"a damaged copy changed without a check: {path}"
            ours[path] = self.damaged[path][0]  # what the ledger and the report count
        # A copy damaged by hand is no twin of a new file without a recorded digest: that
        # file is written again under another name, and a check then restores both.
        restored = {digest(ours[p]) for p in self.ever_damaged if p in ours}
        twice = [
            d for d, n in Counter(map(digest, ours.values())).items() if n > 1 and d not in restored
        ]
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
            assert summary["input_files"] == len(contents)
            assert summary["duplicates"] == actions["duplicate"]
            assert summary["skipped"] == actions["skip"]
            current = {digest(data) for data in contents.values()}
            # Dangling links are listed in removed_sources.csv too, and counted apart.
            gone = {p for p, data in ours.items() if digest(data) not in current} - dangling
            kept = reported - dangling
            assert summary["sources_gone"] == len(kept)
            # A copy once damaged by hand may have been sorted again from a touched input
            # (see above): whether its first placement counts as gone is the ledger's call.
            assert kept - self.ever_damaged == gone - self.ever_damaged, (
                f"gone: {sorted(gone)}, reported: {sorted(kept)}"
            )


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


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

    mode = "copy"
    partitions = 1

    @initialize(files=st.lists(st.tuples(paths, specs), min_size=1, max_size=4))
    def make_world(self, files: list[tuple[str, Spec]]) -> None:
        """A world with a few files already (steps are too few to spend them adding)."""
        self.tmp = tempfile.mkdtemp(prefix="dcmsort-stateful-")
        self.world = World(Path(self.tmp), self.mode, self.partitions)
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
    @rule(pick=picks, spec=specs, in_place=st.booleans())
    def replace_keeping_size_and_mtime(self, pick: int, spec: Spec, in_place: bool) -> None:
        self.world.replace_keeping_mtime(self._pick(pick), spec, in_place)

    @has_inputs
    @rule(pick=picks, relpath=paths)
    def rename(self, pick: int, relpath: str) -> None:
        if self._free(relpath):
            self.world.rename(self._pick(pick), relpath)

    @has_inputs
    @rule(pick=picks)
    def delete(self, pick: int) -> None:
        self.world.delete(self._pick(pick))

    @has_inputs
    @rule(picks=st.lists(picks, min_size=1, max_size=3), relpath=paths, tar=st.booleans())
    def pack_into_an_archive(self, picks: list[int], relpath: str, tar: bool) -> None:
        archive = relpath + (".tar" if tar else ".zip")
        if self._free(archive):
            self.world.pack(sorted({self._pick(p) for p in picks}), archive, tar)

    @rule(pick=picks, link=st.booleans())
    def put_someone_elses_file_at_a_temporary_name(self, pick: int, link: bool) -> None:
        self.world.put_foreign_file_at_temp_name(pick, link)

    @rule(pick=picks)
    def truncate_a_sorted_copy(self, pick: int) -> None:
        self.world.truncate_copy(pick)

    @rule()
    def run(self) -> None:
        self.world.run()

    @rule(how=st.sampled_from(check.HOW))
    def run_with_check(self, how: str) -> None:
        self.world.run_with_check(how)

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

    @invariant()
    def files_of_someone_elses_in_the_output_are_never_removed_or_changed(self) -> None:
        if hasattr(self, "world"):
            self.world.check_foreign()


Sorting.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_state_across_runs = Sorting.TestCase


class SortingLinks(Sorting):
    """The same world in symlink mode, where a link shows its input's path: a renamed
    patient folder must be followed (relinked), and every link that dangles reported."""

    mode = "symlink"

    # Not here: an input rewritten in place (a link shows the new bytes, also to its
    # duplicates; not what this machine is about, and not reported: see the README).
    def replace_content(self, pick: int, spec: Spec) -> None:
        pass

    def replace_keeping_size_and_mtime(self, pick: int, spec: Spec, in_place: bool) -> None:
        pass

    # Not here: members of archives are copied, not linked (tests/test_archives.py).
    def pack_into_an_archive(self, picks: list[int], relpath: str, tar: bool) -> None:
        pass

    @Sorting.has_inputs
    @rule(pick=picks, how=st.sampled_from(["touch", "delete"]))
    def run_while_an_input_changes(self, pick: int, how: str) -> None:
        self.world.run_with_change_during_transfer(pick, how)

    @rule(
        folder=st.sampled_from(["p1", "p2", "p1/sub"]),
        new=st.sampled_from(["p1", "p2", "p3", "p3/sub"]),
    )
    def rename_folder(self, folder: str, new: str) -> None:
        if (self.world.input / folder).is_dir() and not new.startswith(folder):
            self.world.rename_folder(folder, new)


class SortingInPartitions(Sorting):
    """The same stories with the plan and the transfer split over partitions (each
    partition's transfer is killed, or finishes, on its own)."""

    partitions = PARTITIONS


SortingInPartitions.TestCase.settings = Sorting.TestCase.settings
test_state_across_runs_in_partitions = SortingInPartitions.TestCase


SortingLinks.TestCase.settings = settings(
    Sorting.TestCase.settings, max_examples=20, stateful_step_count=12
)
test_state_across_runs_in_symlink_mode = SortingLinks.TestCase


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


def test_a_link_whose_input_path_holds_another_file_now_is_reported_by_a_check(tmp_path):
    # Found by a deep run of the symlink machine: the link reaches the other file, so it
    # shows other bytes than it was made to; a check reports it damaged (nothing holds its
    # bytes any more), as the model now expects.
    world = World(tmp_path, mode="symlink")
    world.add("p1/IM1.dcm", A)
    world.run()
    world.run_with_change_during_transfer(0, "delete")
    world.write("p1/IM1.dcm", b"not DICOM: p1/IM1.dcm")
    world.run_with_check("size")


@pytest.mark.xfail(
    strict=True,
    reason="symlink mode: an input renamed while another file (same SOP, other bytes) takes "
    "its path, then a run with check: the transfer finds a different file at a destination "
    "the plan chose and the run fails (a rerun chooses another name); found by a deep run, "
    "not fixed",
)
def test_a_renamed_input_whose_path_another_file_takes_is_sorted_by_one_run(tmp_path):
    world = World(tmp_path, mode="symlink")
    world.add("p1/IM1.dcm", A)
    world.add("p1/sub/IM1.dcm", A)
    world.run()
    world.rename("p1/IM1.dcm", "p1/IM2.dcm")
    world.add("p1/IM1.dcm", Spec(patient=0, series=0, instance=0, rows=6))
    world.run_with_check("size")


@pytest.mark.xfail(
    strict=True,
    reason="symlink mode: the relink to a renamed input fails when that input changes during "
    "the run, and the link stays pointed at its old path, which another file holds now, "
    "though an unchanged duplicate (p1/sub/IM2.dcm) holds the content: not re-pointed there",
)
def test_a_link_is_pointed_at_an_unchanged_twin_when_its_relink_fails(tmp_path):
    # Found by a deep run of the symlink machine.
    world = World(tmp_path, mode="symlink")
    for relpath in ("p1/IM1.dcm", "p1/sub/IM2.dcm", "copy_of_IM1.dcm"):
        world.add(relpath, A)
    world.run()
    world.run_with_change_during_transfer(0, "delete")  # copy_of_IM1.dcm
    world.rename("p1/IM1.dcm", "copy_of_IM1.dcm")
    world.write("p1/IM1.dcm", b"not DICOM: p1/IM1.dcm")
    world.run_with_change_during_transfer(0, "touch")  # copy_of_IM1.dcm


def test_a_copy_is_not_judged_by_an_input_rewritten_in_place_since(tmp_path):
    # Found by a deep run: an input rewritten in place (same size, old mtime set back: a
    # new ctime) made a checksum check without a recorded digest call the copy of the
    # old bytes damaged, and put the new bytes in its place.
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.run()
    world.replace_keeping_mtime("p1/IM1.dcm", Spec(patient=0, series=0, instance=0, rows=6), True)
    world.run_with_check("checksum")


def test_a_truncated_copy_is_not_restored_from_an_input_rewritten_in_place_and_sorted_since(
    tmp_path,
):
    # Found by a deep run: the input of a truncated copy, rewritten in place with its old
    # mtime set back and sorted since as a new version, was taken to hold the old bytes.
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.run()
    world.replace_keeping_mtime("p1/IM1.dcm", Spec(patient=0, series=0, instance=0, rows=6), True)
    world.run()
    world.truncate_copy(0)
    world.run_with_check("size")


def test_transfers_killed_in_partitions_are_settled_by_a_run_with_one(tmp_path):
    # With one partition there is no partition job: the plan job settles what the killed
    # transfers of the other partition count left (their temporary files, their copies).
    world = World(tmp_path, partitions=PARTITIONS)
    for number, (patient, path) in enumerate([(0, "p1/IM1.dcm"), (1, "p2/IM1"), (2, "IM2.dcm")]):
        world.add(path, Spec(patient=patient, series=0, instance=number))
    world.run_killed_in_transfer(committed=0, copied=1, temp=True)
    assert world.temps
    world.partitions = 1
    world.run()
    assert not world.temps & set(world.tree())


@pytest.mark.parametrize("link", [False, True])
def test_a_file_of_someone_elses_at_a_temporary_name_is_left_as_it_is(tmp_path, link):
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.put_foreign_file_at_temp_name(0, link)  # before the very first transfer
    world.run()
    world.add("p1/IM2.dcm", Spec(patient=0, series=0, instance=1))
    world.run_killed_in_transfer(committed=0, copied=0, temp=True)
    world.run()  # settles the killed transfer: removes its temporary file, not theirs
    assert not world.temps & set(world.tree())


def test_a_renamed_folder_in_symlink_mode_is_followed_not_sorted_twice(tmp_path):
    world = World(tmp_path, "symlink")
    world.add("p1/IM1.dcm", A)
    world.add("p1/sub/IM2.dcm", Spec(patient=0, series=0, instance=1))
    world.run()
    world.rename_folder("p1", "p3")
    world.run()  # every link resolves to its input's new path, nothing written twice
    assert all(world.tree().values()), "no link dangles"


def test_a_link_whose_input_is_deleted_while_a_duplicate_stays_is_reported(tmp_path):
    world = World(tmp_path, "symlink")
    world.add("p1/IM1.dcm", A)
    world.write("p2/IM1.dcm", dicom_bytes(A), A.sop)  # its duplicate
    world.run()
    world.delete("p1/IM1.dcm")
    world.run()  # p2/IM1.dcm's content is behind a dangling link: reported


def test_a_truncated_copy_is_whole_again_after_a_run_with_check(tmp_path):
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.run()
    world.truncate_copy(0)
    world.run()  # a plain run does not look
    world.run_with_check("size")
    assert not world.damaged


def test_a_truncated_copy_whose_input_is_gone_is_reported_by_a_run_with_check(tmp_path):
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.run()
    world.truncate_copy(0)
    world.delete("p1/IM1.dcm")
    world.run_with_check("checksum")
    assert list(world.damaged) == ["DOE^JOHN_1/T1_1/IM1.dcm"]


def test_a_file_replaced_with_the_same_size_and_its_old_mtime_is_sorted(tmp_path):
    world = World(tmp_path)
    world.add("p1/IM1.dcm", A)
    world.run()
    world.replace_keeping_mtime("p1/IM1.dcm", Spec(patient=1, series=0, instance=0), True)
    world.run()  # the new content, of another patient, is sorted; the old copy stays


def test_a_link_whose_input_goes_during_the_run_is_reported_by_the_next_run(tmp_path):
    world = World(tmp_path, "symlink")
    world.add("p1/IM1.dcm", A)
    world.run()
    world.write("p1/IM1", dicom_bytes(A), A.sop)  # its exact duplicate, elsewhere
    world.run_with_change_during_transfer(1, "delete")  # p1/IM1.dcm, what the link shows
    world.run()  # the link dangles: reported now


def test_someone_elses_file_with_the_content_is_kept_as_a_file_in_symlink_mode(tmp_path):
    # It is taken as the placement; recorded as a link, a check took it for damage and set
    # someone else's file aside.
    world = World(tmp_path, "symlink")
    world.add("p1/IM1.dcm", A)
    world.run_with_foreign_file(0, same_bytes=True)
    world.run_with_check("size")
