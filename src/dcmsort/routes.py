"""Partitions and their names: which plan and transfer jobs a run has.

The partition stage writes ``partitions-<inputs>.json`` (the partition count and the
fingerprint of each partition's rows), named by a digest of what it read (the batch
manifests' names, the settings): Snakemake takes an existing checkpoint output as current,
so any change to its inputs must be a missing file for the checkpoint to run again before
any plan. Every job file of a partition is named ``p<index>of<count>-<fingerprint>``, so a
partition whose rows did not change keeps its files and runs no job. Standard library
only: the Snakefile reads it at every start.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple

ROUTES = "partitions-{inputs}.json"
PARTS = "parts"  # each partition's rows, beside the routes: parts/<job>.parquet
_PART = re.compile(r"^p(\d+)of(\d+)$")
# auto: one partition per this many files (a power of two, at most MAX_AUTO). Measured at
# 10,000,000 files (bench plan10m): a plan job peaks at ~1.3 KB per file plus ~60 MB, so a
# partition of 250,000 files stays under 0.5 GB.
FILES_PER_PARTITION = 250_000
MAX_AUTO = 64


def auto_partitions(files: int) -> int:
    """A power of two near files / FILES_PER_PARTITION (1 for a workstation-sized input)."""
    count = 1
    while count * FILES_PER_PARTITION < files and count < MAX_AUTO:
        count *= 2
    return count


class Part(NamedTuple):
    """Partition ``index`` of ``count``: the files whose ``part_key % count == index``."""

    index: int
    count: int

    @property
    def name(self) -> str:
        return f"p{self.index}of{self.count}"


def parse_part(name: str) -> Part | None:
    """The Part named ``p<index>of<count>``, or None."""
    match = _PART.match(name)
    if not match or not int(match[1]) < int(match[2]):
        return None
    return Part(int(match[1]), int(match[2]))


def digest(inputs: list[str]) -> str:
    """What names the routes file of a partition job that reads ``inputs`` (file names
    and settings)."""
    return hashlib.sha256("\n".join(inputs).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def one_partition(routes_file: str | Path) -> dict:
    """The routes of a run with one partition, whose plan job partitions the manifests
    itself: its files are named by the key of the routes file, a digest of what it read
    (as the partition job's output is named), not by a fingerprint of its rows."""
    prefix, suffix = ROUTES.split("{inputs}")
    key = Path(routes_file).name.removeprefix(prefix).removesuffix(suffix)
    return {"partitions": 1, "fingerprints": [key]}


def rows_missing(state_dir: str | Path, key: str) -> bool:
    """Do the routes named by key exist while a partition's rows they list (``parts/``,
    which the partition job writes beside them) do not?"""
    try:
        listed = jobs(routes_file(state_dir, key))
    except (OSError, ValueError, KeyError):
        return False
    return not all((Path(state_dir) / PARTS / f"{job}.parquet").exists() for _, job in listed)


def routes_file(state_dir: str | Path, key: str) -> Path:
    """The routes named by key (a digest of what their writer read)."""
    return Path(state_dir) / ROUTES.format(inputs=key)


def current(state_dir: str | Path) -> Path:
    """The routes file the last partition job wrote (it removes earlier ones)."""
    found = sorted(Path(state_dir).glob(ROUTES.format(inputs="*")), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {ROUTES.format(inputs='*')} in {state_dir}")
    return found[-1]


def jobs(routes_file: str | Path) -> list[tuple[Part, str]]:
    """(partition, ``p<index>of<count>-<fingerprint>``) of every partition."""
    routes = json.loads(Path(routes_file).read_text())
    count = routes["partitions"]
    return [
        (Part(k, count), f"{Part(k, count).name}-{fingerprint}")
        for k, fingerprint in enumerate(routes["fingerprints"])
    ]
