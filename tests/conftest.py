"""Shared fixtures: run the real Snakemake on data made by the project's own generator."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dcmsort import archives, demo, fileops, inventory, ledger, report, routes
from dcmsort.runner import snakemake_command

OPEN_COUNTER = Path(__file__).resolve().parent / "opencounter"


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every path below root with its kind, content digest (files), link target and mtime."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            snapshot[rel] = ("link", os.readlink(path))
        elif path.is_file():
            info = path.stat()
            snapshot[rel] = (
                "file",
                hashlib.sha256(path.read_bytes()).hexdigest(),
                info.st_mtime_ns,
                info.st_mode,
            )
        else:
            snapshot[rel] = ("dir", path.stat().st_mode)
    return snapshot


def write_dicom(
    path: Path, name: str = "DOE^JOHN", pid: str = "1", desc: str = "T1", **kw
) -> bytes:
    """One real DICOM file from the project's generator (series ``desc`` of patient
    ``pid``; ``sop``, ``instance``, ``number``, ``rows`` as keywords; ``tags``: keyword ->
    value to set, None to drop the tag); returns its bytes."""
    series = demo.Series(
        name,
        pid,
        demo.uid("study", pid),
        "20240101",
        demo.uid("series", pid, desc),
        kw.get("number", 1),
        desc,
    )
    sop = kw.get("sop") or demo.uid(path)
    instance = demo.make_instance(series, kw.get("instance", 1), sop, rows=kw.get("rows", 16))
    for keyword, value in kw.get("tags", {}).items():
        if value is None:
            delattr(instance, keyword)
        else:
            setattr(instance, keyword, value)
    demo.write(instance, path)
    return path.read_bytes()


@dataclass
class Run:
    """One finished snakemake run."""

    returncode: int
    stdout: str
    stderr: str
    opened: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class Sorter:
    """Runs dcmsort on one input folder into one output folder, as a user would."""

    workdir: Path
    input_dir: Path
    output_dir: Path

    @property
    def state(self) -> Path:
        return self.output_dir / ".dcmsort"

    def command(self, *extra: str, **config: object) -> list[str]:
        folders = {"input_dir": self.input_dir, "output_dir": self.output_dir}
        return snakemake_command(self.workdir, *extra, **{**folders, **config})

    def run(
        self,
        *extra: str,
        count_opens: bool = False,
        opens_below: Path | None = None,
        check: bool = True,
        timeout: float = 600,
        umask: int | None = None,
        keys: dict[str, object] | None = None,
        **config: object,
    ) -> Run:
        """One run; config keys as keywords, or in ``keys`` (``check``, whose name the
        keyword that fails the test on a non-zero exit already has)."""
        env = dict(os.environ)
        log = self.workdir / "opened.log"
        if count_opens:
            log.unlink(missing_ok=True)
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(OPEN_COUNTER), env.get("PYTHONPATH")])
            )
            env["DCMSORT_OPEN_LOG"] = str(log)
            # Opens of input files, or of files below opens_below.
            env["DCMSORT_OPEN_ROOT"] = str(opens_below or self.input_dir)
        proc = subprocess.run(
            self.command(*extra, **config, **(keys or {})),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            # As a user's shell would have it (e.g. 0o022), whatever the test runner's.
            preexec_fn=None if umask is None else (lambda: os.umask(umask)),
        )
        opened = log.read_text().splitlines() if count_opens and log.exists() else []
        result = Run(proc.returncode, proc.stdout, proc.stderr, opened)
        if check and proc.returncode != 0:
            raise AssertionError(f"snakemake failed ({proc.returncode}):\n{result.output[-4000:]}")
        return result

    def outcomes(self) -> Outcomes:
        """One row per current input file: relpath, action (sort, duplicate, skip),
        destination, reason, conflict; from the ledger and skipped.csv, as a user would
        read them."""
        return outcomes(self.input_dir, self.output_dir, self.state)

    def summary(self) -> dict:
        return json.loads((self.state / "summary.json").read_text())

    def run_until_planned(self, **config: object) -> Run:
        """A run stopped once every partition is planned, before any transfer. With one
        partition (auto: the inputs here are small) the plan job is known from the start;
        with more, once the partition job ran: `--until plan` cannot name them."""
        if config.get("partitions", "auto") in ("auto", 1):
            return self.run("--until", "plan", **config)
        self.run("--until", "partition", **config)
        return self.run(*map(str, self.plan_files()), **config)

    def plan_files(self) -> list[Path]:
        """The current plan file of each partition."""
        return [self.state / "plan" / f"{job}.parquet" for _, job in self.jobs()]

    def jobs(self) -> list[tuple[routes.Part, str]]:
        return routes.jobs(routes.current(self.state))


@pytest.fixture
def sorter(tmp_path: Path) -> Sorter:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return Sorter(workdir, tmp_path / "Unclassified", tmp_path / "Classified")


def input_files(input_dir: Path) -> dict[str, os.stat_result | None]:
    """Every file (or link) below input_dir by manifest relpath (``encode_name`` form, so
    names of any bytes work), with its stat (None if it cannot be followed)."""
    found = {}
    for top, dirs, names in os.walk(input_dir):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            path = os.path.join(top, name)
            try:
                info = os.stat(path)
            except OSError:
                info = None
            found[inventory.encode_name(os.path.relpath(path, input_dir))] = info
    return found


class Outcomes(list[dict]):
    """Outcome rows, one dict per input file with the keys relpath, action (sort, duplicate,
    skip), destination, reason, conflict, size and SOPInstanceUID (None where not set)."""

    def column(self, name: str) -> list:
        return [row[name] for row in self]

    def where(self, **equal: object) -> Outcomes:
        """The rows whose values equal the ones given, e.g. ``where(action="sort")``."""
        return Outcomes(row for row in self if all(row[k] == v for k, v in equal.items()))

    def by_relpath(self) -> dict[str, dict]:
        """The rows by relpath (a file with two outcomes fails the test)."""
        rows = {row["relpath"]: row for row in self}
        assert len(rows) == len(self), "a file has two outcomes"
        return rows


def outcomes(input_dir: Path, output_dir: Path, state: Path) -> Outcomes:
    committed = ledger.read(state)
    current = {
        (relpath, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
        for relpath, info in input_files(input_dir).items()
        if info is not None
    }
    # A member's version is its archive's, but for the size (the member's own).
    archives_now = {(relpath, *version) for relpath, _, *version in current}

    def still_there(r: dict) -> bool:
        if archives.is_member(r["relpath"]):
            archive = archives.split(r["relpath"])[0]
            return (archive, r["mtime_ns"], r["ctime_ns"], r["ino"]) in archives_now
        return tuple(r[k] for k in ledger.SOURCE_KEY) in current

    # The last committed row of each input file that is still there as it was committed.
    live = {r["relpath"]: r for r in committed.to_pylist() if still_there(r)}
    placed = report.placements(committed)
    conflicted = set(report.conflicted(placed)["destination"].to_pylist())
    with open(state / "skipped.csv", newline="", encoding="utf-8") as f:
        skipped = list(csv.DictReader(f))
    return Outcomes(
        [
            {
                "relpath": r["relpath"],
                "action": "sort" if r["status"] == ledger.PLACED else "duplicate",
                "destination": r["destination"],
                "reason": None,
                "conflict": r["status"] == ledger.PLACED and r["destination"] in conflicted,
                "size": r["size"],
                "SOPInstanceUID": r["sop_uid"],
            }
            for r in live.values()
        ]
        + [
            {
                "relpath": fileops.from_spreadsheet_safe(r["relpath"]),
                "action": "skip",
                "destination": None,
                "reason": r["reason"],
                "conflict": False,
                "size": int(r["size"]),
                "SOPInstanceUID": None,
            }
            for r in skipped
        ]
    )


def input_bytes(input_dir: Path, relpath: str) -> bytes:
    """The content of an input file, or of an archive member (``archive//member``)."""
    archive, key = archives.split(relpath)
    path = inventory.source_path(input_dir, archive)
    if not key:
        return Path(path).read_bytes()
    with archives.reading(path) as (_, _, members):
        for member in members:
            if member.key == key:
                with member.open() as stream:
                    return stream.read()
    raise AssertionError(f"no member {key!r} in {archive!r}")


def assert_every_file_accounted_for(sorter: Sorter) -> Outcomes:
    """The central invariant: every input file's content is at its destination,
    byte-identical (placed, or a duplicate of a placed file), or the file is skipped with a
    reason; and every placement the ledger holds is on disk. Returns the outcomes."""
    result = sorter.outcomes()
    inputs = set(input_files(sorter.input_dir))
    relpaths = result.column("relpath")
    # An archive is accounted for by its members' outcomes (and its own, when damaged).
    sources = {archives.split(r)[0] for r in relpaths}
    assert sources == inputs, (
        f"not accounted for: {sorted(inputs - sources)[:5]}, "
        f"unknown: {sorted(sources - inputs)[:5]}"
    )
    assert len(set(relpaths)) == len(relpaths), "a file has two outcomes"
    placed = result.where(action="sort").column("destination")
    assert len(set(placed)) == len(placed), "two current files were given one destination"
    for row in result:
        if row["action"] == "skip":
            continue
        destination = sorter.output_dir / row["destination"]
        assert destination.is_file(), f"{row['relpath']} missing at {row['destination']}"
        assert destination.read_bytes() == input_bytes(sorter.input_dir, row["relpath"]), row[
            "relpath"
        ]
        # Inside output_dir by its path (a symlink's target is the input, by design).
        assert Path(os.path.normpath(destination)).is_relative_to(sorter.output_dir)
        assert not any(
            p.is_symlink()
            for p in destination.relative_to(sorter.output_dir).parents
            if str(p) != "." and (sorter.output_dir / p).is_symlink()
        )
    for destination in report.placements(ledger.read(sorter.state))["destination"].to_pylist():
        assert os.path.lexists(sorter.output_dir / destination), f"ledger lies: {destination}"
    skipped = result.where(action="skip")
    assert all(isinstance(r, str) and r for r in skipped.column("reason")), "skip without reason"
    return result
