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
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from dcmsort import naming
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
    values["filename"] = row["relpath"].rsplit("/", 1)[-1]
    values["input_folder"] = row["folder"]
    return values


def _source_keys(frame: pd.DataFrame) -> set[tuple]:
    return set(frame[SOURCE_KEY].itertuples(index=False, name=None))


def _key_in(frame: pd.DataFrame, keys: set[tuple]) -> pd.Series:
    """For each row of frame: is its (relpath, size, mtime_ns) one of keys?"""
    return pd.Series(
        [k in keys for k in frame[SOURCE_KEY].itertuples(index=False, name=None)],
        index=frame.index,
        dtype=bool,
    )


def duplicate_candidates(
    files: pd.DataFrame, registry: pd.DataFrame
) -> tuple[list[str], list[str]]:
    """Which files need a content digest: those sharing SOPInstanceUID and size with another.

    Returns (input relpaths, output destinations); the destinations are earlier placements
    without a cached digest, hashed from the sorted copy rather than the input.
    """
    dicom = files[files["dicom"] & files["SOPInstanceUID"].notna()]
    current = dicom[~_key_in(dicom, _source_keys(registry))]
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
    registry = registry.copy()
    by_key = {(r["relpath"], r["size"], r["mtime_ns"]): r for r in registry.to_dict("records")}
    folder_of_series = {
        (r["base_folder"], r["series_uid"] or ""): os.path.dirname(r["destination"])
        for r in by_key.values()
        if r["action"] == SORT
    }
    folder_owner = {folder: key for key, folder in folder_of_series.items()}
    used_names = {r["destination"] for r in by_key.values() if r["action"] == SORT}
    # Content known for each SOPInstanceUID: (size, digest, destination, relpath) of sorted files.
    by_sop: dict[str, list[tuple[int, str | None, str, str | None]]] = {}
    for r in by_key.values():
        if r["action"] == SORT and r["sop_uid"]:
            digest = r["digest"] if isinstance(r["digest"], str) else digests.get(r["destination"])
            by_sop.setdefault(r["sop_uid"], []).append((r["size"], digest, r["destination"], None))

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

    rows = files.to_dict("records")
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            _value(rows[i], "StudyDate"),
            _value(rows[i], "StudyInstanceUID"),
            _value(rows[i], "SeriesInstanceUID"),
            rows[i]["relpath"],
        ),
    )
    plan_rows: list[dict] = [{}] * len(rows)
    new_registry_rows = []
    for i in order:
        row = rows[i]
        out = {c: row.get(c) for c in ["folder", *SOURCE_KEY, *PLAN_TAGS]}
        out.update(destination=None, reason=None, conflict=False)
        key = (row["relpath"], row["size"], row["mtime_ns"])
        earlier = by_key.get(key)
        out["new"] = earlier is None
        if not row["dicom"]:
            out.update(action=SKIP, reason=row["skip_reason"])
        elif earlier is not None:
            out.update(action=earlier["action"], destination=earlier["destination"])
            if earlier["action"] == DUPLICATE:
                out["reason"] = "identical to the file already sorted at this destination"
        else:
            sop, size = _value(row, "SOPInstanceUID"), row["size"]
            digest = digests.get(row["relpath"])
            same = [m for m in by_sop.get(sop, []) if m[0] == size and digest and m[1] == digest]
            if sop and same:
                out.update(
                    action=DUPLICATE,
                    destination=same[0][2],
                    reason="identical to the file already sorted at this destination",
                )
            else:
                base = base_folder(row)
                series_uid = _value(row, "SeriesInstanceUID")
                folder = assign_folder(base, series_uid)
                name = naming.render_path(
                    settings.file_template, _file_values(row), settings.placeholder
                ).replace("/", "_")
                destination = assign_name(folder, name)
                out.update(action=SORT, destination=destination)
                if sop:
                    by_sop.setdefault(sop, []).append((size, digest, destination, row["relpath"]))
                new_registry_rows.append(
                    {
                        **{k: row[k] for k in SOURCE_KEY},
                        "action": SORT,
                        "destination": destination,
                        "base_folder": base,
                        "series_uid": series_uid,
                        "sop_uid": sop or None,
                        "digest": digest,
                    }
                )
            if out["action"] == DUPLICATE:
                new_registry_rows.append(
                    {
                        **{k: row[k] for k in SOURCE_KEY},
                        "action": DUPLICATE,
                        "destination": out["destination"],
                        "base_folder": None,
                        "series_uid": None,
                        "sop_uid": sop or None,
                        "digest": digest,
                    }
                )
        plan_rows[i] = out

    # A conflict: one SOPInstanceUID sorted to more than one destination (different bytes).
    sorted_per_sop = {sop: {m[2] for m in members} for sop, members in by_sop.items()}
    for out in plan_rows:
        sop = _value(out, "SOPInstanceUID")
        if out["action"] == SORT and sop and len(sorted_per_sop.get(sop, ())) > 1:
            others = sorted(sorted_per_sop[sop] - {out["destination"]})
            out["conflict"] = True
            out["reason"] = (
                f"conflict: same SOPInstanceUID as {', '.join(others[:3])}"
                f"{' …' if len(others) > 3 else ''} but different content; both kept"
            )

    plan = pd.DataFrame(plan_rows, columns=PLAN_COLUMNS)
    if new_registry_rows:
        registry = pd.concat([registry, pd.DataFrame(new_registry_rows)], ignore_index=True)
    known_digests = registry["destination"].map(digests)
    registry["digest"] = registry["digest"].where(registry["digest"].notna(), known_digests)
    return plan, registry[REGISTRY_COLUMNS]


def removed_sources(files: pd.DataFrame, registry: pd.DataFrame) -> pd.DataFrame:
    """Earlier placements whose input file is gone or was replaced (their copies stay)."""
    return registry[~_key_in(registry, _source_keys(files)) & (registry["action"] == SORT)]


# --- state kept between runs -------------------------------------------------------------


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
    frames = [pd.read_parquet(m) for m in args.manifests]
    files = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["folder", *SOURCE_KEY, "dicom", "skip_reason", "SOPInstanceUID"])
    )
    files = files.sort_values("relpath", kind="stable", ignore_index=True)
    registry = read_registry(registry_file)

    sources, destinations = duplicate_candidates(files, registry)
    digests = {s: file_digest(args.input_dir / s) for s in sources}
    digests |= {
        d: file_digest(args.output_dir / d) for d in destinations if (args.output_dir / d).is_file()
    }
    log.info(
        "%d files in %d manifests; %d earlier placements; %d digests for duplicate checks",
        len(files),
        len(frames),
        len(registry),
        len(digests),
    )

    plan, registry = make_plan(
        files,
        registry,
        settings,
        digests,
        occupied=lambda destination: os.path.lexists(args.output_dir / destination),
    )
    gone = removed_sources(files, registry)
    # Registry first: a plan must never name a destination the registry does not reserve.
    with atomic_path(registry_file) as tmp:
        registry.to_parquet(tmp, index=False)
    with atomic_path(layout_file) as tmp:
        tmp.write_text(json.dumps(asdict(settings), indent=2))
    plan.attrs = {}
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
