"""Templates and safe names: turn untrusted header values into portable paths.

Every function here is pure. Header values are untrusted input: whatever a tag holds, a
rendered path stays inside the output folder and every component is valid on Linux, macOS
and Windows. A value is kept exactly as it is when it is already safe (so ordinary names
look like the seed's); when anything has to change, a short hash of the original value is
appended (``~1a2b3c``) so that two values differing only in unsafe characters never merge.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from dcmsort import dictionary

REPLACEMENT = "_"
MARKER = "~"
# 255 bytes is the limit of ext4, APFS and NTFS (NTFS counts UTF-16 units; 255 UTF-8 bytes
# are never more than 255 UTF-16 units).
MAX_COMPONENT_BYTES = 255
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in [*"0123456789", "¹", "²", "³"]]
)
# Fields a template may use besides DICOM keywords.
FILE_FIELDS = {"filename": "the original file name", "input_folder": "the top-level input folder"}
# Separates the fallbacks of one field: {SeriesDescription|ProtocolName|"no description"}.
FALLBACK = "|"


@dataclass(frozen=True)
class Naming:
    """The settings that decide names; an output folder keeps one set for its lifetime."""

    folder_template: str
    file_template: str
    placeholder: str = "UNKNOWN"
    keep_series_apart: bool = True

    @property
    def fields(self) -> set[str]:
        """Every field the two templates use (DICOM keywords and FILE_FIELDS)."""
        return {
            keyword
            for template in (self.folder_template, self.file_template)
            for keyword in template_keywords(template)
        }


def short_hash(text: str, length: int = 6) -> str:
    """A short stable hex digest of text (not a security feature, a disambiguator)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def _split_extension(name: str) -> tuple[str, str]:
    """Split a short alphanumeric extension (``.dcm``) off, so edits keep it last."""
    stem, dot, ext = name.rpartition(".")
    if dot and stem.strip(".") and 0 < len(ext) <= 8 and ext.isalnum():
        return stem, dot + ext
    return name, ""


def _split_name(name: str) -> tuple[str, str, str]:
    """(stem, extension, trailing dots and spaces): the extension is looked for before
    the trailing dots and spaces Windows drops, so ``x.dcm.`` keeps ``.dcm`` last."""
    body = name.rstrip(". ")
    stem, ext = _split_extension(body)
    return stem, ext, name[len(body) :]


def fold(name: str) -> str:
    """The key under which two names are one name on some file system dcmsort may write
    to: equal keys for names equal under Windows' upper-casing (NTFS, SMB, exFAT: a dotless
    i, U+0131, is ``I``), under case folding with either normalisation (ext4 casefold,
    APFS, the Unicode canonical caseless match: ``ß`` is ``SS``, the ligature U+FB01 is
    ``FI``, the final sigma is a sigma, the Kelvin sign is ``K``) and under normalisation
    alone (macOS's NFD: ``Müller`` composed or not). One key is an equivalence, so it
    merges a little more than any one target (``ß`` and ``ss`` are two names on NTFS): a
    name free under it is free everywhere.

    Upper-casing first takes the dotless i to ``I``; case folding then takes ``ẞ``, ``SS``
    and ``ß`` to ``ss``. The Greek iota subscript (U+0345) is the one mark whose case
    mapping is a letter (an iota: Windows upper-cases it so), which moves it across other
    marks; every iota is spelled as the mark, so canonical ordering puts it in one place
    whichever way it came."""
    if name.isascii():
        return name.lower()
    decomposed = unicodedata.normalize("NFD", name)
    return unicodedata.normalize("NFC", decomposed.upper().casefold().replace("\u03b9", "\u0345"))


def patient_level(folder_template: str) -> int | None:
    """The folder level (0 for the first) that holds one patient: the first whose name uses
    ``{PatientID}``; None when none does (the template groups by what it names)."""
    level = 0
    for literal, field_name, _, _ in _parsed(folder_template):
        level += literal.count("/")
        if field_name is not None and "PatientID" in fallbacks(field_name).keywords:
            return level
    return None


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore")


def is_safe_component(name: str) -> bool:
    """True if name is one valid path component on Linux, macOS and Windows."""
    return (
        bool(name)
        and name == unicodedata.normalize("NFC", name)
        and not name.startswith(".")
        and not name.endswith((".", " "))
        and not _has_unsafe_character(name)
        and name.split(".")[0].rstrip(" ").upper() not in _WINDOWS_RESERVED
        and len(name.encode("utf-8", "surrogatepass")) <= MAX_COMPONENT_BYTES
    )


# Forbidden on Windows, separators, C0/C1 control characters and lone surrogates.
_UNSAFE_CHARACTER = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f-\x9f\ud800-\udfff]')


def _has_unsafe_character(text: str) -> bool:
    return _UNSAFE_CHARACTER.search(text) is not None


def safe_value(raw: str, keep_extension: bool = False) -> str:
    """A header value made safe to embed in a component: separators, characters Windows
    forbids, control characters and lone surrogates (bytes of a file name that are not
    UTF-8) become ``_``, marked with a hash of the original; with ``keep_extension`` (a
    file name) the mark goes before the extension. Rules about whole names (dots, device
    names, length) are left to ``safe_component``."""
    text = unicodedata.normalize("NFC", raw)
    if not _has_unsafe_character(text):
        return text
    stem, ext, trail = _split_name(text) if keep_extension else (text, "", "")
    return _UNSAFE_CHARACTER.sub(REPLACEMENT, stem) + MARKER + short_hash(text) + ext + trail


def safe_component(raw: str, placeholder: str = "UNKNOWN") -> str:
    """Return raw as one portable path component.

    Unchanged when already safe; otherwise unsafe characters become ``_``, a leading dot,
    trailing dots and spaces and Windows device names are defused, long names are shortened,
    and ``~`` plus a hash of the original is added before the extension.
    """
    text = unicodedata.normalize("NFC", raw)
    if not text:
        text = placeholder
    if is_safe_component(text):
        return text
    stem, ext, trail = _split_name(text)  # x.dcm. becomes x_~<hash>.dcm
    cleaned = _UNSAFE_CHARACTER.sub(REPLACEMENT, stem) + REPLACEMENT * len(trail)
    lead = len(cleaned) - len(cleaned.lstrip("."))
    cleaned = REPLACEMENT * lead + cleaned[lead:]
    trail = len(cleaned) - len(cleaned.rstrip(". "))
    cleaned = cleaned[: len(cleaned) - trail] + REPLACEMENT * trail
    if cleaned.split(".")[0].rstrip(" ").upper() in _WINDOWS_RESERVED:
        cleaned = REPLACEMENT + cleaned
    marker = MARKER + short_hash(text)
    room = MAX_COMPONENT_BYTES - len((marker + ext).encode("utf-8"))
    return _truncate_utf8(cleaned, room) + marker + ext


def with_suffix(name: str, suffix: str) -> str:
    """Add a disambiguating suffix before the extension, keeping the byte limit."""
    stem, ext = _split_extension(name)
    room = MAX_COMPONENT_BYTES - len((suffix + ext).encode("utf-8"))
    return _truncate_utf8(stem, room) + suffix + ext


def render_person_name(value: str) -> str:
    """Readable PersonName: drop empty trailing ``^`` components and ``=`` groups.

    ``DOE^JOHN^^^`` becomes ``DOE^JOHN``; ``Yamada^Tarou=山田^太郎=`` keeps both groups.
    Ordinary names (``DOE^JOHN``) stay exactly as pydicom prints them, like the seed.
    """
    groups = [group.rstrip("^") for group in value.split("=")]
    while len(groups) > 1 and not groups[-1]:
        groups.pop()
    return "=".join(groups)


@cache
def _is_person_name(keyword: str) -> bool:
    return dictionary.vr_for_keyword(keyword) == "PN"


@cache
def _parsed(template: str) -> tuple[tuple, ...]:
    return tuple(string.Formatter().parse(template))


def template_fields(template: str) -> list[tuple[str, str]]:
    """The (field, format spec) pairs of a template, in order; a field may be a chain of
    fallbacks (``fallbacks``)."""
    return [
        (field, spec or "")
        for _, field, spec, _ in string.Formatter().parse(template)
        if field is not None
    ]


@dataclass(frozen=True)
class Fallbacks:
    """What one field of a template renders: the first of ``keywords`` whose value is not
    empty, else ``text`` (a quoted literal, last in the chain), else the placeholder.
    ``problem`` says why the field cannot be used (None when it can)."""

    keywords: tuple[str, ...]
    text: str | None = None
    problem: str | None = None


_QUOTES = "\"'"


@cache
def fallbacks(field: str) -> Fallbacks:
    """The chain of a field: ``PatientName|PatientID`` or ``StudyDate|"no date"``."""
    keywords: list[str] = []
    rest = field
    while True:
        if rest[:1] in _QUOTES and rest:
            quote = rest[0]
            text, closed, after = rest[1:].partition(quote)
            if not closed:
                problem = (
                    f"has the fallback text {rest} without its closing {quote} (a fallback "
                    "text cannot hold ':', '!', '{' or '}')"
                )
            elif after:
                quoted = f"{quote}{text}{quote}"
                problem = f"has {after!r} after the fallback text {quoted}, which is always used"
            elif not text.strip():
                problem = (
                    f"has an empty fallback text {quote}{text}{quote}; leave it out for the "
                    "placeholder"
                )
            elif not is_safe_component(text) or text != text.strip():
                problem = (
                    f"has the fallback text {quote}{text}{quote}, which is not a valid file name "
                    "on every system; use letters, digits, spaces, '-' or '_'"
                )
            else:
                return Fallbacks(tuple(keywords), text)
            return Fallbacks(tuple(keywords), None, problem)
        keyword, bar, rest = rest.partition(FALLBACK)
        keyword = keyword.strip()
        if not keyword:
            what = (
                "an empty field '{}'"
                if not field.strip()
                else f"an empty fallback in '{{{field}}}'"
            )
            return Fallbacks(tuple(keywords), None, f"has {what}")
        keywords.append(keyword)
        if not bar:
            return Fallbacks(tuple(keywords))
        rest = rest.strip()


def template_keywords(template: str) -> list[str]:
    """Every keyword a template reads (DICOM keywords and FILE_FIELDS), each once, in order."""
    return list(
        dict.fromkeys(
            k for field, _ in template_fields(template) for k in fallbacks(field).keywords
        )
    )


def template_problems(template: str, one_name: bool = False) -> list[str]:
    """Why a template cannot be used (empty list when it can). ``one_name``: the template
    names one file (the file template), so a '/' of its own is refused, not made '_'."""
    try:
        fields = template_fields(template)
        literals = [literal for literal, *_ in _parsed(template)]
    except ValueError as error:
        return [f"not a valid template ({error})"]
    if one_name and any("/" in literal for literal in literals):
        return ["contains '/', but it names one file; put folders in folder_template"]
    problems = []
    if not fields:
        problems.append("uses no field in braces, so every file would get the same name")
    for field, _ in fields:
        chain = fallbacks(field)
        if chain.problem:
            problems.append(chain.problem)
        problems.extend(
            f"uses '{{{keyword}}}', which is not a DICOM keyword "
            f"(examples: PatientID, SeriesNumber, StudyDate) nor one of {sorted(FILE_FIELDS)}"
            for keyword in chain.keywords
            if keyword not in FILE_FIELDS and dictionary.tag_for_keyword(keyword) is None
        )
    if template.startswith("/") or any(part in ("..", ".") for part in template.split("/")):
        problems.append("must be a relative path without '.' or '..' components")
    elif "" in template.split("/"):
        problems.append("has an empty folder level ('//' or a '/' at its end)")
    return problems


def _format_value(value: str, spec: str) -> str:
    """Apply a format spec such as ``03d`` to a header string, falling back to the text."""
    if not spec:
        return value
    kind = spec[-1]
    try:
        if kind in "dxXobn":
            return format(int(float(value)), spec)
        if kind in "eEfFgG%":
            return format(float(value), spec)
        return format(value, spec)
    except (ValueError, TypeError, OverflowError):
        return value


def render_path(template: str, values: Mapping[str, str | None], placeholder: str) -> str:
    """Render a template into a relative path of safe components, joined by ``/``.

    Only the template's own ``/`` separate folders: a ``/`` inside a header value is made
    safe with the rest of that value, so no tag can add, remove or escape a folder.
    """
    # Each component as (its pieces made safe, its pieces as they came).
    components: list[tuple[list[str], list[str]]] = [([], [])]
    for literal, field, spec, _ in _parsed(template):
        for index, chunk in enumerate(literal.split("/")):
            if index:
                components.append(([], []))
            components[-1][0].append(chunk)
            components[-1][1].append(chunk)
        if field is None:
            continue
        keyword, value = _first_value(fallbacks(field), values)
        if value is None:
            safe = text = safe_component(placeholder)
        else:
            text = value
            if _is_person_name(keyword):
                text = render_person_name(text)
            text = _format_value(text, spec)
            # Values are made safe on their own first, so a separator inside a value stays
            # text.
            safe = safe_value(text, keep_extension=keyword == "filename")
        components[-1][0].append(safe)
        components[-1][1].append(text)
    return "/".join(_component(safe, raw, placeholder) for safe, raw in components)


def _first_value(chain: Fallbacks, values: Mapping[str, str | None]) -> tuple[str, str | None]:
    """(keyword, value) of the first fallback with a value that is not empty or blank;
    ("", text) for the chain's text; ("", None) when there is none (the placeholder)."""
    for keyword in chain.keywords:
        value = values.get(keyword)
        if value is not None and str(value).strip() != "":
            return keyword, str(value)
    return "", chain.text


def _component(safe_pieces: list[str], raw_pieces: list[str], placeholder: str) -> str:
    """One component of a rendered path, with at most one ``~<hash>``: the values' own when
    that is all it needs, else one of the whole component as it came (a value's hash and
    then another for a leading dot would say the same thing twice)."""
    name = "".join(safe_pieces)
    if safe_pieces == raw_pieces or is_safe_component(name):
        return safe_component(name, placeholder)
    return safe_component("".join(raw_pieces), placeholder)


def top_level(template: str) -> str:
    """The part of a folder template that renders the top-level folder."""
    pieces = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        head, slash, _ = literal.partition("/")
        pieces.append(head.replace("{", "{{").replace("}", "}}"))
        if slash:
            break
        if field is not None:
            pieces.append(
                "{"
                + field
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
    return "".join(pieces)


def top_level_from_headers(settings: Naming) -> bool:
    """Is the top-level folder rendered from header values only (partitions can split)?"""
    return not set(template_keywords(top_level(settings.folder_template))) & FILE_FIELDS.keys()
