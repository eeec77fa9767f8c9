"""File operations shared by the stages: atomic writes and content digests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".dcmsort-tmp"


def temp_path_for(path: Path) -> Path:
    """The temporary name used while writing path: hidden, in the same folder (so the final
    rename stays on one file system), and fixed, so a run killed half-way leaves a name the
    next run recognises and replaces."""
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_digest(path: str | Path) -> str:
    """Content digest used to tell exact duplicates from conflicts and to verify copies."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()[:32]
