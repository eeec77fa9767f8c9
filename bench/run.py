"""Benchmark dcmsort against its floors and against dcm2niix, on one machine, in one run.

    python bench/run.py                      # large and many, 3 repetitions (~15 minutes)
    python bench/run.py --shape large        # 40 folders x 240 files of 128 KB
    python bench/run.py --shape many         # 1,000 folders x 100 files of ~10 KB
    python bench/run.py --shape dag          # 10,000 folders: DAG build and no-op rerun
    python bench/run.py --shape huge         # 1,000,000 small files (generated once, cached)
    python bench/run.py --shape plan10m      # 10,000,000 files planned, no files on disk
    python bench/run.py --shape tables       # dcmsort.tables at 1,000,000 placements; pandas' cost
    python bench/run.py --shape pandas       # a full run and a no-op rerun, pandas installed/hidden
    python bench/run.py --shape many --catalog-only   # sort once and check the catalogue only
    python bench/run.py --shape archives     # large, packed in 40 .zip and 40 .tar.gz files
    python bench/run.py --repeat 3           # fewer repetitions (5 by default)

For each shape it generates data with the project's generator and measures wall time, CPU
time (user + sys of every process started) and peak RSS of:
``cp -r`` (the copy floor), a header-only pydicom read of every file (the parse floor),
``dcm2niix -r y`` (the fastest tool users have today), the seed's script
(bench/seed_script.py: a process per patient folder, pydicom and shutil.copy, as its
write-up describes), dcmsort in copy and hardlink modes, dcmsort's no-op rerun, its rerun
after 1 % new folders, and a bare Snakemake no-op (a one-rule workflow with nothing to do:
what any Snakemake run costs). Each is repeated
(``--repeat``), contenders alternating, and reported as median (min-max): single runs on a
shared machine vary several-fold. Each command starts after a ``sync`` (nothing of an
earlier one still to be written back). On the shapes compared with ``cp -r`` and dcm2niix
those three also run cold on ``large``: with the page cache dropped before each command (as root;
otherwise the table says it could not be dropped), as a user meets data on disk; and so do the
floors of the pipeline's shape (the header read and the bare Snakemake no-op), whose sum with
``cp -r`` is the least any Snakemake run that reads every header can take.

After dcmsort's copy run and its rerun with 1 % new folders, the series catalogue is checked
against the ledger and the output tree (``check_catalog``): "catalogue checked: N series, M
files, OK" or the folders that differ, in the table and the json.

Peak RSS is that of the largest single process (``wait4`` of the command), and the
largest dcmsort job's own peak, which every job writes to its log ("peak RSS").
Results go to bench/out/<shape>.json and a table to stdout; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
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
    "huge": (10000, 100, 8),
    "plan10m": (100_000, 100, 0),  # manifests only: run_planning_shape
    "tables": (10000, 100, 8),  # the huge data, hard-linked once: run_tables_shape
    "pandas": (100, 100, 64),  # 10,000 files: run_pandas_shape
    "archives": (40, 240, 256),  # the large data, one archive per patient: run_archives_shape
}
CACHED = {
    "huge",
    "tables",
    "archives",
}  # generated once into bench/out/cache and kept: generating takes minutes
FLOORS = {"large", "many"}
COLD = "(cold)"  # label suffix of a contender run with the page cache dropped
COLD_SHAPES = {"large"}  # the 9,600-file shape of issue 26; cold runs of many take ~3 min
NOT_DROPPED = "NOT dropped (not root: these are warm too)"
# Shapes also sorted with the plan and the transfer split into this many partitions.
PARTITIONED = {"many": 4, "huge": 4}  # shapes compared with cp -r, the parse floor and dcm2niix
PARSE_FLOOR = """
import sys, pydicom
from pathlib import Path
tags = ["PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
        "SeriesDescription", "SOPInstanceUID", "InstanceNumber", "Modality", "StudyDate"]
for path in Path(sys.argv[1]).rglob("*"):
    if path.is_file():
        pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
"""
BARE_SNAKEFILE = """
rule all:
    output: "done"
    shell: "touch {output}"
"""
BARE_FLAGS = ("-c1", "--quiet", "-d")
DCM2NIIX_FLAGS = ("-r", "y", "-f", "%n_%i/%d_%s/%b", "-o")
_JOB_PEAK = re.compile(rb"peak RSS (\d+) MB")
# A progress line a dcmsort job printed on the console (issue 20: at least 3, no flood).
_PROGRESS = re.compile(r"^dcmsort (extract|plan|transfer)\b.* files/s", re.MULTILINE)


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and DROP_CACHES.exists()


def measure(command: list[str], job_logs: Path | None = None, cold: bool = False) -> dict:
    """Wall, CPU and peak RSS of one command and everything it starts. os.wait4 gives this
    child's own usage (RUSAGE_CHILDREN would report the largest child of the whole run).
    cold: the page cache (data, inodes, folders) is dropped first, when this is root."""
    # Every contender starts with nothing left to write back: the previous one's copies and
    # the removal of earlier outputs (ext4 with discard) would otherwise land on whoever
    # runs next, and they varied runs here several-fold.
    os.sync()
    if cold and can_drop_caches():
        DROP_CACHES.write_text("3\n")
    since = time.time()
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode(errors="replace")
    if returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{text[-3000:]}")
    result = {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }
    if job_logs is not None and job_logs.exists():
        peaks = [
            int(m)
            for log in job_logs.rglob("*.log")
            if log.stat().st_mtime >= since  # this run's jobs only
            for m in _JOB_PEAK.findall(log.read_bytes()[-400:])
        ]
        result["largest_job_rss_mb"] = max(peaks, default=0)
        result["progress_lines"] = len(_PROGRESS.findall(text))
    return result


def dcmsort(
    work: Path, source: Path, target: Path, cores: int, *flags: str, **config: object
) -> list[str]:
    return snakemake_command(
        work, "--quiet", "rules", *flags, cores=cores, input_dir=source, output_dir=target, **config
    )


def check_catalog(target: Path) -> dict:
    """Issue 25 at scale: the series catalogue of the sorted output ``target`` against what
    the ledger placed and what is on disk. For every series folder, its catalogue row's
    ``files`` must equal the destinations the ledger has a "placed" row for in it and the
    files in it on disk (the state folder left out), and ``dcmsort.tables(target).series()``
    must sum to the placed files. Counted here from the ledger's parquet files and a walk,
    not with the report's code."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    import dcmsort
    from dcmsort import ledger
    from dcmsort.report import CATALOG
    from dcmsort.settings import STATE_FOLDER

    state = target / STATE_FOLDER
    rows = ds.dataset(
        [str(path) for path in ledger.current_files(state)], schema=ledger.SCHEMA
    ).to_table(columns=["destination"], filter=pc.field("status") == ledger.PLACED)
    placed: dict[str, int] = {}
    for destination in set(rows["destination"].to_pylist()):
        folder = destination.rpartition("/")[0]
        placed[folder] = placed.get(folder, 0) + 1
    on_disk: dict[str, int] = {}
    for folder, subfolders, files in os.walk(target):
        if Path(folder) == target:
            subfolders[:] = [name for name in subfolders if name != STATE_FOLDER]
        elif files:
            on_disk[Path(folder).relative_to(target).as_posix()] = len(files)
    catalogue = pq.read_table(state / CATALOG, columns=["series folder", "files"])
    listed = {row["series folder"]: row["files"] for row in catalogue.to_pylist()}
    series_files = int(dcmsort.tables(target).series(columns=["files"])["files"].sum())
    differ = [
        {
            "series folder": name,
            "catalogue": listed.get(name),
            "ledger": placed.get(name),
            "on disk": on_disk.get(name),
        }
        for name in sorted(set(listed) | set(placed) | set(on_disk))
        if not listed.get(name) == placed.get(name) == on_disk.get(name)
    ]
    placed_files = sum(placed.values())
    # A folder listed twice would be one entry of listed.
    ok = not differ and catalogue.num_rows == len(listed) and series_files == placed_files
    verdict = "OK" if ok else f"MISMATCH in {len(differ)} folders"
    return {
        "series": len(placed),
        "placed files": placed_files,
        "catalogue rows": catalogue.num_rows,
        "tables(OUT).series() files": series_files,
        "files on disk": sum(on_disk.values()),
        "ok": ok,
        "differ": differ[:20],  # the first few, by name
        "message": f"catalogue checked: {len(placed):,} series, {placed_files:,} files, {verdict}"
        + ("" if series_files == placed_files else f" (series() sums to {series_files:,})"),
    }


def catalog_checked(target: Path) -> dict:
    """check_catalog in a process of its own: pandas stays out of this one (whose pages
    every measured command would inherit until its exec)."""
    done = subprocess.run(
        [sys.executable, __file__, "--check-catalog", str(target)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout)


def tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def generate_fast(out: Path, folders: int, per_folder: int, rows: int, first: int = 1) -> None:
    """Many small real DICOM files quickly: one instance per series is made by the project's
    generator, the others are that file with a fixed-width SOPInstanceUID replaced (in the
    dataset and the file meta), so every file is a distinct, valid instance."""
    for patient in range(first, first + folders):
        for series_index in range(1, 5):
            series = demo.Series(
                f"PATIENT^{patient:06d}",
                f"P{patient:06d}",
                demo.uid("bench-study", patient),
                "20240101",
                demo.uid("bench-series", patient, series_index),
                series_index,
                f"SERIES {series_index}",
            )
            # Fixed width and no leading zeros (a UID component may not have them).
            prefix = f"1.2.826.0.1.3680043.10.1.{10_000_000 + patient}.{series_index}."
            template = f"{prefix}{100_000}"
            folder = out / f"patient_{patient}" / f"series_{series_index}"
            path = demo.write(
                demo.make_instance(series, 1, template, rows=rows), folder / "IM000000.dcm"
            )
            data = path.read_bytes()
            for instance in range(1, per_folder // 4):
                sop = f"{prefix}{100_000 + instance}"
                (folder / f"IM{instance:06d}.dcm").write_bytes(
                    data.replace(template.encode(), sop.encode())
                )


PLANNING_FILES = 10_000_000
PLANNING_PARTITIONS = (8, 16, 32)
FILES_PER_PATIENT = 100


def synthetic_manifests(folder: Path, files: int, batches: int = 64) -> list[Path]:
    """Batch manifests of ``files`` rows as extract writes them (the generator's header
    values), without any file on disk: built columnar, so 10,000,000 rows take seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dcmsort import headers

    schema = headers.manifest_schema(headers.MANIFEST_TAGS)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per_batch = -(-files // batches)
    for batch in range(batches):
        start, stop = batch * per_batch, min(files, (batch + 1) * per_batch)
        index = pa.array(range(start, stop), pa.int64())
        patient = pc.cast(pc.divide(index, FILES_PER_PATIENT), pa.string())
        series = pc.cast(pc.divide(index, FILES_PER_PATIENT // 4), pa.string())
        text = pc.cast(index, pa.string())

        def joined(*parts):
            return pc.binary_join_element_wise(*parts, "")

        values = {
            "folder": joined("patient_", patient),
            "relpath": joined("patient_", patient, "/IM", text, ".dcm"),
            "size": pc.add(pc.multiply(pc.bit_wise_and(index, 1023), 7), 10_000),
            "mtime_ns": pc.add(index, 1_700_000_000_000_000_000),
            "dicom": pa.array([True] * len(index)),
            "PatientName": joined("PATIENT^", patient),
            "PatientID": joined("P", patient),
            "StudyInstanceUID": joined("1.2.3.", patient),
            "StudyDate": pa.array(["20240101"] * len(index)),
            "SeriesInstanceUID": joined("1.2.3.", series, ".1"),
            "SeriesNumber": pc.cast(pc.bit_wise_and(pc.cast(series, pa.int64()), 3), pa.string()),
            "SeriesDescription": joined("SERIES ", series),
            "SOPInstanceUID": joined("1.2.4.", text),
            "Modality": pa.array(["MR"] * len(index)),
        }
        table = pa.table(
            {
                f.name: values[f.name] if f.name in values else pa.nulls(len(index), f.type)
                for f in schema
            },
            schema=schema,
        )
        path = folder / f"batch-{batch}-{batch:016x}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def run_planning_shape(out: Path, files: int = PLANNING_FILES) -> dict:
    """The plan of ``files`` files with P partitions: the partition job, and one plan job
    (each holds ~files / P rows), on synthetic manifests (no input file, empty output)."""
    base = out / "plan10m"
    shutil.rmtree(base, ignore_errors=True)
    print(f"[plan10m] writing manifests of {files:,} files ...", flush=True)
    manifests = synthetic_manifests(base / "state" / "manifests", files)
    naming_json = json.dumps(
        {
            "folder_template": "{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}",
            "file_template": "{filename}",
            "placeholder": "UNKNOWN",
            "keep_series_apart": True,
        }
    )
    folders = {"--input-dir": base / "in", "--output-dir": base / "out"}
    for folder in folders.values():
        folder.mkdir()
    stage = [sys.executable, str(REPO / "workflow" / "scripts" / "dcmsort_stage.py")]
    common = [
        *(arg for key, value in folders.items() for arg in (key, str(value))),
        *("--naming", naming_json),
    ]
    results = {}
    for partitions in PLANNING_PARTITIONS:
        state = base / f"state-{partitions}"
        print(f"[plan10m] {partitions} partitions: partition job ...", flush=True)
        results[f"partition job, P={partitions}"] = measure(
            [
                *stage,
                "partition",
                *("--manifests", *map(str, manifests)),
                *common,
                *("--state-dir", str(state), "--partitions", str(partitions)),
                *("--routes", str(state / "partitions-0000000000000000.json")),
            ]
        )
        part = sorted((state / "parts").glob("p0of*.parquet"))[0]
        print(f"[plan10m] {partitions} partitions: plan job of {part.name} ...", flush=True)
        results[f"one plan job, P={partitions}"] = measure(
            [
                *stage,
                "plan",
                *("--manifests", str(part), "--partition", part.name.split("-")[0]),
                *common,
                *("--state-dir", str(state), "--plan", str(state / "plan.parquet")),
            ]
        )
        shutil.rmtree(state)
    shutil.rmtree(base)
    return {"shape": "plan10m", "files": files, "results": results}


# Hides pandas from a process, as if it were not installed (a sitecustomize on PYTHONPATH):
# what Snakemake's main process costs with and without it.
HIDE_PANDAS = """
import importlib.machinery, sys
_path_finder = importlib.machinery.PathFinder
class _NoPandas:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] == "pandas":
            return None  # not found: as if not installed (importlib.util.find_spec too)
        return _path_finder.find_spec(name, path, target)
    @staticmethod
    def invalidate_caches():
        _path_finder.invalidate_caches()
sys.meta_path[:] = [_NoPandas if f is _path_finder else f for f in sys.meta_path]
"""


def pandas_hider(base: Path) -> Path:
    """A folder whose sitecustomize hides pandas from every process that has it on
    PYTHONPATH (Snakemake's main process and, inheriting it, its jobs)."""
    hide = base / "hide-pandas"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(HIDE_PANDAS)
    return hide


def measure_with(pythonpath: Path | None, command: list[str]) -> dict:
    """measure(command) with PYTHONPATH set to pythonpath alone (None: unset)."""
    before = os.environ.pop("PYTHONPATH", None)
    if pythonpath is not None:
        os.environ["PYTHONPATH"] = str(pythonpath)
    try:
        return measure(command)
    finally:
        os.environ.pop("PYTHONPATH", None)
        if before is not None:
            os.environ["PYTHONPATH"] = before


TABLES_READS = {
    "tables(OUT).placements()": "t.placements()",
    "tables(OUT).series()": "t.series()",
    "placements(), 2 columns, one patient": (
        "t.placements(columns=['relpath', 'destination'], "
        "filters=[('destination', '>=', 'PATIENT^000042_'), "
        "('destination', '<', 'PATIENT^000043')])"
    ),
}


def run_tables_shape(out: Path, repeat: int) -> dict:
    """Issue 25: the pandas API's read time at 1,000,000 placements (the huge data, sorted
    once with hard links), and what pandas costs Snakemake's main process (a no-op rerun
    and a bare Snakemake no-op, with pandas importable and hidden)."""
    source = out / "cache" / "huge"
    if not (out / "cache" / "huge.complete").exists():
        print("[tables] generating the huge data first ...", flush=True)
        generate_fast(source, *SHAPES["huge"])
        (out / "cache" / "huge.complete").touch()
    base = out / "tables"
    shutil.rmtree(base, ignore_errors=True)
    (base / "work").mkdir(parents=True)
    target = base / "sorted"
    print("[tables] sorting 1,000,000 files with hard links once ...", flush=True)
    measure(dcmsort(base / "work", source, target, 2, transfer_mode="hardlink"))
    # The run after a hardlink run reads state once (the links changed the inputs' ctime).
    measure(dcmsort(base / "work", source, target, 2, transfer_mode="hardlink"))
    hide = pandas_hider(base)
    bare = base / "bare"
    bare.mkdir()
    (bare / "Snakefile").write_text(BARE_SNAKEFILE)
    bare_command = [sys.executable, "-m", "snakemake", "-s", str(bare / "Snakefile")]
    subprocess.run([*bare_command, "-d", str(bare), "-c1"], check=True, capture_output=True)
    commands = {
        **{
            label: [
                sys.executable,
                "-c",
                f"import sys, dcmsort; t = dcmsort.tables(sys.argv[1]); {code}",
                str(target),
            ]
            for label, code in TABLES_READS.items()
        },
        "bare Snakemake no-op": [*bare_command, *BARE_FLAGS, str(bare)],
        "dcmsort no-op rerun": dcmsort(base / "work", source, target, 2, transfer_mode="hardlink"),
    }
    samples: dict[str, list[dict]] = {}
    for _ in range(repeat):
        for label, command in commands.items():
            runs = [(label, None)]
            if "no-op" in label:
                runs = [(f"{label}, pandas installed", None), (f"{label}, pandas hidden", hide)]
            for name, hidden in runs:
                print(f"[tables] {name} ...", flush=True)
                samples.setdefault(name, []).append(measure_with(hidden, command))
    shutil.rmtree(base)
    return {
        "shape": "tables",
        "repeat": repeat,
        "results": {
            label: {
                key: summarise([s[key] for s in runs]) for key in ("wall_s", "cpu_s", "peak_rss_mb")
            }
            for label, runs in samples.items()
        },
    }


PANDAS_FOUND = "import importlib.util, sys; sys.exit(importlib.util.find_spec('pandas') is None)"


def run_pandas_shape(out: Path, repeat: int) -> dict:
    """Issue 25: what pandas, installed for dcmsort.tables, costs a whole dcmsort run. A
    full copy run of 10,000 files (each into a new output folder) and its no-op rerun,
    with pandas installed and hidden from the import system, alternating."""
    folders, per_folder, rows = SHAPES["pandas"]
    base = out / "pandas"
    shutil.rmtree(base, ignore_errors=True)
    source = base / "Unclassified"
    print(f"[pandas] generating {folders * per_folder:,} files ...", flush=True)
    generate_fast(source, folders, per_folder, rows)
    hide = pandas_hider(base)
    # The hiding works, and pandas is installed: else both variants measure the same.
    found = [sys.executable, "-c", PANDAS_FOUND]
    if subprocess.run(found).returncode != 0:
        raise SystemExit("pandas is not installed: nothing to compare")
    if subprocess.run(found, env={**os.environ, "PYTHONPATH": str(hide)}).returncode == 0:
        raise SystemExit(f"{hide}/sitecustomize.py did not hide pandas")
    variants = (("pandas installed", None), ("pandas hidden", hide))
    runs = ("dcmsort copy", "dcmsort no-op rerun")
    # Labelled in the order of the table: each run with pandas installed, then hidden.
    samples = {f"{run}, {variant}": [] for run in runs for variant, _ in variants}
    for _ in range(repeat):
        for variant, hidden in variants:
            target, work = base / "sorted", base / "work"
            for folder in (target, work):
                shutil.rmtree(folder, ignore_errors=True)
            work.mkdir()
            command = dcmsort(work, source, target, 2)
            for run in runs:
                label = f"{run}, {variant}"
                print(f"[pandas] {label} ...", flush=True)
                samples[label].append(measure_with(hidden, command))
    files, size = tree_size(source)
    shutil.rmtree(base)
    return {
        "shape": "pandas",
        "files": files,
        "bytes": size,
        "repeat": repeat,
        "results": {
            label: {
                key: summarise([s[key] for s in measured])
                for key in ("wall_s", "cpu_s", "peak_rss_mb")
            }
            for label, measured in samples.items()
        },
    }


# Issue 19: how the archives of run_archives_shape are written, and how a user would
# otherwise unpack them (one archive after the other, as a shell loop does).
ARCHIVE_KINDS = {
    "zip": (".zip", ["unzip", "-q", "-o", "{archive}", "-d", "{into}"]),
    "tar.gz": (".tar.gz", ["tar", "-xzf", "{archive}", "-C", "{into}"]),
}


def pack(source: Path, into: Path, suffix: str) -> None:
    """One archive per top-level folder of source (members named from source: the
    folder's name first, as a user's export holds them): a deflated zip, or a tar.gz."""
    import tarfile
    import zipfile

    into.mkdir(parents=True)
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        archive = into / f"{folder.name}{suffix}"
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if suffix == ".zip":
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as packed:
                for path in files:
                    packed.write(path, path.relative_to(source).as_posix())
        else:
            with tarfile.open(archive, "w:gz") as packed:
                for path in files:
                    packed.add(path, path.relative_to(source).as_posix())


def unpack_command(kind: str, archives_dir: Path, into: Path) -> list[str]:
    """A shell loop unpacking every archive of archives_dir into into, one after the other."""
    suffix, template = ARCHIVE_KINDS[kind]
    tool = template[0]
    if shutil.which(tool) is None and kind == "zip":  # the standard library's, then
        template = [sys.executable, "-m", "zipfile", "-e", "{archive}", "{into}"]
    values = {"{archive}": '"$a"', "{into}": shlex.quote(str(into))}
    line = " ".join(values.get(arg) or shlex.quote(arg) for arg in template)
    return [
        "sh",
        "-c",
        f"mkdir -p {shlex.quote(str(into))} && for a in {shlex.quote(str(archives_dir))}/*"
        f"{suffix}; do {line} || exit 1; done",
    ]


def sorted_tree(root: Path) -> dict[str, str]:
    """Relative path -> content digest of every file dcmsort sorted into root (its state
    folder and reports left out)."""
    import hashlib

    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in root.rglob("*")
        if path.is_file() and not path.relative_to(root).parts[0].startswith(".")
    }


def run_archives_shape(out: Path, cores: int, repeat: int) -> dict:
    """Issue 19: the large shape sorted from its folders, from 40 deflated zips and from
    40 tar.gz files (one per patient folder, all in one input folder), and the floor a user
    would otherwise pay: unpacking the same archives into a folder, then a dcmsort run on
    it. Warm page cache. Before the timed runs, the tree sorted from each archive set is
    checked against the one sorted from the folders (same paths, same bytes)."""
    folders, per_folder, rows = SHAPES["archives"]
    base = out / "archives"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    # Generated and packed once into bench/out/cache and kept: that takes minutes.
    cache, complete = out / "cache" / "archives", out / "cache" / "archives.complete"
    source = cache / "Unclassified"
    sets = {"folders": source, **{kind: cache / kind for kind in ARCHIVE_KINDS}}
    started = time.perf_counter()
    if complete.exists():
        print(f"[archives] cached data in {cache}", flush=True)
    else:
        shutil.rmtree(cache, ignore_errors=True)
        print(f"[archives] generating {folders} folders x {per_folder} files ...", flush=True)
        generate_real(source, folders, per_folder, rows)
        for kind, (suffix, _) in ARCHIVE_KINDS.items():
            print(f"[archives] packing {folders} {suffix} files ...", flush=True)
            pack(source, sets[kind], suffix)
        complete.touch()
    files, size = tree_size(source)
    packed = {kind: tree_size(folder)[1] for kind, folder in sets.items()}
    elapsed = time.perf_counter() - started
    print(f"[archives] {files:,} files, {size / 1e6:,.0f} MB ({elapsed:.0f} s)")
    for folder in sets.values():  # warm the page cache for every contender alike
        for path in folder.rglob("*"):
            if path.is_file():
                path.read_bytes()

    def fresh(*paths: Path) -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        paths[-1].mkdir()

    def sort(kind: str, target: Path, work: Path) -> list[str]:
        fresh(target, work)
        return dcmsort(work, sets[kind], target, cores)

    # Correctness, once: the tree from each archive set is the tree from the folders.
    checks = {}
    for kind in sets:
        target, work = base / f"check-{kind}", base / f"work-check-{kind}"
        subprocess.run(sort(kind, target, work), check=True, capture_output=True)
        checks[kind] = sorted_tree(target)
    for kind in ARCHIVE_KINDS:
        same = checks[kind] == checks["folders"]
        missing = len(checks["folders"].keys() - checks[kind].keys())
        extra = len(checks[kind].keys() - checks["folders"].keys())
        print(
            f"[archives] tree from {kind}: {len(checks[kind]):,} files, "
            f"{'the same as' if same else 'DIFFERENT from'} the tree from the folders "
            f"({len(checks['folders']):,} files; {missing} missing, {extra} extra)",
            flush=True,
        )
        checks[kind] = same
    checks["folders"] = len(checks["folders"])
    for kind in sets:
        shutil.rmtree(base / f"check-{kind}")
        shutil.rmtree(base / f"work-check-{kind}")

    samples: dict[str, list[dict]] = {}
    target, work, unpacked = base / "sorted", base / "work", base / "unpacked"
    logs = target / ".dcmsort" / "logs"
    for _ in range(repeat):
        for kind in sets:
            label = "dcmsort copy, folders" if kind == "folders" else f"dcmsort copy, {kind}"
            print(f"[archives] {label} ...", flush=True)
            samples.setdefault(label, []).append(measure(sort(kind, target, work), logs))
        for kind in ARCHIVE_KINDS:
            label = f"unpack {kind} ({ARCHIVE_KINDS[kind][1][0]}), one after the other"
            print(f"[archives] {label} ...", flush=True)
            shutil.rmtree(unpacked, ignore_errors=True)
            samples.setdefault(label, []).append(
                measure(unpack_command(kind, sets[kind], unpacked))
            )
            label = f"unpack {kind} + dcmsort copy"
            print(f"[archives] {label} ...", flush=True)
            shutil.rmtree(unpacked, ignore_errors=True)
            fresh(target, work)
            command = unpack_command(kind, sets[kind], unpacked)
            command[-1] += " && " + shlex.join(dcmsort(work, unpacked, target, cores))
            samples.setdefault(label, []).append(measure(command, logs))
    shutil.rmtree(base)
    return {
        "shape": "archives",
        "files": files,
        "bytes": size,
        "archive_bytes": packed,
        "folders": folders,
        "cores": cores,
        "repeat": repeat,
        "same_tree": checks,
        "unzip": shutil.which("unzip") is not None,
        "results": {
            label: {
                key: summarise([s[key] for s in runs])
                for key in ("wall_s", "cpu_s", "peak_rss_mb", "largest_job_rss_mb")
                if key in runs[0]
            }
            for label, runs in samples.items()
        },
    }


def generate_real(source: Path, folders: int, per_folder: int, rows: int) -> None:
    """A shape's data from the project's generator (real DICOM of 4 series per folder)."""
    demo.generate(
        source,
        patients=folders,
        series=4,
        instances=max(1, per_folder // 4),
        rows=rows,
        junk=False,
    )


def print_pandas_table(summary: dict) -> None:
    print(
        f"\n**pandas**: {summary['files']:,} files, {summary['bytes'] / 1e6:,.0f} MB, 2 cores, a "
        f"full copy run and its no-op rerun with pandas installed and hidden, alternating; "
        f"median (min-max) of {summary['repeat']} runs, warm cache\n"
    )
    _print_results(summary["results"], cpu_first=True)


def print_archives_table(summary: dict) -> None:
    sizes = summary["archive_bytes"]
    print(
        f"\n**archives**: {summary['files']:,} files, {summary['bytes'] / 1e6:,.0f} MB in "
        f"{summary['folders']} patient folders; as {summary['folders']} deflated zips "
        f"({sizes['zip'] / 1e6:,.0f} MB) and {summary['folders']} tar.gz files "
        f"({sizes['tar.gz'] / 1e6:,.0f} MB), all in one input folder; {summary['cores']} cores, "
        f"warm page cache, median (min-max) of {summary['repeat']} runs"
        + ("" if summary["unzip"] else "; no unzip here: python -m zipfile -e instead")
        + "\n"
    )
    for kind in ARCHIVE_KINDS:
        same = summary["same_tree"][kind]
        print(
            f"tree sorted from the {kind} files = tree from the folders: {'yes' if same else 'NO'}"
        )
    print("\n| what | wall s | CPU s | peak RSS MB | largest job MB |")
    print("|---|---:|---:|---:|---:|")
    results = summary["results"]
    for label, value in results.items():
        job = value.get("largest_job_rss_mb")
        job_cell = "" if job is None else f"{job['max']:.0f}"
        print(
            f"| {label} | {_cell(value['wall_s'])} | {_cell(value['cpu_s'])} | "
            f"{value['peak_rss_mb']['median']:.0f} | {job_cell} |"
        )
    print("\n| target (ratio of medians) | wall | CPU | limit | met (CPU) |")
    print("|---|---:|---:|---:|:-:|")
    plain = results["dcmsort copy, folders"]
    for kind in ARCHIVE_KINDS:
        ours = results[f"dcmsort copy, {kind}"]
        floor = results[f"unpack {kind} + dcmsort copy"]
        for label, limit, other in (
            (f"{kind} / folders", 1.2, plain),
            (f"{kind} / (unpack {kind} + sort)", 1.0, floor),
        ):
            wall = ours["wall_s"]["median"] / other["wall_s"]["median"]
            cpu = ours["cpu_s"]["median"] / other["cpu_s"]["median"]
            met = "yes" if cpu <= limit else "no"
            print(f"| {label} | {wall:.2f} | {cpu:.2f} | {limit:.2f} | {met} |")


def print_tables_table(summary: dict) -> None:
    print(
        f"\n**tables**: `dcmsort.tables` on 1,000,000 placements, and Snakemake's main process "
        f"with pandas installed and hidden; median (min-max) of {summary['repeat']} runs\n"
    )
    _print_results(summary["results"])


def _print_results(results: dict, cpu_first: bool = False) -> None:
    """A table of measured commands: wall and CPU seconds (CPU first where the machine's
    load makes wall the noisier figure) and peak RSS."""
    names = ("cpu_s", "wall_s") if cpu_first else ("wall_s", "cpu_s")
    heads = {"cpu_s": "CPU s (user+sys)" if cpu_first else "CPU s", "wall_s": "wall s"}
    print(f"| what | {heads[names[0]]} | {heads[names[1]]} | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for label, value in results.items():
        print(
            f"| {label} | {_cell(value[names[0]])} | {_cell(value[names[1]])} | "
            f"{value['peak_rss_mb']['median']:.0f} |"
        )


def print_planning_table(summary: dict) -> None:
    print(
        f"\n**plan10m**: {summary['files']:,} files planned (synthetic manifests), one run each\n"
    )
    print("| job | wall s | CPU s | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for label, value in summary["results"].items():
        print(
            f"| {label} | {value['wall_s']:.1f} | {value['cpu_s']:.1f} | "
            f"{value['peak_rss_mb']:.0f} |"
        )


def summarise(samples: list[float]) -> dict:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def run_shape(name: str, out: Path, cores: int, repeat: int, catalog_only: bool = False) -> dict:
    """One shape's contenders; catalog_only: dcmsort's copy and its rerun with 1 % new
    folders alone, once, each followed by the catalogue check."""
    folders, per_folder, rows = SHAPES[name]
    base = out / name
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    source = (out / "cache" / name) if name in CACHED else base / "Unclassified"
    extra = base / "extra"  # the 1 % new folders, moved in and out for each repetition
    added = max(1, folders // 100)
    started = time.perf_counter()
    complete = out / "cache" / f"{name}.complete"  # beside the data: not an input file
    if name in CACHED and complete.exists():
        print(f"[{name}] cached data in {source}", flush=True)
    else:
        print(f"[{name}] generating {folders} folders x {per_folder} files ...", flush=True)
        shutil.rmtree(source, ignore_errors=True)
        if name in CACHED:
            generate_fast(source, folders, per_folder, rows)
            complete.touch()
        else:
            generate_real(source, folders, per_folder, rows)
    generate_fast(extra, added, per_folder, rows, first=folders + 1)
    files, size = tree_size(source)
    print(f"[{name}] {files:,} files, {size / 1e6:,.0f} MB ({time.perf_counter() - started:.0f} s)")
    for path in source.rglob("*"):  # warm the page cache for every contender alike
        if path.is_file():
            path.read_bytes()

    bare = base / "bare"
    bare.mkdir()
    (bare / "Snakefile").write_text(BARE_SNAKEFILE)
    subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(bare / "Snakefile"), "-d", str(bare), "-c1"],
        check=True,
        capture_output=True,
    )
    samples: dict[str, list[dict]] = {}

    def record(
        label: str, command: list[str], job_logs: Path | None = None, cold: bool = False
    ) -> None:
        label = f"{label} {COLD}" if cold else label
        print(f"[{name}] {label} ...", flush=True)
        samples.setdefault(label, []).append(measure(command, job_logs, cold))

    reps = 1 if name in CACHED or catalog_only else repeat
    contest = not catalog_only
    checks: dict[str, dict] = {}

    def check(after: str, target: Path) -> None:
        """The catalogue check, after the first repetition's run of its kind."""
        if after not in checks:
            checks[after] = catalog_checked(target)
            print(f"[{name}] after {after}: {checks[after]['message']}", flush=True)

    bare_noop = [sys.executable, "-m", "snakemake", "-s", str(bare / "Snakefile")]
    bare_noop += [*BARE_FLAGS, str(bare)]
    parse_floor = [sys.executable, "-c", PARSE_FLOOR, str(source)]
    for _ in range(reps):
        if contest:
            record("bare Snakemake no-op", bare_noop)
        dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
        if name in COLD_SHAPES and contest:
            # Cold first: cp -r, dcm2niix and a dcmsort copy, as a user meets data on disk.
            for folder in ("cp", "dcm2niix", "sorted-cold", "work-cold"):
                shutil.rmtree(base / folder, ignore_errors=True)
            record("cp -r", ["cp", "-r", str(source), str(base / "cp")], cold=True)
            if Path(dcm2niix).exists():
                (base / "dcm2niix").mkdir()
                record(
                    "dcm2niix -r y",
                    [dcm2niix, *DCM2NIIX_FLAGS, str(base / "dcm2niix"), str(source)],
                    cold=True,
                )
            (base / "work-cold").mkdir()
            record(
                "dcmsort copy",
                dcmsort(base / "work-cold", source, base / "sorted-cold", cores),
                base / "sorted-cold" / ".dcmsort" / "logs",
                cold=True,
            )
            # The floors of the brief's shape, cold: any Snakemake run that reads every
            # header once before it copies pays at least these on top of the copy.
            record("header read, 1 process (floor)", parse_floor, cold=True)
            record("bare Snakemake no-op", bare_noop, cold=True)
            for folder in ("cp", "dcm2niix", "sorted-cold", "work-cold"):
                shutil.rmtree(base / folder, ignore_errors=True)
            for path in source.rglob("*"):  # warm again for the warm contenders
                if path.is_file():
                    path.read_bytes()
        if name in FLOORS and contest:
            shutil.rmtree(base / "cp", ignore_errors=True)
            record("cp -r (floor)", ["cp", "-r", str(source), str(base / "cp")])
            shutil.rmtree(base / "cp", ignore_errors=True)
            record("header read, 1 process (floor)", parse_floor)
            if Path(dcm2niix).exists():
                shutil.rmtree(base / "dcm2niix", ignore_errors=True)
                (base / "dcm2niix").mkdir()
                record(
                    "dcm2niix -r y",
                    [dcm2niix, *DCM2NIIX_FLAGS, str(base / "dcm2niix"), str(source)],
                )
                shutil.rmtree(base / "dcm2niix", ignore_errors=True)
            shutil.rmtree(base / "seed", ignore_errors=True)
            record(
                "seed script (a process per folder)",
                [
                    sys.executable,
                    str(REPO / "bench" / "seed_script.py"),
                    str(source),
                    str(base / "seed"),
                ],
            )
            shutil.rmtree(base / "seed", ignore_errors=True)
            link_out, link_work = base / "link", base / "work-link"
            for folder in (link_out, link_work):
                shutil.rmtree(folder, ignore_errors=True)
            link_work.mkdir()
            record(
                "dcmsort hardlink",
                dcmsort(link_work, source, link_out, cores, transfer_mode="hardlink"),
                link_out / ".dcmsort" / "logs",
            )
        target, work = base / "sorted", base / "work"
        for folder in (target, work):
            shutil.rmtree(folder, ignore_errors=True)
        work.mkdir()
        logs = target / ".dcmsort" / "logs"
        # One partition, so that the partitioned contender has a baseline (auto would pick
        # more than one at 1,000,000 files).
        single = {"partitions": 1} if name in PARTITIONED else {}
        record("dcmsort copy", dcmsort(work, source, target, cores, **single), logs)
        check("dcmsort copy", target)
        if name in PARTITIONED and contest:
            split, split_work = base / "sorted-split", base / "work-split"
            for folder in (split, split_work):
                shutil.rmtree(folder, ignore_errors=True)
            split_work.mkdir()
            record(
                f"dcmsort copy, partitions={PARTITIONED[name]}",
                dcmsort(split_work, source, split, cores, partitions=PARTITIONED[name]),
                split / ".dcmsort" / "logs",
            )
            for folder in (split, split_work):
                shutil.rmtree(folder, ignore_errors=True)
        if contest:
            record("dcmsort no-op rerun", dcmsort(work, source, target, cores, **single), logs)
        moved = [source / p.name for p in extra.iterdir()]
        for folder in extra.iterdir():
            folder.rename(source / folder.name)
        try:
            record("dcmsort rerun, 1% new", dcmsort(work, source, target, cores, **single), logs)
            check("dcmsort rerun, 1% new", target)
        finally:
            for folder in moved:
                folder.rename(extra / folder.name)
        if name == "dag" and contest:
            record("dry run (DAG build)", dcmsort(work, source, target, cores, "-n"))
    results = {
        label: {
            key: summarise([s[key] for s in runs])
            for key in ("wall_s", "cpu_s", "peak_rss_mb", "largest_job_rss_mb", "progress_lines")
            if key in runs[0]
        }
        for label, runs in samples.items()
    }
    summary = {
        "shape": name,
        "files": files,
        "bytes": size,
        "folders": folders,
        "cores": cores,
        "repeat": reps,
        "caches_dropped": can_drop_caches(),
        "results": results,
        "catalog_check": checks,
    }
    shutil.rmtree(base)
    return summary


def ratios(summary: dict) -> list[tuple[str, float, float]]:
    """(target, measured ratio of medians, limit) for each target of the issues."""
    r, cores = summary["results"], summary["cores"]

    def wall(label: str) -> float:
        return r[label]["wall_s"]["median"]

    copy, bare = wall("dcmsort copy"), wall("bare Snakemake no-op")
    rows = []
    if f"cp -r {COLD}" in r:
        cold_copy = wall(f"dcmsort copy {COLD}")
        rows.append(("copy / cp -r, cold", cold_copy / wall(f"cp -r {COLD}"), 1.5))
        if f"dcm2niix -r y {COLD}" in r:
            rows.append(
                ("copy / dcm2niix -r y, cold", cold_copy / wall(f"dcm2niix -r y {COLD}"), 0.7)
            )
        extra_cpu = (
            r[f"dcmsort copy {COLD}"]["cpu_s"]["median"] - r[f"cp -r {COLD}"]["cpu_s"]["median"]
        )
        rows.append(
            ("CPU beyond cp -r, ms per file, cold", extra_cpu * 1000 / summary["files"], 0.2)
        )
        # What the targets above leave, measured: a bare Snakemake start and one header read
        # per file (spread over the cores) are the least any run of the brief's shape adds
        # to the copy (extract, plan and transfer jobs add an interpreter each on top).
        parse_cold, bare_cold = (
            f"header read, 1 process (floor) {COLD}",
            f"bare Snakemake no-op {COLD}",
        )
        if parse_cold in r and bare_cold in r:
            cp_cold = wall(f"cp -r {COLD}")
            shape_floor = cp_cold + wall(bare_cold) + wall(parse_cold) / cores
            rows.append(
                (
                    "(cp -r + Snakemake no-op + header read / cores) / cp -r, cold",
                    shape_floor / cp_cold,
                    1.5,
                )
            )
            floor_cpu = r[parse_cold]["cpu_s"]["median"] + r[bare_cold]["cpu_s"]["median"]
            rows.append(
                (
                    "Snakemake no-op + header read CPU, ms per file, cold",
                    floor_cpu * 1000 / summary["files"],
                    0.2,
                )
            )
    rows += [
        (
            "no-op rerun - bare / full run - bare",
            (wall("dcmsort no-op rerun") - bare) / (copy - bare),
            0.05,
        ),
        (
            "rerun 1% new - bare / full run - bare",
            (wall("dcmsort rerun, 1% new") - bare) / (copy - bare),
            0.10,
        ),
    ]
    if "cp -r (floor)" in r:
        parse = r["header read, 1 process (floor)"]["cpu_s"]["median"] / cores
        rows.append(
            ("copy / (cp -r + parse floor / cores)", copy / (wall("cp -r (floor)") + parse), 1.3)
        )
        rows.append(("hardlink / (parse floor / cores)", wall("dcmsort hardlink") / parse, 1.5))
        floor_cpu = (
            r["cp -r (floor)"]["cpu_s"]["median"]
            + r["header read, 1 process (floor)"]["cpu_s"]["median"]
        )
        rows.append(
            (
                "copy CPU / (cp -r CPU + parse floor CPU)",
                r["dcmsort copy"]["cpu_s"]["median"] / floor_cpu,
                1.5,
            )
        )
    if "dcm2niix -r y" in r:
        rows.append(("copy / dcm2niix -r y", copy / wall("dcm2niix -r y"), 1.0))
    if "seed script (a process per folder)" in r:
        rows.append(("copy / seed script", copy / wall("seed script (a process per folder)"), 1.0))
    rows.append(("copy: CPU / wall (cores busy)", r["dcmsort copy"]["cpu_s"]["median"] / copy, 1.8))
    split = next((label for label in r if label.startswith("dcmsort copy, partitions=")), None)
    if split:
        count = split.rpartition("=")[2]
        rows.append((f"copy, {count} partitions / copy", wall(split) / copy, 1.15))
        rows.append(
            (
                f"largest job, {count} partitions / copy",
                r[split]["largest_job_rss_mb"]["max"]
                / r["dcmsort copy"]["largest_job_rss_mb"]["max"],
                0.7,
            )
        )
    return rows


def _cell(stat: dict, digits: int = 2) -> str:
    if stat["n"] == 1:
        return f"{stat['median']:.{digits}f}"
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


def print_table(summary: dict) -> None:
    print(
        f"\n**{summary['shape']}**: {summary['files']:,} files, {summary['bytes'] / 1e6:,.0f} MB, "
        f"{summary['folders']:,} folders, {summary['cores']} cores, median (min-max) of "
        f"{summary['repeat']} runs; warm page cache, except {COLD}: "
        f"{'dropped before each command' if summary.get('caches_dropped') else NOT_DROPPED}\n"
    )
    print("| what | wall s | CPU s | peak RSS MB | largest job MB | console progress lines |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, value in summary["results"].items():
        job = value.get("largest_job_rss_mb")
        job_cell = "" if job is None else f"{job['max']:.0f}"
        lines = value.get("progress_lines")
        lines_cell = "" if lines is None else f"{lines['median']:.0f}"
        print(
            f"| {label} | {_cell(value['wall_s'])} | {_cell(value['cpu_s'])} | "
            f"{value['peak_rss_mb']['median']:.0f} | {job_cell} | {lines_cell} |"
        )
    for after, checked in summary.get("catalog_check", {}).items():
        print(f"\nAfter {after}: {checked['message']}")
        for row in checked["differ"]:
            print(f"  {row}")
    if "bare Snakemake no-op" not in summary["results"]:
        return  # --catalog-only: no contenders to compare
    print("\n| target (ratio of medians) | measured | limit | met |")
    print("|---|---:|---:|:-:|")
    for label, measured, limit in ratios(summary):
        met = measured >= limit if "cores busy" in label else measured <= limit
        print(f"| {label} | {measured:.2f} | {limit:.2f} | {'yes' if met else 'no'} |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument(
        "--catalog-only",
        action="store_true",
        help="dcmsort's copy and its 1%% rerun only, once, each with the catalogue check",
    )
    parser.add_argument("--check-catalog", type=Path, help=argparse.SUPPRESS)  # catalog_checked
    args = parser.parse_args()
    if args.check_catalog:
        print(json.dumps(check_catalog(args.check_catalog)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in args.shape or ["large", "many"]:
        if shape == "tables":
            summary = run_tables_shape(args.out, args.repeat)
            (args.out / f"{shape}.json").write_text(json.dumps(summary, indent=2))
            print_tables_table(summary)
            continue
        if shape == "pandas":
            summary = run_pandas_shape(args.out, args.repeat)
            (args.out / f"{shape}.json").write_text(json.dumps(summary, indent=2))
            print_pandas_table(summary)
            continue
        if shape == "archives":
            summary = run_archives_shape(args.out, args.cores, args.repeat)
            (args.out / f"{shape}.json").write_text(json.dumps(summary, indent=2))
            print_archives_table(summary)
            continue
        if shape == "plan10m":
            summary = run_planning_shape(args.out)
            (args.out / f"{shape}.json").write_text(json.dumps(summary, indent=2))
            print_planning_table(summary)
            continue
        summary = run_shape(shape, args.out, args.cores, args.repeat, args.catalog_only)
        (args.out / f"{shape}.json").write_text(json.dumps(summary, indent=2))
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
