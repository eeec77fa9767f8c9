"""What is in the input folder, found by stat alone (no file is opened).

The input holds one folder per patient; files sitting directly in the input folder form one
more unit, ``ROOT_FOLDER``. Each unit belongs to one of a fixed number of batches, chosen by
a hash of its name, so a new folder never moves the others to another batch. A fingerprint
(names, sizes, mtimes) tells whether anything in a unit changed since it was last read.

Imports only the standard library: the Snakefile calls it at every start.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

ROOT_FOLDER = ""  # the unit of files lying directly in input_dir

# What a walk found at a path, besides a regular file.
FILE = "file"
BROKEN_SYMLINK = "broken-symlink"
DIRECTORY_SYMLINK = "directory-symlink"
SPECIAL = "special-file"
UNREADABLE_DIRECTORY = "unreadable-directory"


@dataclass(frozen=True, slots=True)
class Entry:
    """One path below input_dir: relpath (POSIX, relative to input_dir), size, mtime, kind."""

    relpath: str
    size: int
    mtime_ns: int
    kind: str


def list_folders(input_dir: str | Path) -> list[str]:
    """Top-level units of input_dir, sorted: every folder, plus ROOT_FOLDER if files lie there."""
    folders, has_root_files = [], False
    with os.scandir(input_dir) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.name)
            else:
                has_root_files = True
    return sorted(folders) + ([ROOT_FOLDER] if has_root_files else [])


# Measured at 10,000 folders: with 32 batches a 1% rerun touched every batch and paid 32
# interpreter starts plus ~300 cached-manifest reads each (18.8 s); jobs use a worker pool,
# so fewer, larger batches lose no parallelism on one machine.
FOLDERS_PER_BATCH = 2048
MAX_AUTO_BATCHES = 64


def auto_batches(folders: int) -> int:
    """How many extract jobs for this many folders: a power of two near folders / 2048.

    Few jobs keep start-up cost low (each job uses several cores instead); many folders get
    more jobs so a cluster can spread them. Powers of two change only when the number of
    folders doubles: then every batch reruns, but reads only cached manifests.
    """
    batches = 1
    while batches * 2 * FOLDERS_PER_BATCH <= folders and batches < MAX_AUTO_BATCHES:
        batches *= 2
    return batches


def batch_of(folder: str, batches: int) -> int:
    """The batch a folder belongs to: stable, independent of the other folders."""
    digest = hashlib.sha256(folder.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % batches


def manifest_name(folder: str) -> str:
    """File name of a folder's manifest; ``%2F`` (a name no folder can have) for the root."""
    return (quote(folder, safe="") if folder != ROOT_FOLDER else "%2F") + ".parquet"


def folder_of_manifest(name: str) -> str:
    """The folder a manifest file name (from ``manifest_name``) belongs to."""
    stem = name.removesuffix(".parquet")
    return ROOT_FOLDER if stem == "%2F" else unquote(stem)


def _entry(path: str, relpath: str, entry: os.DirEntry | None = None) -> Entry:
    try:
        info = entry.stat(follow_symlinks=True) if entry else os.stat(path)
    except FileNotFoundError:
        return Entry(relpath, 0, 0, BROKEN_SYMLINK)
    except OSError:
        return Entry(relpath, 0, 0, SPECIAL)
    if stat.S_ISREG(info.st_mode):
        return Entry(relpath, info.st_size, info.st_mtime_ns, FILE)
    if stat.S_ISDIR(info.st_mode):
        return Entry(relpath, 0, info.st_mtime_ns, DIRECTORY_SYMLINK)
    return Entry(relpath, 0, info.st_mtime_ns, SPECIAL)


def walk_folder(input_dir: str | Path, folder: str) -> list[Entry]:
    """Every file below one unit, sorted by relpath. Directory symlinks are not followed
    (they could loop or leave the input); they are listed so that they can be reported."""
    top = os.path.join(input_dir, folder) if folder != ROOT_FOLDER else str(input_dir)
    found: list[Entry] = []
    stack = [(top, folder)]
    while stack:
        path, relpath = stack.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    rel = f"{relpath}/{entry.name}" if relpath else entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if folder != ROOT_FOLDER:
                            stack.append((entry.path, rel))
                    else:
                        found.append(_entry(entry.path, rel, entry))
        except OSError:
            found.append(Entry(relpath, 0, 0, UNREADABLE_DIRECTORY))
    return sorted(found, key=lambda e: e.relpath)


def fingerprint(entries: list[Entry]) -> str:
    """A digest of names, sizes, mtimes and kinds: changes whenever a file is added,
    removed, replaced or rewritten (a rewrite changes the mtime)."""
    digest = hashlib.sha256()
    for e in entries:
        digest.update(
            f"{e.relpath}\0{e.size}\0{e.mtime_ns}\0{e.kind}\n".encode("utf-8", "surrogateescape")
        )
    return digest.hexdigest()


def batch_fingerprint(input_dir: str | Path, folders: list[str]) -> str:
    """One digest over the given folders' fingerprints (the extract job's rerun trigger)."""
    digest = hashlib.sha256()
    for folder in sorted(folders):
        digest.update(
            f"{folder}\0{fingerprint(walk_folder(input_dir, folder))}\n".encode(
                "utf-8", "surrogateescape"
            )
        )
    return digest.hexdigest()[:16]


def decode_name(text: str) -> str:
    """The file-system form (os.fsdecode, surrogateescape) of a manifest name."""
    return text


def file_name(relpath: str) -> str:
    """The last component of a manifest relpath, in file-system form."""
    return decode_name(relpath.rsplit("/", 1)[-1])


def source_path(input_dir: str | Path, relpath: str) -> str:
    """The path to open for a manifest relpath."""
    return os.path.join(input_dir, decode_name(relpath))


def encode_name(fs_text: str) -> str:
    """The manifest form of a file-system name (placeholder until non-UTF-8 support)."""
    return fs_text
