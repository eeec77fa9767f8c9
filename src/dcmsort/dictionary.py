"""DICOM keywords with their tags and VRs: pydicom's data dictionary, without pydicom.

Importing pydicom costs ~0.26 s (it brings numpy and its pixel handlers along). The
Snakefile checks the templates' keywords at every start (and in every cluster job), the plan
needs to know which fields are person names, and the extract job needs tags and VRs before
it knows whether any file needs pydicom at all. pydicom's dictionary is a module of plain
literals; loaded on its own it takes ~10 ms.
"""

from __future__ import annotations

import difflib
import importlib.util
from functools import cache
from pathlib import Path

# Tags every manifest has; templates, filters and catalog_tags may add more. Here, not in
# headers, so that the Snakefile knows them without importing pyarrow.
MANIFEST_TAGS = [
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "Modality",
]


@cache
def _by_keyword() -> dict[str, tuple[int, str]]:
    """keyword -> (tag, VR) of every entry with a keyword (as pydicom's keyword_dict)."""
    dictionary = None
    spec = importlib.util.find_spec("pydicom")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "_dicom_dict.py"
        module_spec = importlib.util.spec_from_file_location("dcmsort._pydicom_dict", path)
        if path.is_file() and module_spec and module_spec.loader:
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            dictionary = getattr(module, "DicomDictionary", None)
            break
    if dictionary is None:  # pydicom laid out otherwise: the slow, sure way
        from pydicom.datadict import DicomDictionary as dictionary
    return {entry[4]: (tag, entry[0]) for tag, entry in dictionary.items() if entry[4]}


def tag_for_keyword(keyword: str) -> int | None:
    entry = _by_keyword().get(keyword)
    return entry[0] if entry else None


def vr_for_keyword(keyword: str) -> str | None:
    entry = _by_keyword().get(keyword)
    return entry[1] if entry else None


def keywords() -> list[str]:
    """Every keyword of the dictionary (for a "did you mean" hint)."""
    return list(_by_keyword())


def keyword_hint(name: str) -> str:
    """`` (did you mean X?)`` for a name that is not a DICOM keyword, with the closest
    keyword, or "" when none is close."""
    close = difflib.get_close_matches(name, keywords(), 1)
    return f" (did you mean {close[0]}?)" if close else ""
