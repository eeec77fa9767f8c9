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


class _NoPandas:
    """No stage uses pandas, but pyarrow imports it (~0.45 s) on the first table it builds
    whenever it is installed (the SLURM executor plugin brings it along): here it is not
    found, and pyarrow goes on without it."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "pandas":
            raise ModuleNotFoundError("dcmsort jobs do not use pandas", name=name)


sys.meta_path.insert(0, _NoPandas)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
stage = sys.argv.pop(1)
runpy.run_module(f"dcmsort.{stage}", run_name="__main__", alter_sys=True)
