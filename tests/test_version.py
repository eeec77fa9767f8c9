"""One version number, written in pyproject.toml alone: ``dcmsort --version`` shows it."""

from __future__ import annotations

import tomllib
from importlib import metadata

import pytest
from test_cli import dcmsort as run_dcmsort

import dcmsort
from dcmsort import runner

PYPROJECT_VERSION = tomllib.loads((runner.REPO / "pyproject.toml").read_text())["project"][
    "version"
]


def test_dcmsort_version_prints_the_pyproject_version(tmp_path):
    result = run_dcmsort("--version", cwd=tmp_path)
    assert result.returncode == 0, result.output
    assert result.stdout == f"dcmsort {PYPROJECT_VERSION}\n"
    assert dcmsort.__version__ == PYPROJECT_VERSION


def test_the_changelog_names_the_current_version():
    assert f"## {PYPROJECT_VERSION}" in (runner.REPO / "CHANGELOG.md").read_text()


def test_without_a_checkout_the_version_is_the_installed_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(dcmsort, "_PYPROJECT", tmp_path / "pyproject.toml")
    try:
        installed = metadata.version("dcmsort")
    except metadata.PackageNotFoundError:
        installed = "unknown"
    assert dcmsort.version() == installed


def test_another_projects_pyproject_is_not_read(monkeypatch, tmp_path):
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "other"\nversion = "9.9"\n')
    monkeypatch.setattr(dcmsort, "_PYPROJECT", other)
    assert dcmsort.version() != "9.9"


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        _ = dcmsort.no_such_thing
