"""The dcmsort command, end to end through the real Snakemake: a run, a dry run, --help,
``dcmsort config OUT`` and ``dcmsort where OUT FILE``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import Run, Sorter, assert_every_file_accounted_for, tree_snapshot, write_dicom
from dcmsort import runner

SRC = str(runner.REPO / "src")


def dcmsort(*args: object, cwd: Path, env: dict | None = None) -> Run:
    """``dcmsort ARGS`` as the console script runs it (``dcmsort.cli:main``)."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "dcmsort.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def small_input(sorter: Sorter) -> None:
    """Two patients, a duplicate and a junk file."""
    write_dicom(sorter.input_dir / "p1" / "IM1.dcm", "DOE^JOHN", "1", "T1", sop="1.2.3.1")
    write_dicom(
        sorter.input_dir / "p1" / "IM2.dcm", "DOE^JOHN", "1", "T1", sop="1.2.3.2", instance=2
    )
    write_dicom(sorter.input_dir / "p2" / "IM1.dcm", "ROE^ANN", "2", "T2", sop="1.2.3.3")
    (sorter.input_dir / "p2" / "copy.dcm").write_bytes(
        (sorter.input_dir / "p2" / "IM1.dcm").read_bytes()
    )
    (sorter.input_dir / "p2" / "notes.txt").write_text("not an image")


def test_help_lists_every_setting_with_its_default(tmp_path):
    result = dcmsort("--help", cwd=tmp_path)
    assert result.returncode == 0
    schema = yaml.safe_load((runner.REPO / "workflow/schemas/config.schema.yaml").read_text())
    defaults = yaml.safe_load((runner.REPO / "config/config.yaml").read_text())
    lines = result.stdout.splitlines()
    for key in schema["properties"]:
        line = next((line for line in lines if line.split()[:1] == [key]), None)
        assert line is not None, f"{key} is not listed"
        if key in defaults:
            value = defaults[key]
            value = str(value).lower() if isinstance(value, bool) else str(value)
            assert f"default {value}" in line, line
    assert "IN" in result.stdout and "--set KEY=VALUE" in result.stdout
    assert "dcmsort config OUT" in result.stdout and "dcmsort where OUT FILE" in result.stdout


def test_dry_run_writes_nothing_then_a_run_sorts_every_file(sorter):
    small_input(sorter)
    before = tree_snapshot(sorter.input_dir)
    dry = dcmsort(
        sorter.input_dir, sorter.output_dir, "--dry-run", "--cores", 1, cwd=sorter.workdir
    )
    assert dry.returncode == 0, dry.output[-2000:]
    assert "extract" in dry.output
    assert not sorter.output_dir.exists()

    result = dcmsort(sorter.input_dir, sorter.output_dir, "--cores", 2, cwd=sorter.workdir)
    assert result.returncode == 0, result.output[-2000:]
    assert "dcmsort: 3 files sorted (3 new this run), 1 duplicates" in result.stderr
    assert tree_snapshot(sorter.input_dir) == before
    outcomes = assert_every_file_accounted_for(sorter)
    assert len(outcomes.where(action="sort")) == 3
    # The same as snakemake --config: a rerun that way has nothing to do.
    rerun = sorter.run()
    assert "Nothing to be done" in rerun.output


def test_mode_and_settings_reach_the_workflow_and_config_prints_them(sorter):
    small_input(sorter)
    result = dcmsort(
        sorter.input_dir,
        sorter.output_dir,
        "--mode",
        "hardlink",
        "--set",
        "partitions=2",
        "--set",
        "file_template={InstanceNumber:04d}.dcm",
        cwd=sorter.workdir,
    )
    assert result.returncode == 0, result.output[-2000:]
    assert (sorter.output_dir / "DOE^JOHN_1" / "T1_1" / "0002.dcm").stat().st_nlink == 2

    shown = dcmsort("config", sorter.output_dir, cwd=sorter.workdir)
    assert shown.returncode == 0, shown.output
    rows = {line.split()[0]: line for line in shown.stdout.splitlines()}
    assert "{InstanceNumber:04d}.dcm" in rows["file_template"]
    assert "layout.json" in rows["file_template"]
    assert "hardlink" in rows["transfer_mode"]
    assert rows["partitions"].split()[1] == "2"
    assert str(sorter.output_dir) in rows["output_dir"]
    for unrecorded in ("input_dir", "verify", "batches"):
        assert "not recorded" in rows[unrecorded]
    assert rows["last"].startswith("last run: 3 files sorted")


def test_where_says_where_a_file_went_or_why_not(sorter):
    small_input(sorter)
    assert dcmsort(sorter.input_dir, sorter.output_dir, cwd=sorter.workdir).returncode == 0
    new = sorter.input_dir / "p3" / "new.dcm"
    write_dicom(new, "NEW^ONE", "3", "T1")

    def where(*files: object, cwd: Path = sorter.workdir) -> Run:
        return dcmsort("where", sorter.output_dir, *files, cwd=cwd)

    placed = where(sorter.input_dir / "p1" / "IM2.dcm")
    assert placed.returncode == 0
    assert placed.stdout.strip().endswith(f"placed at {sorter.output_dir}/DOE^JOHN_1/T1_1/IM2.dcm")
    # A path relative to the folder it is run from.
    relative = where("p2/copy.dcm", cwd=sorter.input_dir)
    assert relative.returncode == 0
    assert "a duplicate: its content is at" in relative.stdout
    assert relative.stdout.strip().endswith(
        "ROE^ANN_2/T2_1/IM1.dcm (placed from another input file)"
    )

    skipped = where(sorter.input_dir / "p2" / "notes.txt")
    assert skipped.returncode == 1
    assert "skipped: not DICOM" in skipped.stdout
    unknown = where(new, "/no/such/file.dcm")
    assert unknown.returncode == 1
    first, second = unknown.stdout.splitlines()
    assert "not sorted yet" in first
    assert "no such file" in second

    assert dcmsort(sorter.input_dir, sorter.output_dir, cwd=sorter.workdir).returncode == 0
    assert where(new).returncode == 0
    # A file changed since it was placed: its new version is not in the output yet.
    os.utime(new, ns=(1, 1))
    touched = where(new)
    assert touched.returncode == 1
    assert "not sorted yet: this version of it is new" in touched.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["IN"], "the following arguments are required: OUT"),
        (["IN", "OUT", "--mode", "move"], "argument --mode: invalid choice: 'move'"),
        (["IN", "OUT", "--cores", "0"], "argument --cores: give a whole number"),
        (
            ["IN", "OUT", "--set", "verfy=size"],
            "'verfy' is not a dcmsort setting (did you mean verify?)",
        ),
        (["IN", "OUT", "--set", "input_dir=x"], "give it as the IN argument"),
        (["IN", "OUT", "--profile", "nope"], "--profile nope: no such profile"),
        (["config", "."], "holds no dcmsort state"),
        (["config", "OUT"], "OUT is not a folder"),
        (["where", "OUT"], "the following arguments are required: FILE"),
        (["IN", "OUT", "--", "--config", "partitions=2"], "--config after --: give settings"),
        (["IN", "OUT", "--", "-Cpartitions=2"], "-Cpartitions=2 after --: give settings"),
    ],
)
def test_a_bad_argument_is_one_error_line_and_exit_code_2(tmp_path, args, message):
    result = dcmsort(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("dcmsort: error: ")
    assert message in result.stderr


def test_a_setting_the_workflow_refuses_gives_its_line_and_exit_code(sorter):
    small_input(sorter)
    result = dcmsort(sorter.input_dir, sorter.output_dir, "--set", "batches=0", cwd=sorter.workdir)
    assert result.returncode == 1
    assert (
        "dcmsort: error: batches must be a whole number from 1 to 10000, or auto" in result.stderr
    )
    assert "Traceback" not in result.output
    assert not sorter.output_dir.exists()


def test_the_install_puts_a_dcmsort_command_beside_python(tmp_path):
    # What README's "Real use" runs after `source .venv/bin/activate`.
    command = Path(sys.executable).parent / "dcmsort"
    assert command.exists(), "pyproject.toml's [project.scripts] has no dcmsort"
    result = subprocess.run(
        [str(command), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0 and "input_dir" in result.stdout


@pytest.mark.parametrize(
    "name", ["out #2", "out ", "a: b", "x'y\"z", "q'", "t=1", "[x]", "é\udcff", "😀\x85\x9f\u2028"]
)
def test_in_and_out_reach_the_workflow_exactly_as_given(tmp_path, monkeypatch, name):
    # Snakemake reads each --config value as YAML: unquoted, "out #2" would be "out" (a
    # comment), "out " would lose its space, and the run would sort into another folder.
    from snakemake.cli import parse_config

    from dcmsort import cli

    monkeypatch.chdir(tmp_path)
    args = cli.run_parser().parse_args([f"in {name}", name])
    command = cli.sort_command(args, [])
    config = parse_config(command[command.index("--config") + 1 :])
    assert config["input_dir"] == os.path.abspath(f"in {name}")
    assert config["output_dir"] == os.path.abspath(name)


def test_where_finds_a_skipped_file_whose_path_a_spreadsheet_would_run(sorter):
    # skipped.csv writes '=dir/+x as "'=dir/+x" (no spreadsheet runs it); where must read
    # the path back, not say that nothing knows the file.
    small_input(sorter)
    for name in ("=dir/+x.txt", "p2/-notes.txt", "@at/'q.txt"):
        (sorter.input_dir / name).parent.mkdir(exist_ok=True)
        (sorter.input_dir / name).write_text("not an image")
    assert dcmsort(sorter.input_dir, sorter.output_dir, cwd=sorter.workdir).returncode == 0
    for name in ("=dir/+x.txt", "p2/-notes.txt", "@at/'q.txt"):
        found = dcmsort("where", sorter.output_dir, sorter.input_dir / name, cwd=sorter.workdir)
        assert found.returncode == 1, found.output
        assert found.stdout.endswith(
            ": skipped: not DICOM (no DICM preamble and no DICOM identifiers)\n"
        ), found.stdout
