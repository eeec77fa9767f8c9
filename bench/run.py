"""Benchmark dcmsort against its floors and against dcm2niix, on one machine, in one run.

    python bench/run.py                      # both standard shapes (a few minutes)
    python bench/run.py --shape large        # 40 folders x 240 files of 128 KB
    python bench/run.py --shape many         # 1,000 folders x 100 files of ~10 KB
    python bench/run.py --shape dag          # 10,000 folders: DAG build and no-op rerun

For each shape it generates data with the project's generator and measures wall time, CPU
time (user + sys of every process started) and peak RSS (the largest single process) of:
``cp -r`` (the copy floor), a header-only pydicom read of every file (the parse floor),
``dcm2niix -r y`` (the fastest tool users have today), dcmsort in copy and hardlink modes,
dcmsort's no-op rerun and its rerun after 1 % new data. The page cache is warm for all.
Results go to bench/out/<shape>.json and a table to stdout; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from dcmsort import demo  # noqa: E402
from dcmsort.runner import snakemake_command  # noqa: E402

SHAPES = {
    # name: (folders, files per folder, image rows (rows x rows x 2 bytes))
    "large": (40, 240, 256),
    "many": (1000, 100, 64),
    "dag": (10000, 2, 16),
}
PARSE_FLOOR = """
import sys, pydicom
from pathlib import Path
tags = ["PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
        "SeriesDescription", "SOPInstanceUID", "InstanceNumber", "Modality", "StudyDate"]
for path in Path(sys.argv[1]).rglob("*"):
    if path.is_file():
        pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
"""


def measure(command: list[str], cwd: Path | None = None) -> dict:
    """Wall, CPU and peak RSS of one command and everything it starts. os.wait4 gives this
    child's own usage (RUSAGE_CHILDREN would report the largest child of the whole run)."""
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{text[-3000:]}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "output": text,
    }


def dcmsort(
    work: Path, source: Path, target: Path, cores: int, *flags: str, **config: object
) -> list[str]:
    return snakemake_command(
        work, "--quiet", "rules", *flags, cores=cores, input_dir=source, output_dir=target, **config
    )


def tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def run_shape(name: str, out: Path, cores: int) -> dict:
    folders, per_folder, rows = SHAPES[name]
    base = out / name
    shutil.rmtree(base, ignore_errors=True)
    source, work = base / "Unclassified", base / "work"
    work.mkdir(parents=True)
    print(f"[{name}] generating {folders} folders x {per_folder} files ...", flush=True)
    started = time.perf_counter()
    demo.generate(
        source, patients=folders, series=4, instances=max(1, per_folder // 4), rows=rows, junk=False
    )
    files, size = tree_size(source)
    print(f"[{name}] {files} files, {size / 1e6:.0f} MB in {time.perf_counter() - started:.0f} s")
    for path in source.rglob("*"):  # warm the page cache for every contender alike
        if path.is_file():
            path.read_bytes()

    results: dict[str, dict] = {}

    def record(label: str, command: list[str]) -> dict:
        print(f"[{name}] {label} ...", flush=True)
        results[label] = measure(command)
        return results[label]

    if name != "dag":
        record("cp -r (floor)", ["cp", "-r", str(source), str(base / "cp")])
        record("header read, 1 process (floor)", [sys.executable, "-c", PARSE_FLOOR, str(source)])
        dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
        if Path(dcm2niix).exists():
            (base / "dcm2niix").mkdir()
            record(
                "dcm2niix -r y",
                [
                    dcm2niix,
                    "-r",
                    "y",
                    "-f",
                    "%n_%i/%d_%s/%b",
                    "-o",
                    str(base / "dcm2niix"),
                    str(source),
                ],
            )
        record(
            "dcmsort hardlink",
            dcmsort(base / "work-link", source, base / "link", cores, transfer_mode="hardlink"),
        )
    record("dcmsort copy", dcmsort(work, source, base / "sorted", cores))
    record("dcmsort no-op rerun", dcmsort(work, source, base / "sorted", cores))
    added = max(1, folders // 100)
    demo.generate(
        source,
        patients=added,
        series=4,
        instances=max(1, per_folder // 4),
        rows=rows,
        junk=False,
        first_patient=folders + 1,
        seed=1,
    )
    record("dcmsort rerun, 1% new", dcmsort(work, source, base / "sorted", cores))
    if name == "dag":
        record("dry run (DAG build)", dcmsort(work, source, base / "sorted", cores, "-n"))
    for value in results.values():
        value.pop("output")
    summary = {
        "shape": name,
        "files": files,
        "bytes": size,
        "folders": folders,
        "cores": cores,
        "results": results,
    }
    shutil.rmtree(base)
    return summary


def ratios(summary: dict) -> list[tuple[str, float, float]]:
    """(target, measured ratio, limit) for each target of the speed issue."""
    r, cores = summary["results"], summary["cores"]
    copy = r["dcmsort copy"]["wall_s"]
    rows = [
        ("no-op rerun / full run", r["dcmsort no-op rerun"]["wall_s"] / copy, 0.05),
        ("rerun after 1% new / full run", r["dcmsort rerun, 1% new"]["wall_s"] / copy, 0.10),
    ]
    if "cp -r (floor)" in r:
        floor = r["cp -r (floor)"]["wall_s"] + r["header read, 1 process (floor)"]["cpu_s"] / cores
        rows.append(("copy / (cp -r + parse floor / cores)", copy / floor, 1.3))
        parse = r["header read, 1 process (floor)"]["cpu_s"] / cores
        rows.append(
            ("hardlink / (parse floor / cores)", r["dcmsort hardlink"]["wall_s"] / parse, 1.5)
        )
    if "dcm2niix -r y" in r:
        rows.append(("copy / dcm2niix -r y", copy / r["dcm2niix -r y"]["wall_s"], 1.0))
    rows.append(("copy: CPU / wall (cores busy)", r["dcmsort copy"]["cpu_s"] / copy, cores))
    return rows


def print_table(summary: dict) -> None:
    print(
        f"\n{summary['shape']}: {summary['files']:,} files, {summary['bytes'] / 1e6:,.0f} MB, "
        f"{summary['folders']:,} folders, {summary['cores']} cores (warm cache)"
    )
    print(f"| {'what':<34} | {'wall s':>7} | {'CPU s':>7} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 9}|{'-' * 13}|")
    for label, value in summary["results"].items():
        print(
            f"| {label:<34} | {value['wall_s']:>7.2f} | {value['cpu_s']:>7.2f} | "
            f"{value['peak_rss_mb']:>11.0f} |"
        )
    print(f"\n| {'target':<40} | {'measured':>8} | {'limit':>6} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 8}|")
    for label, measured, limit in ratios(summary):
        print(f"| {label:<40} | {measured:>8.2f} | {limit:>6.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in args.shape or ["large", "many"]:
        summary = run_shape(shape, args.out, args.cores)
        (args.out / f"{shape}.json").write_text(json.dumps(summary, indent=2))
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
