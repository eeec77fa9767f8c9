import subprocess
import sys

import pytest

from dcmsort.naming import Naming
from dcmsort.settings import ConfigError, acquire_run_lock, check_layout, resolve

DEFAULTS = {
    "folder_template": "{PatientID}/{SeriesNumber}",
    "file_template": "{filename}",
    "placeholder": "UNKNOWN",
    "keep_series_apart": True,
    "transfer_mode": "copy",
    "verify": "size",
    "batches": "auto",
    "state_dir": "",
}


@pytest.fixture
def input_dir(tmp_path):
    folder = tmp_path / "in"
    (folder / "patient_1").mkdir(parents=True)
    return folder


def config(**values):
    return {**DEFAULTS, **values}


def test_relative_folders_are_resolved_and_state_lives_with_the_output(tmp_path, input_dir):
    settings = resolve(config(input_dir="in", output_dir="out"), cwd=tmp_path)
    assert settings.input_dir == input_dir
    assert settings.state_dir == tmp_path / "out" / ".dcmsort"
    assert settings.keywords == ["PatientID", "SeriesNumber"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"input_dir": "missing"}, "input_dir .* does not exist"),
        ({"output_dir": "in/sorted"}, "output_dir .* is inside input_dir"),
        ({"output_dir": "in"}, "output_dir .* is inside input_dir"),
        ({"output_dir": "."}, "input_dir .* is inside output_dir"),
        ({"folder_template": "{PatientNmae}"}, "folder_template .*PatientNmae.* not a DICOM"),
        ({"file_template": "{SeriesNumber"}, "file_template .* not a valid template"),
        ({"placeholder": "a/b"}, "placeholder"),
    ],
)
def test_bad_config_is_one_clear_message_naming_the_key(tmp_path, input_dir, values, message):
    with pytest.raises(ConfigError, match=message):
        resolve(config(**{"input_dir": "in", "output_dir": "out", **values}), cwd=tmp_path)


def test_an_empty_input_folder_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ConfigError, match="is empty"):
        resolve(config(input_dir="in", output_dir="out"), cwd=tmp_path)


def test_a_changed_layout_is_refused_for_an_existing_output(tmp_path):
    layout = tmp_path / "layout.json"
    layout.write_text('{"folder_template": "{PatientID}", "file_template": "{filename}"}')
    check_layout(layout, Naming("{PatientID}", "{filename}"))
    with pytest.raises(ConfigError, match="folder_template .* was sorted with"):
        check_layout(layout, Naming("{Modality}", "{filename}"))


def test_a_second_run_on_the_same_output_is_refused_while_the_first_lives(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from dcmsort.settings import acquire_run_lock as a; a(Path(sys.argv[1])); "
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another dcmsort run"):
            acquire_run_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    acquire_run_lock(tmp_path)  # the kernel dropped the killed holder's lock
