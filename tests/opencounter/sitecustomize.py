"""Test helper: log every file a Python process opens below DCMSORT_OPEN_ROOT.

Put on PYTHONPATH by the tests, it is loaded by snakemake and by every job it starts, so a
test can tell exactly which input files a run opened (stat is not an open).
"""

import os
import sys

_log_path = os.environ.get("DCMSORT_OPEN_LOG")
_root = os.environ.get("DCMSORT_OPEN_ROOT")

if _log_path and _root:
    _fd = os.open(_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _prefix = os.path.join(os.path.realpath(_root), "")

    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path.startswith(_prefix):
                os.write(_fd, (path[len(_prefix) :] + "\n").encode("utf-8", "surrogateescape"))

    sys.addaudithook(_hook)
