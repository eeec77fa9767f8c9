"""dcmsort.dictionary answers as pydicom's own data dictionary does, without importing it."""

import subprocess
import sys

from pydicom.datadict import dictionary_VR, keyword_dict

from dcmsort import dictionary


def test_every_keyword_has_pydicoms_tag_and_vr():
    assert len(keyword_dict) > 4000
    for keyword, tag in keyword_dict.items():
        if not keyword:  # entries without a keyword: no template can name them
            continue
        assert dictionary.tag_for_keyword(keyword) == tag, keyword
        assert dictionary.vr_for_keyword(keyword) == dictionary_VR(tag), keyword
    assert dictionary.tag_for_keyword("NotADicomKeyword") is None
    assert dictionary.vr_for_keyword("NotADicomKeyword") is None


def test_the_dictionary_is_read_without_importing_pydicom():
    code = (
        "import sys; from dcmsort import dictionary; "
        "assert dictionary.vr_for_keyword('PatientName') == 'PN'; "
        "print('pydicom' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
