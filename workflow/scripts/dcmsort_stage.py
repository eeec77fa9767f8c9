"""Run one dcmsort stage from this checkout: ``python dcmsort_stage.py <stage> [args]``.

The lean entry point of every job: it puts this checkout's ``src`` first on the import path
(so jobs run the workflow's own code, installed or not) and imports nothing else.
"""

import os
import runpy
import sys
from pathlib import Path

# Arrow's default pool (mimalloc) keeps freed memory: measured at 100,000 files, the report
# job peaked at 346 MB with it and 239 MB with the system allocator, for the same work.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


class _Unused:
    """Modules no stage uses, which would be imported anyway when installed: pyarrow imports
    numpy (~0.12 s) at its own import and pandas (~0.45 s) on the first table it builds
    (the SLURM executor plugin brings pandas along), pydicom imports numpy. Here they are
    not found, and pyarrow and pydicom go on without them (header values are the same:
    tests/test_workflow.py runs every job through this file)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in ("pandas", "numpy"):
            raise ModuleNotFoundError(f"dcmsort jobs do not use {name}", name=name)


sys.meta_path.insert(0, _Unused)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
stage = sys.argv.pop(1)
runpy.run_module(f"dcmsort.{stage}", run_name="__main__", alter_sys=True)
