"""Spread the plan and the transfer over P independent jobs: partitions of patient folders.

Every decision the plan makes is local to one top-level output folder (the patient folder,
with the default template) as a case-insensitive file system sees it:

- names: a folder or file name is claimed among the names of its parent folder; all
  claimants of a top-level name render to names that are equal under ``plan.fold``, so
  they have one key;
- duplicates, "present" and restored files: equal content means equal headers, so twins
  render to the same top-level folder;
- series kept apart, PatientIDs kept apart, names already on disk or in the ledger: all
  inside one top-level folder.

So files are partitioned by ``key`` = a hash of the folded top-level folder their headers
render to, and every claimant of a name meets its rivals in one job. The argument has a
hole where the top level is rendered from something other than headers (``{filename}`` or
``{input_folder}``: identical files in two input folders would be planned apart), so such a
template runs with one partition (``settings`` refuses more). What crosses partitions is
only informational (a SOPInstanceUID shared by two patients with different content is
flagged as a conflict by the report, which reads everything).

This stage (one job, after extract) writes each partition's manifest rows to one file
named by a fingerprint of its rows, ``parts/p<k>of<P>-<fingerprint>.parquet``, and the list
of current files to ``partitions-<inputs>.json`` (named by what it read). A partition
whose rows did not change keeps its file, so its plan and transfer jobs do not run again:
a rerun runs jobs only for the partitions that got new or changed files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dcmsort import inventory, ledger, naming
from dcmsort.fileops import (
    atomic_path,
    read_parquet,
    remove_other_versions,
    temp_path_for,
    with_schema,
)
from dcmsort.filters import NO_FILTERS, Filters
from dcmsort.naming import Naming
from dcmsort.plan import PLAN_TAGS, fold
from dcmsort.progress import peak_rss_mb
from dcmsort.routes import PARTS, Part, auto_partitions, parse_part
from dcmsort.transfer import pending_file, settle

log = logging.getLogger("dcmsort.partition")

_FINGERPRINT_ROWS = 100_000  # rows rendered as text at a time for the fingerprint


def key(top_folder: str) -> int:
    """The partition key of a rendered top-level folder: a 63-bit hash of its folded
    spelling, so names one file system merges have one key."""
    digest = hashlib.blake2b(fold(top_folder).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1


def keys(files: pa.Table, settings: Naming) -> pa.Array:
    """The partition key of every row (rendered once per distinct combination of the
    top level's values)."""
    template = naming.top_level(settings.folder_template)
    fields = naming.template_keywords(template)

    def column(field: str) -> list:
        if field == "filename":
            return [inventory.file_name(r) for r in files["relpath"].to_pylist()]
        if field == "input_folder":
            return [inventory.decode_name(f or "") for f in files["folder"].to_pylist()]
        if field in files.column_names:
            return files[field].to_pylist()
        return [None] * files.num_rows

    cache: dict[tuple, int] = {}
    result = []
    for values in (
        zip(*(column(f) for f in fields), strict=True) if fields else [()] * files.num_rows
    ):
        found = cache.get(values)
        if found is None:
            rendered = naming.render_path(
                template, dict(zip(fields, values, strict=True)), settings.placeholder
            )
            found = cache[values] = key(rendered)
        result.append(found)
    return pa.array(result, pa.int64())


def _fingerprint(path: Path, filters: Filters) -> str:
    """A digest of a partition's rows, independent of their order: the version key
    columns sorted, as CSV text (a byte-exact rendering of the values; Arrow buffers may
    carry padding), a slice at a time so that memory stays bounded. The filters, if any,
    are part of it: the plan applies them, so a change of filters plans again."""
    # One chunk: taking rows from a chunked table joins its chunks on every call.
    table = read_parquet(path, columns=list(ledger.SOURCE_KEY)).combine_chunks()
    order = pc.sort_indices(table, [(c, "ascending") for c in ledger.SOURCE_KEY])
    digest = hashlib.sha256()
    if filters:
        digest.update(filters.to_json().encode() + b"\n")
    no_header = pacsv.WriteOptions(include_header=False)
    for start in range(0, len(order), _FINGERPRINT_ROWS):
        sink = pa.BufferOutputStream()
        rows = table.take(order[start : start + _FINGERPRINT_ROWS])
        pacsv.write_csv(rows, sink, write_options=no_header)
        digest.update(sink.getvalue())
    return digest.hexdigest()[:16]


def slice_schema(settings: Naming, filters: Filters = NO_FILTERS) -> pa.Schema:
    """The columns a plan job reads: the version key, the tags planning, the templates
    and the filters use, and the partition key."""
    fields = [
        ("folder", pa.string()),
        *[(c, ledger.SCHEMA.field(c).type) for c in ledger.SOURCE_KEY],
        ("dicom", pa.bool_()),
    ]
    names = {name for name, _ in fields}
    keywords = sorted((settings.fields | set(filters.keywords)) - naming.FILE_FIELDS.keys())
    for tag in dict.fromkeys([*PLAN_TAGS, *keywords]):
        if tag not in names:
            fields.append((tag, pa.string()))
    return pa.schema([*fields, ("part_key", pa.int64())])


def route(
    manifests: list[Path],
    state_dir: Path,
    settings: Naming,
    partitions: int | None,
    filters: Filters = NO_FILTERS,
) -> dict:
    """Write each partition's rows (``parts/``); return the routes (partition count and
    the fingerprint of each partition's rows)."""
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in manifests)
    count = partitions or (auto_partitions(total) if naming.top_level_from_headers(settings) else 1)
    schema = slice_schema(settings, filters)
    parts = [Part(k, count) for k in range(count)]
    folder = state_dir / PARTS
    folder.mkdir(parents=True, exist_ok=True)
    temps = [temp_path_for(folder / f"{part.name}.parquet") for part in parts]
    writers = [pq.ParquetWriter(tmp, schema) for tmp in temps]
    try:
        for path in manifests:
            available = pq.read_schema(path).names
            table = read_parquet(path, columns=[c for c in schema.names if c in available])
            if "dicom" not in available:
                continue
            table = table.filter(pc.fill_null(table["dicom"], False))
            if table.num_rows == 0:
                continue
            table = with_schema(table.append_column("part_key", keys(table, settings)), schema)
            if count == 1:
                writers[0].write_table(table)
                continue
            # One stable sort by partition, then a slice per partition present: one pass,
            # not a filter of the whole batch for each of the count partitions.
            index = ledger.part_index(table["part_key"], count)
            order = pc.sort_indices(index)
            table, index = table.take(order), index.take(order)
            start = 0
            for run in pc.value_counts(index).to_pylist():  # in sorted order
                writers[run["values"]].write_table(table.slice(start, run["counts"]))
                start += run["counts"]
    finally:
        for writer in writers:
            writer.close()
    fingerprints = []
    for part, tmp in zip(parts, temps, strict=True):
        fingerprint = _fingerprint(tmp, filters)
        final = folder / f"{part.name}-{fingerprint}.parquet"
        if final.exists():
            tmp.unlink()
        else:
            tmp.rename(final)
        fingerprints.append(fingerprint)
    # Earlier rows of each partition, and of another partition count: nobody reads them.
    current = {folder / f"{p.name}-{f}.parquet" for p, f in zip(parts, fingerprints, strict=True)}
    for stale in set(folder.glob("p*of*-*.parquet")) - current:
        stale.unlink(missing_ok=True)
    return {"partitions": count, "fingerprints": fingerprints}


def settle_other_partitionings(
    state_dir: Path, input_dir: Path, output_dir: Path, mode: str, count: int
) -> int:
    """Commit what killed transfers of another partition count (or of a version before
    partitions) had placed: no job of this run will look at their pending plans."""
    settled = 0
    earlier = [(None, pending_file(state_dir))] + [
        (parse_part(path.stem.removeprefix("pending-")), path)
        for path in sorted(state_dir.glob("plan/pending-*.parquet"))
    ]
    for part, pending in earlier:
        if part is not None and part.count == count:
            continue
        if pending.exists():
            settled += settle(pending, input_dir, output_dir, state_dir, mode, part)
            pending.unlink(missing_ok=True)
    return settled


def partition(
    manifests: list[Path],
    state_dir: Path,
    input_dir: Path,
    output_dir: Path,
    settings: Naming,
    partitions: int | None,
    filters: Filters,
    mode: str,
) -> dict:
    """The stage's work, routes aside: each partition's rows written, what killed transfers
    of another partition count placed committed, manifests of another batch count removed.
    Run by the partition job, or by the plan job itself when a run has one partition (no
    partition job then: ``workflow/rules/common.smk``, ``partition_count``)."""
    if manifests:  # a batch count no longer used leaves manifests nobody reads
        for stale in set(manifests[0].parent.glob("batch-*.parquet")) - set(manifests):
            stale.unlink()
    routes = route(manifests, state_dir, settings, partitions, filters)
    settled = settle_other_partitionings(
        state_dir, input_dir, output_dir, mode, routes["partitions"]
    )
    if settled:
        log.info("committed %d files a killed transfer had placed", settled)
    return routes


def write_routes(routes: dict, routes_file: Path) -> None:
    """The routes for later runs' readers (``routes.current``); earlier ones removed."""
    with atomic_path(routes_file) as tmp:
        tmp.write_text(json.dumps(routes, indent=1))
    remove_other_versions(routes_file, "partitions")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcmsort.partition", description=__doc__)
    parser.add_argument("--manifests", type=Path, nargs="*", default=[])
    parser.add_argument("--input-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--naming", required=True, help="Naming settings as JSON")
    parser.add_argument("--filters", default="{}", help="include and exclude rules as JSON")
    parser.add_argument("--partitions", default="auto")
    parser.add_argument("--mode", default="copy", help="transfer_mode (to settle a killed one)")
    parser.add_argument("--routes", type=Path, required=True)
    parser.add_argument("--log", type=Path, help="this job's log (earlier ones are removed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    routes = partition(
        args.manifests,
        args.state_dir,
        args.input_dir,
        args.output_dir,
        Naming(**json.loads(args.naming)),
        None if args.partitions == "auto" else int(args.partitions),
        Filters.from_json(args.filters),
        args.mode,
    )
    write_routes(routes, args.routes)
    if args.log:
        remove_other_versions(args.log, "partition")
    log.info(
        "partitions: %d (%s); %.2f s, peak RSS %d MB",
        routes["partitions"],
        args.partitions,
        time.perf_counter() - started,
        peak_rss_mb(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
