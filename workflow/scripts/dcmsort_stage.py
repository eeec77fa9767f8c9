"""Run one dcmsort stage from this checkout: ``python dcmsort_stage.py <stage> [args]``.

The lean entry point of every job: it puts this checkout's ``src`` first on the import path
(so jobs run the workflow's own code, installed or not) and imports nothing else.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
stage = sys.argv.pop(1)
runpy.run_module(f"dcmsort.{stage}", run_name="__main__", alter_sys=True)
