import os
import unicodedata

from hypothesis import example, given
from hypothesis import strategies as st

from dcmsort.inventory import decode_name, encode_name, file_name, source_path
from dcmsort.naming import (
    MAX_COMPONENT_BYTES,
    is_safe_component,
    render_path,
    render_person_name,
    safe_component,
    safe_value,
    template_problems,
)

SEED_TEMPLATE = "{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}"
WINDOWS_FORBIDDEN = set('<>:"/\\|?*')


def windows_valid(name: str) -> bool:
    """An independent statement of the portability rules, to check the implementation."""
    base = name.split(".")[0].rstrip(" ").upper()
    reserved = {"CON", "PRN", "AUX", "NUL"} | {
        f"{p}{n}" for p in ("COM", "LPT") for n in "0123456789¹²³"
    }
    return (
        name not in ("", ".", "..")
        and not (set(name) & WINDOWS_FORBIDDEN)
        and all(ord(c) >= 32 for c in name)
        and not name.endswith((" ", "."))
        and base not in reserved
        and len(name.encode("utf-8")) <= 255
    )


def render(values: dict, template: str = SEED_TEMPLATE) -> str:
    return render_path(template, values, "UNKNOWN")


def test_ordinary_values_give_the_seed_layout():
    values = {
        "PatientName": "DOE^JOHN",
        "PatientID": "12345",
        "SeriesDescription": "T1 MPRAGE",
        "SeriesNumber": "3",
    }
    assert render(values) == "DOE^JOHN_12345/T1 MPRAGE_3"


def test_a_leading_dot_never_makes_a_hidden_or_parent_folder():
    for raw in (".hidden", "..", ".dcmsort"):
        name = safe_component(raw)
        assert not name.startswith("."), name
    assert render({"PatientName": ".dcmsort", "PatientID": ""}).split("/")[0][0] != "."


def test_composed_and_decomposed_spellings_are_one_name():
    composed, decomposed = "M\u00fcller", "Mu\u0308ller"
    assert safe_component(decomposed) == safe_component(composed) == composed
    assert render({"PatientName": decomposed}) == render({"PatientName": composed})


def test_non_ascii_names_are_kept_not_transliterated():
    values = {
        "PatientName": "MÜLLER^HANS",
        "PatientID": "7",
        "SeriesDescription": "頭部",
        "SeriesNumber": "2",
    }
    assert render(values) == "MÜLLER^HANS_7/頭部_2"


def test_missing_and_empty_tags_render_the_placeholder():
    assert render({"PatientName": "", "PatientID": None}) == "UNKNOWN_UNKNOWN/UNKNOWN_UNKNOWN"


def test_format_specs_apply_to_numeric_header_strings():
    assert render({"SeriesNumber": "7"}, "{SeriesNumber:03d}") == "007"
    assert render({"SeriesNumber": "abc"}, "{SeriesNumber:03d}") == "abc"


def test_separators_inside_values_never_add_or_escape_folders():
    for hostile in ["../../etc", "/abs", "C:\\x", "a/../b", "..", "."]:
        path = render(
            {
                "PatientName": hostile,
                "PatientID": hostile,
                "SeriesDescription": hostile,
                "SeriesNumber": "1",
            }
        )
        parts = path.split("/")
        assert len(parts) == 2
        assert all(windows_valid(p) and p not in (".", "..") for p in parts), path


def test_windows_device_names_are_defused():
    assert render({"PatientID": "CON"}, "{PatientID}") != "CON"
    assert windows_valid(render({"PatientID": "lpt1.txt"}, "{PatientID}"))
    assert render({"SeriesDescription": "CON"}, "{SeriesDescription}_1") == "CON_1"


def test_person_name_drops_empty_trailing_components():
    assert render_person_name("DOE^JOHN^^^") == "DOE^JOHN"
    assert render_person_name("Yamada^Tarou=山田^太郎=") == "Yamada^Tarou=山田^太郎"


def test_long_values_are_shortened_and_stay_distinct():
    a = safe_component("A" * 400)
    b = safe_component("A" * 399 + "B")
    assert len(a.encode()) <= MAX_COMPONENT_BYTES and a != b


def test_template_problems_name_unknown_keywords_and_traversal():
    assert template_problems(SEED_TEMPLATE) == []
    assert "PatientNmae" in template_problems("{PatientNmae}")[0]
    assert template_problems("../{PatientID}")
    assert template_problems("static")


@given(st.text(max_size=300))
@example(".hidden")
@example("..")
@example("Mu\u0308ller")  # decomposed, as macOS file names come
def test_any_string_becomes_one_valid_portable_component(text):
    name = safe_component(text)
    assert is_safe_component(name)
    assert windows_valid(name)
    assert "/" not in name and not name.startswith(".")
    assert name == unicodedata.normalize("NFC", name)


@given(st.text(max_size=80))
def test_sanitising_is_deterministic_and_keeps_safe_names(text):
    assert safe_component(text) == safe_component(text)
    assert safe_component(safe_component(text)) == safe_component(text)


UNSAFE = [*sorted(WINDOWS_FORBIDDEN), "\x00", "\x1f"]


@given(st.text(max_size=60), st.sampled_from(UNSAFE), st.sampled_from(UNSAFE))
def test_values_differing_only_in_unsafe_characters_do_not_merge(text, one, other):
    """Two series described 'T1/T2' and 'T1:T2' must not end up in one folder."""
    a, b = f"{text}{one}x", f"{text}{other}x"
    if a != b:
        template = "{SeriesDescription}_1"
        assert render({"SeriesDescription": a}, template) != render(
            {"SeriesDescription": b}, template
        )


@given(
    st.dictionaries(
        st.sampled_from(["PatientName", "PatientID", "SeriesDescription", "SeriesNumber"]),
        st.text(max_size=100),
    )
)
def test_any_header_values_render_inside_the_output_folder(values):
    path = render(values)
    parts = path.split("/")
    assert len(parts) == 2 and all(windows_valid(p) for p in parts)


def test_a_hashed_unsafe_file_name_keeps_its_extension_last():
    assert render({"filename": "IM:0001.dcm"}, "{filename}") == "IM_0001~fe9150.dcm"
    assert safe_component("IM:0001.dcm") == "IM_0001~fe9150.dcm"
    assert safe_value("T1/T2").startswith("T1_T2~")  # a header value: no extension rule


def test_a_file_name_that_is_not_utf8_becomes_a_safe_name_that_keeps_apart():
    a = render({"filename": os.fsdecode(b"IM\xff.dcm")}, "{filename}")
    b = render({"filename": os.fsdecode(b"IM\xfe.dcm")}, "{filename}")
    assert a != b and a.endswith(".dcm") and is_safe_component(a)


NAME_BYTES = st.binary(min_size=1, max_size=255).filter(lambda b: b"/" not in b and b"\0" not in b)


@given(NAME_BYTES)
def test_any_bytes_as_a_file_name_round_trip_through_the_manifest_form(raw):
    text = encode_name(os.fsdecode(raw))
    text.encode("utf-8")  # valid UTF-8: parquet, CSV and JSON can hold it
    assert os.fsencode(decode_name(text)) == raw
    assert file_name(f"folder/{text}") == os.fsdecode(raw)


@given(st.lists(NAME_BYTES, min_size=1, max_size=4))
def test_any_bytes_as_a_folder_path_round_trip_and_open_the_same_path(parts):
    relpath = "/".join(encode_name(os.fsdecode(p)) for p in parts)
    assert os.fsencode(source_path("/in", relpath)) == b"/in/" + b"/".join(parts)
    assert decode_name(encode_name(decode_name(relpath))) == decode_name(relpath)


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40))
def test_names_that_are_utf8_without_percent_are_unchanged_by_the_manifest_form(text):
    if "%" not in text:
        assert encode_name(text) == text
        assert decode_name(text) == text
