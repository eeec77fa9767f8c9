"""The ``dcmsort`` command: sort, show what an output was sorted with, find an input file.

::

    dcmsort IN OUT [--cores N] [--mode M] [--dry-run] [--profile slurm] [--set KEY=VALUE ...]
    dcmsort --version
    dcmsort config OUT
    dcmsort where OUT FILE [FILE ...]

Sorting runs this checkout's Snakefile through Snakemake's own command line, as
``snakemake --config input_dir=IN output_dir=OUT ...`` does (``runner.snakemake_command``):
one workflow, whichever way it is started, and Snakemake's exit code. The settings and
their defaults are read from the schema and ``config/config.yaml``, never listed here.
``config`` and ``where`` only read the output's state folder.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NoReturn

import dcmsort
from dcmsort import archives, inventory, routes, runner, settings, status

SCHEMA = runner.REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIG = runner.REPO / "config" / "config.yaml"
PROFILES = runner.REPO / "workflow" / "profiles"
# Settings the command takes as arguments of their own, not with --set.
ARGUMENTS = {"input_dir": "IN", "output_dir": "OUT", "transfer_mode": "--mode"}
COMMANDS = ("config", "where")
NOT_PLACED = 1  # the exit code of `where` when a file is not (yet) in the output


class Parser(argparse.ArgumentParser):
    """An argument parser whose every refusal is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        refuse(f"{message} (see {self.prog} --help)")


def refuse(message: str) -> NoReturn:
    print(f"dcmsort: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _yaml(path: Path) -> dict:
    import yaml  # only for --help, --set and config: a run does not need it here

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def config_keys() -> dict[str, dict]:
    """Every setting (the schema's properties, in its order) with ``default``: the value
    config/config.yaml gives it, else the schema's default, else absent (required)."""
    schema, defaults = _yaml(SCHEMA), _yaml(CONFIG)
    keys = {}
    for key, spec in schema["properties"].items():
        entry = {"description": " ".join(spec.get("description", "").split())}
        if key in defaults or "default" in spec:
            entry["default"] = defaults.get(key, spec.get("default"))
        keys[key] = entry
    return keys


def shown(value: object) -> str:
    """A setting's value as it is typed on the command line (``true``, not ``True``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def settings_help() -> str:
    """The settings with their defaults, for ``dcmsort --help``."""
    lines = ["settings (--set KEY=VALUE; each explained in config/README.md):"]
    for key, entry in config_keys().items():
        default = f"default {shown(entry['default'])}" if "default" in entry else ""
        if key in ARGUMENTS:
            default = ", ".join(filter(None, [f"the {ARGUMENTS[key]} argument", default]))
        lines.append(f"  {key:<18} {default}")
        lines += textwrap.wrap(
            entry["description"], 88, initial_indent=" " * 21, subsequent_indent=" " * 21
        )
    return "\n".join(lines)


def run_parser() -> Parser:
    parser = Parser(
        prog="dcmsort",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Sort the DICOM files of IN into OUT (the workflow of this checkout, run by\n"
            "Snakemake). The same as: snakemake --config input_dir=IN output_dir=OUT ...\n\n"
            "other commands:\n"
            "  dcmsort config OUT              the settings OUT was sorted with\n"
            "  dcmsort where OUT FILE [FILE]   where an input file went (or why not)"
        ),
        epilog=settings_help()
        + "\n\nOptions after -- go to Snakemake as they are (e.g. -- --directory DIR).\n"
        "Exit code: Snakemake's (0 done, 1 a job failed or a setting was refused, 3 a check\n"
        "left damage); 2 for a command line dcmsort cannot read.",
    )
    parser.add_argument("input_dir", metavar="IN", help="the folder of unsorted files")
    parser.add_argument("output_dir", metavar="OUT", help="the folder of the sorted tree")
    parser.add_argument(
        "--cores", metavar="N", type=_cores, help="cores to use (default: all of them)"
    )
    parser.add_argument(
        "--mode",
        choices=_yaml(SCHEMA)["properties"]["transfer_mode"]["enum"],
        help="transfer_mode: how a file reaches the output (default: "
        f"{shown(config_keys()['transfer_mode'].get('default'))})",
    )
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument(
        "-n", "--dry-run", action="store_true", help="show the jobs a run would do; write nothing"
    )
    parser.add_argument(
        "--profile",
        metavar="NAME",
        help=f"a workflow profile: {', '.join(_profiles())} (in workflow/profiles), or a folder",
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="any other setting (below), as snakemake --config KEY=VALUE",
    )
    return parser


def version_line() -> str:
    return f"dcmsort {dcmsort.version()}"


def _cores(text: str) -> str:
    if text == "all" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"give a whole number from 1, or all, not {text!r}")


def _profiles() -> list[str]:
    return sorted(p.name for p in PROFILES.iterdir() if p.is_dir())


def _profile_folder(name: str) -> Path:
    if (PROFILES / name).is_dir() and "/" not in name:
        return PROFILES / name
    if Path(name).is_dir():
        return Path(name).resolve()
    refuse(f"--profile {name}: no such profile; use one of {', '.join(_profiles())}, or a folder")


def _settings_given(entries: list[str]) -> dict[str, str]:
    """--set KEY=VALUE entries as a mapping; an unknown key or a setting that has its own
    argument is refused (the value is checked by the workflow, as with --config)."""
    keys = config_keys()
    given = {}
    for entry in entries:
        key, equals, value = entry.partition("=")
        if not equals or not key:
            refuse(f"--set {entry}: give KEY=VALUE, e.g. --set partitions=4")
        if key in ARGUMENTS:
            refuse(f"--set {key}: give it as the {ARGUMENTS[key]} argument")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            refuse(
                f"--set {key}: {key!r} is not a dcmsort setting{hint}; "
                f"the settings are {', '.join(k for k in keys if k not in ARGUMENTS)}"
            )
        given[key] = value
    return given


def sort_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The Snakemake command line of a run (flags before --config, as Snakemake needs)."""
    flags = []
    if args.dry_run:
        flags.append("--dry-run")
    if args.profile:
        flags += ["--workflow-profile", str(_profile_folder(args.profile))]
    # Snakemake reads every --config value as YAML: a folder is passed as a quoted YAML
    # text, so that "out #2" (a comment), "out " (a trailing space) or "a: b" (a mapping)
    # reach the workflow as the folder given, never another one.
    config = {
        "input_dir": _yaml_text(os.path.abspath(args.input_dir)),
        "output_dir": _yaml_text(os.path.abspath(args.output_dir)),
    }
    if args.mode:
        config["transfer_mode"] = args.mode
    config.update(_settings_given(args.set))
    return runner.snakemake_command(Path.cwd(), *flags, *extra, cores=args.cores, **config)


# Characters YAML refuses to read in a stream (C1 controls, surrogates: the bytes of a
# name that is not UTF-8, U+FFFE, U+FFFF) or reads as line breaks (U+0085, U+2028,
# U+2029): written as escapes.
_NOT_YAML_PRINTABLE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")


def _yaml_text(text: str) -> str:
    """text as a YAML double-quoted scalar that Snakemake's --config reads back as is
    (JSON's escapes are YAML's). The spaces around it keep Snakemake from stripping the
    quotes, and a quote the text ends with, before it reads the YAML."""
    quoted = json.dumps(text, ensure_ascii=False)
    quoted = _NOT_YAML_PRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)
    return f" {quoted} "


def run(command: list[str]) -> int:
    """Run Snakemake with this terminal; its exit code (128 + N for a signal N, as a shell
    says). Ctrl-C reaches Snakemake itself (one process group), which stops its jobs."""
    process = subprocess.Popen(command)
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:
            continue  # Snakemake got the same signal: wait for it to stop
    return 128 - code if code < 0 else code


# --- dcmsort config OUT --------------------------------------------------------------------


def state_folder(output_dir: str, state_dir: str | None) -> Path:
    """The state folder of an output, refused in one line when it holds no dcmsort state."""
    output = Path(output_dir)
    state = Path(state_dir) if state_dir else output / settings.STATE_FOLDER
    if not output.is_dir():
        refuse(f"{output} is not a folder")
    if not (state / settings.LOCK_FILE).is_file():
        hint = "" if state_dir else "; a state_dir elsewhere: give --state-dir"
        refuse(f"{state} holds no dcmsort state (nothing was sorted into {output} yet{hint})")
    return state


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def recorded_settings(state: Path) -> list[tuple[str, str, str]]:
    """(key, value, where it is recorded) of every setting; value "" when not recorded."""
    layout = _read_json(state / "layout.json")
    summary = _read_json(state / "summary.json")
    try:
        partitions = json.loads(routes.current(state).read_text())["partitions"]
    except (OSError, ValueError, KeyError):
        partitions = None
    rows = []
    for key in config_keys():
        value, source = "", ""
        if key == "state_dir":
            value, source = str(state.resolve()), "this folder"
        elif key == settings.OUTPUT_KEY and key in layout:
            value, source = str((state / layout[key]).resolve()), "layout.json"
        elif key in layout:
            value, source = shown(layout[key]), "layout.json: every run into it must use it"
        elif key == "transfer_mode" and summary.get(key):
            value, source = summary[key], "summary.json: the last run's (may change per run)"
        elif key == "partitions" and partitions:
            value, source = str(partitions), "partitions-*.json: the last run's count"
        elif key == "check" and summary:
            check = summary.get("check")
            value = f"checked {check['placements']:,} placements" if check else "did not check"
            source = "summary.json: the last run"
        rows.append((key, value, source))
    return rows


def show_config(argv: list[str]) -> int:
    parser = Parser(
        prog="dcmsort config",
        description="The settings an output was sorted with, as its state records them; "
        "what is not recorded is said so.",
    )
    parser.add_argument("output_dir", metavar="OUT")
    parser.add_argument("--state-dir", help="its state_dir, if not OUT/.dcmsort")
    args = parser.parse_args(argv)
    state = state_folder(args.output_dir, args.state_dir)
    keys = config_keys()
    rows = recorded_settings(state)
    width = max(len(value) for _, value, _ in rows)
    for key, value, source in rows:
        if value:
            print(f"{key:<18} {value:<{width}}  {source}")
            continue
        default = keys[key].get("default")
        note = "" if default is None else f"; config/config.yaml: {shown(default)}"
        print(f"{key:<18} {'-':<{width}}  not recorded (each run gives it{note})")
    summary = state / "summary.json"
    if summary.exists():
        print("last run" + status.summary_line(summary).removeprefix("dcmsort"))
    else:
        print("last run: no report yet (the first run has not finished)")
    return 0


# --- dcmsort where OUT FILE ----------------------------------------------------------------


def relpath_candidates(path: str) -> list[str]:
    """Every way the path could be named relative to an input folder (manifest relpath
    form), longest first: the path as given and with its folders resolved."""
    absolute = Path(os.path.abspath(path))
    spellings = [absolute]
    with contextlib.suppress(OSError):
        spellings.append(absolute.parent.resolve() / absolute.name)
    found = []
    for spelling in spellings:
        parts = spelling.parts[1:]
        for start in range(len(parts)):
            candidate = inventory.encode_name("/".join(parts[start:]))
            if candidate not in found:
                found.append(candidate)
    return sorted(found, key=lambda c: -c.count("/"))


def _members_known(candidates: list[str], placements: dict, skipped: dict) -> int:
    """How many members the ledger and skipped.csv know of an archive at one of these
    relpaths."""
    prefixes = tuple(archives.relpath_of(c, "") for c in candidates)
    return sum(1 for relpath in [*placements, *skipped] if relpath.startswith(prefixes))


def _skipped(state: Path) -> dict[str, dict]:
    """skipped.csv's rows by relpath, each text cell as the value it stands for (a cell a
    spreadsheet would run, '=dir/x', is written "'=dir/x")."""
    from dcmsort.fileops import from_spreadsheet_safe

    try:
        with open(state / "skipped.csv", newline="", encoding="utf-8") as f:
            rows = [
                {key: from_spreadsheet_safe(value or "") for key, value in row.items()}
                for row in csv.DictReader(f)
            ]
    except OSError:
        return {}
    return {row["relpath"]: row for row in rows}


def _last_transfers(state: Path) -> dict[str, dict]:
    """The last transfer result of each relpath that was not placed (changed, error)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dcmsort.fileops import read_parquet
    from dcmsort.transfer import CHANGED, ERROR

    found: dict[str, dict] = {}
    try:
        jobs = routes.jobs(routes.current(state))
    except (OSError, ValueError, KeyError):
        return found
    for _, job in jobs:
        try:
            results = read_parquet(state / "transfers" / f"{job}.parquet")
        except (OSError, ValueError):
            continue
        failed = results.filter(pc.is_in(results["status"], value_set=pa.array([CHANGED, ERROR])))
        for row in failed.to_pylist():
            found[row["relpath"]] = row
    return found


def where(argv: list[str]) -> int:
    parser = Parser(
        prog="dcmsort where",
        description="Where each input FILE went in OUT (from its ledger), or why it is not "
        f"there. Exit code 0 when every FILE is in the output, {NOT_PLACED} when one is not.",
    )
    parser.add_argument("output_dir", metavar="OUT")
    parser.add_argument("files", metavar="FILE", nargs="+", help="a file of the input folder")
    parser.add_argument("--state-dir", help="its state_dir, if not OUT/.dcmsort")
    args = parser.parse_args(argv)
    state = state_folder(args.output_dir, args.state_dir)
    output = Path(os.path.abspath(args.output_dir))

    from dcmsort import ledger

    columns = [*ledger.SOURCE_KEY, "status", "destination", "mode"]
    placements: dict[str, list[dict]] = {}
    for row in ledger.read(state, columns).to_pylist():
        placements.setdefault(row["relpath"], []).append(row)
    skipped, failed = _skipped(state), _last_transfers(state)
    code = 0
    for name in args.files:
        answer, placed = _where_one(name, output, placements, skipped, failed)
        print(f"{name}: {answer}")
        code = code if placed else NOT_PLACED
    return code


def _where_one(
    name: str,
    output: Path,
    placements: dict[str, list[dict]],
    skipped: dict[str, dict],
    failed: dict[str, dict],
) -> tuple[str, bool]:
    """The answer for one file, and whether its current version is in the output."""
    from dcmsort import ledger

    # A member of an archive, ARCHIVE//MEMBER: its version is its archive's, but the size.
    path, _, member = name.partition(archives.SEPARATOR)
    member = member and archives.typed_key(member)
    try:
        info = os.stat(path)
        version = (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
    except OSError:
        info, version = None, None
    candidates = [archives.relpath_of(c, member) if member else c for c in relpath_candidates(path)]
    known = [c for c in candidates if c in placements or c in skipped]
    relpath = known[0] if known else None
    rows = placements.get(relpath, [])
    compared = 1 if member else 0  # a member's size is not its archive's
    current = [
        r
        for r in rows
        if version
        and (r["size"], r["mtime_ns"], r["ctime_ns"], r["ino"])[compared:] == version[compared:]
    ]
    if not member and not current and info is not None and stat.S_ISREG(info.st_mode):
        members = _members_known(candidates, placements, skipped)
        if members:
            return (
                f"an archive: {members} of its members are known here; ask for one as "
                f"{name}{archives.SEPARATOR}MEMBER (the paths in plan.csv and skipped.csv)",
                False,
            )
    if current:
        row = current[-1]  # the newest commit
        at = output / row["destination"]
        if row["status"] == ledger.PLACED:
            how = "" if row["mode"] in (None, "copy") else f" ({row['mode']})"
            return f"placed at {at}{how}", True
        return f"a duplicate: its content is at {at} (placed from another input file)", True
    if relpath in skipped:
        if (
            info is not None
            and not member  # (the size of a member's archive is not its own)
            and stat.S_ISREG(info.st_mode)
            and str(info.st_size) != (skipped[relpath]["size"])
        ):
            return "not sorted yet: it changed since the last run skipped it", False
        return f"skipped: {skipped[relpath]['reason']}", False
    if relpath in failed:
        row = failed[relpath]
        return f"not placed by the last run ({row['status']}): {row['detail']}", False
    if info is None and rows:
        return f"no such file now; it was placed at {output / rows[-1]['destination']}", False
    if info is None:
        return "no such file, and no input file of that path was sorted into this output", False
    if stat.S_ISDIR(info.st_mode):
        return "a folder; ask for its files (e.g. FOLDER/*)", False
    if rows:
        return (
            f"not sorted yet: this version of it is new (an earlier one is at "
            f"{output / rows[-1]['destination']}); the next run sorts it",
            False,
        )
    return (
        "not sorted yet: neither the ledger nor the last report knows it (a file added "
        "since the last run, or one outside the input)",
        False,
    )


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `dcmsort where ... | head`: no traceback
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "config":
        return show_config(argv[1:])
    if argv and argv[0] == "where":
        return where(argv[1:])
    if argv == ["--version"]:  # also without a checkout beside the package
        print(version_line())
        return 0
    extra = []
    if "--" in argv:  # Snakemake's own options, as they are
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
        # dcmsort gives Snakemake its own --config last, and Snakemake keeps the last one:
        # settings given this way would be dropped without a word.
        given = next(
            (a for a in extra if a in ("--config", "-C") or a.startswith(("--config=", "-C"))),
            None,
        )
        if given is not None:
            refuse(f"{given} after --: give settings with --set KEY=VALUE (see dcmsort --help)")
    if not runner.SNAKEFILE.is_file():
        refuse(
            f"no workflow at {runner.SNAKEFILE}; install dcmsort from its checkout (pip install -e)"
        )
    args = run_parser().parse_args(argv)
    return run(sort_command(args, extra))


if __name__ == "__main__":
    raise SystemExit(main())
