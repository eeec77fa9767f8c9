"""Permissions of what dcmsort writes: never more open than the input and the output folder.

DICOM headers and pixels are patient data, and so are the manifests, plan, report and logs.
The rules, as pure functions of modes (unit-tested), and the few calls that apply them:

- The run narrows its process umask so that nothing it or Snakemake creates is more open
  than ``output_dir`` (``run_umask``): a ``0700`` output gives umask ``077``. The umask is
  only ever narrowed, never widened, so nothing outside the output gets more open either.
- A copied file gets its source's permission bits masked by that umask, as ``cp`` does
  (``copy_mode``): never wider than the source. Hard links share the input's inode and
  symbolic links point at it: the input's own permissions stand, and are never changed.
- A folder dcmsort creates takes its parent's permission bits masked by the umask
  (``folder_mode``); in a setgid parent (a group-shared folder, ``2770``) it keeps the
  setgid bit and the parent's group bits whatever the umask, so the group can keep adding.
  In the sorted tree the parent is always ``output_dir`` (``folder_mode`` of a
  ``folder_mode`` is itself): the transfer's threads never read the mode of a folder that
  another thread has just made and may not have given its mode yet.
- State files (manifests, plan, report, logs) are no more open than their folder without
  the execute bits (``state_file_mode``).
- A missing ``output_dir`` is created no more open than ``input_dir`` (``new_output_mode``).
- Nothing that exists is ever chmod-ed: only what dcmsort has just created.
"""

from __future__ import annotations

import os
import stat
from functools import cache
from pathlib import Path

PERMS = 0o777  # rwx for user, group, others
GROUP = 0o070
OWNER_DIR = 0o700  # the owner always keeps rwx on what it creates (privacy is about others)
OWNER_FILE = 0o600
NO_EXEC = 0o666
# The run's lock, in the state folder; made before anything else in it, so that a state
# folder holding anything holds it (settings refuses a state_dir that holds other files).
LOCK_FILE = "run.lock"


def run_umask(umask: int, output_mode: int) -> int:
    """The umask of a run: the user's, narrowed so that nothing created is more open than
    output_dir. Only ever narrows (so Snakemake's own files elsewhere are not opened up)."""
    return (umask | (~output_mode & PERMS)) & PERMS


def _effective_umask(umask: int, parent_mode: int) -> int:
    """umask for something created in parent: never more open than parent; in a setgid
    (group-shared) parent the group bits follow the parent, not the umask."""
    if parent_mode & stat.S_ISGID:
        umask &= ~GROUP
    return run_umask(umask, parent_mode)


def folder_mode(parent_mode: int, umask: int) -> int:
    """Mode of a folder dcmsort creates in a folder of parent_mode: the parent's bits masked
    by the umask; in a setgid parent, setgid and the parent's group bits are kept."""
    mode = (PERMS & ~_effective_umask(umask, parent_mode)) | OWNER_DIR
    return mode | (parent_mode & stat.S_ISGID)


def state_file_mode(folder: int, umask: int) -> int:
    """Mode of a state file (manifest, plan, report, log, lock) in a folder of mode folder:
    no more open than the folder, without the execute bits."""
    return (NO_EXEC & ~_effective_umask(umask, folder)) | OWNER_FILE


def copy_mode(source_mode: int, umask: int) -> int:
    """Mode of a copy, as ``cp`` gives it: the source's permission bits masked by the umask
    (the run's, so also by output_dir). Never wider than the source."""
    return source_mode & PERMS & ~umask


def new_output_mode(input_mode: int, parent_mode: int, umask: int) -> int:
    """Mode of an output_dir that dcmsort creates: a folder in its parent (folder_mode), and
    no more open than input_dir: a private input gives a private output."""
    return folder_mode(parent_mode, umask) & (input_mode & PERMS | OWNER_DIR | stat.S_ISGID)


def _read_umask() -> int:
    """The process umask without changing it (os.umask would, for a moment, for every
    thread): from /proc where Linux has it, else set and restore."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


@cache
def current_umask() -> int:
    """The process umask, read once per process (set_umask keeps it right)."""
    return _read_umask()


def set_umask(umask: int) -> int:
    """Set the process umask; returns the previous one."""
    previous = os.umask(umask)
    current_umask.cache_clear()
    return previous


def _nearest_mode(path: Path) -> int:
    """Mode of path or, if it is missing, of its nearest existing ancestor."""
    for folder in (path, *path.parents):
        try:
            return os.stat(folder).st_mode
        except FileNotFoundError:
            continue
    raise FileNotFoundError(path)


def output_mode(output_dir: Path, input_dir: Path, umask: int) -> int:
    """Mode of output_dir: as it is, or as dcmsort will create it."""
    try:
        return os.stat(output_dir).st_mode
    except FileNotFoundError:
        parent = _nearest_mode(output_dir.parent)
        return new_output_mode(os.stat(input_dir).st_mode, parent, umask)


def narrow_umask(output_dir: Path, input_dir: Path) -> int:
    """Narrow this process's umask for a run into output_dir (children inherit it: every
    job, and what Snakemake itself writes: logs, folders). Returns the new umask."""
    umask = current_umask()
    narrowed = run_umask(umask, output_mode(output_dir, input_dir, umask))
    set_umask(narrowed)
    return narrowed


def make_folders(folder: Path, mode: int | None = None) -> None:
    """Create folder and any missing parents (an existing one is left as it is).

    Each created folder gets ``mode``, or by default ``folder_mode`` of its parent. It is
    made ``0700`` first and then given its mode, so it is never more open than that, even
    for a moment; it costs two calls (stat, chmod) per folder created, none when it exists.
    The parent's mode is read from disk: in the moment between the two calls it is
    ``0700``, so folders that several jobs may create at once are made before they start
    (``prepare_run_folders``), and the sorted tree's folders are made by
    ``transfer.OutputTree``, which never reads a parent's mode.
    """
    folder = Path(folder)
    try:
        os.mkdir(folder, OWNER_DIR)
    except FileNotFoundError:
        if folder.parent == folder or folder.parent.is_dir():
            raise  # the parent is there, and this file system makes no folder in it
        make_folders(folder.parent, mode)
        make_folders(folder, mode)
        return
    except FileExistsError:
        if not folder.is_dir():
            raise
        return
    if mode is None:
        mode = folder_mode(os.stat(folder.parent).st_mode, current_umask())
    os.chmod(folder, mode)


def create_state_file(path: Path, mode: int | None = None) -> bool:
    """Create an empty state file that later runs open in place (a lock, an appended log)
    with ``mode``, by default ``state_file_mode`` of its folder, so that in a group-shared
    output the group can open it too. An existing file is left as it is; returns whether
    the file was created."""
    if mode is None:
        mode = state_file_mode(os.stat(path.parent).st_mode, current_umask())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_FILE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def prepare_run_folders(
    input_dir: Path, output_dir: Path, state_dir: Path, state_subfolders: tuple[str, ...] = ()
) -> None:
    """Create output_dir (no more open than input_dir) and state_dir (no more open than
    output_dir) if missing, the lock file first in it, and the state subfolders Snakemake
    would otherwise create with the plain umask (in a group-shared output, the group could
    not add to them later)."""
    umask = current_umask()
    if not output_dir.is_dir():
        make_folders(output_dir.parent)
        make_folders(output_dir, output_mode(output_dir, input_dir, umask))
    make_folders(state_dir, folder_mode(os.stat(output_dir).st_mode, umask))
    create_state_file(state_dir / LOCK_FILE)
    for sub in state_subfolders:
        make_folders(state_dir / sub)
