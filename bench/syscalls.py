"""Metadata calls per input file, per stage, counted with ``strace -f`` (not a test).

    python bench/syscalls.py                 # 2,000 to 4,000 files; a table to stdout

On Lustre, GPFS or NFS each stat or open is a round trip to a metadata server, so their
number per input file matters more there than CPU. One full run and one no-op rerun are
traced at three sizes, to tell the cost of one more file from that of one more patient
folder (``measure``); what every run pays once (Python's and Snakemake's imports, the state
folder) counts as neither. Each traced
process is given to a stage by the ``dcmsort_stage.py <stage>`` it executes; its children
(extract's worker pool) inherit it; the Snakemake process itself is "snakemake main".
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from run import generate_fast  # noqa: E402

from dcmsort.runner import snakemake_command  # noqa: E402

STATS = {"stat", "lstat", "fstat", "newfstatat", "statx", "fstatat64", "stat64", "lstat64"}
OPENS = {"open", "openat", "openat2", "creat"}
OTHERS = {
    "copy_file_range",
    "utimensat",
    "fchmod",
    "renameat2",
    "rename",
    "linkat",
    "unlink",
    "unlinkat",
}
TRACED = ",".join(sorted(STATS | OPENS | OTHERS | {"execve", "clone", "clone3", "fork", "vfork"}))
MAIN = "snakemake main"
_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(\w+)")
_STAGE = re.compile(r"dcmsort_stage\.py\", \"(\w+)\"")
_CHILD = re.compile(r"= (\d+)$")


def count(trace: Path) -> dict[str, Counter]:
    """Calls per stage (stat, open and each of OTHERS) in one ``strace -f -o`` file."""
    stage_of: dict[str, str] = {}
    calls: dict[str, Counter] = defaultdict(Counter)
    root = None
    for line in trace.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        pid, call = match.groups()
        root = root or pid
        stage = stage_of.setdefault(pid, MAIN if pid == root else stage_of.get(pid, MAIN))
        if call == "execve" and (found := _STAGE.search(line)):
            stage_of[pid] = stage = found.group(1)
        if call in {"clone", "clone3", "fork", "vfork"} and (child := _CHILD.search(line)):
            stage_of[child.group(1)] = stage
        if line.rstrip().endswith("<unfinished ...>"):
            continue  # counted once, at its "resumed" line
        kind = "stat" if call in STATS else "open" if call in OPENS else call
        if kind in {"stat", "open"} | OTHERS:
            calls[stage][kind] += 1
    return calls


def traced_run(work: Path, source: Path, target: Path, trace: Path) -> dict[str, Counter]:
    command = snakemake_command(
        work, "--quiet", "rules", cores=2, input_dir=source, output_dir=target
    )
    subprocess.run(
        ["strace", "-f", "-qq", "-s", "512", "-e", f"trace={TRACED}", "-o", str(trace), *command],
        check=True,
        capture_output=True,
    )
    return count(trace)


def measure(base: Path, folders: int, per_folder: int) -> dict:
    """{run: {stage: {call: (per file, per folder)}}} for a full run and a no-op rerun.

    Three inputs: (folders, per_folder), (folders, 2 per_folder) and (2 folders,
    per_folder) files; the first two differ in files alone (the cost of a file), the first
    and the third in patient folders too (what is left is the cost of a folder: its walk,
    its manifest, its four series folders in the output)."""
    shapes = [(folders, per_folder), (folders, 2 * per_folder), (2 * folders, per_folder)]
    counted: dict[str, list[dict[str, Counter]]] = {"full run": [], "no-op rerun": []}
    for index, (count_folders, count_files) in enumerate(shapes):
        source, target = base / f"in-{index}", base / f"out-{index}"
        work = base / f"work-{index}"
        generate_fast(source, count_folders, count_files, 8)
        work.mkdir()
        for run in counted:
            counted[run].append(traced_run(work, source, target, base / "trace"))
    result = {}
    for run, (small, more_files, more_folders) in counted.items():
        result[run] = {}
        for stage in sorted(set(small) | set(more_files) | set(more_folders)):
            calls = {}
            for call in sorted(set(small[stage]) | set(more_files[stage])):
                per_file = (more_files[stage][call] - small[stage][call]) / (folders * per_folder)
                rest = more_folders[stage][call] - small[stage][call]
                calls[call] = (per_file, (rest - per_file * folders * per_folder) / folders)
            result[run][stage] = calls
    return result


def print_table(result: dict, folders: int, per_folder: int) -> None:
    print(
        f"\nCalls per input file and per patient folder (4 series folders), `strace -f`; "
        f"from {folders} folders x {per_folder} files, {folders} x {2 * per_folder} and "
        f"{2 * folders} x {per_folder}:\n"
    )
    print(
        "| run | stage | stat / file | open / file | other / file | stat / folder | open / folder |"
    )
    print("|---|---|---:|---:|---|---:|---:|")
    for run, stages in result.items():
        total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for stage, calls in stages.items():
            for call, (per_file, per_folder_) in calls.items():
                total[call][0] += per_file
                total[call][1] += per_folder_
            if not any(abs(v) >= 0.005 for pair in calls.values() for v in pair):
                continue
            other = ", ".join(
                f"{v[0]:.2f} {k}" for k, v in calls.items() if k in OTHERS and abs(v[0]) >= 0.005
            )
            stat, opened = calls.get("stat", (0, 0)), calls.get("open", (0, 0))
            print(
                f"| {run} | {stage} | {stat[0]:.2f} | {opened[0]:.2f} | {other} "
                f"| {stat[1]:.1f} | {opened[1]:.1f} |"
            )
        stat, opened = total["stat"], total["open"]
        print(
            f"| {run} | **all** | **{stat[0]:.2f}** | **{opened[0]:.2f}** | "
            f"| **{stat[1]:.1f}** | **{opened[1]:.1f}** |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folders", type=int, default=20)
    parser.add_argument("--per-folder", type=int, default=100)
    args = parser.parse_args()
    if not shutil.which("strace"):
        sys.exit("bench/syscalls.py: strace is not installed (apt-get install strace)")
    with tempfile.TemporaryDirectory(prefix="dcmsort-syscalls-") as tmp:
        result = measure(Path(tmp), args.folders, args.per_folder)
    print_table(result, args.folders, args.per_folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
