"""Decide every destination: the one stage that sees all files at once.

``make_plan`` is a pure function of (manifests, earlier placements, naming settings,
digests of duplicate candidates). For every input file it decides one action:

- ``sort``: copy (or link) to ``destination``;
- ``duplicate``: the same SOPInstanceUID and the same bytes as a file already sorted, so
  nothing is written; ``destination`` names the copy that holds its content;
- ``skip``: not a sortable DICOM file; ``reason`` says why.

Rules it keeps (and the tests guard): a decision once made is kept (the registry of earlier
placements is read first, so a file never moves and a series keeps its folder); two series
never share a folder when ``keep_series_apart``; two files never share a name; a name that
already exists in the output folder is never reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from dcmsort import inventory, naming
from dcmsort.fileops import atomic_path, file_digest
from dcmsort.naming import Naming
from dcmsort.settings import ConfigError, check_layout

log = logging.getLogger("dcmsort.plan")

SORT, DUPLICATE, SKIP = "sort", "duplicate", "skip"
SOURCE_KEY = ["relpath", "size", "mtime_ns"]
REGISTRY_COLUMNS = [
    *SOURCE_KEY,
    "action",
    "destination",
    "base_folder",
    "series_uid",
    "sop_uid",
    "digest",
]
# Tags carried into the plan for the report (and for people reading plan.csv).
PLAN_TAGS = [
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "SOPInstanceUID",
]
PLAN_COLUMNS = [
    "folder",
    *SOURCE_KEY,
    "action",
    "destination",
    "reason",
    "conflict",
    "new",
    *PLAN_TAGS,
]


def empty_registry() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in REGISTRY_COLUMNS}).astype(
        {"size": "int64", "mtime_ns": "int64"}
    )


def _value(row: Mapping, key: str) -> str:
    value = row.get(key)
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _file_values(row: Mapping) -> dict[str, str]:
    """A row's text values for a template (missing tags are absent, not NaN)."""
    values = {k: v for k, v in row.items() if isinstance(v, str)}
    values["filename"] = inventory.file_name(row["relpath"])
    values["input_folder"] = inventory.decode_name(row["folder"])
    return values


def _key_in(frame: pd.DataFrame, keys: pd.DataFrame) -> pd.Series:
    """For each row of frame: is its (relpath, size, mtime_ns) among the rows of keys?"""
    found = frame[SOURCE_KEY].merge(
        keys[SOURCE_KEY].drop_duplicates(), on=SOURCE_KEY, how="left", indicator=True
    )
    return pd.Series(found["_merge"].to_numpy() == "both", index=frame.index)


def duplicate_candidates(
    files: pd.DataFrame, registry: pd.DataFrame
) -> tuple[list[str], list[str]]:
    """Which files need a content digest: those sharing SOPInstanceUID and size with another.

    Returns (input relpaths, output destinations); the destinations are earlier placements
    without a cached digest, hashed from the sorted copy rather than the input.
    """
    dicom = files[files["dicom"] & files["SOPInstanceUID"].notna()]
    current = dicom[~_key_in(dicom, registry)]
    placed = registry[registry["action"] == SORT]
    members = pd.concat(
        [
            pd.DataFrame(
                {
                    "sop": current["SOPInstanceUID"],
                    "size": current["size"],
                    "relpath": current["relpath"],
                    "destination": None,
                    "digest": None,
                    "new": True,
                }
            ),
            pd.DataFrame(
                {
                    "sop": placed["sop_uid"],
                    "size": placed["size"],
                    "relpath": None,
                    "destination": placed["destination"],
                    "digest": placed["digest"],
                    "new": False,
                }
            ),
        ],
        ignore_index=True,
    )
    groups = members.groupby(["sop", "size"], dropna=True)
    shared = members[(groups["sop"].transform("size") > 1) & groups["new"].transform("any")]
    sources = shared.loc[shared["new"], "relpath"].tolist()
    destinations = shared.loc[~shared["new"] & shared["digest"].isna(), "destination"].tolist()
    return sources, destinations


DUPLICATE_REASON = "identical to the file already sorted at this destination"
_ORDER = ["StudyDate", "StudyInstanceUID", "SeriesInstanceUID", "relpath"]
_CHUNK = 20_000  # rows turned into Python objects at a time (bounds memory)


def _rows_in_order(files: pd.DataFrame, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """(position, row) in planning order: by study date, study, series, path. Rows are made
    a chunk at a time, so memory holds the compact columns, not a dict per file."""
    order = files[_ORDER].sort_values(_ORDER, na_position="first", kind="stable").index.to_numpy()
    for start in range(0, len(order), _CHUNK):
        chunk = order[start : start + _CHUNK]
        values = zip(*(files[c].take(chunk).tolist() for c in columns), strict=True)
        for position, row in zip(chunk.tolist(), values, strict=True):
            yield position, dict(zip(columns, row, strict=True))


def make_plan(
    files: pd.DataFrame,
    registry: pd.DataFrame,
    settings: Naming,
    digests: Mapping[str, str] | None = None,
    occupied: Callable[[str], bool] = lambda _destination: False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (plan, registry): one plan row per file, and the updated placements.

    ``digests`` maps input relpaths (and earlier destinations) of duplicate candidates to
    content digests; ``occupied(destination)`` says whether a path in the output folder is
    already taken by something dcmsort did not place.
    """
    digests = digests or {}
    missing = [c for c in dict.fromkeys([*PLAN_TAGS, *_ORDER]) if c not in files.columns]
    # Adds columns without copying the others (pandas copy-on-write).
    files = files.reset_index(drop=True).assign(**dict.fromkeys(missing))
    # Earlier decisions, as compact tuples: this is what keeps placements stable.
    earlier: dict[tuple, tuple[str, str]] = {}
    folder_of_series: dict[tuple[str, str], str] = {}
    used_names: set[str] = set()
    # Content known for each SOPInstanceUID: (size, digest, destination) of sorted files.
    by_sop: dict[str, list[tuple[int, str | None, str]]] = {}
    for relpath, size, mtime, action, destination, base, series, sop, digest in zip(
        *(registry[c].tolist() for c in REGISTRY_COLUMNS), strict=True
    ):
        earlier[(relpath, size, mtime)] = (action, destination)
        if action != SORT:
            continue
        folder_of_series[(base, series if isinstance(series, str) else "")] = (
            destination.rpartition("/")[0]
        )
        used_names.add(destination)
        if isinstance(sop, str) and sop:
            known = digest if isinstance(digest, str) else digests.get(destination)
            by_sop.setdefault(sop, []).append((size, known, destination))
    folder_owner = {folder: key for key, folder in folder_of_series.items()}

    folder_cache: dict[tuple, str] = {}
    folder_fields = [f for f, _ in naming.template_fields(settings.folder_template)]

    def base_folder(row: Mapping) -> str:
        key = tuple(_value(row, f) for f in folder_fields)
        if key not in folder_cache:
            folder_cache[key] = naming.render_path(
                settings.folder_template, _file_values(row), settings.placeholder
            )
        return folder_cache[key]

    def assign_folder(base: str, series_uid: str) -> str:
        if not settings.keep_series_apart:
            return base
        key = (base, series_uid)
        if key not in folder_of_series:
            candidate, attempt = base, 1
            while candidate in folder_owner and folder_owner[candidate] != key:
                attempt += 1
                suffix = f"_{naming.short_hash(series_uid)}" + (
                    f"_{attempt}" if attempt > 2 else ""
                )
                head, _, leaf = base.rpartition("/")
                candidate = (head + "/" if head else "") + naming.with_suffix(leaf, suffix)
            folder_of_series[key] = candidate
            folder_owner[candidate] = key
        return folder_of_series[key]

    def assign_name(folder: str, name: str) -> str:
        destination, attempt = f"{folder}/{name}", 1
        while destination in used_names or occupied(destination):
            attempt += 1
            destination = f"{folder}/{naming.with_suffix(name, f'_{attempt}')}"
        used_names.add(destination)
        return destination

    n = len(files)
    actions: list[str | None] = [None] * n
    destinations: list[str | None] = [None] * n
    reasons: list[str | None] = [None] * n
    # Decisions of this run, one list per registry column (a dict per file costs ~1 KB).
    new_rows: dict[str, list] = {c: [] for c in REGISTRY_COLUMNS}
    template_fields = settings.fields
    columns = list(
        dict.fromkeys(
            ["folder", *SOURCE_KEY, "dicom", "skip_reason", "SOPInstanceUID", *_ORDER]
            + [c for c in files.columns if c in template_fields]
        )
    )
    for i, row in _rows_in_order(files, columns):
        decided = earlier.get((row["relpath"], row["size"], row["mtime_ns"]))
        if not row["dicom"]:
            actions[i], reasons[i] = SKIP, row["skip_reason"]
            continue
        if decided is not None:
            actions[i], destinations[i] = decided
            reasons[i] = DUPLICATE_REASON if decided[0] == DUPLICATE else None
            continue
        sop, size = _value(row, "SOPInstanceUID"), row["size"]
        digest = digests.get(row["relpath"])
        same = [m for m in by_sop.get(sop, []) if m[0] == size and digest and m[1] == digest]
        base = series_uid = None
        if sop and same:
            actions[i], destinations[i], reasons[i] = DUPLICATE, same[0][2], DUPLICATE_REASON
        else:
            base = base_folder(row)
            series_uid = _value(row, "SeriesInstanceUID")
            name = naming.render_path(
                settings.file_template, _file_values(row), settings.placeholder
            ).replace("/", "_")
            actions[i] = SORT
            destinations[i] = assign_name(assign_folder(base, series_uid), name)
            if sop:
                by_sop.setdefault(sop, []).append((size, digest, destinations[i]))
        for column, value in zip(
            REGISTRY_COLUMNS,
            (
                row["relpath"],
                size,
                row["mtime_ns"],
                actions[i],
                destinations[i],
                base,
                series_uid,
                sop or None,
                digest,
            ),
            strict=True,
        ):
            new_rows[column].append(value)

    # A conflict: one SOPInstanceUID sorted to more than one destination (different bytes).
    conflicts = [False] * n
    sorted_per_sop = {sop: {m[2] for m in ms} for sop, ms in by_sop.items() if len(ms) > 1}
    if sorted_per_sop:
        for i, sop in enumerate(files["SOPInstanceUID"].tolist()):
            if actions[i] == SORT and sop in sorted_per_sop:
                others = sorted(sorted_per_sop[sop] - {destinations[i]})
                if others:
                    conflicts[i] = True
                    reasons[i] = (
                        f"conflict: same SOPInstanceUID as {', '.join(others[:3])}"
                        f"{' …' if len(others) > 3 else ''} but different content; both kept"
                    )

    plan = files[["folder", *SOURCE_KEY, *PLAN_TAGS]].assign(
        action=actions,
        destination=destinations,
        reason=reasons,
        conflict=conflicts,
        new=~_key_in(files, registry),
    )[PLAN_COLUMNS]
    if new_rows["relpath"]:
        registry = pd.concat([registry, pd.DataFrame(new_rows)], ignore_index=True)
    known_digests = registry["destination"].map(digests)
    registry = registry.assign(
        digest=registry["digest"].where(registry["digest"].notna(), known_digests)
    )
    return plan, registry[REGISTRY_COLUMNS]


def removed_sources(files: pd.DataFrame, registry: pd.DataFrame) -> pd.DataFrame:
    """Earlier placements whose input file is gone or was replaced (their copies stay)."""
    return registry[~_key_in(registry, files) & (registry["action"] == SORT)]


# --- state kept between runs -------------------------------------------------------------


def read_manifests(paths: list[Path], settings: Naming) -> pd.DataFrame:
    """All manifest rows, sorted by path, with only the columns planning uses (memory)."""
    wanted = list(
        dict.fromkeys(
            [
                "folder",
                *SOURCE_KEY,
                "dicom",
                "skip_reason",
                *PLAN_TAGS,
                *_ORDER,
                *sorted(settings.fields),
            ]
        )
    )
    frames = [
        pd.read_parquet(p, columns=[c for c in wanted if c in pq.read_schema(p).names])
        for p in paths
    ]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in wanted[:6]})
    files = pd.concat(frames, ignore_index=True)
    return files.sort_values("relpath", kind="stable", ignore_index=True)


def read_registry(path: Path) -> pd.DataFrame:
    if not path.exists():
        return empty_registry()
    return pd.read_parquet(path)[REGISTRY_COLUMNS]


def occupied_in(output_dir: Path) -> Callable[[str], bool]:
    """Whether a destination is taken on disk; folders that do not exist yet are noted once,
    so planning into a new output folder costs one stat per folder, not one per file."""
    folder_exists: dict[str, bool] = {}

    def occupied(destination: str) -> bool:
        folder = destination.rpartition("/")[0]
        if folder not in folder_exists:
            folder_exists[folder] = (output_dir / folder).is_dir()
        return folder_exists[folder] and os.path.lexists(output_dir / destination)

    return occupied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcmsort.plan", description=__doc__)
    parser.add_argument("--manifests", type=Path, nargs="*", default=[])
    parser.add_argument("--input-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--naming", required=True, help="Naming settings as JSON")
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--plan-csv", type=Path, required=True)
    parser.add_argument("--skipped", type=Path, required=True)
    parser.add_argument(
        "--removed", type=Path, required=True, help="CSV of earlier placements whose input is gone"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    settings = Naming(**json.loads(args.naming))
    layout_file, registry_file = args.state_dir / "layout.json", args.state_dir / "registry.parquet"
    try:
        check_layout(layout_file, settings)
    except ConfigError as error:
        log.error("dcmsort: error: %s", error)
        return 2
    files = read_manifests(args.manifests, settings)
    registry = read_registry(registry_file)

    sources, destinations = duplicate_candidates(files, registry)
    digests = {s: file_digest(inventory.source_path(args.input_dir, s)) for s in sources}
    digests |= {
        d: file_digest(args.output_dir / d) for d in destinations if (args.output_dir / d).is_file()
    }
    log.info(
        "%d files in %d manifests; %d earlier placements; %d digests for duplicate checks",
        len(files),
        len(args.manifests),
        len(registry),
        len(digests),
    )

    plan, registry = make_plan(
        files,
        registry,
        settings,
        digests,
        occupied=occupied_in(args.output_dir),
    )
    gone = removed_sources(files, registry)
    # Registry first: a plan must never name a destination the registry does not reserve.
    with atomic_path(registry_file) as tmp:
        registry.to_parquet(tmp, index=False)
    with atomic_path(layout_file) as tmp:
        tmp.write_text(json.dumps(asdict(settings), indent=2))
    with atomic_path(args.plan) as tmp:
        plan.to_parquet(tmp, index=False)
    with atomic_path(args.plan_csv) as tmp:
        plan.to_csv(tmp, index=False)
    with atomic_path(args.skipped) as tmp:
        plan.loc[plan["action"] == SKIP, ["relpath", "size", "reason"]].to_csv(tmp, index=False)
    with atomic_path(args.removed) as tmp:
        gone[["relpath", "destination"]].to_csv(tmp, index=False)
    counts = plan["action"].value_counts().to_dict()
    log.info(
        "plan: %d to sort (%d new), %d duplicates, %d conflicts, %d skipped, %d sources gone",
        counts.get(SORT, 0),
        int((plan["new"] & (plan["action"] == SORT)).sum()),
        counts.get(DUPLICATE, 0),
        int(plan["conflict"].sum()),
        counts.get(SKIP, 0),
        len(gone),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
