import os
import unicodedata

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from dcmsort.inventory import decode_name, encode_name, file_name, source_path
from dcmsort.naming import (
    MARKER,
    MAX_COMPONENT_BYTES,
    fold,
    is_safe_component,
    patient_level,
    render_path,
    render_person_name,
    safe_component,
    safe_value,
    short_hash,
    template_keywords,
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
    assert "empty folder level" in template_problems("{PatientID}//{Modality}")[0]
    assert "empty folder level" in template_problems("{PatientID}/")[0]
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


# --- one name on some file system: the comparison key -----------------------------------


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def windows_upper(text: str) -> str:
    """NTFS, SMB and exFAT compare names through an upper-case table: one code unit to one
    (so ß stays ß), no normalisation."""
    return "".join(c.upper() if len(c.upper()) == 1 else c for c in text)


# How each target file system spells a name it compares: two names are one name there
# when these give one string.
TARGETS = {
    "Windows (upper-case table)": windows_upper,
    "case folding after NFC": lambda t: nfc(nfc(t).casefold()),
    "canonical caseless match (ext4 casefold, APFS)": lambda t: nfd(nfd(t).casefold()),
    "macOS normalisation (NFD)": nfd,
    "NFC": nfc,
    "ZFS (upper-case, normalised)": lambda t: nfd(windows_upper(t)),
}


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("\u0131x.dcm", "IX.dcm"),  # dotless i: NTFS upper-cases it to I
        ("T\u0131_1", "TI_1"),
        ("ix", "IX"),
        ("İ", "i\u0307"),  # capital I with dot, and i + combining dot (macOS)
        ("straße", "STRASSE"),
        ("ẞ", "ss"),
        ("\ufb01le", "FILE"),  # the fi ligature
        ("ΟΔΟΣ", "οδος"),  # final sigma
        ("οδος", "οδοσ"),
        ("\u212a", "k"),  # Kelvin sign
        ("Mu\u0308ller", "MÜLLER"),
    ],
)
def test_names_one_file_system_sees_as_one_have_one_key(one, other):
    assert fold(one) == fold(other)


@pytest.mark.parametrize(("one", "other"), [("İ", "I"), ("DOE^JOHN_1", "DOE^JOHN_l"), ("a", "b")])
def test_names_no_file_system_merges_keep_apart(one, other):
    assert fold(one) != fold(other)


def test_every_character_has_the_key_of_each_targets_spelling_of_it():
    """Exhaustive over single code points: a key equal to the key of every target's
    spelling gives two names equal on a target one key."""
    for code in [*range(0xD800), *range(0xE000, 0x30000)]:
        char = chr(code)
        key = fold(char)
        assert fold(key) == key, hex(code)
        for target, spell in TARGETS.items():
            assert fold(spell(char)) == key, (hex(code), target)


UNICODE_NAMES = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=["Cs"]),
        st.sampled_from("\u0131Iİiß\u1e9eSsς\u03c3\u03a3\u212aK\ufb01\u0345\u0307\u0301\u0339ᾳΐ"),
    ),
    max_size=12,
)


@given(UNICODE_NAMES)
@example("ᾳ\u0339")  # iota subscript and a mark it moves across when case-mapped
@example("4\u0345\u0315")
def test_names_equal_under_any_targets_comparison_have_equal_keys(text):
    key = fold(text)
    assert fold(key) == key
    for target, spell in TARGETS.items():
        assert fold(spell(text)) == key, target


@given(UNICODE_NAMES, UNICODE_NAMES)
def test_two_names_a_target_sees_as_one_are_one_key(one, other):
    if any(spell(one) == spell(other) for spell in TARGETS.values()):
        assert fold(one) == fold(other)


# --- one repair, one hash; the extension stays last -----------------------------------------


def test_a_name_that_needs_two_repairs_gets_one_hash():
    name = render({"filename": "..\\..\\x.dcm"}, "{filename}")
    assert name.count(MARKER) == 1 and name.endswith(".dcm") and is_safe_component(name)
    assert name.startswith("___.._x~")


def test_a_trailing_dot_keeps_the_extension_last():
    assert safe_component("x.dcm.").endswith(".dcm")
    assert safe_component("x.dcm.").startswith("x_~")
    assert render({"filename": "x.dcm. "}, "{filename}").endswith(".dcm")
    assert safe_component("x.dcm.") != safe_component("x.dcm..") != safe_component("x_.dcm")
    # Without an extension a trailing dot is replaced, as before.
    assert safe_component("abc.").startswith("abc_~")


def test_names_with_one_repair_are_unchanged():
    """Names an earlier version made stay the names of the same values."""
    assert render(
        {"SeriesDescription": "T1/T2", "SeriesNumber": "3"}, "{SeriesDescription}_{SeriesNumber}"
    ) == ("T1_T2~697af6_3")
    assert safe_component(".hidden") == "_hidden~" + short_hash(".hidden")
    assert render({"filename": "IM:0001.dcm"}, "{filename}") == "IM_0001~fe9150.dcm"


@given(
    st.text(alphabet=st.sampled_from("ab.\\/: "), max_size=12),
    st.sampled_from(["", ".", "..", " ", ". "]),
)
def test_any_file_name_gets_at_most_one_hash_and_keeps_its_extension(stem, tail):
    assume(stem.strip("."))  # else ".dcm" is a hidden name, not an extension
    name = render({"filename": f"{stem}.dcm{tail}"}, "{filename}")
    assert name.count(MARKER) <= 1
    assert name.endswith(".dcm")
    assert is_safe_component(name)


@given(
    st.text(alphabet=st.sampled_from("ab.\\/: "), max_size=10),
    st.text(alphabet=st.sampled_from("ab.\\/: "), max_size=10),
)
def test_two_values_that_differ_keep_apart_after_one_repair(one, other):
    template = "{SeriesDescription}_{SeriesNumber}"
    if one.strip() and other.strip() and nfc(one) != nfc(other):
        a = render({"SeriesDescription": one, "SeriesNumber": "1"}, template)
        b = render({"SeriesDescription": other, "SeriesNumber": "1"}, template)
        assert a != b


def test_the_patient_level_is_the_first_that_names_the_patient_id():
    assert patient_level(SEED_TEMPLATE) == 0
    assert patient_level("{Modality}/{PatientName}_{PatientID}/{SeriesNumber}") == 1
    assert patient_level("{PatientName}/{SeriesDescription}") is None
    # A name that falls back to the ID is a patient folder: two IDs never share it.
    assert patient_level("{PatientName|PatientID}/{SeriesDescription}") == 0


FALLBACK_TEMPLATE = (
    '{PatientName|PatientID}_{PatientID}/{SeriesDescription|ProtocolName|"no description"}'
    "_{SeriesNumber|AcquisitionNumber:03d}"
)


@pytest.mark.parametrize(
    ("values", "rendered"),
    [
        (
            {"PatientName": "DOE^JOHN", "PatientID": "7", "SeriesDescription": "T1"},
            "DOE^JOHN_7/T1_UNKNOWN",
        ),
        # Missing, empty and blank values fall through to the next in the chain.
        (
            {"PatientName": " ", "PatientID": "7", "SeriesDescription": "", "ProtocolName": "P"},
            "7_7/P_UNKNOWN",
        ),
        ({"PatientID": "7", "SeriesNumber": "3"}, "7_7/no description_003"),
        # The format spec applies to whichever value is chosen.
        ({"AcquisitionNumber": "4"}, "UNKNOWN_UNKNOWN/no description_004"),
        # A value chosen by a chain is made safe like any value.
        ({"ProtocolName": "a/../b", "PatientID": "7"}, None),
    ],
)
def test_a_fallback_chain_renders_its_first_value_that_is_not_empty(values, rendered):
    path = render_path(FALLBACK_TEMPLATE, values, "UNKNOWN")
    if rendered is not None:
        assert path == rendered
    assert len(path.split("/")) == 2 and all(map(is_safe_component, path.split("/")))


def test_a_chain_without_text_ends_with_the_placeholder():
    assert render_path("{SeriesDescription|ProtocolName}", {}, "NONE") == "NONE"


def test_the_keywords_of_a_template_are_every_link_of_every_chain():
    assert template_keywords(FALLBACK_TEMPLATE) == [
        "PatientName",
        "PatientID",
        "SeriesDescription",
        "ProtocolName",
        "SeriesNumber",
        "AcquisitionNumber",
    ]


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{PatientID|}", "empty fallback in '{PatientID|}'"),
        ("{|PatientID}", "empty fallback"),
        ("{PatientID||Modality}", "empty fallback"),
        ("{PatientID|PatientNmae}", "'{PatientNmae}', which is not a DICOM keyword"),
        ('{PatientID|"none}', "without its closing"),
        ('{PatientID|"none"|Modality}', 'after the fallback text "none", which is always'),
        ('{PatientID|""}', "empty fallback text"),
        ('{PatientID|"a/b"}', "not a valid file name on every system"),
        ('{PatientID|".x"}', "not a valid file name on every system"),
    ],
)
def test_a_broken_fallback_chain_is_named(template, problem):
    assert problem in template_problems(template)[0]
