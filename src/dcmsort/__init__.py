"""dcmsort: sort a dump of unorganised DICOM files into a clean, predictable tree."""

from __future__ import annotations

from pathlib import Path

# The one place the version is written by hand is pyproject.toml.
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def version() -> str:
    """dcmsort's version: the pyproject.toml of the checkout this code runs from (an
    editable install's recorded version is the one it was installed with), else the
    installed package's."""
    try:
        import tomllib

        project = tomllib.loads(_PYPROJECT.read_text(encoding="utf-8")).get("project", {})
    except (OSError, ValueError):
        project = {}
    if project.get("name") == "dcmsort" and "version" in project:
        return project["version"]
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("dcmsort")
    except PackageNotFoundError:
        return "unknown"


def __getattr__(name: str) -> object:
    """Read when asked, so that ``import dcmsort`` (every job) imports neither pyarrow nor
    pandas: ``__version__``, and ``dcmsort.tables(OUT)`` (the module, which is callable)."""
    if name == "__version__":
        return version()
    if name == "tables":
        import importlib

        return importlib.import_module("dcmsort.tables")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
