"""What is in the input folder, found by stat alone (no file is opened).

The input holds one folder per patient; files sitting directly in the input folder form one
more unit, ``ROOT_FOLDER``. Names are kept as text that round-trips to the bytes on disk
(``encode_name``): every folder and relpath this module hands out is in that form, and
``source_path`` turns a relpath back into the path to open. Each unit belongs to one of a
fixed number of batches, chosen by a hash of its name, so a new folder never moves the
others to another batch. A fingerprint
(names and each file's version: size, mtime, ctime, inode) tells whether anything in a unit
changed since it was last read.

Imports only the standard library: the Snakefile calls it at every start.
"""

from __future__ import annotations

import errno
import hashlib
import marshal
import os
import re
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
UNREADABLE_DIRECTORY = "unreadable-directory"  # permission denied or another listing error
SYMLINK_LOOP = "symlink-loop"
PATH_TOO_LONG = "path-too-long"  # the full path exceeds the system's limit (PATH_MAX)
DIRECTORY_PATH_TOO_LONG = "directory-path-too-long"
UNREADABLE = "unreadable"  # stat failed for another reason

# --- names: any bytes a file system allows, as valid UTF-8 text ---------------------------
# os.fsdecode turns a byte that is not UTF-8 into a lone surrogate U+DC80..U+DCFF; parquet,
# CSV and JSON cannot hold those. They are written as %XX, and '%' itself as %25, so an
# ordinary name is unchanged and every name round-trips to its bytes.
_TO_ENCODE = re.compile("[%\udc80-\udcff]")
_TO_DECODE = re.compile("%([0-9A-F]{2})")


def _escape(match: re.Match) -> str:
    char = match.group()
    return "%25" if char == "%" else f"%{ord(char) - 0xDC00:02X}"


def _unescape(match: re.Match) -> str:
    byte = int(match.group(1), 16)
    if byte == 0x25:
        return "%"
    return chr(0xDC00 + byte) if byte >= 0x80 else match.group()


def encode_name(fs_text: str) -> str:
    """A file system name (as ``os.fsdecode`` gives it) as valid UTF-8 text: '%' becomes
    ``%25`` and every byte that is not UTF-8 ``%XX``; everything else is unchanged."""
    if "%" not in fs_text and fs_text.isascii():
        return fs_text
    return _TO_ENCODE.sub(_escape, fs_text)


def decode_name(text: str) -> str:
    """The inverse of ``encode_name``: back to the ``os.fsdecode`` form (lone surrogates)."""
    if "%" not in text:
        return text
    return _TO_DECODE.sub(_unescape, text)


def source_path(input_dir: str | Path, relpath: str) -> str:
    """The path to open for a manifest relpath (relative to input_dir)."""
    return os.path.join(os.fspath(input_dir), decode_name(relpath))


def file_name(relpath: str) -> str:
    """The original last component of a manifest relpath (``os.fsdecode`` form)."""
    return decode_name(relpath.rsplit("/", 1)[-1])


@dataclass(frozen=True, slots=True)
class Entry:
    """One path below input_dir: relpath (POSIX, relative to input_dir), its version as
    stat sees it (size, mtime, ctime, inode number) and its kind.

    mtime alone misses a file replaced by one of the same size whose old mtime was kept
    (``cp -p``, ``rsync -t``, an unzip with stored times); the kernel sets ctime on every
    write, rename or attribute change and a user cannot set it back, and a file renamed
    over another has another inode. The device number is left out: NFS and btrfs give a
    file another one after a remount or on another machine (docs/design.md)."""

    relpath: str
    size: int
    mtime_ns: int
    kind: str
    ctime_ns: int = 0
    ino: int = 0

    @property
    def version(self) -> tuple[str, int, int, int, int]:
        """(relpath, size, mtime_ns, ctime_ns, ino): the ledger's SOURCE_KEY."""
        return (self.relpath, self.size, self.mtime_ns, self.ctime_ns, self.ino)


def list_folders(input_dir: str | Path) -> list[str]:
    """Top-level units of input_dir (``encode_name`` form), sorted: every folder, plus
    ROOT_FOLDER if files lie there."""
    folders, has_root_files = [], False
    with os.scandir(input_dir) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(encode_name(entry.name))
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
    """The batch a folder (``encode_name`` form) belongs to: stable, independent of the
    other folders."""
    digest = hashlib.sha256(folder.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % batches


# A manifest's file name is the quoted folder name while that is short; a longer one keeps
# a readable prefix plus a hash (with a '%' not followed by hex digits, which quote never
# writes, so no short name can equal it). 255 bytes is the usual file name limit.
_MAX_QUOTED = 150
_PREFIX = 100
_HASHED = "%~"


def manifest_name(folder: str) -> str:
    """File name of a folder's manifest, at most ~130 bytes whatever the folder's length;
    ``%2F`` (a name no folder can have) for the root."""
    if folder == ROOT_FOLDER:
        return "%2F.parquet"
    quoted = quote(folder, safe="")
    if len(quoted) > _MAX_QUOTED:
        prefix = quoted[:_PREFIX]
        cut = prefix.rfind("%", len(prefix) - 2)  # never cut a %XX escape in two
        prefix = prefix[:cut] if cut >= 0 else prefix
        digest = hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        quoted = f"{prefix}{_HASHED}{digest}"
    return quoted + ".parquet"


def folder_of_manifest(name: str) -> str | None:
    """The folder a manifest file name (from ``manifest_name``) belongs to, or None for a
    shortened name: then the folder is in the manifest's own metadata (key ``folder``)."""
    stem = name.removesuffix(".parquet")
    if _HASHED in stem:
        return None
    return ROOT_FOLDER if stem == "%2F" else unquote(stem)


def _failed(relpath: str, error: OSError, directory: bool = False) -> Entry:
    if error.errno == errno.ENAMETOOLONG:
        kind = DIRECTORY_PATH_TOO_LONG if directory else PATH_TOO_LONG
    elif error.errno == errno.ELOOP:
        kind = SYMLINK_LOOP
    else:
        kind = UNREADABLE_DIRECTORY if directory else UNREADABLE
    return Entry(relpath, 0, 0, kind)


def _entry(path: str, relpath: str, entry: os.DirEntry | None = None) -> Entry:
    try:
        info = entry.stat(follow_symlinks=True) if entry else os.stat(path)
    except FileNotFoundError:
        return Entry(relpath, 0, 0, BROKEN_SYMLINK)
    except OSError as error:
        return _failed(relpath, error)
    if stat.S_ISREG(info.st_mode):
        return Entry(relpath, info.st_size, info.st_mtime_ns, FILE, info.st_ctime_ns, info.st_ino)
    if stat.S_ISDIR(info.st_mode):
        return Entry(relpath, 0, info.st_mtime_ns, DIRECTORY_SYMLINK)
    return Entry(relpath, 0, info.st_mtime_ns, SPECIAL)


def walk_folder(input_dir: str | Path, folder: str) -> list[Entry]:
    """Every file below one unit (``encode_name`` form), sorted by relpath. Directory
    symlinks are not followed (they could loop or leave the input); they are listed so that
    they can be reported, as are paths that could not be listed or stat'ed."""
    top = source_path(input_dir, folder) if folder != ROOT_FOLDER else os.fspath(input_dir)
    found: list[Entry] = []
    stack = [(top, folder)]
    while stack:
        path, relpath = stack.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    name = encode_name(entry.name)
                    rel = f"{relpath}/{name}" if relpath else name
                    if entry.is_dir(follow_symlinks=False):
                        if folder != ROOT_FOLDER:
                            stack.append((entry.path, rel))
                    else:
                        found.append(_entry(entry.path, rel, entry))
        except OSError as error:
            found.append(_failed(relpath, error, directory=True))
    return sorted(found, key=lambda e: e.relpath)


def fingerprint(entries: list[Entry]) -> str:
    """A digest of names, versions and kinds: changes whenever a file is added, removed,
    replaced or rewritten (a write changes the ctime, even when the mtime is set back)."""
    digest = hashlib.sha256()
    for e in entries:
        digest.update(
            f"{e.relpath}\0{e.size}\0{e.mtime_ns}\0{e.ctime_ns}\0{e.ino}\0{e.kind}\n".encode(
                "utf-8", "surrogateescape"
            )
        )
    return digest.hexdigest()


def walk_folders(input_dir: str | Path, folders: list[str]) -> dict[str, list[Entry]]:
    """walk_folder of each folder, in sorted order."""
    return {folder: walk_folder(input_dir, folder) for folder in sorted(folders)}


def batch_fingerprint(walks: dict[str, list[Entry]], filter_keywords: list[str] = ()) -> str:
    """One digest over the walked folders' fingerprints (the extract job's rerun trigger),
    and over the keywords the filters read, if any: a filter on a keyword the manifests do
    not carry yet must have them extracted again (the rows of unchanged files are reused,
    and re-read only where a column is missing)."""
    digest = hashlib.sha256()
    if filter_keywords:
        digest.update(("\0".join(filter_keywords) + "\n").encode())
    for folder in sorted(walks):
        digest.update(
            f"{folder}\0{fingerprint(walks[folder])}\n".encode("utf-8", "surrogateescape")
        )
    return digest.hexdigest()[:16]


# --- one walk per run ----------------------------------------------------------------------
# The Snakefile walks the input to name each batch's manifest; the extract job of a changed
# batch takes that walk from a file instead of stat-ing every file again (on Lustre or NFS
# each stat is a round trip to a metadata server). A file changed in between is caught where
# it always is: the transfer compares the input with the version the walk saw.


def walk_path(manifest: str | Path) -> Path:
    """Where the walk behind a batch manifest (``<state>/manifests/batch-<n>-<fp>.parquet``)
    is kept until its extract job has read it: ``<state>/walks/batch-<n>-<fp>.marshal``."""
    manifest = Path(manifest)
    return manifest.parent.parent / "walks" / f"{manifest.stem}.marshal"


def dump_walk(walks: dict[str, list[Entry]], filter_keywords: list[str] = ()) -> bytes:
    """A batch's walk as bytes for ``load_walk`` (marshal: the standard library's fastest
    format for plain tuples; read only by this version of dcmsort, beside it). Compact, so
    the Snakefile can hold it from its walk until onstart has made the state folder. The
    filter keywords go with it: with them the extract job recomputes the batch
    fingerprint from what it read and takes the walk only if it is the one its manifest
    is named after (``load_walk``)."""
    return marshal.dumps(
        (
            list(filter_keywords),
            {
                folder: [
                    (e.relpath, e.size, e.mtime_ns, e.kind, e.ctime_ns, e.ino) for e in entries
                ]
                for folder, entries in walks.items()
            },
        )
    )


def write_walks(folder: Path, walks: dict[Path, bytes]) -> None:
    """Replace what folder holds (walks of earlier runs, killed before their extract job
    read them) by these (path: dump_walk's bytes), each written whole or not at all. The
    umask, narrowed by the Snakefile to output_dir's, gives the files their mode: file names
    are patient data."""
    for stale in folder.glob("*"):
        if stale not in walks:
            stale.unlink(missing_ok=True)
    for path, walk in walks.items():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(walk)
        os.replace(tmp, path)


def load_walk(path: Path, fingerprint: str | None = None) -> dict[str, list[Entry]] | None:
    """A walk dump_walk wrote, or None if there is none, it cannot be read, or (with
    ``fingerprint``, the batch fingerprint its manifest is named after) it is not the walk
    behind that fingerprint: a foreign or damaged walk would name the manifest after one
    input and fill it with another, whose missing files no later run would see. The
    caller then walks the input itself."""
    try:
        filter_keywords, data = marshal.loads(Path(path).read_bytes())
        walks = {folder: [Entry(*fields) for fields in rows] for folder, rows in data.items()}
        if fingerprint is not None and batch_fingerprint(walks, filter_keywords) != fingerprint:
            return None
    except (OSError, EOFError, ValueError, TypeError, AttributeError):
        return None
    return walks
