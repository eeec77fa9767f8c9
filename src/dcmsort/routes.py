"""Partitions and their names: which plan and transfer jobs a run has.

The partition stage writes ``partitions.json`` (the partition count and the fingerprint of
each partition's rows); every job file of a partition is named
``p<index>of<count>-<fingerprint>``, so a partition whose rows did not change keeps its
files and runs no job. Standard library only: the Snakefile reads it at every start.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

ROUTES = "partitions.json"
_PART = re.compile(r"^p(\d+)of(\d+)$")


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


def jobs(routes_file: str | Path) -> list[tuple[Part, str]]:
    """(partition, ``p<index>of<count>-<fingerprint>``) of every partition."""
    routes = json.loads(Path(routes_file).read_text())
    count = routes["partitions"]
    return [
        (Part(k, count), f"{Part(k, count).name}-{fingerprint}")
        for k, fingerprint in enumerate(routes["fingerprints"])
    ]
