"""The run's settings, resolved from the validated config, with one-line errors for bad input.

The Snakefile validates the config against ``workflow/schemas/config.schema.yaml`` (keys,
types, defaults) and then calls ``resolve``, which checks what a schema cannot: that the
folders exist and do not nest, that the templates name real DICOM keywords.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from dcmsort import naming, permissions
from dcmsort.naming import Naming

STATE_FOLDER = ".dcmsort"


class ConfigError(Exception):
    """A config value that cannot work; the message names the key and the fix."""


@dataclass(frozen=True)
class Settings:
    input_dir: Path
    output_dir: Path
    state_dir: Path
    naming: Naming
    transfer_mode: str
    verify: str
    batches: int | None  # None: chosen from the number of folders (auto)

    @property
    def naming_json(self) -> str:
        return json.dumps(asdict(self.naming), ensure_ascii=False)

    @property
    def keywords(self) -> list[str]:
        """DICOM keywords the templates use (the manifests must carry them)."""
        return sorted(self.naming.fields - naming.FILE_FIELDS.keys())


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def resolve(config: dict, cwd: Path | None = None) -> Settings:
    """Settings from a schema-validated config; raises ConfigError naming key and fix."""
    cwd = cwd or Path.cwd()
    if not config.get("input_dir"):
        raise ConfigError("input_dir is not set; pass --config input_dir=/path/to/Unclassified")
    if not config.get("output_dir"):
        raise ConfigError("output_dir is not set; pass --config output_dir=/path/to/Classified")
    input_dir = (cwd / os.path.expanduser(str(config["input_dir"]))).resolve()
    output_dir = (cwd / os.path.expanduser(str(config["output_dir"]))).resolve()
    if not input_dir.is_dir():
        what = "is not a folder" if input_dir.exists() else "does not exist"
        raise ConfigError(
            f"input_dir {input_dir} {what}; set input_dir to the folder of patient folders"
        )
    try:
        empty = not any(os.scandir(input_dir))
    except OSError as error:
        raise ConfigError(f"input_dir {input_dir} cannot be read ({error.strerror})") from error
    if empty:
        raise ConfigError(f"input_dir {input_dir} is empty; nothing to sort")
    if _inside(output_dir, input_dir):
        raise ConfigError(
            f"output_dir {output_dir} is inside input_dir {input_dir}; choose an "
            "output_dir outside it (the output would be sorted again next run)"
        )
    if _inside(input_dir, output_dir):
        raise ConfigError(
            f"input_dir {input_dir} is inside output_dir {output_dir}; choose "
            "folders that do not contain each other"
        )
    state_dir = (
        (cwd / str(config["state_dir"])).resolve()
        if config.get("state_dir")
        else output_dir / STATE_FOLDER
    )
    if _inside(state_dir, input_dir):
        raise ConfigError(f"state_dir {state_dir} is inside input_dir; choose another state_dir")
    for key in ("folder_template", "file_template"):
        problems = naming.template_problems(config[key])
        if problems:
            raise ConfigError(f"{key} {config[key]!r} {problems[0]}")
    placeholder = config["placeholder"]
    if not naming.is_safe_component(placeholder):
        raise ConfigError(
            f"placeholder {placeholder!r} is not a valid file name on every "
            "system; use letters, digits, '-' or '_'"
        )
    return Settings(
        input_dir=input_dir,
        output_dir=output_dir,
        state_dir=state_dir,
        naming=Naming(
            config["folder_template"],
            config["file_template"],
            placeholder,
            bool(config["keep_series_apart"]),
        ),
        transfer_mode=config["transfer_mode"],
        verify=config["verify"],
        batches=None if config["batches"] == "auto" else int(config["batches"]),
    )


def check_layout(layout_file: Path, settings: Naming) -> None:
    """Refuse naming settings other than those the output folder was sorted with, so that
    one output folder never silently mixes two layouts."""
    if not layout_file.exists():
        return
    recorded = json.loads(layout_file.read_text())
    for key, value in asdict(settings).items():
        if key in recorded and recorded[key] != value:
            raise ConfigError(
                f"{key} is {value!r} but {layout_file.parent.parent} was sorted with "
                f"{recorded[key]!r}; set it back, or sort into a new output_dir "
                "(files already sorted never move)"
            )


# The lock must outlive the function that takes it: it is held until the process ends,
# and the kernel drops it when the process dies, even by SIGKILL.
_held_locks: list[IO] = []


def acquire_run_lock(state_dir: Path) -> None:
    """Hold an exclusive lock on state_dir for the rest of this process.

    Raises ConfigError if another live run holds it. A run killed by SIGKILL leaves no
    stale lock behind, unlike a lock file whose existence is the lock. The lock file is
    made with a state file's mode, so in a group-shared output the next member can lock.
    """
    permissions.make_folders(state_dir)
    permissions.create_state_file(state_dir / "run.lock")
    handle = open(state_dir / "run.lock", "a+")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"another dcmsort run ({holder}) is sorting into {state_dir.parent}; "
            "wait for it to finish (a second run at the same time could not be safe)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _held_locks.append(handle)
