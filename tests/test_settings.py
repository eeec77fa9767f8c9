import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from dcmsort.naming import Naming
from dcmsort.settings import (
    ConfigError,
    acquire_run_lock,
    check_how,
    check_layout,
    discard_logs,
    format_spec_problem,
    from_command_line,
    layout_record,
    resolve,
    schema_message,
)

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


# Each message names the key, and then says what to do (the part after the `;`).
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"input_dir": ""}, "input_dir is not set; .* --config input_dir=/path/to/"),
        ({"output_dir": None}, "output_dir is not set; .* output_dir=/path/to/"),
        ({"input_dir": "missing"}, "input_dir .* does not exist; set input_dir to the folder"),
        ({"output_dir": "in/sorted"}, "output_dir .* is inside input_dir .*; choose an output_dir"),
        ({"output_dir": "in"}, "output_dir .* is inside input_dir .*; choose an output_dir"),
        ({"output_dir": "."}, "input_dir .* is inside output_dir .*; choose folders"),
        ({"output_dir": "out/{x}"}, "output_dir .* contains '{' or '}'.*; choose a folder"),
        ({"state_dir": "s{1}"}, "state_dir .* contains '{' or '}'.*; choose a folder"),
        ({"output_dir": "out\udcfe"}, r"output_dir .*out\\xfe is not valid UTF-8 .*; choose a"),
        ({"state_dir": "s\udcff/x"}, r"state_dir .*s\\xff/x is not valid UTF-8 .*; choose a"),
        ({"state_dir": "in/state"}, "state_dir .* is inside input_dir; choose another state_dir"),
        ({"output_dir": "a_file"}, r"output_dir .*a_file is a file, not a folder; choose a"),
        ({"output_dir": "a_file/x"}, "output_dir .* cannot be created: .*a_file is a file"),
        ({"state_dir": "a_file"}, "state_dir .*a_file is a file, not a folder; choose a"),
        ({"state_dir": "out"}, "state_dir .* is inside output_dir .*; leave state_dir empty"),
        ({"state_dir": "out/P_1/state"}, "state_dir .* inside output_dir .*could replace sorted"),
        ({"state_dir": "out/P_1/.state"}, "inside output_dir .*or one whose name starts with '.'"),
        ({"state_dir": "."}, "output_dir .* is inside state_dir .*; choose folders that do not"),
        ({"file_template": "a/{filename}"}, "file_template .* contains '/', but it names one file"),
        ({"state_dir": "notes"}, "state_dir .*notes holds 'todo.txt' and no dcmsort state; choose"),
        (
            {"folder_template": "{PatientNmae}"},
            "folder_template .*PatientNmae.* not a DICOM keyword .*examples: PatientID",
        ),
        ({"file_template": "{SeriesNumber"}, "file_template .* not a valid template .*README"),
        ({"folder_template": "{}"}, "folder_template .* empty field .*; put a DICOM keyword"),
        (
            {"folder_template": "{SeriesNumber:%Y}"},
            "folder_template .*'{SeriesNumber:%Y}'.* formats no value .*; use a Python format",
        ),
        ({"file_template": "{InstanceNumber:04q}.dcm"}, "file_template .* formats no value"),
        ({"placeholder": "a/b"}, "placeholder .* not a valid file name .*; use letters"),
    ],
)
def test_bad_config_is_one_clear_message_naming_the_key_and_the_fix(
    tmp_path, input_dir, values, message
):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("a user's own file")
    with pytest.raises(ConfigError, match=message):
        resolve(config(**{"input_dir": "in", "output_dir": "out", **values}), cwd=tmp_path)


@pytest.mark.parametrize("spec", ["03d", "x", ">8", ".3s", ".1f", "^10", ",d", "%"])
def test_working_format_specs_are_accepted(spec):
    assert format_spec_problem("SeriesNumber", spec) is None


@pytest.mark.parametrize("spec", ["%Y", "=5", "04q", "zz"])
def test_format_specs_that_format_no_value_are_refused(spec):
    assert "formats no value" in format_spec_problem("SeriesNumber", spec)


@pytest.mark.parametrize("cwd", ["in", "in/patient_1"])
def test_a_run_from_inside_the_input_is_refused(tmp_path, input_dir, cwd):
    with pytest.raises(ConfigError, match="working directory .* is inside input_dir .*; run from"):
        resolve(
            config(input_dir=str(input_dir), output_dir=str(tmp_path / "out")), cwd=tmp_path / cwd
        )


@pytest.mark.parametrize(
    ("typed", "read_as", "text"),
    [
        ("{PatientID}", {"PatientID": ""}, "{PatientID}"),
        ("{InstanceNumber:04d}", {"InstanceNumber:04d": ""}, "{InstanceNumber:04d}"),
        ("{}", {}, "{}"),
        ("(config file) {PatientID}", {"PatientID": None}, "{PatientID}"),
    ],
)
def test_a_template_yaml_read_as_a_mapping_is_turned_back_into_its_text(typed, read_as, text):
    base = {"input_dir": "in", "output_dir": "out", "folder_template": "{PatientName}"}
    # Snakemake merges a command-line mapping into the config file's text: `{}` leaves the
    # default in place, so what the command line held is what counts.
    merged = {**base, "folder_template": read_as or base["folder_template"]}
    fixed = from_command_line(merged, {"folder_template": read_as})
    assert fixed["folder_template"] == text


def test_a_template_read_as_a_longer_mapping_says_how_to_quote_it():
    given = {"folder_template": {"PatientID": "", "Modality": ""}}
    with pytest.raises(
        ConfigError, match=r"""--config 'folder_template="{PatientID, Modality}"'"""
    ):
        from_command_line({"input_dir": "in", "output_dir": "out", **given}, given)


@pytest.mark.parametrize("missing", [["input_dir"], ["output_dir"], ["input_dir", "output_dir"]])
def test_missing_folders_say_what_to_pass(missing):
    values = {key: "x" for key in ("input_dir", "output_dir") if key not in missing}
    with pytest.raises(ConfigError) as caught:
        from_command_line(values, {})
    message = str(caught.value)
    assert message.startswith(" and ".join(missing))
    assert "--config input_dir=/path/to/Unclassified output_dir=/path/to/Classified" in message
    assert "make demo" in message


def test_the_log_of_a_refused_run_is_removed_with_the_folders_it_made(tmp_path):
    log = tmp_path / ".snakemake" / "log" / "now.snakemake.log"
    log.parent.mkdir(parents=True)
    log.write_text("")
    discard_logs([str(log)])
    assert list(tmp_path.iterdir()) == []
    earlier = tmp_path / ".snakemake" / "log" / "earlier.snakemake.log"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("kept")
    log.write_text("")
    discard_logs([str(log)])
    assert earlier.read_text() == "kept" and not log.exists()


def test_an_empty_input_folder_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ConfigError, match="is empty"):
        resolve(config(input_dir="in", output_dir="out"), cwd=tmp_path)


def test_a_changed_layout_is_refused_for_an_existing_output(tmp_path):
    layout = tmp_path / "layout.json"
    layout.write_text('{"folder_template": "{PatientID}", "file_template": "{filename}"}')
    check_layout(layout, Naming("{PatientID}", "{filename}"), tmp_path)
    with pytest.raises(ConfigError, match="folder_template .* was sorted with"):
        check_layout(layout, Naming("{Modality}", "{filename}"), tmp_path)


@pytest.mark.parametrize(
    ("state", "moves_with_the_output"), [(".dcmsort", True), (".a/.b", True), ("../state", False)]
)
def test_a_state_describes_one_output_and_moves_with_it_when_inside(
    tmp_path, state, moves_with_the_output
):
    naming = Naming("{PatientID}", "{filename}")
    output, other = tmp_path / "one" / "out", tmp_path / "one" / "other"
    state_dir = output / state
    state_dir.mkdir(parents=True)
    (state_dir / "layout.json").write_text(json.dumps(layout_record(naming, output, state_dir)))
    check_layout(state_dir / "layout.json", naming, output)
    (tmp_path / "link").symlink_to(output)
    check_layout(state_dir / "layout.json", naming, tmp_path / "link")  # the same folder
    with pytest.raises(ConfigError, match="holds the state of output_dir .*out, not .*other;"):
        check_layout(state_dir / "layout.json", naming, other)
    (tmp_path / "one").rename(tmp_path / "moved")  # the output, with its state, moved
    moved = tmp_path / "moved" / "out"
    if moves_with_the_output:
        check_layout(moved / state / "layout.json", naming, moved)
    else:  # a state elsewhere names the output by its path
        with pytest.raises(ConfigError, match="holds the state of output_dir .*one/out, not"):
            check_layout(moved / state / "layout.json", naming, moved)


def test_a_v03_state_without_an_output_record_is_judged_by_where_it_lies_and_its_report(
    tmp_path,
):
    naming = Naming("{PatientID}", "{filename}")
    inside, elsewhere = tmp_path / "out" / ".dcmsort", tmp_path / "state"
    for state in (inside, elsewhere):
        state.mkdir(parents=True)
        (state / "layout.json").write_text(json.dumps(dataclasses.asdict(naming)))
        (state / "summary.json").write_text(json.dumps({"output_dir": "/was/sorted/here"}))
    check_layout(inside / "layout.json", naming, tmp_path / "out")  # moved with its output
    with pytest.raises(ConfigError, match="holds the state of output_dir /was/sorted/here"):
        check_layout(elsewhere / "layout.json", naming, tmp_path / "out")
    (elsewhere / "summary.json").unlink()  # a first run stopped before its report
    check_layout(elsewhere / "layout.json", naming, tmp_path / "out")


def test_a_state_dir_reached_through_a_link_inside_the_output_is_refused(tmp_path, input_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / ".dcmsort").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "out_link").symlink_to(tmp_path / "out")
    for state_dir in ("", "out/.dcmsort/sub", "out_link/.dcmsort", "out/.x/../.dcmsort"):
        with pytest.raises(ConfigError, match=r"symbolic link .*out/\.dcmsort inside output_dir"):
            resolve(config(input_dir="in", output_dir="out", state_dir=state_dir), cwd=tmp_path)
    # A link on the way to the output is followed, as it is for output_dir itself.
    (tmp_path / "out" / ".dcmsort").unlink()
    settings = resolve(
        config(input_dir="in", output_dir="out", state_dir="out_link/.state"), cwd=tmp_path
    )
    assert settings.state_dir == tmp_path / "out" / ".state"


def test_a_state_dir_in_a_hidden_folder_of_the_output_or_in_the_home_is_accepted(
    tmp_path, input_dir, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for given, expected in [
        ("out/.state", tmp_path / "out" / ".state"),
        ("~/state", tmp_path / "home" / "state"),
    ]:
        settings = resolve(config(input_dir="in", output_dir="out", state_dir=given), tmp_path)
        assert settings.state_dir == expected


@pytest.mark.parametrize("key", ["folder_template", "file_template", "placeholder"])
@pytest.mark.parametrize("given", [None, ""])
def test_an_empty_naming_value_is_refused_as_empty_not_as_unquoted(key, given):
    with pytest.raises(ConfigError, match=f"^{key} is empty; leave it out for the default"):
        from_command_line({"input_dir": "in", "output_dir": "out", key: given}, {key: given})


def test_an_empty_state_dir_is_the_default():
    given = {"state_dir": None}
    assert (
        from_command_line({"input_dir": "i", "output_dir": "o", **given}, given)["state_dir"] == ""
    )


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


SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batches": 0}, "batches must be a whole number from 1 to 10000, or auto, not 0"),
        ({"batches": "many"}, "batches must be a whole number from 1 to 10000, or auto"),
        ({"transfer_mode": "move"}, "transfer_mode must be one of copy, hardlink, symlink"),
        ({"keep_series_apart": "maybe"}, "keep_series_apart must be true or false"),
        ({"check": "yes please"}, "check must be true or false, or one of size, checksum"),
        (
            {"placeholder": 7},
            """placeholder must be text.*quote the value: --config 'placeholder=""",
        ),
        ({"inptu_dir": "x"}, "'inptu_dir' is not a dcmsort key \\(did you mean input_dir\\?\\)"),
    ],
)
def test_a_schema_violation_is_one_line_that_says_what_is_accepted(values, message):
    validator = jsonschema.Draft202012Validator(yaml.safe_load(SCHEMA.read_text()))
    error = next(validator.iter_errors({"input_dir": "in", "output_dir": "out", **values}))
    assert re.search(message, schema_message(error))


def test_a_state_dir_of_dcmsort_or_snakemake_alone_is_accepted(tmp_path, input_dir):
    state = tmp_path / "state"
    (state / ".snakemake").mkdir(parents=True)  # the working directory is the state folder
    resolve(config(input_dir="in", output_dir="out", state_dir="state"), cwd=tmp_path)
    acquire_run_lock(state)
    (state / "report.html").write_text("dcmsort's own")
    resolve(config(input_dir="in", output_dir="out", state_dir="state"), cwd=tmp_path)


@pytest.mark.parametrize(
    ("typed", "verify", "how"),
    [
        ("true", "size", "size"),
        ("True", "checksum", "checksum"),  # true checks as verify does
        ("false", "checksum", None),
        ("size", "checksum", "size"),
        ("checksum", "size", "checksum"),
    ],
)
def test_check_on_the_command_line_says_how_a_run_checks(typed, verify, how):
    # Snakemake reads --config check=true as the text "true" (only True is a boolean).
    given = {"check": typed, "verify": verify}
    fixed = from_command_line({"input_dir": "in", "output_dir": "out", **given}, given)
    assert check_how(fixed["check"], verify) == how


def test_keep_series_apart_false_on_the_command_line_is_a_boolean():
    given = {"keep_series_apart": "false"}
    fixed = from_command_line({"input_dir": "in", "output_dir": "out", **given}, given)
    assert fixed["keep_series_apart"] is False


def test_catalog_tags_add_only_keywords_no_manifest_has_yet(tmp_path, input_dir):
    def keywords(tags):
        given = config(input_dir="in", output_dir="out", catalog_tags=tags)
        return resolve(given, cwd=tmp_path).keywords

    assert keywords(["StudyDate", "Modality"]) == ["PatientID", "SeriesNumber"]
    assert keywords(["BodyPartExamined"]) == ["BodyPartExamined", "PatientID", "SeriesNumber"]


def test_a_catalog_tag_that_is_no_dicom_keyword_is_refused_with_a_hint(tmp_path, input_dir):
    with pytest.raises(ConfigError, match="catalog_tags names 'BodyPartExamind'.*BodyPartExamined"):
        resolve(
            config(input_dir="in", output_dir="out", catalog_tags=["BodyPartExamind"]), tmp_path
        )
