"""dcmsort as a module of another workflow (``module dcmsort: snakefile: ...``, then
``use rule * from dcmsort as dcmsort_*``), end to end through the real Snakemake: the outer
workflow lives in a folder of its own, as a workflow that reuses dcmsort would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import Run, Sorter, assert_every_file_accounted_for, write_dicom
from dcmsort import runner, settings, status

OUTER_SNAKEFILE = """\
module dcmsort:
    snakefile:
        {snakefile}
    config:
        {{"input_dir": {input_dir!r}, "output_dir": {output_dir!r}}}


use rule * from dcmsort as dcmsort_*


# The outer workflow's own target: dcmsort's, and a file made from its summary.
rule all:
    default_target: True
    input:
        rules.dcmsort_all.input,
        "patients.txt",


rule count_patients:
    input:
        {summary!r},
    output:
        "patients.txt",
    shell:
        "grep -c . {{input}} > {{output}}"


# Declared after the module statement: dcmsort's handlers run as well.
onstart:
    print("outer onstart")


onsuccess:
    print("outer onsuccess")
"""


def outer_workflow(
    tmp_path: Path, snakefile: str = repr(str(runner.SNAKEFILE))
) -> tuple[Sorter, Path]:
    """A sorter's folders and an outer workflow in a folder of its own that sorts them
    with dcmsort as a module (``snakefile``: the module's snakefile, as Python)."""
    sorter = Sorter(tmp_path / "work", tmp_path / "Unclassified", tmp_path / "Classified")
    sorter.workdir.mkdir()
    outer = tmp_path / "outer" / "Snakefile"
    outer.parent.mkdir()
    outer.write_text(
        OUTER_SNAKEFILE.format(
            snakefile=snakefile,
            input_dir=str(sorter.input_dir),
            output_dir=str(sorter.output_dir),
            summary=str(sorter.state / "summary.json"),
        )
    )
    return sorter, outer


def run_outer(outer: Path, workdir: Path, *flags: str) -> Run:
    environment = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(outer), "-d", str(workdir), "-c2", *flags],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def small_input(sorter: Sorter) -> None:
    write_dicom(sorter.input_dir / "a" / "IM1.dcm", "DOE^JOHN", "1", "T1", sop="1.2.3.1")
    write_dicom(sorter.input_dir / "a" / "IM2.dcm", "DOE^JOHN", "1", "T1", sop="1.2.3.2")
    write_dicom(sorter.input_dir / "b" / "IM1.dcm", "ROE^ANN", "2", "T2", sop="1.2.3.3")
    (sorter.input_dir / "b" / "notes.txt").write_text("not an image")


def test_a_workflow_using_dcmsort_as_a_module_sorts_the_files(tmp_path):
    sorter, outer = outer_workflow(tmp_path)
    small_input(sorter)
    result = run_outer(outer, sorter.workdir)
    assert result.returncode == 0, result.output[-4000:]
    assert sorted(
        str(p.relative_to(sorter.output_dir))
        for p in sorter.output_dir.rglob("*")
        if p.is_file() and ".dcmsort" not in p.parts
    ) == ["DOE^JOHN_1/T1_1/IM1.dcm", "DOE^JOHN_1/T1_1/IM2.dcm", "ROE^ANN_2/T2_1/IM1.dcm"]
    assert_every_file_accounted_for(sorter)
    # The outer workflow's own target was made (dcmsort did not take the default target),
    # and dcmsort's onstart and onsuccess ran: the report is current, the summary printed.
    assert (sorter.workdir / "patients.txt").is_file()
    assert status.status_of(sorter.state) == status.COMPLETE
    assert "dcmsort: 3 files sorted (3 new this run)" in result.stderr
    assert (sorter.state / settings.LOCK_FILE).read_text().startswith("pid ")
    assert "outer onstart" in result.stdout
    assert "outer onsuccess" in result.stdout


def test_a_module_run_again_with_nothing_new_changes_nothing(tmp_path):
    sorter, outer = outer_workflow(tmp_path)
    small_input(sorter)
    assert run_outer(outer, sorter.workdir).returncode == 0
    again = run_outer(outer, sorter.workdir)
    assert again.returncode == 0, again.output[-4000:]
    assert "dcmsort: nothing new; last run: 3 files sorted" in again.stderr
    # A new file is sorted by the next run of the outer workflow.
    write_dicom(sorter.input_dir / "c" / "IM1.dcm", "POE^EVE", "3", "T1", sop="1.2.3.9")
    assert run_outer(outer, sorter.workdir).returncode == 0
    assert (sorter.output_dir / "POE^EVE_3" / "T1_1" / "IM1.dcm").is_file()
    assert_every_file_accounted_for(sorter)


def test_a_deployment_with_only_the_module_sorts_with_dcmsorts_target(tmp_path):
    """What ``snakedeploy deploy-workflow`` writes: the module and its rules, no target of
    its own; dcmsort's ``all`` is the default target."""
    sorter, outer = outer_workflow(tmp_path)
    outer.write_text(outer.read_text().split("# The outer workflow's own target")[0])
    small_input(sorter)
    result = run_outer(outer, sorter.workdir)
    assert result.returncode == 0, result.output[-4000:]
    assert_every_file_accounted_for(sorter)
    assert status.status_of(sorter.state) == status.COMPLETE


def test_a_module_from_a_git_repository_runs_the_installed_dcmsort(tmp_path):
    """A module read from git (as github(...) from snakedeploy is) has no checkout on disk:
    its jobs run the dcmsort package of the environment (here: this checkout's src)."""
    published = tmp_path / "published"
    published.mkdir()
    for name in ("Snakefile", "workflow", "config", "environment.yml"):
        source = runner.REPO / name
        if source.is_dir():
            shutil.copytree(source, published / name)
        else:
            shutil.copy(source, published / name)
    git = ["git", "-C", str(published), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "release"], check=True)
    sorter, outer = outer_workflow(
        tmp_path, f"gitfile({str(published)!r}, path='workflow/Snakefile', ref='HEAD')"
    )
    small_input(sorter)
    result = run_outer(outer, sorter.workdir)
    assert result.returncode == 0, result.output[-4000:]
    assert "dcmsort: 3 files sorted (3 new this run)" in result.stderr
    assert_every_file_accounted_for(sorter)
