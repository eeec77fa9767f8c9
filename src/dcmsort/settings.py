"""The run's settings, resolved from the validated config, with one-line errors for bad input.

The Snakefile first undoes what Snakemake's reading of ``--config`` does to a template
(``from_command_line``), validates the config against
``workflow/schemas/config.schema.yaml`` (keys, types, defaults; ``schema_message`` turns a
violation into one line that says what to do) and then calls ``resolve``, which checks what
a schema cannot: that the folders exist and do not nest, that the templates name real DICOM
keywords and their format specs work. ``check_layout`` then refuses a state folder that
describes another output folder, or an output sorted with other naming settings.
"""

from __future__ import annotations

import difflib
import fcntl
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from dcmsort import dictionary, filters, naming, permissions
from dcmsort.naming import Naming

STATE_FOLDER = ".dcmsort"
# Made first in a state folder: one holding other files but not this one is not a dcmsort
# state, and its files could be replaced by state files.
LOCK_FILE = permissions.LOCK_FILE
README = "config/README.md"
# What a user must pass on every real run (config/config.yaml carries no folders).
USAGE = "--config input_dir=/path/to/Unclassified output_dir=/path/to/Classified"
FOLDER_KEYS = ("input_dir", "output_dir", "state_dir")
# The naming keys, each with a value to show when it is given empty.
NAMING_EXAMPLES = {
    "folder_template": "{PatientID}/{SeriesNumber}",
    "file_template": "{filename}",
    "placeholder": "UNKNOWN",
}
TEXT_KEYS = (*FOLDER_KEYS, *NAMING_EXAMPLES)
# The key of layout.json that records the output folder a state describes.
OUTPUT_KEY = "output_dir"
# Keys that take true or false. Snakemake reads `--config key=true` as the text "true"
# (only "True" and "False" become booleans), which the schema would refuse.
BOOLEAN_KEYS = ("keep_series_apart", "check")
_BOOLEAN_WORDS = {"true": True, "false": False}
# Every manifest has these already (headers.MANIFEST_TAGS): the default costs nothing.
DEFAULT_CATALOG_TAGS = ("StudyDate", "StudyDescription", "Modality")


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
    partitions: int | None = None  # None: chosen from the number of files (auto)
    # How this run checks every placement after the transfer: "size", "checksum", or None
    # (a plain run trusts the ledger and looks at no placed file).
    check: str | None = None
    # Which files are sorted (config keys include and exclude); not part of the layout:
    # a change sorts newly included files and removes none.
    filters: filters.Filters = field(default_factory=filters.Filters)
    # Header values the series catalogue carries besides those every manifest has (config
    # key catalog_tags): read by the extract jobs with the rest.
    catalog_tags: tuple[str, ...] = DEFAULT_CATALOG_TAGS

    @property
    def naming_json(self) -> str:
        return json.dumps(asdict(self.naming), ensure_ascii=False)

    @property
    def filters_json(self) -> str:
        return self.filters.to_json()

    @property
    def keywords(self) -> list[str]:
        """DICOM keywords the templates, the filters and the catalogue use (the manifests
        must carry them)."""
        # A catalogue tag every manifest has already changes nothing (the extract jobs'
        # command line neither: Snakemake runs a job again when its params change).
        extra = set(self.catalog_tags) - set(dictionary.MANIFEST_TAGS)
        used = self.naming.fields | set(self.filters.keywords) | extra
        return sorted(used - naming.FILE_FIELDS.keys())


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _in_hidden_folder(path: Path, folder: Path) -> bool:
    """True if path lies in folder under a first component that starts with '.': a name
    the naming layer never gives a destination (``naming.safe_component``), nor the
    transfer a temporary file (those lie beside a destination, never in the output's top)."""
    return path != folder and path.relative_to(folder).parts[0].startswith(".")


def _first_link_inside(path: Path, folder: Path) -> Path | None:
    """The first symbolic link that path passes through inside folder (None if none).
    path is walked as the system resolves it: a link outside folder is followed (it may
    lead into folder), '..' goes to the real parent."""
    current = Path(path.anchor)
    for part in path.parts[1:]:
        if part == "..":
            current = current.parent
            continue
        step = current / part
        if step.is_symlink():
            if _inside(current, folder):
                return step
            step = step.resolve()
        current = step
    return None


def _as_typed(mapping: Mapping) -> str:
    """The text a user typed that YAML read as a flow mapping: ``{PatientID}``, ``{}``."""
    return "{" + ", ".join(k if v in ("", None) else f"{k}: {v}" for k, v in mapping.items()) + "}"


def from_command_line(config: dict, given: Mapping[str, Any]) -> dict:
    """The config with the text keys as the user typed them.

    Snakemake reads each ``--config`` value as YAML, so ``folder_template={PatientID}``
    arrives as the mapping ``{'PatientID': ''}``, and ``folder_template={}`` (an empty
    mapping merged into the config file's text) silently leaves the default in place.
    ``given`` is what the command line held (``workflow.config_settings.overwrite_config``).
    ``true`` and ``false`` (any case) become booleans for the keys that take them.
    A one-field template is turned back into its text; anything else that is not text is
    refused with the quoting that works. Missing folders are refused here too, before the
    schema would call them merely "required".
    """
    config = dict(config)
    for key in TEXT_KEYS:
        if key not in given and key not in config:
            continue  # the schema's default
        value = given[key] if key in given else config[key]
        # `key=`, `key=""` and `key=''` all arrive as None.
        if value is None or value == "":
            if key in NAMING_EXAMPLES:
                raise ConfigError(
                    f"{key} is empty; leave it out for the default, or give one, e.g. "
                    f"--config '{key}=\"{NAMING_EXAMPLES[key]}\"' (see {README})"
                )
            config[key] = ""  # state_dir: the default; input_dir, output_dir: not set (below)
        elif isinstance(value, Mapping) and len(value) <= 1:
            config[key] = _as_typed(value)
        elif isinstance(value, Mapping | list):
            typed = _as_typed(value) if isinstance(value, Mapping) else "..."
            raise ConfigError(
                f"{key} was read as YAML ({value!r}), not as text; quote it on the "
                f"command line: --config '{key}=\"{typed}\"'"
            )
    for key in BOOLEAN_KEYS:
        value = given.get(key)
        if isinstance(value, str) and value.lower() in _BOOLEAN_WORDS:
            config[key] = _BOOLEAN_WORDS[value.lower()]
    missing = [key for key in ("input_dir", "output_dir") if not config.get(key)]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; "
            f"every run names its folders: snakemake {USAGE} (`make demo` sorts demo data)"
        )
    return config


def _describe(schema: Mapping) -> str:
    """What a schema accepts, in words: 'a whole number from 1 to 10000, or auto'."""
    if "oneOf" in schema or "anyOf" in schema:
        return ", or ".join(_describe(s) for s in schema.get("oneOf", schema.get("anyOf")))
    if "const" in schema:
        return str(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(_describe({**schema, "type": one}) for one in kind)
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and high is not None:
            return f"a whole number from {low} to {high}"
        return "a whole number"
    return {
        "boolean": "true or false",
        "string": "text",
        "number": "a number",
        "object": "a mapping (keyword: value)",
        "null": "empty",
    }.get(kind, f"of type {kind}")


def schema_message(error: Any) -> str:
    """One line for a jsonschema ValidationError: the key, what is wrong, what to do."""
    path = list(getattr(error, "absolute_path", []))
    key = ".".join(map(str, path))
    validator = getattr(error, "validator", None)
    if validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        hints = [
            f"'{name}' is not a dcmsort key"
            + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(name, known, 1))
            for name in unknown
        ]
        return f"{'; '.join(hints)}; the keys are {', '.join(known)} (see {README})"
    if validator == "required":
        return f"{error.message}; pass it: snakemake {USAGE}"
    if key and isinstance(getattr(error, "schema", None), Mapping):
        # Validation stops at the first error, so its schema is the key's own.
        expected = _describe(error.schema)
        if expected == "text":
            return (
                f"{key} must be text, not {error.instance!r} (the command line is read as "
                f"YAML); quote the value: --config '{key}=\"...\"'"
            )
        return f"{key} must be {expected}, not {error.instance!r} (see {README})"
    return f"{key or 'config'}: {getattr(error, 'message', error)} (see {README})"


def format_spec_problem(field: str, spec: str) -> str | None:
    """Why a format spec can never apply to a field's values (None when it can).

    The naming layer falls back to the plain text when a spec does not apply to a value,
    which hides a spec that applies to none (``{SeriesNumber:%Y}`` gives folders ``3``,
    ``8``). So each spec is tried at start on a sample of the kind it asks for, converted as
    ``naming`` converts: integer presentation types on a number, float types on a float,
    any other on text.
    """
    if not spec:
        return None
    kind = spec[-1]
    sample: object = 3 if kind in "dxXobn" else 1.5 if kind in "eEfFgG%" else "TEXT"
    try:
        format(sample, spec)
    except (ValueError, TypeError) as error:
        return (
            f"has the format spec '{{{field}:{spec}}}', which formats no value ({error}); "
            f"use a Python format spec such as {{{field}:03d}} or {{{field}:>8}}, or none"
        )
    return None


def _folder_problem(key: str, path: Path) -> str | None:
    """Why path cannot be (or become) a folder dcmsort writes to."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        # Snakemake records each output file by its path as UTF-8 (.snakemake/incomplete):
        # a path with bytes that are not UTF-8 stops it with a traceback.
        shown = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
        return (
            f"{key} {shown} is not valid UTF-8 (a name with a byte such as \\xff), which "
            "Snakemake cannot record; choose a folder whose path is UTF-8"
        )
    if "{" in str(path) or "}" in str(path):
        return (
            f"{key} {path} contains '{{' or '}}', which Snakemake reads as a wildcard; "
            "choose a folder whose path has no braces"
        )
    for existing in (path, *path.parents):
        if existing.exists():
            if existing.is_dir():
                return None
            what = "is" if existing == path else f"cannot be created: {existing} is"
            return f"{key} {path} {what} a file, not a folder; choose a folder (created if missing)"
    return None


def _foreign_file(state_dir: Path) -> str | None:
    """The name of a file in an existing state_dir that is not dcmsort's (None if there is
    none): one of a folder that holds no LOCK_FILE, except Snakemake's `.snakemake/` (the
    working directory may be the state folder)."""
    if not state_dir.is_dir() or (state_dir / LOCK_FILE).exists():
        return None
    try:
        with os.scandir(state_dir) as entries:
            return next((e.name for e in entries if e.name != ".snakemake"), None)
    except OSError as error:
        raise ConfigError(f"state_dir {state_dir} cannot be read ({error.strerror})") from error


def resolve(config: dict, cwd: Path | None = None) -> Settings:
    """Settings from a schema-validated config; raises ConfigError naming key and fix."""
    cwd = (cwd or Path.cwd()).resolve()
    for key in ("input_dir", "output_dir"):
        if not config.get(key):
            raise ConfigError(f"{key} is not set; every run names its folders: snakemake {USAGE}")
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
    if _inside(cwd, input_dir):
        raise ConfigError(
            f"the working directory {cwd} is inside input_dir {input_dir}, and Snakemake "
            "writes its .snakemake/ folder there; run from outside it (the checkout, or "
            "any folder with snakemake -s path/to/Snakefile, or pass --directory)"
        )
    state_dir = (
        cwd / os.path.expanduser(str(config["state_dir"]))
        if config.get("state_dir")
        else output_dir / STATE_FOLDER
    )
    link = _first_link_inside(state_dir, output_dir)
    if link:
        raise ConfigError(
            f"state_dir {state_dir} is reached through the symbolic link {link} inside "
            "output_dir, and no link inside the output is followed; make it a folder, or "
            "set state_dir to the folder the link points to"
        )
    state_dir = state_dir.resolve()
    if _inside(state_dir, input_dir):
        raise ConfigError(f"state_dir {state_dir} is inside input_dir; choose another state_dir")
    if _inside(state_dir, output_dir) and not _in_hidden_folder(state_dir, output_dir):
        raise ConfigError(
            f"state_dir {state_dir} is inside output_dir {output_dir}, where state files "
            "could replace sorted ones; leave state_dir empty (output_dir/.dcmsort), or "
            "choose a folder outside output_dir or one whose name starts with '.' in it"
        )
    if _inside(output_dir, state_dir):
        raise ConfigError(
            f"output_dir {output_dir} is inside state_dir {state_dir}; choose folders "
            "that do not contain each other (or leave state_dir empty)"
        )
    for key, folder in (("output_dir", output_dir), ("state_dir", state_dir)):
        problem = _folder_problem(key, folder)
        if problem:
            raise ConfigError(problem)
    foreign = _foreign_file(state_dir)
    if foreign:
        raise ConfigError(
            f"state_dir {state_dir} holds {foreign!r} and no dcmsort state; choose a new or "
            "empty folder (state files are written there by fixed names, replacing any other)"
        )
    for key in ("folder_template", "file_template"):
        one_name = key == "file_template"
        problems = naming.template_problems(config[key], one_name) or [
            problem
            for field, spec in naming.template_fields(config[key])
            if (problem := format_spec_problem(field, spec))
        ]
        if problems:
            fix = (
                "; put a DICOM keyword in the braces, e.g. {PatientID}"
                if "empty field" in problems[0]
                else f" (templates: {README})"
            )
            raise ConfigError(f"{key} {config[key]!r} {problems[0]}{fix}")
    placeholder = config["placeholder"]
    if not naming.is_safe_component(placeholder):
        raise ConfigError(
            f"placeholder {placeholder!r} is not a valid file name on every "
            "system; use letters, digits, '-' or '_'"
        )
    naming_settings = Naming(
        config["folder_template"],
        config["file_template"],
        placeholder,
        bool(config["keep_series_apart"]),
    )
    try:
        rules = filters.parse(config)
    except filters.FilterError as error:
        raise ConfigError(f"{error} (filters: {README})") from None
    catalog_tags = tuple(dict.fromkeys(str(tag) for tag in config.get("catalog_tags") or ()))
    for tag in catalog_tags:
        if dictionary.tag_for_keyword(tag) is None:
            raise ConfigError(
                f"catalog_tags names '{tag}', which is not a DICOM keyword"
                f"{dictionary.keyword_hint(tag)}; list "
                f"keywords, e.g. catalog_tags: [StudyDate, BodyPartExamined] ({README})"
            )
    given = config.get("partitions", "auto")
    partitions = None if given == "auto" else int(given)
    if partitions and partitions > 1 and not naming.top_level_from_headers(naming_settings):
        raise ConfigError(
            f"partitions={partitions} needs a folder_template whose first folder is made of "
            "DICOM keywords only ({filename} and {input_folder} there would plan identical "
            "files apart); use partitions=1 or move them below the first '/'"
        )
    return Settings(
        input_dir=input_dir,
        output_dir=output_dir,
        state_dir=state_dir,
        naming=naming_settings,
        transfer_mode=config["transfer_mode"],
        verify=config["verify"],
        batches=None if config["batches"] == "auto" else int(config["batches"]),
        partitions=partitions,
        check=check_how(config.get("check", False), config["verify"]),
        filters=rules,
        catalog_tags=catalog_tags,
    )


def check_how(check: bool | str, verify: str) -> str | None:
    """What ``check`` asks for: true checks as ``verify`` does (size, or checksum)."""
    if check is True:
        return verify
    return check or None


def discard_logs(logfiles: list[str]) -> None:
    """Remove Snakemake's log of a refused run, and its folders when they are left empty.

    Snakemake creates ``.snakemake/log/<time>.snakemake.log`` in the working directory
    before the workflow is read; a run refused at start (e.g. one started inside
    input_dir) must leave no trace, least of all in the input.
    """
    for logfile in map(Path, logfiles):
        logfile.unlink(missing_ok=True)
        for folder in (logfile.parent, logfile.parent.parent):
            if folder.name not in ("log", ".snakemake"):
                break
            try:
                folder.rmdir()  # only when empty: earlier runs' logs stay
            except OSError:
                break


def _described_output(state_dir: Path, recorded: Mapping, output_dir: Path) -> Path | None:
    """The output folder the state in state_dir describes (None for a new state).

    layout.json records it (``layout_record``). A state of v0.3 has no such record: one
    inside the current output describes it (a state moves with its output), one elsewhere
    describes the output its last summary.json names; until its next plan writes the
    record, a state without either (a first run stopped before its plan) takes the current
    output.
    """
    text = recorded.get(OUTPUT_KEY)
    if text is None and _inside(state_dir, output_dir):
        return output_dir
    if text is None:
        try:
            text = json.loads((state_dir / "summary.json").read_text()).get(OUTPUT_KEY)
        except (OSError, ValueError, AttributeError):
            return None
    return (state_dir / text).resolve() if text else None


def layout_record(settings: Naming, output_dir: Path, state_dir: Path) -> dict:
    """What layout.json records: the naming settings, and the output folder the state
    describes, relative to the state when the state lies inside it (so the two can be
    moved together), else as its real path."""
    output_dir, state_dir = output_dir.resolve(), state_dir.resolve()
    where = (
        os.path.relpath(output_dir, state_dir)
        if _inside(state_dir, output_dir)
        else str(output_dir)
    )
    return {**asdict(settings), OUTPUT_KEY: where}


def check_layout(layout_file: Path, settings: Naming, output_dir: Path) -> None:
    """Refuse an output folder other than the one the state describes, so that one state
    never mixes two outputs (its ledger and report would describe files that are not
    there), and naming settings other than those the output folder was sorted with, so
    that one output folder never silently mixes two layouts."""
    output_dir = output_dir.resolve()
    recorded = json.loads(layout_file.read_text()) if layout_file.exists() else {}
    described = _described_output(layout_file.parent, recorded, output_dir)
    if described is not None and described != output_dir:
        raise ConfigError(
            f"state_dir {layout_file.parent} holds the state of output_dir {described}, not "
            f"{output_dir}; sort into {described}, or give {output_dir} another state_dir "
            "(or leave state_dir empty)"
        )
    for key, value in asdict(settings).items():
        if key in recorded and recorded[key] != value:
            raise ConfigError(
                f"{key} is {value!r} but {output_dir} was sorted with "
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
    permissions.create_state_file(state_dir / LOCK_FILE)
    handle = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held open on purpose)
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
