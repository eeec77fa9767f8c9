"""Decide where each new input file goes: the one stage that sees all files at once.

The plan is a pure function of (manifests, ledger, naming settings) plus two windows on
the world, asked only when a decision needs them: the content digest of a file, and the
names already present in an output folder. It looks only at *new* file versions, those
whose (relpath, size, mtime, ctime, inode) the ledger does not hold (a columnar anti-join,
no Python per known file), and gives each one action:

- ``sort``: write (copy or link) to ``destination``, a name nobody holds;
- ``present``: its content is already at ``destination`` (a touched or renamed input, or a
  copy made by a run killed before it could commit); nothing is written, the transfer
  confirms it is there and commits it;
- ``relink``: its content is that of a symbolic link dcmsort made to another input path
  that holds it no more (the input was renamed or moved): the link at ``destination`` is
  pointed at this file instead (``previous_relpath``: where it points now);
- ``duplicate``: its content is at ``destination`` for another current input; nothing is
  written;
- ``restore``: its content is that of a placement whose file was removed from the output
  by hand while another current input holds it: the file is written back to
  ``destination`` and this input is recorded as that placement's duplicate.

Content identity is (size, digest), never (size, mtime): a digest is computed only for a
file that shares size (and SOPInstanceUID, when it has one) with another, or whose name is
taken on disk by a file of its size. A duplicate is resolved only against a placement the
ledger holds or a file sorted in the same plan; the transfer commits a duplicate only once
its target is committed. Names are unique under ``naming.fold`` (case and Unicode
normalisation as every target file system compares them), and never reuse a name present
in the output folder or in the ledger. A patient folder (the template's first level with
``{PatientID}``) holds one PatientID: another ID whose folder name is the same one gets
``_<hash of its ID>``, as a second series does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcmsort import archives, inventory, ledger, naming, routes
from dcmsort.fileops import atomic_path, file_digest, read_parquet, remove_other_versions
from dcmsort.filters import NO_FILTERS, Filters
from dcmsort.naming import Naming, fold
from dcmsort.progress import Progress, peak_rss_mb
from dcmsort.routes import parse_part
from dcmsort.settings import ConfigError, check_layout, layout_record
from dcmsort.transfer import pending_file, settle, with_temp_token

log = logging.getLogger("dcmsort.plan")

SORT, PRESENT, DUPLICATE, RESTORE, RELINK = "sort", "present", "duplicate", "restore", "relink"
SOURCE_KEY = ledger.SOURCE_KEY
# Tags carried into the plan (for the ledger, the report and people reading plan.csv).
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
_ORDER = ["StudyDate", "StudyInstanceUID", "SeriesInstanceUID"]
PLAN_SCHEMA = pa.schema(
    [
        ("folder", pa.string()),
        ("relpath", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("ctime_ns", pa.int64()),
        ("ino", pa.uint64()),
        ("action", pa.string()),
        ("destination", pa.string()),
        # True when destination's content is committed in the ledger (a duplicate or present
        # row may name a file placed earlier in this same plan, which must succeed first).
        ("committed", pa.bool_()),
        ("digest", pa.string()),
        ("base_folder", pa.string()),
        ("conflict", pa.bool_()),
        ("reason", pa.string()),
        # relink: the input path dcmsort's link at destination points to now.
        ("previous_relpath", pa.string()),
        *[(tag, pa.string()) for tag in PLAN_TAGS],
        ("part_key", pa.int64()),  # partition.key of the row's patient folder
    ]
)
# What Planner.decide returns for each row; the other plan columns are the row's own.
DECISIONS = ("action", "destination", "committed", "digest", "base_folder", "conflict", "reason")
DECISIONS += ("previous_relpath",)
DECISION_SCHEMA = pa.schema([PLAN_SCHEMA.field(name) for name in DECISIONS])
DUPLICATE_REASON = "identical to the file already sorted at this destination"
PRESENT_REASON = "its content is already at this destination"
RELINK_REASON = "its content is at this destination, by a link to its earlier path: re-pointed"
_CHUNK = 5_000  # new rows turned into Python values at a time (bounds memory)
# The plan job's output inside the ledger folder, named by the workflow's target: a ledger
# removed or emptied by hand takes it along, so the next run plans every file again (each
# found on disk by content) instead of saying "nothing new" with an empty ledger.
LEDGER_MARKER = (
    "The last plan was made against this ledger. Removing the ledger removes this file too;\n"
    "the next run then plans every input file again and finds the sorted ones by content.\n"
)
# A new row's PatientID as a patient folder compares it (ledger.patient_ids).
PATIENT_ID = "_patient_id"
# What a series folder belongs to: (fold of the rendered base folder, SeriesInstanceUID or
# "" when series may share, PatientID or "" when the template names no patient folder).
# A placement made before the ledger kept PatientIDs has None: any patient's.
SeriesKey = tuple[str, str, "str | None"]


# --- the world outside, asked only when needed ----------------------------------------


class Disk:
    """What the output folder holds, seen without following any link. One listing per
    folder asked about; a folder reached through a link or a file counts as absent."""

    DIR, FILE, OTHER = "dir", "file", "other"

    def __init__(self, root: Path):
        self.root = Path(root)
        self._children: dict[str, dict[str, tuple[str, str]]] = {}

    def children(self, folder: str) -> dict[str, tuple[str, str]]:
        """fold(name) -> (name, kind) of everything in folder ("" is the output folder)."""
        if folder not in self._children:
            found: dict[str, tuple[str, str]] = {}
            parent = folder.rpartition("/")[0] if folder else None
            reachable = folder == "" or (
                self.children(parent).get(fold(folder.rpartition("/")[2]), ("", ""))[1] == self.DIR
            )
            if reachable:
                try:
                    with os.scandir(self.root / folder) as entries:
                        for entry in entries:
                            if entry.is_dir(follow_symlinks=False):
                                kind = self.DIR
                            elif entry.is_file(follow_symlinks=False):
                                kind = self.FILE
                            else:
                                kind = self.OTHER
                            found.setdefault(fold(entry.name), (entry.name, kind))
                except (FileNotFoundError, NotADirectoryError):
                    pass
            self._children[folder] = found
        return self._children[folder]

    def holds(self, path: str) -> bool:
        """Is anything at path (a file or a link), reached through real folders only?"""
        folder, _, name = path.rpartition("/")
        held = self.children(folder).get(fold(name))
        return held is not None and held[0] == name

    def size(self, path: str) -> int | None:
        try:
            info = os.lstat(self.root / path)
        except OSError:
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def digest(self, path: str) -> str | None:
        try:
            return file_digest(self.root / path)
        except OSError:
            return None


@dataclass
class Content:
    """A file content the output holds, or will hold once this plan is carried out."""

    destination: str
    size: int
    digest: str | None
    sop: str | None
    committed: bool  # in the ledger
    live: bool  # some current input file has this content
    source: str | None = None  # the input it comes from, when planned in this run
    # The input path dcmsort's symbolic link at destination points to, if it is one.
    link_source: str | None = None


class ContentIndex:
    """Contents by (SOPInstanceUID or "", size), to find a new file's twin by digest.

    Holds every earlier placement it is given (the few that could matter), but a new file
    only when another new file shares its (SOPInstanceUID, size) or its SOPInstanceUID
    (``repeated``): most files have no twin, and a first run must not keep all of them.
    """

    def __init__(
        self,
        digest_of_output: Callable[[str], str | None],
        digest_of_input: Callable[[str], str | None],
        repeated: tuple[set[tuple[str, int]], set[str]] = (set(), set()),
    ):
        self._by_key: dict[tuple[str, int], list[Content]] = {}
        self._by_sop: dict[str, set[str]] = {}
        self._digest_of_output = digest_of_output
        self._digest_of_input = digest_of_input
        self._repeated_keys, self._repeated_sops = repeated

    def add(self, content: Content) -> None:
        key = (content.sop or "", content.size)
        if content.committed or key in self._by_key or key in self._repeated_keys:
            self._by_key.setdefault(key, []).append(content)
        if content.sop and (
            content.committed or content.sop in self._by_sop or content.sop in self._repeated_sops
        ):
            self._by_sop.setdefault(content.sop, set()).add(content.destination)

    def candidates(self, sop: str | None, size: int) -> list[Content]:
        return self._by_key.get((sop or "", size), [])

    def twin(self, sop: str | None, size: int, digest: str) -> Content | None:
        """The content equal to (size, digest), hashing earlier placements when needed."""
        for content in self.candidates(sop, size):
            if content.digest is None:
                # A file planned in this run is not in the output yet: hash its input.
                content.digest = (
                    self._digest_of_input(content.source)
                    if content.source
                    else self._digest_of_output(content.destination)
                )
            if content.digest == digest:
                return content
        return None

    def other_destinations(self, sop: str | None, destination: str) -> list[str]:
        """Where else a file with this SOPInstanceUID lies (different content: a conflict)."""
        return sorted(self._by_sop.get(sop, set()) - {destination}) if sop else []


@dataclass
class Names:
    """Names taken in the output folder, compared case-insensitively: on disk, in the
    ledger and in this plan. Folders are reused in the spelling first seen."""

    disk: Disk
    ledger_names: Callable[[str], set[str]]
    _taken: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    _next_suffix: dict[tuple[str, str], int] = field(default_factory=dict)

    def _folder(self, folder: str) -> dict[str, tuple[str, str]]:
        if folder not in self._taken:
            taken = dict(self.disk.children(folder))
            for name in self.ledger_names(folder):
                taken.setdefault(fold(name), (name, Disk.FILE))
            self._taken[folder] = taken
        return self._taken[folder]

    def folder_path(self, path: str) -> str:
        """path with each folder component resolved: an existing folder is reused in its
        own spelling; a name held by a file, a link or anything else is taken, so the
        component gets ``_2``, ``_3``, ... (a link is never followed, a file never
        replaced)."""
        resolved = ""
        for component in path.split("/"):
            taken = self._folder(resolved)
            candidate, attempt = component, 1
            while True:
                held = taken.get(fold(candidate))
                if held is None:
                    taken[fold(candidate)] = (candidate, Disk.DIR)
                    break
                if held[1] == Disk.DIR:
                    candidate = held[0]
                    break
                attempt += 1
                candidate = naming.with_suffix(component, f"_{attempt}")
            resolved = f"{resolved}/{candidate}" if resolved else candidate
        return resolved

    def claim_file(self, folder: str, name: str, adopt: Callable[[str], bool]) -> tuple[str, bool]:
        """A free name for a file in folder, or a held one whose file ``adopt`` accepts
        (already holds this content). Returns (destination, adopted). Linear in the names
        tried: a per-(folder, name) counter remembers where the last search stopped."""
        taken = self._folder(folder)
        attempt = self._next_suffix.get((folder, name), 1)
        candidate = name if attempt == 1 else naming.with_suffix(name, f"_{attempt}")
        while True:
            destination = f"{folder}/{candidate}"
            held = taken.get(fold(candidate))
            if held is None:
                taken[fold(candidate)] = (candidate, Disk.FILE)
                self._next_suffix[(folder, name)] = attempt
                return destination, False
            if held[1] == Disk.FILE and held[0] == candidate and adopt(destination):
                taken[fold(candidate)] = (candidate, "claimed")
                return destination, True
            attempt += 1
            candidate = naming.with_suffix(name, f"_{attempt}")


# --- reading the ledger for the new rows only ---------------------------------------------


def new_files(files: pa.Table, committed: pa.Table) -> pa.Table:
    """Sortable files whose version (ledger.SOURCE_KEY) the ledger does not hold."""
    dicom = files.filter(pc.fill_null(files["dicom"], False))
    return ledger.rows_by_key(dicom, committed, keep="missing")


# The new files the filters leave out, as the report lists them: version and rule.
EXCLUDED_SCHEMA = pa.schema(
    [*(ledger.SCHEMA.field(name) for name in SOURCE_KEY), ("reason", pa.string())]
)


def leave_out(
    files: pa.Table,
    committed: pa.Table,
    filters: Filters,
    digests: tuple[Callable[[str], str | None], Callable[[str], str | None]] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(files without the new ones the filters leave out, those left out: EXCLUDED_SCHEMA).
    Only new files (not in the ledger) are filtered: a file placed earlier stays placed
    and counted, whatever the filters say now. A file left out is never in the ledger, so
    every plan of its partition meets it as new again: the list is always complete, and a
    file a later change of filters includes is planned like any new file.

    ``digests`` (of an input relpath, of an output destination): a new file version that
    holds the content of a placement (a placed file renamed, touched or copied) is that
    placement's (present, relinked or a duplicate), not left out, so the placement is not
    "gone"; only files with a placement of their SOPInstanceUID and size are read."""
    if not filters:
        return files, EXCLUDED_SCHEMA.empty_table()
    new = new_files(files, committed)
    reasons = filters.reasons(new)
    if digests is not None:
        reasons = _unless_placed(new, reasons, committed, *digests)
    left_out = new.filter(pc.is_valid(reasons))
    excluded = pa.table(
        {
            **{name: left_out[name] for name in SOURCE_KEY},
            "reason": reasons.filter(pc.is_valid(reasons)),
        },
        schema=EXCLUDED_SCHEMA,
    )
    return ledger.rows_by_key(files, excluded, keep="missing"), excluded


def _unless_placed(
    new: pa.Table,
    reasons: pa.Array,
    committed: pa.Table,
    digest_of_input: Callable[[str], str | None],
    digest_of_output: Callable[[str], str | None],
) -> pa.Array:
    """reasons, without those of files whose content a placement holds."""
    if committed.num_rows == 0 or not pc.any(pc.is_valid(reasons)).as_py():
        return reasons
    placed = committed.filter(pc.equal(committed["status"], ledger.PLACED))
    sop = pc.fill_null(placed["sop_uid"].cast(pa.string()), "")
    twins: dict[tuple[str, int], dict[str, str | None]] = {}
    keys = set(
        zip(
            pc.fill_null(new["SOPInstanceUID"].cast(pa.string()), "").to_pylist(),
            new["size"].to_pylist(),
            strict=True,
        )
    )
    for key, destination, digest in zip(
        zip(sop.to_pylist(), placed["size"].to_pylist(), strict=True),
        placed["destination"].to_pylist(),
        placed["digest"].to_pylist(),
        strict=True,
    ):
        if key in keys:
            known = twins.setdefault(key, {})
            known[destination] = known.get(destination) or digest
    if not twins:
        return reasons
    found = reasons.to_pylist()
    for index, (reason, relpath, sop_uid, size) in enumerate(
        zip(
            found,
            new["relpath"].to_pylist(),
            new["SOPInstanceUID"].to_pylist(),
            new["size"].to_pylist(),
            strict=True,
        )
    ):
        candidates = twins.get((sop_uid or "", size)) if reason is not None else None
        if not candidates:
            continue
        digest = digest_of_input(relpath)
        if digest is not None and any(
            (known or digest_of_output(destination)) == digest
            for destination, known in candidates.items()
        ):
            found[index] = None
    return pa.array(found, pa.string())


def _parent(destinations: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.replace_substring_regex(destinations, pattern=r"/[^/]*$", replacement="")


def known_contents(committed: pa.Table, files: pa.Table, new: pa.Table) -> list[Content]:
    """Placements that could be a new file's twin (same SOPInstanceUID or, without one,
    same size) or share its SOPInstanceUID (a conflict): filtered columnar, so the Python
    work grows with the new files."""
    if committed.num_rows == 0 or new.num_rows == 0:
        return []
    sops = pc.unique(new["SOPInstanceUID"].drop_null())
    sizes_without_sop = pc.unique(new.filter(pc.is_null(new["SOPInstanceUID"]))["size"])
    wanted = pc.or_(
        pc.is_in(committed["sop_uid"], value_set=sops),
        pc.and_(
            pc.is_null(committed["sop_uid"]),
            pc.is_in(committed["size"], value_set=sizes_without_sop),
        ),
    )
    rows = committed.filter(pc.fill_null(wanted, False))
    # A placement is held by a current input only through a placed row: one whose file
    # was touched or renamed is taken over by its new version (present), even when a
    # current duplicate points to it.
    current = ledger.live(rows, files)
    placed = current.filter(pc.equal(current["status"], ledger.PLACED))
    live = set(placed["destination"].to_pylist())
    contents: dict[str, Content] = {}
    for row in rows.to_pylist():
        destination = row["destination"]
        content = contents.get(destination)
        if content is None and row["status"] == ledger.PLACED:
            content = contents[destination] = Content(
                destination, row["size"], None, row["sop_uid"], True, destination in live
            )
        if content is not None and content.digest is None:
            content.digest = row["digest"]
        # A link points to the input of its newest placed row (a relink's, or a touched
        # input's): a placement linked once is a link (the transfer checks what is there).
        linked = row["mode"] == "symlink" or (content and content.link_source is not None)
        if content is not None and row["status"] == ledger.PLACED and linked:
            content.link_source = row["relpath"]
    return list(contents.values())


def _series_keys(rows: pa.Table, settings: Naming) -> list[tuple[SeriesKey, str]]:
    """(SeriesKey, series folder) of each distinct series folder placement in rows."""
    level = naming.patient_level(settings.folder_template)
    none = pa.nulls(len(rows), pa.string())
    distinct = (
        pa.table(
            {
                "base": rows["base_folder"],
                "series": rows["series_uid"] if settings.keep_series_apart else none,
                "patient": rows["patient_id"] if level is not None else none,
                "folder": _parent(rows["destination"]),
            }
        )
        .group_by(["base", "series", "patient", "folder"], use_threads=False)
        .aggregate([])
        .to_pylist()
    )
    return [
        (
            (fold(r["base"] or ""), r["series"] or "", r["patient"] if level is not None else ""),
            r["folder"],
        )
        for r in distinct
    ]


def series_folders(committed: pa.Table, new: pa.Table, settings: Naming) -> dict[SeriesKey, str]:
    """SeriesKey -> series folder, of earlier placements of the series the new files
    belong to (the Python work grows with those series, not with the ledger): a series
    keeps its folder for good, whatever the case of the values that name it."""
    if committed.num_rows == 0 or new.num_rows == 0:
        return {}
    rows = committed
    if settings.keep_series_apart:
        uids = pc.unique(new["SeriesInstanceUID"])
        rows = committed.filter(pc.fill_null(pc.is_in(committed["series_uid"], uids), False))
    return dict(_series_keys(rows, settings))


def folder_owners(
    committed: pa.Table, parents: pa.Array, settings: Naming
) -> Callable[[list[str]], dict[str, SeriesKey]]:
    """A lookup: series folder -> the SeriesKey that owns it."""

    def owners(folders: list[str]) -> dict[str, SeriesKey]:
        if not folders or committed.num_rows == 0:
            return {}
        rows = committed.filter(pc.is_in(parents, value_set=pa.array(folders)))
        return {folder: key for key, folder in _series_keys(rows, settings)}

    return owners


def patient_owners(
    committed: pa.Table, parents: pa.Array, level: int | None
) -> dict[str, set[str | None]]:
    """fold(patient folder) -> the PatientIDs placed in it (None: placed before the ledger
    kept them), found columnar: one row per distinct (series folder, PatientID)."""
    if level is None or committed.num_rows == 0:
        return {}
    pairs = (
        pa.table({"folder": parents, "patient": committed["patient_id"]})
        .group_by(["folder", "patient"], use_threads=False)
        .aggregate([])
    )
    owners: dict[str, set[str | None]] = {}
    for folder, patient in zip(
        pairs["folder"].to_pylist(), pairs["patient"].to_pylist(), strict=True
    ):
        patient_folder = "/".join(folder.split("/")[: level + 1])
        owners.setdefault(fold(patient_folder), set()).add(patient)
    return owners


def ledger_file_names(committed: pa.Table, parents: pa.Array) -> Callable[[str], set[str]]:
    """A lookup: folder -> names of files the ledger placed in it (one vectorised filter
    per folder asked about; folders are asked about once)."""
    if committed.num_rows == 0:
        return lambda _folder: set()
    destinations = committed["destination"]

    def names(folder: str) -> set[str]:
        inside = destinations.filter(pc.equal(parents, folder)).to_pylist()
        return {d.rpartition("/")[2] for d in inside}

    return names


# --- naming the new rows ---------------------------------------------------------------


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


class Renderer:
    """Template rendering with a cache per distinct tuple of template values."""

    def __init__(self, settings: Naming):
        self.settings = settings
        self._folder_fields = naming.template_keywords(settings.folder_template)
        self._file_fields = naming.template_keywords(settings.file_template)
        self._cache: dict[tuple, str] = {}

    @staticmethod
    def values(row: dict, fields: list[str]) -> dict[str, str]:
        """The template values of one row: only its fields, each found once."""
        values = {}
        for field_name in fields:
            if field_name == "filename":
                values[field_name] = inventory.file_name(row["relpath"])
            elif field_name == "input_folder":
                values[field_name] = inventory.decode_name(row.get("folder") or "")
            elif isinstance(value := row.get(field_name), str):
                values[field_name] = value
        return values

    def base_folder(self, row: dict) -> str:
        key = tuple(
            inventory.file_name(row["relpath"])
            if f == "filename"
            else _text(row.get(f) if f != "input_folder" else row["folder"])
            for f in self._folder_fields
        )
        if key not in self._cache:
            self._cache[key] = naming.render_path(
                self.settings.folder_template,
                self.values(row, self._folder_fields),
                self.settings.placeholder,
            )
        return self._cache[key]

    def file_name(self, row: dict) -> str:
        rendered = naming.render_path(
            self.settings.file_template,
            self.values(row, self._file_fields),
            self.settings.placeholder,
        )
        return rendered.replace("/", "_")


def _planning_order(new: pa.Table) -> pa.Array:
    """Row numbers of the new rows in planning order: by study date, study, series, then
    the file a person would keep of two identical ones (the shorter file name, then path
    order): ``IM1.dcm`` before ``copy_of_IM1.dcm`` and ``IM1 (2).dcm``."""
    names = pc.replace_substring_regex(new["relpath"], pattern=r"^.*/", replacement="")
    keyed = new.append_column("_name_length", pc.utf8_length(names)).append_column("_name", names)
    return pc.sort_indices(
        keyed,
        sort_keys=[
            (c, "ascending", "at_start") for c in [*_ORDER, "_name_length", "_name", "relpath"]
        ],
    )


@dataclass
class Planner:
    """The decisions of one plan, made row by row over the new files only."""

    settings: Naming
    renderer: Renderer
    names: Names
    contents: ContentIndex
    folder_of_series: dict[SeriesKey, str]
    owner_of_folder: Callable[[list[str]], dict[str, SeriesKey]]
    # fold(patient folder) -> its PatientIDs (patient_owners), grown by this plan's claims.
    patients_of_folder: dict[str, set[str | None]]
    digest_of_input: Callable[[str], str | None]
    disk: Disk
    # fold(patient folder) -> its PatientIDs in the whole ledger (every partition): asked
    # only about a patient folder that stands on disk and this partition's ledger does not
    # know (one another partition named, e.g. with a PatientID suffix that equals a name
    # this partition renders).
    patients_elsewhere: Callable[[str], set[str | None]] = lambda _folder: set()
    # The same for series folders: series folder -> its SeriesKey in the whole ledger,
    # asked only about a folder on disk that this partition's ledger does not know (a
    # series folder at the top level that another partition named with a UID's hash).
    owner_elsewhere: Callable[[list[str]], dict[str, SeriesKey]] = lambda _folders: {}
    _owners: dict[str, SeriesKey] = field(default_factory=dict)

    def _on_disk(self, path: str) -> bool:
        parent, _, name = path.rpartition("/")
        held = self.disk.children(parent).get(fold(name))
        return held is not None and held[1] == Disk.DIR

    def _patients_of(self, patient_path: str) -> set[str | None]:
        """The PatientIDs a patient folder holds (this plan's view, grown by its claims)."""
        folded = fold(patient_path)
        if folded not in self.patients_of_folder:
            self.patients_of_folder[folded] = (
                set(self.patients_elsewhere(folded)) if self._on_disk(patient_path) else set()
            )
        return self.patients_of_folder[folded]

    def series_folder(self, base: str, series_uid: str, patient_id: str) -> str:
        """The folder of a series: its earlier one, else base, else base + a hash of the
        series UID when another series holds base (``keep_series_apart``). Within base, the
        patient folder (``naming.patient_level``) gets a hash of the PatientID when another
        PatientID holds it."""
        level = naming.patient_level(self.settings.folder_template)
        keep_apart = self.settings.keep_series_apart
        key: SeriesKey = (
            fold(base),
            series_uid if keep_apart else "",
            patient_id if level is not None else "",
        )
        found = self.folder_of_series.get(key) or self.folder_of_series.get((*key[:2], None))
        if found is not None:
            self.folder_of_series[key] = found
            return found
        parts = base.split("/")
        patient_attempt = 1
        while True:
            named = list(parts)
            if level is not None:
                named[level] = naming.with_suffix(
                    named[level], _attempt_suffix(key[2], patient_attempt)
                )
            series_attempt = 1
            while True:
                leaf = naming.with_suffix(named[-1], _attempt_suffix(series_uid, series_attempt))
                candidate = self.names.folder_path("/".join([*named[:-1], leaf]))
                patient_folder = (
                    fold("/".join(candidate.split("/")[: level + 1])) if level is not None else ""
                )
                if level is not None and not self._patients_of(
                    "/".join(candidate.split("/")[: level + 1])
                ) <= {None, key[2]}:
                    break  # another patient's folder
                if candidate not in self._owners:
                    self._owners.update(self.owner_of_folder([candidate]))
                    if candidate not in self._owners and self._on_disk(candidate):
                        self._owners.update(self.owner_elsewhere([candidate]))
                owner = self._owners.get(candidate)
                if owner is None or _same_series(owner, key) or not keep_apart:
                    self._owners[candidate] = key
                    self.folder_of_series[key] = candidate
                    if level is not None:
                        self.patients_of_folder.setdefault(patient_folder, set()).add(key[2])
                    return candidate
                series_attempt += 1
            patient_attempt += 1

    def decide(self, row: dict) -> dict:
        """One new file's action, destination and digest."""
        sop, size, relpath = row.get("SOPInstanceUID"), row["size"], row["relpath"]
        digest = None
        if self.contents.candidates(sop, size):
            digest = self.digest_of_input(relpath)
            twin = self.contents.twin(sop, size, digest) if digest else None
            if twin is not None and twin.committed and not self.disk.holds(twin.destination):
                # The ledger's file was removed from the output: this file's bytes go back
                # there (the placement stays true); it is that placement's duplicate when a
                # current input still holds it, else its new source. Later twins are
                # duplicates of it.
                action = RESTORE if twin.live else SORT
                twin.committed, twin.live = False, True
                return {
                    "action": action,
                    "destination": twin.destination,
                    "committed": False,
                    "digest": digest,
                    "base_folder": self.renderer.base_folder(row),
                    "conflict": False,
                    "reason": "its identical copy was removed from the output: put back",
                }
            if twin is not None and not twin.live and twin.link_source not in (None, relpath):
                # dcmsort's link to an input path that holds this content no more (renamed
                # or moved): pointed here instead, no second name. Later twins are its
                # duplicates.
                previous, twin.link_source, twin.live = twin.link_source, relpath, True
                return {
                    "action": RELINK,
                    "destination": twin.destination,
                    "committed": twin.committed,
                    "digest": digest,
                    "base_folder": None,
                    "conflict": False,
                    "reason": RELINK_REASON,
                    "previous_relpath": previous,
                }
            if twin is not None:
                action = DUPLICATE if twin.live else PRESENT
                twin.live = True
                return {
                    "action": action,
                    "destination": twin.destination,
                    "committed": twin.committed,
                    "digest": digest,
                    "base_folder": None,
                    "conflict": False,
                    "reason": DUPLICATE_REASON if action == DUPLICATE else PRESENT_REASON,
                }
        base = self.renderer.base_folder(row)
        folder = self.series_folder(base, _text(row.get("SeriesInstanceUID")), row[PATIENT_ID])

        def adopt(destination: str) -> bool:
            # A name held on disk by a file of this size: ours if the bytes are (a copy
            # made by a run that was killed before it committed).
            nonlocal digest
            if self.disk.size(destination) != size:
                return False
            digest = digest or self.digest_of_input(relpath)
            return digest is not None and self.disk.digest(destination) == digest

        destination, adopted = self.names.claim_file(folder, self.renderer.file_name(row), adopt)
        self.contents.add(Content(destination, size, digest, sop, False, True, relpath))
        others = self.contents.other_destinations(sop, destination)
        reason = PRESENT_REASON if adopted else None
        if others:
            reason = (
                f"conflict: same SOPInstanceUID as {', '.join(others[:3])}"
                f"{' …' if len(others) > 3 else ''} but different content; both kept"
            )
        return {
            "action": PRESENT if adopted else SORT,
            "destination": destination,
            "committed": False,
            "digest": digest,
            "base_folder": base,
            "conflict": bool(others),
            "reason": reason,
        }


def _attempt_suffix(value: str, attempt: int) -> str:
    """What the attempt-th try at a taken folder name adds: nothing, then a hash of the
    value that must have a folder of its own (a series UID, a PatientID), then a count."""
    if attempt == 1:
        return ""
    return f"_{naming.short_hash(value)}" + (f"_{attempt}" if attempt > 2 else "")


def _same_series(owner: SeriesKey, key: SeriesKey) -> bool:
    """Is owner (of a placed series folder) the series key? A placement that predates the
    ledger's PatientIDs belongs to whichever patient has its series."""
    return owner[:2] == key[:2] and owner[2] in (None, key[2])


def make_plan(
    files: pa.Table,
    committed: pa.Table,
    settings: Naming,
    disk: Disk,
    digest_of_input: Callable[[str], str | None],
    stage: str = "plan",
    elsewhere: Elsewhere | None = None,
) -> pa.Table:
    """One plan row per new file version (PLAN_SCHEMA), decided against the ledger
    (``committed``), the output folder (``disk``) and each other. Its progress is logged
    as ``stage``."""
    files = _with_columns(files)
    new = new_files(files, committed)
    new = new.append_column(PATIENT_ID, ledger.patient_ids(new["PatientID"]))
    contents = ContentIndex(disk.digest, digest_of_input, repeated(new))
    for content in known_contents(committed, files, new):
        contents.add(content)
    # The series folder of every placement, computed once (a regex over the ledger).
    parents = _parent(committed["destination"])
    planner = Planner(
        settings=settings,
        renderer=Renderer(settings),
        names=Names(disk, ledger_file_names(committed, parents)),
        contents=contents,
        folder_of_series=series_folders(committed, new, settings),
        owner_of_folder=folder_owners(committed, parents, settings),
        patients_of_folder=patient_owners(
            committed, parents, naming.patient_level(settings.folder_template)
        ),
        digest_of_input=digest_of_input,
        disk=disk,
        patients_elsewhere=elsewhere.patients if elsewhere else (lambda _folder: set()),
        owner_elsewhere=elsewhere.owners if elsewhere else (lambda _folders: {}),
    )
    # Decisions go into compact Arrow columns a chunk at a time, so memory holds Python
    # values for one chunk of rows, not for every new file. One chunk of the table (one
    # manifest per batch) first: taking rows from a chunked column joins its chunks on
    # every call, which made a plan of 1,000,000 files quadratic in time and memory.
    new = new.combine_chunks()
    order = _planning_order(new)
    decided = [pa.table({name: [] for name in DECISIONS}, schema=DECISION_SCHEMA)]
    progress = Progress(stage, len(order), log)
    for start in range(0, len(order), _CHUNK):
        rows = new.take(order[start : start + _CHUNK]).to_pylist()
        decisions = [planner.decide(row) for row in rows]
        columns = {name: [d.get(name) for d in decisions] for name in DECISIONS}
        decided.append(pa.table(columns, schema=DECISION_SCHEMA))
        progress.advance(len(rows))
    progress.finish()
    decisions = pa.concat_tables(decided).combine_chunks()
    ordered = new.take(order)
    return pa.table(
        {
            name: decisions[name] if name in DECISIONS else ordered[name]
            for name in PLAN_SCHEMA.names
        },
        schema=PLAN_SCHEMA,
    )


def repeated(new: pa.Table) -> tuple[set[tuple[str, int]], set[str]]:
    """(SOPInstanceUID or "", size) pairs, and SOPInstanceUIDs, that more than one new file
    has (found columnar): only such files can be each other's duplicate or conflict."""
    if new.num_rows < 2:
        return set(), set()
    keys = pa.table({"sop": pc.fill_null(new["SOPInstanceUID"], ""), "size": new["size"]})

    def more_than_once(columns: list[str]) -> list[dict]:
        counts = keys.group_by(columns, use_threads=False).aggregate([([], "count_all")])
        return counts.filter(pc.greater(counts["count_all"], 1)).to_pylist()

    pairs = {(r["sop"], r["size"]) for r in more_than_once(["sop", "size"])}
    sops = {r["sop"] for r in more_than_once(["sop"]) if r["sop"]}
    return pairs, sops


def _with_columns(files: pa.Table) -> pa.Table:
    """files with every PLAN_TAGS column, text where a column holds only nulls."""
    for index, column in enumerate(files.schema):
        if pa.types.is_null(column.type):
            files = files.set_column(index, column.name, files[column.name].cast(pa.string()))
    for tag in PLAN_TAGS:
        if tag not in files.column_names:
            files = files.append_column(tag, pa.nulls(files.num_rows, pa.string()))
    if "part_key" not in files.column_names:
        files = files.append_column("part_key", pa.nulls(files.num_rows, pa.int64()))
    return files


# --- entry point ------------------------------------------------------------------------


def read_manifests(paths: list[Path], settings: Naming, filters: Filters = NO_FILTERS) -> pa.Table:
    """Every manifest row with the columns planning and the filters use."""
    wanted = list(
        dict.fromkeys(
            [
                "folder",
                *SOURCE_KEY,
                "dicom",
                "skip_reason",
                *PLAN_TAGS,
                *sorted(settings.fields),
                *filters.keywords,
                "part_key",
            ]
        )
    )
    tables = []
    for path in paths:
        names = pq.read_schema(path).names
        tables.append(read_parquet(path, columns=[c for c in wanted if c in names]))
    if not tables:
        return pa.table(
            {
                "folder": pa.array([], pa.string()),
                "relpath": pa.array([], pa.string()),
                "size": pa.array([], pa.int64()),
                "mtime_ns": pa.array([], pa.int64()),
                "ctime_ns": pa.array([], pa.int64()),
                "ino": pa.array([], pa.uint64()),
                "dicom": pa.array([], pa.bool_()),
                "skip_reason": pa.array([], pa.string()),
            }
        )
    return pa.concat_tables(tables, promote_options="default")


class Elsewhere:
    """What the ledger of every partition says about a folder: its PatientIDs (a patient
    folder) and its SeriesKey (a series folder). A partition's plan knows its own folders;
    one that another partition named (a name with a PatientID's or a series UID's hash
    that equals a name rendered here) is known only there. The whole ledger is read at the
    first question, which only a folder on disk that this partition's ledger does not know
    asks (rare: never in a first run, nor for a patient this partition placed)."""

    def __init__(self, state_dir: Path, settings: Naming):
        self.state_dir, self.settings = state_dir, settings
        self._patients: dict[str, set[str | None]] | None = None
        self._owners: Callable[[list[str]], dict[str, SeriesKey]] | None = None

    def _read(self) -> None:
        rows = ledger.read(
            self.state_dir, ["destination", "patient_id", "base_folder", "series_uid"]
        )
        parents = _parent(rows["destination"])
        level = naming.patient_level(self.settings.folder_template)
        self._patients = patient_owners(rows, parents, level)
        self._owners = folder_owners(rows, parents, self.settings)

    def patients(self, folder: str) -> set[str | None]:
        """fold(patient folder) -> its PatientIDs."""
        if self._patients is None:
            self._read()
        return self._patients.get(folder, set())

    def owners(self, folders: list[str]) -> dict[str, SeriesKey]:
        """series folder -> the SeriesKey that owns it."""
        if self._owners is None:
            self._read()
        return self._owners(folders)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcmsort.plan", description=__doc__)
    parser.add_argument("--manifests", type=Path, nargs="*", default=[])
    parser.add_argument("--input-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--naming", required=True, help="Naming settings as JSON")
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--partition", help="p<index>of<count>: the partition these rows are")
    parser.add_argument("--mode", default="copy", help="transfer_mode (to settle a killed one)")
    parser.add_argument("--log", type=Path, help="this job's log (earlier ones are removed)")
    parser.add_argument(
        "--ledger-marker", type=Path, help="written into the ledger folder once planned"
    )
    parser.add_argument("--filters", default="{}", help="include and exclude rules as JSON")
    parser.add_argument("--excluded", type=Path, help="the new files the filters leave out")
    parser.add_argument(
        "--routes",
        type=Path,
        help="with one partition: --manifests are the batch manifests, and this job does the "
        "partition stage's work first, writing its routes here (the run has no partition job)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    settings = Naming(**json.loads(args.naming))
    part = parse_part(args.partition) if args.partition else None
    filters = Filters.from_json(args.filters)
    if args.routes is not None:
        if part is None or part.count != 1:
            parser.error("--routes: only a plan of partition p0of1 partitions the manifests itself")
        # Here, not at the top: the partition stage imports this module's PLAN_TAGS.
        from dcmsort import partition

        rows = partition.partition(
            args.manifests,
            args.state_dir,
            args.input_dir,
            args.output_dir,
            settings,
            1,
            filters,
            args.mode,
        )
        args.manifests = [
            args.state_dir / routes.PARTS / f"{part.name}-{rows['fingerprints'][0]}.parquet"
        ]
        # This job's files are named by what it read (the routes' key), not by its rows.
        partition.write_routes(routes.one_partition(args.routes), args.routes)
    layout_file = args.state_dir / "layout.json"
    try:
        check_layout(layout_file, settings, args.output_dir)
    except ConfigError as error:
        log.error("dcmsort: error: %s", error)
        return 2
    # What a killed transfer of the previous plan put in place is committed first, so the
    # new plan sees it (its inputs may have been renamed or deleted since).
    pending = pending_file(args.state_dir, part)  # the last plan, until its transfer finished
    settled = settle(pending, args.input_dir, args.output_dir, args.state_dir, args.mode, part)
    if settled:
        log.info("committed %d files a killed transfer had placed", settled)
    files = read_manifests(args.manifests, settings, filters)
    committed = ledger.read(args.state_dir, part=part)
    hashed = []
    member_digests = archives.MemberDigests(args.input_dir)

    def digest_of_input(relpath: str) -> str | None:
        hashed.append(relpath)
        if archives.is_member(relpath):
            return member_digests(relpath)
        try:
            return file_digest(inventory.source_path(args.input_dir, relpath))
        except OSError:
            return None

    disk = Disk(args.output_dir)
    files, excluded = leave_out(files, committed, filters, (digest_of_input, disk.digest))

    plan = make_plan(
        files,
        committed,
        settings,
        disk,
        digest_of_input,
        f"plan {part.name}" if part and part.count > 1 else "plan",
        Elsewhere(args.state_dir, settings) if part and part.count > 1 else None,
    )
    plan = with_temp_token(plan)  # written before any temporary file with it exists
    # Written by every partition's plan job, side by side on the first run.
    with atomic_path(layout_file, writer=part.name if part else "") as tmp:
        record = layout_record(settings, args.output_dir, args.state_dir)
        tmp.write_text(json.dumps(record, indent=2))
    # Earlier plans of this partition are done with (their transfers committed or their
    # pending copy was settled above).
    if part:
        remove_other_versions(args.plan, part.name)
        if args.log:
            remove_other_versions(args.log, part.name)
    with atomic_path(args.plan) as tmp:
        pq.write_table(plan, tmp)
    # Snakemake removes a job's outputs before it runs again: the copy under another name
    # is what tells the next plan what a killed transfer may have left.
    with atomic_path(pending) as tmp:
        pq.write_table(plan, tmp)
    if args.excluded is not None:
        with atomic_path(args.excluded) as tmp:
            pq.write_table(excluded, tmp)
        if part:
            remove_other_versions(args.excluded, part.name)
    if args.ledger_marker is not None:
        with atomic_path(args.ledger_marker) as tmp:
            tmp.write_text(LEDGER_MARKER)
        if part:
            remove_other_versions(args.ledger_marker, f"planned-{part.name}")
    actions = plan["action"].to_pylist()
    log.info(
        "plan%s: %d files, %d committed earlier, %d left out by filters, %d new: %d to sort, "
        "%d already present, %d to relink, %d duplicates, %d conflicts; %d digests; %.2f s, "
        "peak RSS %d MB",
        f" {part.name}" if part else "",
        files.num_rows + excluded.num_rows,
        committed.num_rows,
        excluded.num_rows,
        plan.num_rows,
        actions.count(SORT),
        actions.count(PRESENT),
        actions.count(RELINK),
        actions.count(DUPLICATE),
        pc.sum(plan["conflict"]).as_py() or 0,
        len(hashed),
        time.perf_counter() - started,
        peak_rss_mb(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
