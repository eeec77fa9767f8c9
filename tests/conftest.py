"""Shared fixtures: run the real Snakemake on data made by the project's own generator."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

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
        check: bool = True,
        timeout: float = 600,
        umask: int | None = None,
        **config: object,
    ) -> Run:
        env = dict(os.environ)
        log = self.workdir / "opened.log"
        if count_opens:
            log.unlink(missing_ok=True)
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(OPEN_COUNTER), env.get("PYTHONPATH")])
            )
            env["DCMSORT_OPEN_LOG"] = str(log)
            env["DCMSORT_OPEN_ROOT"] = str(self.input_dir)
        proc = subprocess.run(
            self.command(*extra, **config),
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

    def plan(self) -> pd.DataFrame:
        return pd.read_parquet(self.state / "plan.parquet")

    def summary(self) -> dict:
        return json.loads((self.state / "summary.json").read_text())


@pytest.fixture
def sorter(tmp_path: Path) -> Sorter:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return Sorter(workdir, tmp_path / "Unclassified", tmp_path / "Classified")


def assert_every_file_accounted_for(sorter: Sorter) -> pd.DataFrame:
    """The central invariant: every input file is at exactly one destination, byte-identical,
    or is a duplicate of one, or is skipped with a reason. Returns the plan."""
    plan = sorter.plan()
    inputs = {
        str(p.relative_to(sorter.input_dir))
        for p in sorter.input_dir.rglob("*")
        if p.is_file() or p.is_symlink()
    }
    assert set(plan["relpath"]) == inputs
    assert plan["relpath"].is_unique
    placed = plan[plan["action"] == "sort"]
    assert placed["destination"].is_unique, "two files were given one destination"
    for row in placed.itertuples():
        destination = sorter.output_dir / row.destination
        assert destination.is_file(), f"{row.relpath} missing at {row.destination}"
        assert destination.read_bytes() == (sorter.input_dir / row.relpath).read_bytes()
        # Inside output_dir by its path (a symlink's target is the input, by design).
        assert Path(os.path.normpath(destination)).is_relative_to(sorter.output_dir)
    for row in plan[plan["action"] == "duplicate"].itertuples():
        assert (sorter.output_dir / row.destination).read_bytes() == (
            sorter.input_dir / row.relpath
        ).read_bytes()
    skipped = plan[plan["action"] == "skip"]
    assert skipped["reason"].notna().all() and (skipped["reason"].str.len() > 0).all()
    return plan
